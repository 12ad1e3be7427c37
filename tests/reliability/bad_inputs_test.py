"""Every bad input of `bad_inputs.py` ends in one line naming its culprit, and leaves nothing.

The cases run the command line in this process (`experiments.run.cli`), on the tiny data
and a copy of the tiny trained run; permission cases run as an ordinary user in a
subprocess when the tests run as root. Cases that train or compute TracIn, and those that
start a process (the permission cases, the real-process check), are marked slow.
"""

import os
import pathlib
import subprocess
import sys

import pytest

import bad_inputs

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Cases that train a model or compute TracIn (seconds each); the rest fail before any work.
SLOW = {"modality_all_zero", "seg_affine_differs", "header_30000_cubed_skipped",
        "voxels_1e300_skipped", "case_dir_unreadable_skipped", "nan_loss",
        "checkpoint_restored_after_corruption", "correct_run_after_failed_run",
        "influence_scores_byte_flipped_rerun", "influence_part_truncated",
        "influence_part_byte_flipped", "store_block_byte_flipped", "store_record_rate_changed",
        "metrics_truncated"}


def _param(case):
  marks = [pytest.mark.slow] if case.name in SLOW or case.unprivileged else []
  return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in bad_inputs.CASES])
def test_bad_input_ends_in_one_line_naming_the_culprit(case, shared, runner):
  if case.unprivileged and bad_inputs.unprivileged_problem():
    pytest.skip(bad_inputs.unprivileged_problem())
  base, data, run_dir = shared
  outcome, left, detail, res = bad_inputs.run_case(case, base, data, run_dir, runner)
  assert outcome == "one-line", (outcome, detail, res.stdout[-1500:], res.stderr[-3000:])
  assert not left, "files left behind in the workdir"
  if case.expect == "error" and not case.library:
    assert res.rc == 1 and res.stderr.count("\n") == 1


def test_the_case_list_covers_the_issue_and_more():
  names = {c.name for c in bad_inputs.CASES}
  assert len(names) == len(bad_inputs.CASES) >= 60
  for name in ("resume_on_other_data", "influence_other_split", "checkpoint_64_bytes_flipped",
               "adam_checkpoints", "voxels_1e300", "header_30000_cubed", "list_of_batches"):
    assert name in names


@pytest.mark.slow  # two processes
def test_the_command_line_prints_one_line_and_exits_1_in_a_real_process(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.run", f"--workdir={tmp_path / 'w'}",
         "--image_size=12", "--depth=3"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr == ("error: --image_size=12: must be a multiple of 2**depth = 8 "
                         "(--depth=3), e.g. 8.\n")
  assert not (tmp_path / "w").exists()
  debug = subprocess.run(cmd, cwd=ROOT, env=dict(env, TRACIN_JAX_DEBUG="1"),
                         capture_output=True, text=True, timeout=120)
  assert debug.returncode == 1 and "Traceback" in debug.stderr
  assert "SettingsError: --image_size=12" in debug.stderr


def test_a_bad_flag_value_is_one_line(runner, tmp_path):
  res = runner([f"--workdir={tmp_path}", "--image_size=abc"])
  assert res.rc == 1 and res.stderr.startswith("error: ") and "--image_size" in res.stderr
  assert res.stderr.count("\n") == 1
