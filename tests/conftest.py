"""Fixtures shared by the whole suite: the tiny training run, the smoke run, one compile cache.

Compilation is paid once per test run: before JAX is imported, every process of the run
(this one, pytest-xdist's workers, and the subprocesses, notebook kernels and store workers
the tests start, which inherit the environment) is pointed at one persistent compilation
cache, a directory made for this run and removed after it. A developer who sets
JAX_COMPILATION_CACHE_DIR keeps their own cache across runs (a faster edit loop). Each of
those processes computes on one XLA thread (below).

XLA's optimisations stay on: with `jax_disable_most_optimizations` the suite took 40% less
time, but XLA:CPU then computed NaN losses for the tiny UNet's training step, and tests that
compare two computations bit for bit passed on NaN.
"""

import os
import pathlib
import shutil
import sys
import tempfile

_OWN_CACHE = "TRACIN_JAX_TEST_COMPILATION_CACHE"  # set where this run made the directory
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_OWN_CACHE] = tempfile.mkdtemp(
      prefix="tracin_jax_test_compilations_")
  os.chmod(os.environ[_OWN_CACHE], 0o755)  # readable by the permission cases' ordinary user
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# One XLA:CPU compute thread per process: pytest-xdist runs one worker per core, and the
# processes the tests start run beside them, so XLA's own pool of a thread per core only
# oversubscribes the cores. On 2 cores the quick tier took 270 s with it and 177 s without.
_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_ONE_THREAD}".strip()

import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_TESTS = pathlib.Path(__file__).parent
for _d in ("", "training", "stages", "reliability"):  # shared helper modules
  sys.path.insert(0, str(_TESTS / _d))
import shared_runs  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import tiny_run  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from tracin_jax.training import train as train_lib  # noqa: E402


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """Scheduling by shared_runs.WORKER_GROUPS (xdist's own `xdist_group` mark renames tests
  through an attribute that pytest 9 no longer reads, so it groups nothing)."""
  if config.getvalue("dist") != "load":
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class GroupScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      return shared_runs.worker_group(nodeid)

    def _reschedule(self, node):
      # xdist queues more work while a worker has up to 2 tests pending: the last three
      # notebooks (20 to 40 s each) then queued on one worker while the other stood idle.
      # One unit ahead keeps a worker busy without hoarding the end of the run.
      if (not node.shutting_down and self.workqueue
          and self._pending_of(self.assigned_work[node]) > 1):
        return
      super()._reschedule(node)

  return GroupScheduling(config, log)


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what will not run
def pytest_collection_modifyitems(config, items):
  """Tests of the smoke run go last, and the run starts now, in the background, if any of
  them is to run (the quick tier has none)."""
  uses = [item for item in items if "smoke_run" in getattr(item, "fixturenames", ())]
  if uses:
    last = set(map(id, uses))
    items[:] = [item for item in items if id(item) not in last] + uses
    shared_runs.start_smoke_run(config._tmp_path_factory)  # pylint: disable=protected-access


def pytest_unconfigure(config):
  """What this test run started goes with it (only in the process that owns it)."""
  if not hasattr(config, "workerinput"):
    if hasattr(config, "_tmp_path_factory"):
      shared_runs.stop_smoke_run(config._tmp_path_factory)  # pylint: disable=protected-access
    if os.environ.get(_OWN_CACHE):
      shutil.rmtree(os.environ[_OWN_CACHE], ignore_errors=True)


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
  """The tiny run (tests/training/tiny_run.py), trained once: (workdir, TrainResult)."""
  workdir = tmp_path_factory.mktemp("full")
  result = train_lib.train(tiny_run.CONFIG, tiny_run.TRAIN, tiny_run.VAL, workdir,
                           progress=False, log=lambda *_: None)
  return workdir, result


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> shared_runs.SmokeRun:
  """The smoke flagfile's run, made once for the whole test run by `python -m
  experiments.run` in the background. Read only: copy it to write (`copy_to`)."""
  return shared_runs.smoke_run(tmp_path_factory)
