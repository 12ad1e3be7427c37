"""The removal test's saved retrainings: read back as run_retrainings saved them, none run."""

import logging
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


class _FakeRetrainer:
  """Stands for `retrain.Retrainer`: the 'model' it returns is the removed set itself."""

  epochs, from_epoch, num_steps = (3, 4), 2, 8

  def __init__(self, calls):
    self.calls = calls

  def __call__(self, removed, **_):
    self.calls.append(tuple(removed))
    return tuple(removed)


def test_a_damaged_saved_retraining_is_named_and_run_again(tmp_path, caplog):
  from tracin_jax.stages import base  # pylint: disable=g-import-not-at-top

  jobs = _JOBS[1:]  # no baseline: its record compares with the run's parameters
  calls = []
  measure = lambda removed: ([0.5 + 0.125 * len(removed)], [1.0 - 0.25 * len(removed)])
  run = lambda store: removal.run_retrainings(jobs, measure, None, store,
                                              lambda: _FakeRetrainer(calls), log=lambda _: None)
  store = base.Parts(tmp_path, {"run": "x"}, what="retraining")
  first = run(store)
  assert calls == [(1, 2), (3, 4)]
  path = store.dir / f"{removal.default_part_name(jobs[1])}.json"
  path.write_text(path.read_text().replace("0.75", "0.25"))  # still JSON, another Dice
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    again = run(base.Parts(tmp_path, {"run": "x"}, what="retraining"))
  assert calls == [(1, 2), (3, 4), (3, 4)]  # only the damaged one retrained
  assert again == first
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and warned[0].startswith(f"retraining: {path}: its bytes differ")
