"""The run on volumes (`--spatial_dims=3`): settings, refusals and a tiny 3D run end to end.

The end-to-end run trains a tiny 3D UNet on five small BraTS-2019 cases written here
(48 x 48 x 24 voxels of 1 mm, 16^3 volumes of 2 mm), through `experiment.run` as the
command line does; one module-scoped run serves every test that reads it.
"""

import json
import logging
import pathlib
import re
import types

import nibabel
import numpy as np
import pytest
import tiny_run
from flax import nnx

from tracin_jax import experiment
from tracin_jax import patient
from tracin_jax import rundir
from tracin_jax import settings
from tracin_jax.cli import config_flags
from tracin_jax.data import constants
from tracin_jax.data import layouts
from tracin_jax.data import patient_space
from tracin_jax.data import volumes
from tracin_jax.influence import figures
from tracin_jax.stages import base
from tracin_jax.training import train as train_lib
from tracin_jax.training.checkpoints import CheckpointStore

ADAM_EPOCHS, SGD_EPOCHS = 2, 1
# TracIn of the head's parameters only, and no gradient store: the stage's path on volumes
# at a fraction of the full network's compile.
INFLUENCE_FLAGS = {"influence_params": "head", "nostore": None, "num_local_panels": 2}
# A gradient, a path and a layer method on one volume at a few steps and samples: the
# stage's path on volumes, not its numbers (the methods' 3D maps are checked in
# tests/saliency/saliency_volume_test.py).
SALIENCY_FLAGS = {"saliency_num_images": 1, "saliency_methods":
                  "vanilla_gradient,integrated_gradients,grad_cam",
                  "randomisation_methods": "vanilla_gradient,grad_cam",
                  "ig_steps": 2, "guided_ig_steps": 2,
                  "smoothgrad_samples": 2, "instance_samples": 2, "instance_max_voxels": 4,
                  "context_dilations": 2, "deletion_steps": 3, "deletion_patch": 4,
                  "saliency_rings": 1}
# Both validation volumes exported, with the saliency stage's gradient and layer methods.
EXPORT_FLAGS = {"export_cases": 2, "export_methods": "vanilla_gradient,grad_cam"}


def _config(workdir, cache, data_dir=None, **flags):
  """The ExperimentConfig of the tiny 3D run (flags as on the command line)."""
  argv = [f"--workdir={workdir}", f"--cache_dir={cache}", "--spatial_dims=3",
          "--volume_spacing=2", "--volume_size=16,16,16", "--num_val=2", "--base_width=4",
          "--depth=2", "--batch_size=2", "--eval_batch_size=2",
          f"--adam_epochs={ADAM_EPOCHS}", f"--sgd_epochs={SGD_EPOCHS}",
          "--adam_learning_rate=1e-2", "--noaugment"]
  if data_dir is not None:
    argv.append(f"--data_dir={data_dir}")
  argv += [f"--{k}" if v is None else f"--{k}={v}" for k, v in flags.items()]
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top

  fv = absl_flags.FlagValues()
  config_flags.define_app_flags(fv)
  holder = config_flags.define_flags(experiment.ExperimentConfig, fv)
  fv(["test", *argv])
  return holder.value()


def _write_case(root: pathlib.Path, name: str, seed: int) -> None:
  """A 1 mm case 48 x 48 x 24 (box brain, a nested tumour placed by `seed`) in the 2019
  layout."""
  rng = np.random.default_rng(seed)
  shape = (48, 48, 24)
  brain = np.zeros(shape, bool)
  brain[6:42, 6:42, 2:22] = True
  x, y = rng.integers(12, 26, size=2)
  seg = np.zeros(shape, np.uint8)
  seg[x:x + 12, y:y + 12, 6:18] = 2
  seg[x + 2:x + 10, y + 2:y + 10, 8:16] = 4
  seg[x + 4:x + 8, y + 4:y + 8, 10:14] = 1
  case_dir = root / "HGG" / name
  case_dir.mkdir(parents=True)
  for k, m in enumerate(constants.MODALITIES):
    v = np.where(brain, rng.uniform(100, 120, shape) * (k + 1), 0).astype(np.float32)
    v += 80.0 * (k + 1) * np.isin(seg, ((1, 2), (4,), (2,), (1, 2, 4))[k])
    nibabel.Nifti1Image(v, constants.BRATS_AFFINE).to_filename(case_dir / f"{name}_{m}.nii.gz")
  nibabel.Nifti1Image(seg, constants.BRATS_AFFINE).to_filename(
      case_dir / f"{name}_{constants.SEG_SUFFIX}.nii.gz")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("brats3d")
  for i in range(5):
    _write_case(root, f"BraTS19_V3_{i}", seed=i)
  return root


