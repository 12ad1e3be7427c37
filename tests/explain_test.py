"""Explaining new images from the influence stage's gradient store, on the tiny run."""

import json

import numpy as np
import pytest
import tiny_run

from tracin_jax import explain
from tracin_jax import stages
from tracin_jax.influence import core
from tracin_jax.influence import layout
from tracin_jax.influence import segmentation
from tracin_jax.influence import store as store_lib
from tracin_jax.stages import influence as influence_stage

# The stage tests' settings (tests/stages/stages_test.py): one run serves both modules.
CONFIGS = {"train": tiny_run.CONFIG,
           "influence": influence_stage.InfluenceConfig(threshold=0.5, top_k=3, global_top=3,
                                                        num_local_panels=1)}


@pytest.fixture(scope="module")
def influenced(full_run):
  context = stages.Context(full_run[0], tiny_run.TRAIN, tiny_run.VAL,
                           data_name="tiny test set", configs=CONFIGS, progress=False)
  for name in ("train", "influence"):
    result = stages.run_stage(stages.get_stage(name, CONFIGS[name]), context)
  return context, result


def test_the_stage_writes_a_complete_store(influenced):
  context, _ = influenced
  store = store_lib.open_store(context.workdir / "influence" / "store")
  assert store.is_complete() and store.num_examples == len(tiny_run.TRAIN)
  assert store.meta["projection"]["kind"] == "countsketch"
  assert store.meta["example_ids"][0] == "{}:{}".format(*tiny_run.TRAIN.ids[0])
  headline = stages.read_manifest(context.workdir, "influence")["headline"]
  assert headline["store"]["bytes"] == store.nbytes() > 0


