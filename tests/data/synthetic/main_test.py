"""Tests for the command line, `python -m tracin_jax.data.synthetic`."""

import json
import os
import pathlib
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_command_line(tmp_path):
  out = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "tracin_jax.data.synthetic", "--out", str(out), "--cases", "1",
       "--seed", "3", "--workers", "1"],
      capture_output=True, text=True, check=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[3])))
  assert "1 synthetic cases in" in proc.stdout and " s" in proc.stdout
  assert "[synthetic] 1/1 BraTS19_SYN_0001" in proc.stderr
  record = json.loads((out / "cohort.json").read_text())
  assert (record["seed"], record["num_cases"], record["synthetic"]) == (3, 1, True)
