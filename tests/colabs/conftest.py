"""The notebooks' run: a copy of the suite's smoke run per notebook module.

Each notebook trains the smoke flagfile's network unless TRACIN_JAX_NOTEBOOK_WORKDIR names a
run made with the same flags; the suite's smoke run (made once for the whole test run) is
that run, so the notebooks reuse its stages instead of each training its own. A notebook
whose flags differ from the flagfile's is refused by the run itself (its settings are checked
against the run's), so the test fails rather than silently retraining.
"""

import pytest


@pytest.fixture(scope="module")
def toy_run(smoke_run, tmp_path_factory):
  """(workdir, cache_dir): this module's copy of the smoke run, and its data cache."""
  workdir = smoke_run.copy_to(tmp_path_factory.mktemp("notebook_run") / "run")
  return workdir, smoke_run.cache
