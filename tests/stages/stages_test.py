"""Each stage on the tests' tiny training run: outputs, manifest, load, reuse and resume."""

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import tiny_run

from tracin_jax import stages
from tracin_jax.influence import layout
from tracin_jax.stages.export import ExportConfig
from tracin_jax.stages.influence import InfluenceConfig
from tracin_jax.stages.interpret import InterpretConfig
from tracin_jax.stages.lds import LdsConfig
from tracin_jax.stages.report import ReportConfig
from tracin_jax.stages.saliency import SaliencyConfig
from tracin_jax.stages.validate import ValidateConfig

CONFIGS = {
    "train": tiny_run.CONFIG,
    "influence": InfluenceConfig(threshold=0.5, top_k=3, global_top=3, num_local_panels=1),
    "interpret": InterpretConfig(batch_size=8),
    "saliency": SaliencyConfig(
        num_images=2, methods=("vanilla_gradient", "integrated_gradients", "smoothgrad",
                               "grad_cam_plus_plus"), ig_steps=4, smoothgrad_samples=2,
        instance_samples=2, rings=2, context_dilations=3, deletion_patch=2, deletion_steps=4,
        randomisation_methods=("vanilla_gradient", "grad_cam_plus_plus")),
    "export": ExportConfig(cases=2, methods=("smoothgrad", "grad_cam_plus_plus")),
    "validate": ValidateConfig(regions_per_class=1, num_removed=2, num_random=1,
                               randomisation_examples=6),
    "lds": LdsConfig(num_subsets=2, variants=("tracin", "random"), removal_k=(),
                     num_bootstrap=10, ceiling_subsets=0),
    "report": ReportConfig(pages=3, top=2),
}


def _context(workdir):
  return stages.Context(workdir, tiny_run.TRAIN, tiny_run.VAL, data_name="tiny test set",
                        configs=CONFIGS, progress=False)


@pytest.fixture(scope="module")
def staged(full_run):
  """Every stage run once in order on the tiny run: (context, {name: result})."""
  context = _context(full_run[0])
  results = {name: stages.run_stage(stages.get_stage(name, CONFIGS[name]), context)
             for name in stages.list_stages()}
  return context, results


def test_registry_order_and_needs():
  assert stages.list_stages() == ("train", "influence", "interpret", "saliency", "export",
                                  "validate", "lds", "report")
  for name in stages.list_stages():
    stage = stages.get_stage(name)
    assert isinstance(stage, stages.Stage)
    assert all(stages.list_stages().index(n) < stages.list_stages().index(name)
               for n in stage.needs)
  with pytest.raises(ValueError, match="Unknown stage 'trian'"):
    stages.get_stage("trian")


def assert_same(ran, loaded, where: str) -> None:
  """A stage's result as it ran equals the result its `load` read back: arrays exactly (NaN
  equal to NaN; JSON gives lists for tuples, float64 for float32), model functions
  callable on both sides, pytrees leaf by leaf, manifests as written."""
  if isinstance(ran, stages.Manifest):
    ran, loaded = (json.loads(json.dumps(stages.base.outputs.plain(dataclasses.asdict(m))))
                   for m in (ran, loaded))
  if dataclasses.is_dataclass(ran) and not isinstance(ran, type):
    assert type(loaded) is type(ran), (where, type(loaded))
    for field in dataclasses.fields(ran):
      assert_same(getattr(ran, field.name), getattr(loaded, field.name),
                  f"{where}.{field.name}")
  elif callable(ran) and not hasattr(ran, "shape"):
    assert callable(loaded), where
  elif isinstance(ran, dict):
    assert sorted(map(str, ran)) == sorted(map(str, loaded)), where
    keyed = {str(k): v for k, v in loaded.items()}
    for key, value in ran.items():
      assert_same(value, keyed[str(key)], f"{where}[{key!r}]")
  elif isinstance(ran, (list, tuple)):
    assert isinstance(loaded, (list, tuple)) and len(ran) == len(loaded), where
    for k, (x, y) in enumerate(zip(ran, loaded)):
      assert_same(x, y, f"{where}[{k}]")
  elif ran is None or isinstance(ran, (str, bool)):
    assert ran == loaded, (where, ran, loaded)
  elif isinstance(ran, (int, float, np.generic, np.ndarray)) or hasattr(ran, "shape"):
    np.testing.assert_array_equal(np.asarray(ran), np.asarray(loaded), err_msg=where)
  else:  # a pytree of arrays (a model's parameters or state)
    import jax  # pylint: disable=g-import-not-at-top

    x, y = jax.tree.leaves(ran), jax.tree.leaves(loaded)
    assert len(x) == len(y), where
    for k, (u, v) in enumerate(zip(x, y)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=f"{where} leaf {k}")