@pytest.fixture(scope="module")
def run3d(tmp_path_factory, data_dir):
  """The tiny 3D run (train, influence, then the report): its config, results and
  workdir."""
  base_dir = tmp_path_factory.mktemp("run3d")
  config = _config(base_dir / "run", base_dir / "cache", data_dir, **INFLUENCE_FLAGS)
  results = experiment.run(config, ["train", "influence"], progress=False)
  return config, results, base_dir / "run"


# ----------------------------------------------------------------------------- settings


def test_a_2d_run_keeps_its_record_and_fingerprint():
  """spatial_dims is left out of a 2D run's record: finished 2D runs are still reused."""
  record = train_lib.run_record(tiny_run.CONFIG, tiny_run.TRAIN, tiny_run.VAL)
  assert "spatial_dims" not in record["config"]["model"]
  key = base.inputs_key({"record": record,
                         "data": train_lib.data_fingerprint(tiny_run.TRAIN, tiny_run.VAL)})
  assert key == "686d8856d38b2004"  # the train stage's fingerprint before volumes existed


@pytest.mark.parametrize("dims", [2, 3])
def test_the_train_config_round_trips_its_rank(dims):
  config = train_lib.TrainConfig(model=train_lib.ModelConfig(spatial_dims=dims))
  d = config.to_dict()
  assert ("spatial_dims" in d["model"]) == (dims == 3)
  assert train_lib.TrainConfig.from_dict(json.loads(json.dumps(d))) == config


def test_conv3d_is_recorded_only_when_stacked(tmp_path):
  stacked = train_lib.TrainConfig(model=train_lib.ModelConfig(spatial_dims=3, conv3d="stacked"))
  d = stacked.to_dict()
  assert d["model"]["conv3d"] == "stacked"
  assert train_lib.TrainConfig.from_dict(json.loads(json.dumps(d))) == stacked
  direct = train_lib.TrainConfig(model=train_lib.ModelConfig(spatial_dims=3))
  assert "conv3d" not in direct.to_dict()["model"]  # 3D runs before the setting: reused
  model = nnx.eval_shape(lambda: train_lib.build_model(stacked.model))  # shapes only
  assert model.conv3d == "stacked" and type(model.encoder[0].conv1).__name__ == (
      "DepthStackedConv")
  experiment.check_config(_config(tmp_path / "w", tmp_path / "c", conv3d="stacked"))
  with pytest.raises(settings.SettingsError, match=r"^--conv3d=stacked: computes a 3D model's "
                     r"3x3x3 convolutions; it needs --spatial_dims=3 \(this run trains on "
                     r"slices, --spatial_dims=2\)\.$"):
    experiment.check_config(_config(tmp_path / "w", tmp_path / "c", spatial_dims=2,
                                    conv3d="stacked"))


