"""End to end: the smoke flagfile through the absl app, as a user runs it."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tracin_jax.training.checkpoints import CheckpointStore

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_flagfile_end_to_end(tmp_path):
  workdir, cache = tmp_path / "run", tmp_path / "cache"
  cmd = [sys.executable, "-m", "experiments.run",
         "--flagfile=experiments/configs/smoke.flags",
         f"--workdir={workdir}", f"--cache_dir={cache}", "--noprogress"]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "synthetic" in proc.stdout

  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["dataset"] == "synthetic cohort"
  for split in ("train", "validation"):
    assert set(metrics[split]) == {"NCR/NET", "ED", "ET", "WT", "TC"}
    assert all(0.0 <= v <= 1.0 for v in metrics[split].values())
  assert (workdir / "training_curves.png").stat().st_size > 0

  store = CheckpointStore(workdir, create=False)
  assert store.epochs() == [1, 2, 3, 4, 5]
  meta = [store.metadata(e) for e in store.epochs()]
  assert [m["phase"] for m in meta] == ["adam", "adam", "sgd", "sgd", "sgd"]
  assert [m["learning_rate"] for m in meta] == pytest.approx([3e-3, 0.05, 0.05, 0.05, 0.05])

  # A second run reuses the finished run and the caches instead of recomputing.
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "reusing it" in again.stdout