@pytest.mark.slow  # every stage, end to end, on the tiny run
@pytest.mark.parametrize("name", stages.list_stages())
def test_a_stage_reads_back_the_result_it_wrote(staged, name, tmp_path):
  """load(write(compute())) == compute(): the stage run again (its manifest removed, in a
  copy of the run, so that it computes and writes rather than loads; its saved parts make
  that quick), then read back by a new context from the files it wrote."""
  context, _ = staged
  workdir = tmp_path / "run"
  shutil.copytree(context.workdir, workdir)
  (workdir / name / stages.MANIFEST).unlink()
  ran = stages.run_stage(stages.get_stage(name, CONFIGS[name]), _context(workdir))
  loaded = stages.get_stage(name, CONFIGS[name]).load(_context(workdir))
  assert ran is not loaded
  assert_same(ran, loaded, name)


def test_the_comparison_of_results_can_fail():
  a = stages.Manifest("x", headline={"d": 0.5})
  assert_same(a, stages.Manifest("x", headline={"d": 0.5}), "same")
  for other in (stages.Manifest("x", headline={"d": 0.25}), stages.Manifest("y")):
    with pytest.raises(AssertionError):
      assert_same(a, other, "differs")
  with pytest.raises(AssertionError):
    assert_same({"a": np.array([1.0, np.nan])}, {"a": np.array([1.0, 2.0])}, "array")
  assert_same({"a": (1, np.float32(0.1))}, {"a": [1, float(np.float32(0.1))]}, "json")


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_every_stage_writes_a_manifest_listing_what_it_wrote(staged):
  context, results = staged
  for name in stages.list_stages():
    manifest = stages.read_manifest(context.workdir, name)
    assert manifest["stage"] == name and manifest["data"] == "tiny test set"
    assert manifest["fingerprint"] == results[name].manifest.fingerprint
    assert manifest["seconds"] >= 0 and manifest["versions"]["jax"]
    assert manifest["settings"] == json.loads(json.dumps(
        stages.base.outputs.plain(CONFIGS[name])))
    assert manifest["files"] and (manifest["figures"] or name == "report")
    for entry in manifest["files"] + manifest["figures"]:
      assert (context.workdir / entry["path"]).exists(), entry
      assert len(entry.get("description", entry.get("caption", ""))) > 20
  assert stages.read_manifest(context.workdir, "train")["headline"]["validation_dice"] == \
      results["train"].metrics["validation"]


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_influence_result_matches_its_files_and_load(staged):
  context, results = staged
  inf = results["influence"]
  n, v = len(tiny_run.TRAIN), len(tiny_run.VAL)
  assert inf.train_blocks.shape == (3, n, 3 * n) and inf.test_blocks.shape == (3, v, 3 * n)
  assert inf.epochs == [3, 4]
  with np.load(context.workdir / "influence" / "test_influence.npz") as f:
    np.testing.assert_array_equal(f["scores"], inf.test_blocks)
    assert str(f["dataset"]) == "tiny test set"
  scores = layout.from_class_blocks(inf.train_blocks)
  assert np.all(np.isnan(scores[~inf.presence_train]))
  loaded = stages.get_stage("influence", CONFIGS["influence"]).load(context)
  np.testing.assert_array_equal(loaded.train_blocks, inf.train_blocks)
  np.testing.assert_array_equal(loaded.val_regions, inf.val_regions)
  assert loaded.fingerprint == inf.fingerprint


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_interpret_and_validate_results(staged):
  context, results = staged
  fi = results["interpret"].fi
  assert fi.shape[:2] == (3, tiny_run.CONFIG.model.base_width)
  val = results["validate"]
  assert val.reproduces_run is True
  saved = json.loads((context.workdir / "validate" / "retraining.json").read_text())
  assert saved["num_removed"] == 2 and saved["dice_change"] == json.loads(
      json.dumps(val.summary["dice_change"]))
  loaded = stages.get_stage("validate", CONFIGS["validate"]).load(context)
  assert loaded.summary["dice_change"] == saved["dice_change"]
  # The cascade re-initialises one more layer per step, from the output down, and ends with
  # every layer random: the full randomisation check.
  check = json.loads((context.workdir / "validate" / "randomisation_check.json").read_text())
  order = check["cascade"]["order"]
  assert order[0] == "head" and order[-1] == "encoder[0]" and "last_hidden" in order[1:3]
  steps = check["cascade"]["steps"]
  assert [s["randomised"] for s in steps] == [order[:i + 1] for i in range(len(order))]
  assert steps[-1]["auc"] == check["randomised"]["auc"]
  assert check["without_output_layer"]["output_layer"] == "head"
  assert (context.workdir / "validate" / "randomisation_cascade.png").stat().st_size > 0


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_rerun_reuses_finished_stages_and_parts(staged, caplog):
  context, results = staged
  again = _context(context.workdir)
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    for name in stages.list_stages():
      stages.run_stage(stages.get_stage(name, CONFIGS[name]), again)
  assert caplog.text.count("reusing it") == len(stages.list_stages())
  np.testing.assert_array_equal(again.results["influence"].test_blocks,
                                results["influence"].test_blocks)

  # As after a kill before the manifest: the stage runs again, from its saved parts.
  (context.workdir / "influence" / "manifest.json").unlink()
  caplog.clear()
  third = _context(context.workdir)
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    rerun = stages.run_stage(stages.get_stage("influence", CONFIGS["influence"]), third)
  assert "checkpoint of epoch 3 (1/2) reused" in caplog.text
  assert "checkpoint of epoch 4 (2/2) reused" in caplog.text
  np.testing.assert_array_equal(rerun.test_blocks, results["influence"].test_blocks)
  assert rerun.fingerprint == results["influence"].fingerprint


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_a_changed_setting_reruns_the_stage_reusing_the_parts_it_does_not_change(
    staged, caplog):
  context, results = staged
  other = dict(CONFIGS, influence=dataclasses.replace(CONFIGS["influence"], top_k=2))
  ctx = stages.Context(context.workdir, tiny_run.TRAIN, tiny_run.VAL,
                       data_name="tiny test set", configs=other, progress=False)
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    rerun = stages.run_stage(stages.get_stage("influence", other["influence"]), ctx)
  assert "reusing it" not in caplog.text  # the stage ran again ...
  assert "checkpoint of epoch 4 (2/2) reused" in caplog.text  # ... on its saved TracIn sums
  assert rerun.fingerprint != results["influence"].fingerprint
  saved = json.loads((context.workdir / "influence" / "proponents.json").read_text())
  assert saved["k"] == 2
  assert all(len(e["proponents"]) <= 2 for e in saved["explanations"])
  # The stages after it see a changed input and run again too.
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    stages.run_stage(stages.get_stage("interpret", other["interpret"]), ctx)
  assert "interpret: inputs and settings unchanged" not in caplog.text
  stages.run_stage(stages.get_stage("influence", CONFIGS["influence"]),
                   _context(context.workdir))  # restore the module's run