def test_slices_given_to_a_3d_model_are_refused_naming_spatial_dims(tmp_path):
  config = train_lib.TrainConfig(model=train_lib.ModelConfig(spatial_dims=3))
  with pytest.raises(ValueError, match=r"--spatial_dims=3: the examples are slices"):
    train_lib.train(config, tiny_run.TRAIN, tiny_run.VAL, tmp_path / "w")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("flags,message", [
    ({"volume_size": "16,18,16"}, r"--volume_size=16,18,16: each side must be a multiple of "
                                  r"2\*\*depth = 4 \(--depth=2\), e\.g\. 16,16,16\.$"),
    ({"volume_size": "16,20,16", "depth": 3},
     r"--volume_size=16,20,16: each side .* = 8 \(--depth=3\), e\.g\. 16,16,16\.$"),
    ({"volume_size": ""}, r"--volume_size: required with --spatial_dims=3"),
])
def test_volume_sides_must_divide_by_two_to_the_depth(tmp_path, flags, message):
  experiment.check_config(_config(tmp_path / "w", tmp_path / "c"))  # 16,16,16 at depth 2
  with pytest.raises(settings.SettingsError, match=message):
    experiment.check_config(_config(tmp_path / "w", tmp_path / "c", **flags))


def test_stages_without_volumes_are_refused_by_name_before_any_work(tmp_path):
  config = _config(tmp_path / "w", tmp_path / "c")
  with pytest.raises(settings.SettingsError) as e:
    experiment.run(config, ["train", "validate"], progress=False)
  assert str(e.value) == (
      "--stages=train,validate: validate not supported yet with "
      "--spatial_dims=3 (volumes); run train,influence,saliency,export,report.")
  assert not (tmp_path / "w").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("name", ["demo3d", "smoke3d", "experiments/configs/demo3d.flags"])
def test_the_3d_flagfiles_are_packaged_and_valid(tmp_path, name):
  config, stages = config_flags.from_flagfile(
      experiment.ExperimentConfig, name, f"--workdir={tmp_path / 'w'}",
      f"--cache_dir={tmp_path / 'c'}")
  assert config.train.model.spatial_dims == 3 and stages[0] == "train"
  experiment.check_config(config)
  experiment.check_volume_stages(config, stages)


# ----------------------------------------------------------------------------- the run


@pytest.mark.slow
def test_the_3d_run_trains_on_volumes_and_writes_what_a_2d_run_does(run3d):
  config, results, workdir = run3d
  metrics = json.loads((workdir / "metrics.json").read_text())
  for split in ("train", "validation"):
    assert set(metrics[split]) == {"NCR/NET", "ED", "ET", "WT", "TC"}
    assert all(0.0 <= v <= 1.0 for v in metrics[split].values())
  assert metrics["num_train_cases"] == 3 and metrics["num_val_cases"] == 2
  assert results["train"].metrics == metrics
  assert (workdir / "training_curves.png").stat().st_size > 0
  store = CheckpointStore(workdir, create=False)
  try:
    assert store.epochs() == list(range(1, ADAM_EPOCHS + SGD_EPOCHS + 1))
  finally:
    store.close()
  record = train_lib.load_record(workdir)
  assert record["config"]["model"]["spatial_dims"] == 3
  assert record["image_shape"] == [16, 16, 16, 4] and record["num_train_slices"] == 3
  manifest = base.read_manifest(workdir, "train")
  assert manifest["headline"]["validation_dice"] == metrics["validation"]
  assert (workdir / "report" / "index.html").is_file()
  # The model is the 3D one: it maps a volume to a volume of logits.
  model, _ = train_lib.load_model(workdir)
  train_set, _ = experiment.load_data(config.data, spatial_dims=3, progress=False)
  assert isinstance(train_set, volumes.VolumeSet)
  pred = train_lib.predict_classes(model, train_set.images[:1], 1)
  assert pred.shape == (1, 16, 16, 16)


@pytest.mark.slow
def test_the_finished_3d_run_is_reused_and_other_data_are_refused(run3d, caplog):
  config, _, workdir = run3d
  before = (workdir / "checkpoints").stat().st_mtime_ns, (workdir / "metrics.json").read_bytes()
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    experiment.run(config, ["train", "influence"], progress=False)
  for name in ("train", "influence"):  # the influence stage's results read back from volumes
    assert f"{name}: inputs and settings unchanged" in caplog.text
  assert before == ((workdir / "checkpoints").stat().st_mtime_ns,
                    (workdir / "metrics.json").read_bytes())
  other = _config(workdir, config.data.cache_dir, config.data.data_dir, volume_spacing=3)
  with pytest.raises(train_lib.RunMismatchError, match="image shape|data"):
    experiment.run(other, ["train"], progress=False)


