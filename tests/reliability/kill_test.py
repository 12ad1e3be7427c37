"""SIGKILL at random points of a run, then a rerun: the outputs equal an uninterrupted run's,
bit for bit.

The run is the tiny one of `bad_inputs.py` (the train stage, through the command line, in
a subprocess); kill points are drawn from a seeded generator over the uninterrupted run's
duration, so they land in start-up, slice caching, training and checkpoint writing. Compared
bit for bit: `train_config.json`, `metrics.json`, every checkpoint's arrays (model and
optimizer) and its metadata (less the wall-clock seconds in the history).
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import bad_inputs
import digests
import tiny_brats

ROOT = pathlib.Path(__file__).resolve().parents[2]
KILLS = 2


def _command(workdir, data, cache):
  return [sys.executable, "-m", "experiments.run", f"--workdir={workdir}",
          f"--data_dir={data}", f"--cache_dir={cache}", "--stages=train",
          *bad_inputs.BASE_FLAGS]


def _env():
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")


def _run(workdir, data, cache) -> float:
  t0 = time.perf_counter()
  proc = subprocess.run(_command(workdir, data, cache), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  return time.perf_counter() - t0


def _checkpoints(workdir: pathlib.Path) -> dict:
  """Epoch -> (arrays of every item, metadata without timings), read raw with Orbax."""
  out = {}
  checkpointer = ocp.StandardCheckpointer()
  for step in sorted((workdir / "checkpoints").iterdir()):
    arrays = {item: jax.tree.leaves(checkpointer.restore(step / item))
              for item in ("model", "optimizer")}
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step / "metadata")
    for record in meta["history"]:
      record.pop("seconds")
    out[step.name] = (arrays, meta)
  return out


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_outputs_bit_for_bit(tmp_path):
  data = tiny_brats.make_tiny_brats(tmp_path / "data")
  reference = tmp_path / "reference"
  duration = _run(reference, data, tmp_path / "cache_reference")
  want = _checkpoints(reference)
  assert sorted(want) == ["1", "2", "3"]

  rng = np.random.default_rng(0)
  for k in range(KILLS):
    workdir, cache = tmp_path / f"killed{k}", tmp_path / f"cache{k}"
    delay = rng.uniform(0.35, 0.95) * duration
    proc = subprocess.Popen(_command(workdir, data, cache), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    _run(workdir, data, cache)
    for name in ("train_config.json", "metrics.json"):
      digests.assert_same_file(workdir / name, reference / name, f"kill {k} at {delay:.1f} s")
    got = _checkpoints(workdir)
    assert sorted(got) == sorted(want)
    for epoch, (arrays, meta) in want.items():
      assert got[epoch][1] == meta, (k, epoch, delay)
      for item in arrays:
        for a, b in zip(got[epoch][0][item], arrays[item], strict=True):
          np.testing.assert_array_equal(a, b, err_msg=f"kill {k} at {delay:.1f} s, epoch "
                                                      f"{epoch}, {item}")


def _children(pid: int) -> set[int]:
  """Pids whose parent is `pid` (from /proc)."""
  out = set()
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      out.add(int(stat.parent.name))
  return out


def _alive(pid: int) -> bool:
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.slow  # a parent process and its workers
def test_cohort_workers_die_with_their_killed_parent(tmp_path):
  code = ("from tracin_jax.data.synthetic import cohort\n"
          "if __name__ == '__main__':\n"
          f"  cohort.generate_cohort({str(tmp_path / 'cohort')!r}, 4, 0, workers=2,"
          " template_resolution=2)\n")
  script = tmp_path / "make.py"
  script.write_text(code)
  parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  workers = set()
  while time.monotonic() < deadline and len(workers) < 2:
    workers = {p for p in _children(parent.pid)
               if "multiprocessing" in pathlib.Path(f"/proc/{p}/cmdline").read_text()}
    time.sleep(0.2)
  assert len(workers) >= 2, "the workers did not start"
  time.sleep(1.0)  # the workers are in their initializer or working
  parent.send_signal(signal.SIGKILL)
  parent.wait(timeout=30)
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline and any(_alive(p) for p in workers):
    time.sleep(0.2)
  assert not any(_alive(p) for p in workers), "workers outlived their killed parent"
