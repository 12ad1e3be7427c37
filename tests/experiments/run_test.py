"""End to end: the smoke flagfile through the absl app, as a user runs it.

The run itself is the suite's smoke run (`smoke_run`, made once per test run in the
background by `python -m experiments.run`); a copy of it is resumed here in a real process.
"""

import json
import os
import pathlib
import subprocess
import sys

import bad_inputs
import numpy as np
import pytest

from tracin_jax.influence import layout

from tracin_jax.training.checkpoints import CheckpointStore

ROOT = pathlib.Path(__file__).resolve().parents[2]
ADAM_EPOCHS, SGD_EPOCHS = 20, 3  # tracin_jax/configs/smoke.flags


@pytest.mark.slow
def test_smoke_flagfile_end_to_end(smoke_run):
  workdir, stdout = smoke_run.workdir, smoke_run.stdout
  assert "synthetic" in stdout

  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["dataset"] == "synthetic cohort"
  for split in ("train", "validation"):
    assert set(metrics[split]) == {"NCR/NET", "ED", "ET", "WT", "TC"}
    assert all(0.0 <= v <= 1.0 for v in metrics[split].values())
  # The smoke network learns: every class is found in the validation patients.
  assert all(metrics["validation"][c] >= 0.3 for c in ("NCR/NET", "ED", "ET")), metrics
  assert (workdir / "training_curves.png").stat().st_size > 0

  store = CheckpointStore(workdir, create=False)
  assert store.epochs() == list(range(1, ADAM_EPOCHS + SGD_EPOCHS + 1))
  meta = [store.metadata(e) for e in store.epochs()]
  assert [m["phase"] for m in meta] == ["adam"] * ADAM_EPOCHS + ["sgd"] * SGD_EPOCHS
  # The rate SGD applies at each checkpoint: the last Adam epoch's is SGD's first.
  assert [m["learning_rate"] for m in meta] == pytest.approx(
      [1e-2] * (ADAM_EPOCHS - 1) + [0.05] * (SGD_EPOCHS + 1))

  # The influence stage's files (train regions: 4 cases x 10 slices; validation: 2 x 10).
  out = workdir / "influence"
  with np.load(out / "train_influence.npz") as f:
    blocks, presence = f["scores"], f["presence"]
    assert blocks.shape == (3, 40, 120) and presence.shape == (40, 3)
    assert f["epochs"].tolist() == list(range(ADAM_EPOCHS + 1, ADAM_EPOCHS + SGD_EPOCHS + 1))
    assert set(f["train_case_ids"].tolist()) == set(f["train_case_ids"].tolist()[::10])
  scores = layout.from_class_blocks(blocks)
  np.testing.assert_allclose(scores, np.transpose(scores, (2, 3, 0, 1)), equal_nan=True)
  assert np.all(np.isnan(scores[~presence]))  # absent regions: NaN, never zero
  assert np.all(np.isfinite(scores[presence][:, presence]))
  with np.load(out / "test_influence.npz") as f:
    assert f["scores"].shape == (3, 20, 120)
  explanations = json.loads((out / "proponents.json").read_text())["explanations"]
  assert explanations and all(
      len(e["proponents"]) <= 10 and
      [p["score"] for p in e["proponents"]] == sorted(
          [p["score"] for p in e["proponents"]], reverse=True) for e in explanations)
  assert json.loads((out / "global_explainers.json").read_text())["dataset"] == \
      "synthetic cohort"
  for name in ("train_influence.png", "proponent_classes.png", "self_influence.png"):
    assert (out / name).stat().st_size > 0
  assert list(out.glob("local_*.png"))

  # The interpret stage's files: FI [3, C, R], the selection and impact per feature and class.
  out = workdir / "interpret"
  with np.load(out / "feature_importance.npz") as f:
    fi, predictive = f["fi"], f["predictive"]
    assert fi.ndim == 3 and fi.shape[0] == 3 and predictive.shape == fi.shape[:2]
    assert f["class_names"].tolist() == ["NCR/NET", "ED", "ET"]
  impact = json.loads((out / "feature_impact.json").read_text())
  assert impact["dataset"] == "synthetic cohort"
  for i, name in enumerate(impact["class_names"]):
    assert len(impact["feature_impact"][name]) == fi.shape[1]
    assert impact["predictive_features"][name] == np.flatnonzero(predictive[i]).tolist()
    assert set(impact["statistics"][name]) >= {"slope", "r2", "fi_first", "u_shape"}
    test = impact["mann_whitney"][name]
    assert test["p_value"] is not None or "selected" in test["note"]
  assert (out / "feature_impact.png").stat().st_size > 0
  assert list(out.glob("ranked_scatter_*_f*.png"))
  assert "[interpret stage done in" in stdout

  # The saliency stage's files: per explained region a grid of maps and a panel beside its
  # TracIn proponents; the lesion, faithfulness and context tables and their figures.
  out = workdir / "saliency"
  for name in ("instances.csv", "instances.json", "faithfulness.json", "context_curves.json",
               "modality_shares.png", "context_curves.png"):
    assert (out / name).stat().st_size > 0
  assert list(out.glob("grid_*.png")) and list(out.glob("tracin_*.png"))
  instances = json.loads((out / "instances.json").read_text())
  assert instances["synthetic"] is True
  assert any(i["status"] == "TP" for i in instances["instances"])  # it sees tumour

  # The export stage's volumes, read back: on the synthetic scan's grid (its affine), the
  # prediction in BraTS labels equal to the validation Dice's own prediction of the slices.
  import nibabel  # pylint: disable=g-import-not-at-top

  exported = json.loads((workdir / "export" / "manifest.json").read_text())["headline"]
  assert len(exported["cases"]) == 1
  case = exported["cases"][0]
  written = nibabel.load(workdir / "export" / case / "prediction.nii.gz")
  scan = nibabel.load(next(smoke_run.cache.glob(f"synthetic_*/HGG/{case}/{case}_t1.nii.gz")))
  np.testing.assert_allclose(written.affine, scan.affine)
  assert written.shape == scan.shape == (240, 240, 155)
  assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 4}
  assert (workdir / "export" / case / "check.png").stat().st_size > 0
  assert "[export stage done in" in stdout

  # The validate stage's files: every checked region has its three removals, the baseline
  # replay reproduced the run, and the randomisation check compared the two structures.
  out = workdir / "validate"
  retraining = json.loads((out / "retraining.json").read_text())
  assert retraining["baseline_reproduces_run"] is True
  assert retraining["num_removed"] == 10 and len(retraining["random_sets"]) == 1
  assert 1 <= len(retraining["regions"]) <= 3  # one region per class present
  assert retraining["regions"] and all(
      len(r["proponents"]) == 10 and len(r["opponents"]) == 10 and
      not set(map(tuple, r["proponents"])) & set(map(tuple, r["opponents"]))
      for r in retraining["regions"])
  for name in ("proponents", "random", "opponents"):
    assert retraining["dice_change"][name]["n"] == len(retraining["regions"])
  assert retraining["rank_correlation"]["all"]["n"] == (2 + 1) * len(retraining["regions"])
  check = json.loads((out / "randomisation_check.json").read_text())
  assert check["num_examples"] == 20 and set(check["trained"]) >= {"auc", "same_class_top"}
  for name in ("retraining.png", "randomisation_check.png"):
    assert (out / name).stat().st_size > 0
  jobs = sorted(p for p in (out / "retraining").glob("*/*.json") if p.name != "inputs.json")
  assert len(jobs) == 1 + 1 + 2 * len(retraining["regions"])
  for stage in ("train", "influence", "interpret", "saliency", "export", "validate"):
    manifest = json.loads((workdir / stage / "manifest.json").read_text())
    assert manifest["data"] == "synthetic cohort" and manifest["synthetic"] is True
    assert all((workdir / f["path"]).exists() for f in manifest["files"] + manifest["figures"])