@pytest.mark.slow
def test_the_3d_influence_stage_explains_validation_volumes_by_training_volumes(run3d):
  config, results, workdir = run3d
  train_set, val_set = experiment.load_data(config.data, spatial_dims=3, progress=False)
  n_train, n_val = len(train_set), len(val_set)
  out = workdir / "influence"
  with np.load(out / "train_influence.npz") as f:
    assert f["scores"].shape == (3, n_train, 3 * n_train)
    assert f["train_case_ids"].tolist() == train_set.cases
    assert f["train_slice_indices"].tolist() == [volumes.NO_SLICE] * n_train
  with np.load(out / "test_influence.npz") as f:
    assert f["scores"].shape == (3, n_val, 3 * n_train)
    assert f["test_case_ids"].tolist() == val_set.cases
  result = results["influence"]
  assert result.train_regions.shape == (n_train, 16, 16, 16, 3)
  names = list(result.class_names)
  explanations = json.loads((out / "proponents.json").read_text())["explanations"]
  assert explanations and all(e["proponents"] for e in explanations)
  for e in explanations:  # every slice named is the one its region's figure draws
    a = val_set.cases.index(e["case"])
    assert e["slice"] == figures.representative_slice(
        result.val_regions[a][..., names.index(e["class"])])
    for entry in e["proponents"] + e["opponents"]:
      b = train_set.cases.index(entry["case"])
      region = result.train_regions[b][..., names.index(entry["class"])]
      assert region.any() and entry["slice"] == figures.representative_slice(region)
  manifest = base.read_manifest(workdir, "influence")
  drawn = manifest["headline"]["local_panel_slices"]
  assert drawn and set(drawn) <= set(val_set.cases)
  panels = [f["path"] for f in manifest["figures"] if "/local_" in f["path"]]
  assert len(panels) == len(drawn)
  for case in drawn:  # named by the slice of the volume's regions' largest cross-section
    a = val_set.cases.index(case)
    z = figures.representative_slice(result.val_regions[a].any(axis=-1))
    assert f"influence/local_{case}_{z}.png" in panels
    assert (workdir / f"influence/local_{case}_{z}.png").stat().st_size > 0
  for name in ("train_influence.png", "proponent_classes.png", "self_influence.png"):
    assert (out / name).stat().st_size > 0
  index = (workdir / "report" / "index.html").read_text()  # the report's index shows them
  assert all(path in index for path in panels + ["influence/train_influence.png"])


@pytest.fixture(scope="module")
def saliency3d(run3d):
  """The saliency stage on the tiny 3D run (train and influence reused)."""
  config, _, workdir = run3d
  config = _config(workdir, config.data.cache_dir, config.data.data_dir, **INFLUENCE_FLAGS,
                   **SALIENCY_FLAGS)
  results = experiment.run(config, ["train", "influence", "saliency"], progress=False)
  return config, results, workdir


