"""Fixtures shared by the whole suite: the tiny training run, trained once per session.

XLA's optimisations stay on: with `jax_disable_most_optimizations` the suite took 40% less
time, but XLA:CPU then computed NaN losses for the tiny UNet's training step, and tests that
compare two computations bit for bit passed on NaN.
"""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # digests, shared_runs
sys.path.insert(0, str(pathlib.Path(__file__).parent / "training"))
sys.path.insert(0, str(pathlib.Path(__file__).parent / "stages"))
import tiny_run  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from tracin_jax.training import train as train_lib  # noqa: E402


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
  """The tiny run (tests/training/tiny_run.py), trained once: (workdir, TrainResult)."""
  workdir = tmp_path_factory.mktemp("full")
  result = train_lib.train(tiny_run.CONFIG, tiny_run.TRAIN, tiny_run.VAL, workdir,
                           progress=False, log=lambda *_: None)
  return workdir, result
