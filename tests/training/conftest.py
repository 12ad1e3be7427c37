import pytest
import tiny_run

from tracin_jax.training import train as train_lib


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
  """The tiny run, trained once: (workdir, TrainResult)."""
  workdir = tmp_path_factory.mktemp("full")
  result = train_lib.train(tiny_run.CONFIG, tiny_run.TRAIN, tiny_run.VAL, workdir,
                           progress=False, log=lambda *_: None)
  return workdir, result
