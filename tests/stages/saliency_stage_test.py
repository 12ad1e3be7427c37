"""The saliency stage on the tiny run: its files, its tables, resume per image, and the choice
of images."""

import csv
import json
import logging

import numpy as np
import pytest
import stages_test
import tiny_run

from tracin_jax import rundir
from tracin_jax import stages
from tracin_jax.stages import saliency as saliency_stage

staged = stages_test.staged  # the module fixture: every stage once on the tiny run


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_the_stage_writes_grids_tables_and_curves(staged):
  context, results = staged
  out = context.workdir / "saliency"
  result = results["saliency"]
  manifest = stages.read_manifest(context.workdir, "saliency")
  listed = {e["path"] for e in manifest["files"] + manifest["figures"]}
  for a_case, z in result.images:
    name = saliency_stage.tag(a_case, z)
    assert f"saliency/maps_{name}.npz" in listed
    with np.load(out / f"maps_{name}.npz") as f:
      assert f["maps"].shape == (4, 3, 16, 16, 4)  # methods x classes x image
      assert f["methods"].tolist() == list(stages_test.CONFIGS["saliency"].methods)
      assert f["instance_maps"].shape[1:] == (16, 16, 4)
      assert f["instance_masks"].shape[0] == f["instance_maps"].shape[0]
  assert any(p.startswith("saliency/grid_") for p in listed)
  assert any(p.startswith("saliency/tracin_") for p in listed)
  # The manifest says which image and class each grid shows: readers look grids up there.
  grids = rundir.saliency_grids(manifest)
  assert sorted(f["path"] for f in grids.values()) == sorted(
      p for p in listed if p.startswith("saliency/grid_"))
  for (a_case, z, cname), figure in grids.items():
    assert (a_case, z) in [(str(c), int(k)) for c, k in result.images]
    assert figure["path"] == "saliency/" + rundir.saliency_file("grid", a_case, z, cname)
  for name in ("modality_shares.png", "context_curves.png", "randomisation.png",
               "instances.csv", "instances.json", "faithfulness.csv", "faithfulness.json",
               "context_curves.json", "randomisation.json"):
    assert f"saliency/{name}" in listed and (out / name).stat().st_size > 0

  table = json.loads((out / "instances.json").read_text())
  rows = table["instances"]
  assert rows and {r["status"] for r in rows} <= {"TP", "FP", "FN"}
  for r in rows:
    assert r["size"] >= 6 and abs(sum(r["share"]) - 1) < 1e-6
    assert r["driver"].split()[0] in ("T1", "T1Gd", "T2", "FLAIR")
    assert set(r["measures"]["FLAIR"]) == {"inside", "ring1", "ring2"}
  with open(out / "instances.csv") as f:
    assert len(list(csv.DictReader(f))) == len(rows)
  curves = json.loads((out / "context_curves.json").read_text())["curves"]
  assert len(curves) == len(rows) and all(len(c["probability"]) == 4 for c in curves)

  faith = json.loads((out / "faithfulness.json").read_text())
  methods = {r["method"] for r in faith["summary"]}
  assert methods == set(stages_test.CONFIGS["saliency"].methods) | {"random"}
  for r in faith["rows"]:
    # Completeness only for the path methods; none for the Grad-CAM family.
    assert (r["completeness_error"] is not None) == (r["method"] == "integrated_gradients")
    assert 0 <= r["relevance_mass"] <= 1 if r["relevance_mass"] is not None else True
  rand = json.loads((out / "randomisation.json").read_text())["methods"]
  assert set(rand) == {"vanilla_gradient", "grad_cam_plus_plus"}
  assert rand["vanilla_gradient"]["layers"][0] == "head"
  assert manifest["headline"]["instances"]["TP"] == sum(r["status"] == "TP" for r in rows)


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_an_interrupted_stage_resumes_from_its_saved_images(staged, caplog):
  context, results = staged
  (context.workdir / "saliency" / "manifest.json").unlink()
  again = stages_test._context(context.workdir)  # pylint: disable=protected-access
  config = stages_test.CONFIGS["saliency"]
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    rerun = stages.run_stage(stages.get_stage("saliency", config), again)
  n = len(results["saliency"].images)
  assert caplog.text.count("methods x 3 classes reused") == n
  assert caplog.text.count("faithfulness reused") == n
  assert "cascading randomisation reused" in caplog.text
  assert rerun.instances == results["saliency"].instances
  assert rerun.faithfulness == results["saliency"].faithfulness


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_named_images_and_a_clear_error_for_unknown_ones(staged):
  context, _ = staged
  case, z = tiny_run.VAL.ids[1]
  with pytest.raises(stages.StageError, match="--saliency_images: nope:3 not among"):
    saliency_stage._resolve_images(  # pylint: disable=protected-access
        saliency_stage.SaliencyConfig(images=("nope:3",)), tiny_run.VAL.ids)
  assert saliency_stage._resolve_images(  # pylint: disable=protected-access
      saliency_stage.SaliencyConfig(images=(f"{case}:{z}",)), tiny_run.VAL.ids) == [1]


