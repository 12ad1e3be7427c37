"""The tiny data and the tiny trained run (train and influence), made once per session."""

import pathlib
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bad_inputs  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def runner():
  return bad_inputs.inprocess_runner()


@pytest.fixture(scope="session")
def shared(runner):
  """(base directory, tiny data, trained run): the run is copied, never changed, by cases.

  The base is a fresh directory under the system's temporary directory, readable by all:
  permission cases run as an ordinary user when the tests run as root (pytest's own
  temporary directories are private to their owner).
  """
  base = pathlib.Path(tempfile.mkdtemp(prefix="tracin_jax_reliability_"))
  base.chmod(0o755)
  data, run_dir = bad_inputs.make_shared(base, runner)
  yield base, data, run_dir
  shutil.rmtree(base, ignore_errors=True)