@pytest.mark.slow
def test_a_second_run_reuses_the_finished_stages_in_a_real_process(smoke_run, tmp_path):
  """A stage interrupted before its manifest was written (here: validate, missing one
  retraining) redoes only the missing part; every other stage is reused."""
  workdir = smoke_run.copy_to(tmp_path / "run")
  out = workdir / "validate"
  retraining = json.loads((out / "retraining.json").read_text())
  jobs = sorted(p for p in (out / "retraining").glob("*/*.json") if p.name != "inputs.json")
  jobs[-1].unlink()
  (out / "manifest.json").unlink()
  cmd = [sys.executable, "-m", "experiments.run", *smoke_run.flags(workdir)]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  for stage in ("train", "influence", "interpret", "saliency", "export"):
    assert f"{stage}: inputs and settings unchanged" in again.stdout
  assert f"{len(jobs) - 1} of {len(jobs)} results reused" in again.stdout
  assert "retraining 1/1 " in again.stdout
  assert (out / "manifest.json").exists()
  assert json.loads((out / "retraining.json").read_text())["dice_change"] == \
      retraining["dice_change"]

  # A setting the run cannot meet is a one-line error naming it, not a traceback.
  bad = bad_inputs.inprocess_runner(ROOT)(
      smoke_run.flags(workdir) + ["--stages=validate", "--num_removed=21"])
  assert bad.rc == 1
  assert "error: --num_removed=21" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # a real process
def test_bad_data_dir_gives_a_one_line_error(tmp_path):
  (tmp_path / "data").mkdir()
  cmd = [sys.executable, "-m", "experiments.run", "--flagfile=smoke",
         f"--workdir={tmp_path / 'run'}", f"--data_dir={tmp_path / 'data'}"]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "error:" in proc.stderr and "HGG" in proc.stderr and "Traceback" not in proc.stderr
