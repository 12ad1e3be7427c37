"""What the suite shares: the smoke run, made once for a whole test run, and the worker groups.

The first worker to collect a test that needs it starts it, under a file lock in the run's
common temporary directory; the others find it started and wait for it where they need it.
What it holds is read only: a test that writes copies it first (`SmokeRun.copy_to`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE_FLAGS = ROOT / "tracin_jax" / "configs" / "smoke.flags"

# Modules whose tests share one process's fixtures, and so run in one pytest-xdist worker:
# the tiny run's workdir and the stage outputs the modules build on it in turn, and the
# bad-input cases' tiny data and trained run. Every other module's tests run in one worker
# together, so that the functions they share compile once, not once per worker.
WORKER_GROUPS = {
    "tiny_run": ("tests/explain_test.py", "tests/report/html_report_test.py",
                 "tests/stages/influence_params_test.py", "tests/stages/lds_stage_test.py",
                 "tests/stages/saliency_stage_test.py", "tests/stages/stages_test.py",
                 "tests/training/metagradient_test.py", "tests/training/retrain_test.py",
                 "tests/training/train_test.py"),
    "reliability": ("tests/reliability/bad_inputs_test.py",),
}
_GROUP_OF = {path: name for name, paths in WORKER_GROUPS.items() for path in paths}


def worker_group(nodeid: str) -> str:
  """The scheduling unit of a test: its module's group, or the module itself."""
  module = nodeid.split("::", 1)[0]
  return _GROUP_OF.get(module, module)


def _shared_root(tmp_path_factory) -> pathlib.Path:
  """The temporary directory common to every worker of this test run."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@dataclasses.dataclass(frozen=True)
class SmokeRun:
  """The smoke flagfile's finished run: its workdir and data cache, and what it printed."""

  workdir: pathlib.Path
  cache: pathlib.Path
  stdout: str
  stderr: str

  def flags(self, workdir: pathlib.Path | None = None) -> list[str]:
    """The command line that made it (with another workdir, to resume a copy)."""
    return [f"--flagfile={SMOKE_FLAGS}", f"--workdir={workdir or self.workdir}",
            f"--cache_dir={self.cache}", "--noprogress"]

  def copy_to(self, path: pathlib.Path) -> pathlib.Path:
    """A copy of the workdir at path (the data cache is shared, read only)."""
    shutil.copytree(self.workdir, path, symlinks=True)
    return path


# The smoke run is the smoke flagfile run as a user runs it (`python -m experiments.run`, a
# real process), started in the background as soon as a worker collects a test that needs
# it; those tests run last, so the workers spend the ~2 minutes it takes on other tests.
_SMOKE = "shared_smoke"
_RUN_AND_RECORD = ('out=$1; shift; "$@" > "$out/stdout.txt" 2> "$out/stderr.txt"; '
                   'echo $? > "$out/rc.tmp"; mv "$out/rc.tmp" "$out/rc"')


def _smoke_in(directory: pathlib.Path, stdout: str, stderr: str) -> SmokeRun:
  return SmokeRun(directory / "run", directory / "cache", stdout, stderr)


def start_smoke_run(tmp_path_factory) -> None:
  """Starts the smoke run in the background unless a worker of this test run already did."""
  root = _shared_root(tmp_path_factory)
  directory = root / _SMOKE
  with _locked(root / f"{_SMOKE}.lock"):
    if directory.exists():
      return
    directory.mkdir()
    run = _smoke_in(directory, "", "")
    proc = subprocess.Popen(
        ["sh", "-c", _RUN_AND_RECORD, "sh", str(directory), sys.executable, "-m",
         "experiments.run", *run.flags()],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL,
        start_new_session=True)
    (directory / "pid").write_text(str(proc.pid))


def stop_smoke_run(tmp_path_factory) -> None:
  """Ends a smoke run still going when the test run ends (interrupted, or not needed)."""
  pid_file = _shared_root(tmp_path_factory) / _SMOKE / "pid"
  if pid_file.exists() and not (pid_file.parent / "rc").exists():
    with contextlib.suppress(OSError):
      os.killpg(int(pid_file.read_text()), signal.SIGTERM)


def smoke_run(tmp_path_factory) -> SmokeRun:
  """The finished smoke run (waits for it); raises with its output if it failed."""
  start_smoke_run(tmp_path_factory)
  directory = _shared_root(tmp_path_factory) / _SMOKE
  while not (directory / "rc").exists():
    time.sleep(0.5)
  run = _smoke_in(directory, (directory / "stdout.txt").read_text(),
                  (directory / "stderr.txt").read_text())
  rc = (directory / "rc").read_text().strip()
  if rc != "0":
    raise RuntimeError(f"the smoke run failed (exit {rc}):\n{run.stdout[-2000:]}\n"
                       f"{run.stderr[-3000:]}")
  return run
