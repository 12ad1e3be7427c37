"""`python -m experiments.run --help`: every setting, its default and one sentence, by stage."""

import os
import pathlib
import subprocess
import sys

import pytest

from tracin_jax.cli import config_flags
from tracin_jax import experiment
from tracin_jax import settings

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a real process
def test_help_lists_every_setting_grouped_by_stage_and_exits_0():
  proc = subprocess.run([sys.executable, "-m", "experiments.run", "--help"], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = proc.stdout
  assert "--flagfile=FILE" in text
  assert "--stages (default: train,influence,interpret,saliency,export)" in text
  headings = [line[:-1] for line in text.splitlines() if line and line.endswith(":")
              and not line.startswith(" ")]
  assert headings[-9:] == ["data", "train stage", "influence stage", "interpret stage",
                           "saliency stage", "export stage", "validate stage", "lds stage",
                           "report"]
  # Every nested config (stage) has a heading of its own, not the run's.
  nested = {leaf.path[0] for leaf in settings.leaves(experiment.ExperimentConfig)
            if len(leaf.path) > 1}
  assert nested == set(config_flags._GROUPS)  # pylint: disable=protected-access
  for leaf in settings.leaves(experiment.ExperimentConfig):
    assert f"  --{leaf.flag} (default: " in text, leaf.flag
  assert text.count("(default: ") == len(list(settings.leaves(
      experiment.ExperimentConfig))) + 2  # and --stages, --progress
  assert config_flags.help_text(experiment.ExperimentConfig) in text
