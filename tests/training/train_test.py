"""Tests of training: checkpoint metadata, resume after an interruption, reuse, refusal."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest
import tiny_run
from flax import nnx

from tracin_jax.training import train as train_lib
from tracin_jax.training.checkpoints import CheckpointStore

CONFIG, TRAIN, VAL = tiny_run.CONFIG, tiny_run.TRAIN, tiny_run.VAL


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_checkpoint_metadata_round_trip(full_run):
  workdir, result = full_run
  store = CheckpointStore(workdir, create=False)
  assert store.epochs() == [1, 2, 3, 4]
  steps = train_lib.steps_per_epoch(len(TRAIN), CONFIG.batch_size)
  for epoch in store.epochs():
    meta = store.metadata(epoch)
    assert meta["epoch"] == epoch and meta["step"] == epoch * steps
    assert meta["phase"] == ("adam" if epoch <= 2 else "sgd")
    # eta_t: the rate the next update applies from this checkpoint.
    rate = (CONFIG.optimizer.adam_learning_rate if epoch < 2
            else CONFIG.optimizer.sgd_learning_rate)
    assert meta["learning_rate"] == pytest.approx(rate)
  model = train_lib.build_model(CONFIG.model, seed=123)
  store.restore(4, model)
  for a, b in zip(_params(model), _params(result.model)):
    np.testing.assert_array_equal(a, b)
  assert (workdir / "metrics.json").exists() and (workdir / "training_curves.png").exists()
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert set(metrics["validation"]) == {"NCR/NET", "ED", "ET", "WT", "TC"}


def test_resume_after_interruption_continues_at_the_right_epoch(tmp_path, full_run):
  _, full = full_run
  stopped = train_lib.train(CONFIG, TRAIN, VAL, tmp_path, progress=False,
                            stop_after_epoch=2, log=lambda *_: None)
  assert [h["epoch"] for h in stopped.history] == [1, 2] and not stopped.metrics
  messages = []
  resumed = train_lib.train(CONFIG, TRAIN, VAL, tmp_path, progress=False, log=messages.append)
  assert resumed.resumed_from == 2
  assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
  assert any("epoch 2/4" in m for m in messages)
  # Same seed and data order: the resumed run ends where the uninterrupted one does.
  for a, b in zip(_params(resumed.model), _params(full.model)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_finished_run_is_reused_not_overwritten(full_run):
  workdir, _ = full_run
  before = (workdir / "metrics.json").stat().st_mtime_ns
  again = train_lib.train(CONFIG, TRAIN, VAL, workdir, progress=False, log=lambda *_: None)
  assert again.reused
  assert (workdir / "metrics.json").stat().st_mtime_ns == before


def test_a_finished_run_without_its_figure_draws_it_when_reused(full_run, tmp_path):
  """A run killed after metrics.json but before the figure (the order before the figure
  came first) is reused with its figure drawn, not refused by the stage's manifest."""
  workdir = tmp_path / "run"
  shutil.copytree(full_run[0], workdir)
  (workdir / train_lib.CURVES_FILE).unlink()
  before = (workdir / "metrics.json").read_bytes()
  again = train_lib.train(CONFIG, TRAIN, VAL, workdir, progress=False, log=lambda *_: None)
  assert again.reused and (workdir / "metrics.json").read_bytes() == before
  assert (workdir / train_lib.CURVES_FILE).stat().st_size > 0


def test_different_run_in_same_workdir_is_refused(full_run):
  workdir, _ = full_run
  other = train_lib.TrainConfig(**{**CONFIG.__dict__, "sgd_epochs": 3})
  with pytest.raises(train_lib.RunMismatchError, match="sgd_epochs|config"):
    train_lib.train(other, TRAIN, VAL, workdir, progress=False, log=lambda *_: None)


def test_tracin_checkpoints_are_the_sgd_epochs_with_their_rates(full_run):
  workdir, result = full_run
  apply_fn, checkpoints, epochs = train_lib.tracin_checkpoints(workdir)
  assert epochs == [3, 4]
  assert [c.learning_rate for c in checkpoints] == pytest.approx([0.05, 0.05])
  logits = jax.jit(apply_fn)(checkpoints[-1].params, VAL.images[:2], checkpoints[-1].state)
  expected = result.model(VAL.images[:2])
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_damaged_metrics_are_computed_again_and_a_damaged_record_is_refused(
    full_run, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(full_run[0], workdir)
  metrics = workdir / train_lib.METRICS_FILE
  want = json.loads(metrics.read_text())
  metrics.write_bytes(metrics.read_bytes()[:40])  # truncated
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    again = train_lib.train(CONFIG, TRAIN, VAL, workdir, progress=False, log=lambda *_: None)
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warned == [f"{metrics}: 40 bytes where {len(json.dumps(want, indent=2)) + 1} were "
                    "written (truncated or overwritten); computing the final metrics again."]
  assert not again.reused and again.metrics == want  # the same model, evaluated again
  assert json.loads(metrics.read_text()) == want
  record = workdir / train_lib.CONFIG_FILE
  text = record.read_text()
  record.write_text(text.replace('"seed": 0', '"seed": 1'))  # still JSON, another run
  assert text != record.read_text()
  with pytest.raises(train_lib.RunMismatchError, match=rf"^{record} is damaged: its bytes "
                     "differ .*; the run's settings and data cannot be checked"):
    train_lib.train(CONFIG, TRAIN, VAL, workdir, progress=False, log=lambda *_: None)