@pytest.mark.slow
def test_the_3d_saliency_stage_explains_a_volume_keyed_by_its_case(saliency3d):
  config, results, workdir = saliency3d
  result, influence = results["saliency"], results["influence"]
  _, val_set = experiment.load_data(config.data, spatial_dims=3, progress=False)
  (case, z), = result.images
  assert z == volumes.NO_SLICE and case in val_set.cases
  methods = config.saliency.methods
  maps, = result.maps
  assert maps.maps.shape == (len(methods), 3, 16, 16, 16, 4)
  assert np.isfinite(maps.maps).all() and np.abs(maps.maps).max() > 0
  out = workdir / "saliency"
  with np.load(out / f"maps_{case}.npz") as f:  # named by the case alone
    np.testing.assert_array_equal(f["maps"], maps.maps)
    assert f["instance_masks"].shape[1:] == (16, 16, 16)
    assert f["instance_maps"].shape[1:] == (16, 16, 16, 4)
  manifest = base.read_manifest(workdir, "saliency")
  val_regions = influence.val_regions[val_set.cases.index(case)]
  grids = [f for f in manifest["figures"] if f.get("kind") == "saliency_grid"]
  assert grids
  names = list(influence.class_names)
  for g in grids:  # drawn at the region's largest axial slice, recorded
    regions = val_regions[..., names.index(g["class"])]
    assert g["slice"] == volumes.NO_SLICE and g["case"] == case
    assert g["axial_slice"] == int(np.argmax(regions.sum(axis=(1, 2))))
    assert (workdir / g["path"]).stat().st_size > 0
    assert g["path"] == "saliency/" + rundir.saliency_file("grid", case, z, g["class"])
  rows = json.loads((out / "instances.json").read_text())["instances"]
  for r in rows:  # 3D lesions: a centroid in three coordinates, shares summing to one
    assert len(r["centroid"]) == 3 and r["slice"] == volumes.NO_SLICE
    assert np.isclose(sum(r["share"]), 1.0) or not np.isfinite(r["share"]).all()
  faith = json.loads((out / "faithfulness.json").read_text())["rows"]
  assert {r["method"] for r in faith} == set(methods) | {"random"}
  assert all(np.isfinite(r["deletion_auc"]) for r in faith)
  path = [r for r in faith if r["method"] in ("integrated_gradients",)]
  assert path and all(r["completeness_error"] is not None for r in path)
  rand = json.loads((out / "randomisation.json").read_text())
  assert rand["image"] == [case, volumes.NO_SLICE]
  for m in config.saliency.randomisation_methods:
    assert len(rand["methods"][m]["spearman"]) == len(rand["methods"][m]["layers"]) > 1
  assert (workdir / "report" / "index.html").is_file()
  assert manifest["settings"]["instance_max_voxels"] == 4  # the volumes' cap, recorded


def test_a_2d_saliency_stage_keeps_its_fingerprint():
  """The volumes' voxel cap is left out on slices: finished 2D saliency stages are reused."""
  from tracin_jax.stages import saliency as stage  # pylint: disable=g-import-not-at-top

  need = lambda name: types.SimpleNamespace(manifest=types.SimpleNamespace(fingerprint="abc"))
  context = types.SimpleNamespace(
      need=need, data_fingerprint=lambda: "data", data_name="tiny",
      val_set=types.SimpleNamespace(images=np.zeros((1, 4, 4, 4))))
  one = stage.SaliencyStage(stage.SaliencyConfig())
  assert one.fingerprint(context) == "a347c0d62527890c"  # as before volumes had the stage
  other = stage.SaliencyStage(stage.SaliencyConfig(instance_max_voxels=7))
  assert other.fingerprint(context) == "a347c0d62527890c"
  context.val_set = types.SimpleNamespace(images=np.zeros((1, 4, 4, 4, 4)))
  assert one.fingerprint(context) != other.fingerprint(context)


def test_ies_max_on_volumes_keeps_a_seeded_subsample_of_the_lesion_voxels():
  from tracin_jax.saliency import instances as inst_lib  # pylint: disable=g-import-not-at-top
  from tracin_jax.stages import saliency as stage  # pylint: disable=g-import-not-at-top

  mask = np.zeros((4, 4, 4), bool)
  mask[1:3, 1:4, :] = True
  inst = inst_lib.Instance(1, "TP", mask, int(mask.sum()), 0.5, index=2)
  cut = stage._subsampled(inst, 5, 0)  # pylint: disable=protected-access
  assert cut.mask.sum() == 5 and not (cut.mask & ~mask).any()
  np.testing.assert_array_equal(cut.mask, stage._subsampled(inst, 5, 0).mask)  # pylint: disable=protected-access
  assert stage._subsampled(inst, 100, 0) is inst  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- export, report


