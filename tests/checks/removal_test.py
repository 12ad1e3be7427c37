"""The removal test's saved retrainings: read back as run_retrainings saved them, none run."""

import pathlib

import pytest

from tracin_jax.checks import removal


class _Store:
  """A store in memory (`removal.RetrainingStore`)."""

  dir = pathlib.Path("in-memory")

  def __init__(self):
    self.saved = {}

  def load(self, name):
    return self.saved.get(name)

  def save(self, name, value):
    self.saved[name] = value


_JOBS = [removal.RemovalJob("baseline", "baseline", (), None),
         removal.RemovalJob("random_0", "random", (1, 2), None),
         removal.RemovalJob("proponents_0", "proponents", (3, 4), 0)]


def _no_retrainer():
  raise AssertionError("a saved retraining was run again")


def test_saved_retrainings_are_those_under_each_jobs_part_name():
  store = _Store()
  store.save("baseline", {"region_dice": [0.5]})
  store.save(removal.default_part_name(_JOBS[2]), {"region_dice": [0.25]})
  store.save("random_0", {"region_dice": [0.0]})  # not its part name: no hash of its set
  assert removal.saved_retrainings(_JOBS, store) == {
      "baseline": {"region_dice": [0.5]}, "proponents_0": {"region_dice": [0.25]}}
  named = removal.saved_retrainings(_JOBS, store, part_name=lambda job: job.name)
  assert set(named) == {"baseline", "random_0"}


def test_run_retrainings_runs_none_when_every_one_is_saved():
  store = _Store()
  for job in _JOBS:
    store.save(removal.default_part_name(job), {"name": job.name, "region_dice": [0.1]})
  lines = []
  results = removal.run_retrainings(_JOBS, measure=None, final_params=None, store=store,
                                    make_retrainer=_no_retrainer, log=lines.append)
  assert results == removal.saved_retrainings(_JOBS, store)
  assert lines == ["Retraining: 3 of 3 results reused from in-memory."]
  with pytest.raises(AssertionError, match="run again"):
    removal.run_retrainings(_JOBS + [removal.RemovalJob("opponents_0", "opponents", (5,), 0)],
                            None, None, store, _no_retrainer, log=lines.append)