def test_explaining_an_image_equals_influence_with_the_store_projection(influenced, tmp_path):
  context, inf = influenced
  store = store_lib.open_store(context.workdir / "influence" / "store")
  run = explain.load_run(context.workdir)
  a = int(np.argmax(inf.presence_test.sum(1)))
  result = explain.explain_image(context.workdir, tiny_run.VAL.images[a], name="val", k=3)
  train_ex = influence_stage._examples(tiny_run.TRAIN, inf.train_regions)  # pylint: disable=protected-access
  image = tiny_run.VAL.images[a:a + 1]
  # An unlabelled image's region losses take the model's own prediction as target.
  own = np.argmax(np.asarray(segmentation.call_model(run.final_apply, run.params, image,
                                                     run.state)), -1).astype(np.int32)
  val_ex = {"image": image, "target": own, "region": inf.val_regions[a:a + 1]}
  expect = core.influence(run.loss_fn, run.checkpoints, train_ex, val_ex,
                          projection=store.projection)
  expect = layout.to_class_blocks(segmentation.mask_absent(
      expect, inf.presence_test[a:a + 1], inf.presence_train))
  np.testing.assert_allclose(result.blocks, expect, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(result.regions, inf.val_regions[a])
  assert {e["class"] for e in result.proponents} == {
      influence_stage.CLASS_NAMES[i] for i in np.flatnonzero(inf.presence_test[a])}
  paths = explain.write_explanation(result, tmp_path, tiny_run.TRAIN,
                                    train_regions=inf.train_regions, k=3)
  assert [p.name for p in paths] == ["val.json", "val.png"]
  written = json.loads(paths[0].read_text())
  assert written["explanations"] == json.loads(json.dumps(result.proponents))
  assert written["method"] == {"renormalised": False, "projection": store.meta["projection"],
                               "checkpoints": [c["name"] for c in store.meta["checkpoints"]]}


def test_an_exact_store_gives_the_stage_scores(influenced, tmp_path):
  context, inf = influenced
  run = explain.load_run(context.workdir)
  train_ex = influence_stage._examples(tiny_run.TRAIN, inf.train_regions)  # pylint: disable=protected-access
  val_ex = influence_stage._examples(tiny_run.VAL, inf.val_regions)  # pylint: disable=protected-access
  exact = store_lib.build_store(tmp_path / "exact", run.loss_fn, run.checkpoints, train_ex)
  scores = exact.influence(run.loss_fn, run.checkpoints, val_ex)
  blocks = layout.to_class_blocks(segmentation.mask_absent(scores, inf.presence_test,
                                                           inf.presence_train))
  np.testing.assert_allclose(blocks, inf.test_blocks, rtol=2e-4, atol=1e-6)
  train_blocks = layout.to_class_blocks(segmentation.mask_absent(
      exact.train_influence(), inf.presence_train, inf.presence_train))
  np.testing.assert_allclose(train_blocks, inf.train_blocks, rtol=2e-4, atol=1e-6)


def test_bad_images_and_missing_stores_are_named(influenced, tmp_path):
  context, _ = influenced
  with pytest.raises(ValueError, match=r"image must be \["):
    explain.explain_image(context.workdir, tiny_run.VAL.images[0][:-1])
  with pytest.raises(FileNotFoundError, match="no gradient store"):
    explain.explain_image(tmp_path, tiny_run.VAL.images[0])


def _unlabelled_case(root, rng):
  """A BraTS 2021-layout case of 20 x 18 x 5 voxels, no segmentation: each axial slice's
  centre 16 x 16 (the crop) holds a tiny-run validation image's intensities."""
  import nibabel  # pylint: disable=g-import-not-at-top

  case_id = "BraTS2021_00099"
  case_dir = root / case_id
  case_dir.mkdir(parents=True)
  affine = np.diag([1.0, 1.0, 2.0, 1.0])
  volumes = np.zeros((4, 20, 18, 5), np.float32)
  for z in range(5):
    volumes[:, 2:18, 1:17, z] = np.moveaxis(tiny_run.VAL.images[z % 4], -1, 0) + 2.0
  volumes += rng.uniform(0.0, 0.01, size=volumes.shape).astype(np.float32)
  for k, kind in enumerate(("t1", "t1ce", "t2", "flair")):
    nibabel.Nifti1Image(volumes[k], affine).to_filename(case_dir / f"{case_id}_{kind}.nii.gz")
  return case_dir


@pytest.mark.slow  # the tiny run's store
def test_an_unlabelled_scan_is_explained_and_written_back_on_its_grid(influenced, tmp_path):
  """A case folder without a segmentation: every axial slice predicted and explained
  against the store, Grad-CAM on the slice with the most tumour, the volumes written under
  the run with the input's affine and shape, nothing written beside the input."""
  import nibabel  # pylint: disable=g-import-not-at-top

  from tracin_jax import patient  # pylint: disable=g-import-not-at-top
  from tracin_jax.data import brats  # pylint: disable=g-import-not-at-top

  context, _ = influenced
  case_dir = _unlabelled_case(tmp_path / "scans", np.random.default_rng(0))
  before = sorted(p.name for p in case_dir.iterdir())
  result = patient.explain_case(
      context.workdir, case_dir, brats.PreprocessConfig(crop_size=16), tiny_run.TRAIN,
      slices="all", k=2, saliency_methods=("grad_cam",),
      out_dir=tmp_path / "run" / "export" / "BraTS2021_00099")
  assert sorted(p.name for p in case_dir.iterdir()) == before
  assert (result.slices.labels == -1).all() and len(result.slices) == 5
  source = nibabel.load(case_dir / "BraTS2021_00099_t1.nii.gz")
  written = {p.name: nibabel.load(p) for p in result.paths if p.name.endswith(".nii.gz")}
  assert "prediction.nii.gz" in written and "saliency_grad_cam_ET.nii.gz" in written
  for image in written.values():
    np.testing.assert_array_equal(image.affine, source.affine)
    assert image.shape == source.shape
  labels = np.asarray(written["prediction.nii.gz"].dataobj)
  for z in range(5):  # the prediction, ET written as BraTS 2021's label 4
    np.testing.assert_array_equal(labels[2:18, 1:17, z],
                                  np.where(result.predicted[z] == 3, 4, result.predicted[z]))
  assert not labels[:2].any() and not labels[:, 17:].any()
  present = [a for a in range(5) if result.regions[a].any()]
  assert [len(e) > 0 for e in result.explanations] == [a in present for a in range(5)]
  assert len(result.saliency_slices) == (1 if present else 0)
  out = tmp_path / "run" / "export" / "BraTS2021_00099"
  record = json.loads((out / "explanation.json").read_text())
  assert record["ground_truth"] is False and record["layout"] == "brats2021"
  page = (out / "viewer.html").read_text()
  assert "prediction" in page and (out / "static" / "niivue.umd.js").exists()
  # The report's viewer of such a folder: the files read back, on the scan's grid.
  from tracin_jax import report  # pylint: disable=g-import-not-at-top

  z = present[0] if present else 0
  shown = report.export_viewer(tmp_path / "run", "BraTS2021_00099", z)
  names = [v.name for v in shown.volumes]
  assert names[:5] == ["FLAIR", "T1", "T1Gd", "T2", "prediction"]
  assert "ground truth" not in names  # the folder has none
  np.testing.assert_array_equal(shown.volumes[4].data, result.predicted.transpose(1, 2, 0))
  np.testing.assert_array_equal(shown.volumes[0].affine[:, 3], source.affine @ [2, 1, 0, 1])
  assert shown.focus[2] == z