@pytest.fixture(scope="module")
def export3d(saliency3d):
  """The export stage on the tiny 3D run (train, influence and saliency reused), then the
  report with a page per validation volume."""
  config, _, workdir = saliency3d
  config = _config(workdir, config.data.cache_dir, config.data.data_dir, **INFLUENCE_FLAGS,
                   **SALIENCY_FLAGS, **EXPORT_FLAGS)
  results = experiment.run(config, ["train", "influence", "saliency", "export"],
                           progress=False)
  return config, results, workdir


def _model_grid(volume: np.ndarray, record: volumes.VolumeRecord, shape) -> np.ndarray:
  """Labels [X, Y, Z] on the scan resampled onto the sample's [D, H, W] grid by the
  loader's own nearest-neighbour rule (`volumes.resample`)."""
  counts = [0, 0, 0]
  for k, a in enumerate(volumes.SAMPLE_AXES):
    counts[a] = shape[k]
  dummy = np.zeros(volume.shape + (1,), np.float32)
  _, labels = volumes.resample(dummy, volume.astype(np.int32), record.origin[0],
                               record.step[0], counts)
  return labels.transpose(volumes.SAMPLE_AXES)


@pytest.mark.slow
def test_the_3d_export_stage_writes_each_volume_on_its_input_scan(export3d):
  """Every file is on the case's 48 x 48 x 24 input grid with its T1's affine; the
  prediction, read back and resampled to the model's 16^3 grid by nearest neighbour, is the
  stage's prediction exactly (2 mm voxels of whole 1 mm source voxels: no voxel may
  differ); the influence support is 0 outside the predicted regions."""
  config, results, workdir = export3d
  export, influence = results["export"], results["influence"]
  _, val_set = experiment.load_data(config.data, spatial_dims=3, progress=False)
  assert sorted(c.case_id for c in export.cases) == sorted(val_set.cases)
  names = list(influence.class_names)
  supported = 0
  for one in export.cases:
    a = val_set.cases.index(one.case_id)
    sample = val_set.subset([a])
    record = sample.record
    folder = workdir / "export" / rundir.safe_name(one.case_id)
    expected = {patient.PREDICTION_FILE, "grid.npz", "check.png"}
    expected |= {patient.influence_file(c) for c in names}
    expected |= {patient.saliency_file(m, c) for m in ("vanilla_gradient", "grad_cam")
                 for c in names}
    assert expected == {p.name for p in folder.iterdir()}
    t1 = nibabel.load(str(record.source[0]))
    for path in folder.glob("*.nii.gz"):
      written = nibabel.load(path)
      assert written.shape == t1.shape == (48, 48, 24), path.name
      np.testing.assert_array_equal(written.affine, t1.affine)
    labels = np.asarray(nibabel.load(folder / patient.PREDICTION_FILE).dataobj)
    layout = str(record.layout[0])
    assert set(np.unique(labels)) <= {0, 1, 2, 4}  # the 2019 layout's own labels
    back = _model_grid(layouts.to_classes(labels, layout), record, one.grid.shape)
    assert one.predicted.shape == (1, 16, 16, 16)
    np.testing.assert_array_equal(back, one.predicted[0])
    regions = influence.val_regions[a]  # [D, H, W, K]
    assert one.influence.shape == (1, 16, 16, 16, 3)
    assert not one.influence[0][~regions].any()  # on the model's grid: inside the regions
    for i, cname in enumerate(names):
      support = np.asarray(nibabel.load(folder / patient.influence_file(cname)).dataobj)
      # On the scan, trilinear: at most the region's own trilinear image, 0 where it is 0.
      cover = volumes.to_volume(regions[..., i].astype(np.float32), record)
      assert support.min() >= 0 and (support <= cover + 1e-6).all()
      assert not support[cover == 0].any()
      supported += int(support.max() > 0)
    for method in ("vanilla_gradient", "grad_cam"):
      sal = np.asarray(nibabel.load(folder / patient.saliency_file(method, names[0])).dataobj)
      assert np.isfinite(sal).all()
    assert (folder / "check.png").stat().st_size > 0
    grid, explained = patient.read_grid(folder / "grid.npz")  # what `load` reads back
    assert patient.is_volume(grid) and grid.shape == (16, 16, 16)
    assert explained.tolist() == [0]
    np.testing.assert_array_equal(grid.record.origin, record.origin)
  assert supported  # some region's top proponents cover some of its voxels
  manifest = base.read_manifest(workdir, "export")
  checks = [f for f in manifest["figures"] if f.get("kind") == rundir.EXPORT_CHECK]
  assert len(checks) == len(export.cases)
  for f in checks:  # the scan's slice through the volume's largest predicted tumour
    one = next(c for c in export.cases if c.case_id == f["case"])
    d = figures.representative_slice(one.predicted[0] > 0)
    assert f["axial_slice"] == d and f["slice"] == patient.scan_slice(one.grid, d)
    assert f"axial slice {f['slice']} of 24 (the volume's slice {d} of 16:" in \
        f["caption"]


