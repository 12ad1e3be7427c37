"""The notebooks' shared toy run, trained once per session.

Each notebook trains the smoke flagfile's network with `TOY_FLAGS` unless
TRACIN_JAX_NOTEBOOK_WORKDIR names a run made with the same flags; the fixture makes that run
once, so the notebooks' tests reuse its stages instead of each training its own. A notebook
whose flags differ from these is refused by the run itself (its settings are checked against
the run's), so the test fails rather than silently retraining.
"""

import pathlib

import pytest

from experiments import config_flags
from notebook_run import TOY_FLAGS
from tracin_jax import experiment

ROOT = pathlib.Path(__file__).resolve().parents[2]
STAGES = ["train", "influence", "interpret"]


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
  """(workdir, cache_dir) of the toy run, with the stages the notebooks share."""
  cache = tmp_path_factory.mktemp("notebook_cache")
  workdir = tmp_path_factory.mktemp("notebook_run") / "run"
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("TRACIN_JAX_CACHE", str(cache))
    config, _ = config_flags.from_flagfile(
        experiment.ExperimentConfig, str(ROOT / "experiments/configs/smoke.flags"),
        f"--workdir={workdir}", *TOY_FLAGS)
    experiment.run(config, STAGES, progress=False)
  return workdir, cache