def test_a_stage_whose_needs_have_not_run_is_refused(tmp_path):
  context = _context(tmp_path)
  with pytest.raises(stages.StageError, match="no finished influence stage"):
    stages.run_stage(stages.get_stage("interpret", CONFIGS["interpret"]), context)


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_a_finished_run_is_not_explained_on_other_data(staged):
  context, _ = staged
  fewer = stages.Context(context.workdir, tiny_run.TRAIN.subset(np.arange(10)), tiny_run.VAL,
                         configs=CONFIGS, progress=False)
  with pytest.raises(stages.StageError, match="differs from this one in data.*slices"):
    stages.run_stage(stages.get_stage("influence", CONFIGS["influence"]), fewer)


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_the_export_stage_puts_the_maps_back_on_each_cases_scan(staged):
  """The tiny run's slices lie at crop box (2, 1)-(18, 17) of a 20 x 18 x 2 scan: the
  volumes are on that grid, with its affine, the run's prediction in BraTS labels inside
  the box and nothing outside it; the influence lies inside the predicted regions."""
  import nibabel  # pylint: disable=g-import-not-at-top

  from tracin_jax import patient  # pylint: disable=g-import-not-at-top
  from tracin_jax.influence import segmentation  # pylint: disable=g-import-not-at-top

  context, results = staged
  export, influence = results["export"], results["influence"]
  first = list(dict.fromkeys(c for c, _ in results["saliency"].images))
  assert [c.case_id for c in export.cases][:len(first)] == first[:2]
  assert len(export.cases) == min(2, len(tiny_run.VAL.cases))
  for one in export.cases:
    folder = context.workdir / "export" / one.case_id
    names = {p.name for p in folder.iterdir()}
    assert {"prediction.nii.gz", "grid.npz", "check.png"} <= names
    assert {patient.saliency_file(m, c) for m in ("smoothgrad", "grad_cam_plus_plus")
            for c in patient.CLASS_NAMES} <= names
    written = nibabel.load(folder / "prediction.nii.gz")
    np.testing.assert_array_equal(written.affine, np.diag([1.0, 1.0, 2.0, 1.0]))
    labels = np.asarray(written.dataobj)
    assert labels.shape == (20, 18, 2) and set(np.unique(labels)) <= {0, 1, 2, 4}
    rows = [a for a, c in enumerate(tiny_run.VAL.case_ids) if c == one.case_id]
    _, predicted = segmentation.predict_regions_and_labels(
        influence.apply_fn, influence.params, tiny_run.VAL.images[rows],
        influence.threshold, state=influence.state)
    for a, z in zip(range(len(rows)), tiny_run.VAL.slice_indices[rows]):
      inside = labels[2:18, 1:17, z]
      np.testing.assert_array_equal(inside, np.where(predicted[a] == 3, 4, predicted[a]))
    outside = labels.copy()
    outside[2:18, 1:17] = 0
    assert not outside.any()
    et = np.asarray(nibabel.load(folder / patient.influence_file("ET")).dataobj)
    assert et.min() >= 0 and et.max() <= 1 + 1e-6
    assert not et[labels != 4].any()  # the ET support lies inside the predicted ET