@pytest.mark.slow
def test_the_3d_report_has_a_page_per_volume_with_its_exported_files(export3d):
  config, results, workdir = export3d
  _, val_set = experiment.load_data(config.data, spatial_dims=3, progress=False)
  influence = results["influence"]
  pages = sorted((workdir / "report" / "images").glob("val*.html"))
  assert len(pages) == len(val_set)
  index = (workdir / "report" / "index.html").read_text()
  overlays = 0
  for page in pages:
    text = page.read_text()
    a = int(page.stem[3:])
    case = val_set.cases[a]
    d = figures.representative_slice(influence.val_regions[a].any(-1))
    assert f"<h1>{case}, axial slice {d} of 16" in text  # the figures' slice, named
    assert f'href="images/{page.name}"' in index
    assert f"{case}<br>axial slice {d} of 16" in index  # not the volume's slice -1
    assert (page.parent / page.stem / "modalities.png").stat().st_size > 0
    tag = rundir.safe_name(case)
    for name in (patient.PREDICTION_FILE, patient.influence_file("ET"), "check.png"):
      assert f'"../../export/{tag}/{name}"' in text
      assert (workdir / "export" / tag / name).is_file()
    thumbs = set(re.findall(r'src="(train/[^"]+)"', text))
    assert thumbs and all((page.parent / t).stat().st_size > 0 for t in thumbs)
    assert re.search(r"BraTS19_V3_\d, axial slice \d+<br>", text)  # proponents' slices
    viewers = [json.loads(m) for m in re.findall(
        r'<script type="application/json" id="[^"]*" class="viewer-data">(.*?)</script>', text,
        re.S)]
    assert len(viewers) == 1 and "the NIfTI outputs on the patient" in text
    shown = {v["name"] for v in viewers[0]["volumes"]}
    assert {"FLAIR", "prediction", "ground truth"} <= shown
    supported = any(np.asarray(nibabel.load(workdir / "export" / tag / patient.influence_file(
        c)).dataobj).any() for c in influence.class_names)
    heats = {n for n in shown if n.startswith("TracIn support")}
    assert bool(heats) == supported  # the case's nonzero support maps are its overlays
    overlays += len(heats)
  assert overlays and (workdir / "report" / "static" / "viewer.js").is_file()


def test_volume_outputs_of_the_wrong_shape_are_refused_by_name(data_dir, tmp_path):
  config = _config(tmp_path / "w", tmp_path / "c", data_dir)
  _, val_set = experiment.load_data(config.data, spatial_dims=3, progress=False)
  with pytest.raises(patient_space.PatientSpaceError, match=r"2 volumes given"):
    patient.volume_grid(val_set)
  grid = patient.volume_grid(val_set.subset([0]))
  assert grid.shape == (16, 16, 16) and patient.is_volume(grid)
  with pytest.raises(patient_space.PatientSpaceError,
                     match=r"influence has shape \[1, 16, 16, 8, 3\]; expected \[1, 16, 16, 16"):
    patient.write_case_outputs(grid, tmp_path / "out", influence=np.zeros((1, 16, 16, 8, 3)))
  assert not (tmp_path / "out").exists()
