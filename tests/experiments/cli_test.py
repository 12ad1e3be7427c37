"""The command line in this process: `tracin-jax run|explain`, its flagfiles by name, its
one-line errors with a pointer to what to run, and `--stages=all`."""

import logging

from absl import logging as absl_logging
import pytest

from tracin_jax import experiment
from tracin_jax import stages as stages_lib
from tracin_jax.cli import run as run_cli


@pytest.fixture(autouse=True)
def _restore_logging():
  """The command sends the library's log to stdout and quiets absl; other tests' log
  captures need them as they were."""
  logger = logging.getLogger("tracin_jax")
  before = (list(logger.handlers), logger.propagate, logger.level,
            logging.getLogger("asyncio").level, absl_logging.get_verbosity())
  yield
  logger.handlers[:] = before[0]
  logger.propagate, logger.level = before[1], before[2]
  logging.getLogger("asyncio").setLevel(before[3])
  absl_logging.set_verbosity(before[4])


@pytest.fixture(name="runs")
def _runs(monkeypatch):
  """The stages each `experiment.run` of the command was asked for (nothing is run)."""
  calls = []
  monkeypatch.setattr(experiment, "run", lambda config, names, progress: calls.append(names))
  return calls


def test_stages_all_runs_every_stage_in_run_order(runs, tmp_path):
  assert run_cli.cli(["tracin-jax run", f"--workdir={tmp_path}", "--stages=all"]) == 0
  assert run_cli.cli(["tracin-jax run", f"--workdir={tmp_path}"]) == 0
  assert runs == [list(stages_lib.list_stages()), ["train", "influence", "interpret",
                                                   "saliency"]]