def test_choose_images_wants_all_classes_a_false_positive_and_a_false_negative():
  ids = [("a", 0), ("a", 1), ("b", 0), ("c", 0), ("d", 0)]
  presence = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 1]], bool)
  counts = [{"FP": 0, "FN": 0}, {"FP": 1, "FN": 1}, {"FP": 0, "FN": 2}, {"FP": 0, "FN": 0},
            {"FP": 5, "FN": 5}]
  sizes = np.array([50, 10, 20, 40, 99])
  # The FP image (the only full one with a FP), then a FN image of another case, then the
  # largest full image of a third case (not 0: case a has one already); image 4 lacks a
  # class and is not chosen while full images remain.
  assert saliency_stage.choose_images(ids, presence, counts, sizes, 3) == [1, 2, 3]
  assert saliency_stage.choose_images(ids, presence, counts, sizes, 4) == [1, 2, 3, 0]
  assert saliency_stage.choose_images(ids, presence, counts, sizes, 1) == [1]
  none = np.zeros_like(presence)
  assert saliency_stage.choose_images(ids, none, counts, sizes, 2) == [4, 2]



def test_the_per_image_outputs_are_named_as_the_run_directory_names_them():
  """The stage's templates for files per image and class give `rundir.saliency_file`'s
  names, awkward case ids and class names included (readers find the files by those)."""
  per_image = {o.name.split("_{image}")[0]: o for o in saliency_stage.SaliencyStage.writes
               if "{image}" in o.name}
  assert sorted(per_image) == ["grid", "information_flow", "maps", "tracin"]
  for case, z, cname in (("BraTS 1/2", 7, "NCR/NET"), ("v0", 0, "ED")):
    fields = saliency_stage._image_fields(case, z, cname)  # pylint: disable=protected-access
    for kind, output in per_image.items():
      per_class = "{class_file}" in output.name
      assert output.path(**fields) == rundir.saliency_file(
          kind, case, z, cname if per_class else None,
          ".npz" if kind == "maps" else ".png"), kind


def test_a_reference_preset_takes_its_own_counts_and_refuses_changed_ones():
  config = saliency_stage.SaliencyConfig
  assert saliency_stage.preset_counts(config(ig_steps=4)) == {
      "ig_steps": 4, "guided_ig_steps": 200, "smoothgrad_samples": 25}
  assert saliency_stage.preset_counts(config(preset="neuroxai")) == {
      "ig_steps": None, "guided_ig_steps": None, "smoothgrad_samples": None}
  with pytest.raises(stages.StageError, match="--smoothgrad_samples=2 would be ignored"):
    saliency_stage.preset_counts(config(preset="ies", smoothgrad_samples=2))
