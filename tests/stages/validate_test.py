"""Tests of the validate stage's bookkeeping: which slices each retraining removes, and how
the measured Dice values become effects, summaries and the rank correlation."""

import numpy as np
import pytest

from tracin_jax.checks import stats as checks_stats
from tracin_jax.stages import validate


def _setup():
  rng = np.random.default_rng(0)
  k, n_val, n_train = 3, 4, 12
  scores = rng.normal(size=(k, n_val, n_train))
  regions = [(0, 0), (2, 1), (3, 2)]
  config = validate.ValidateConfig(num_removed=3, num_random=2, seed=1)
  return scores, regions, config, validate._jobs(regions, scores, n_train, config)


def test_jobs_remove_each_regions_top_slices_and_shared_random_sets():
  scores, regions, config, jobs = _setup()
  assert [j.name for j in jobs] == ["baseline", "random_0", "random_1", "proponents_0",
                                    "opponents_0", "proponents_1", "opponents_1",
                                    "proponents_2", "opponents_2"]
  assert jobs[0].removed == ()
  for job in jobs[3:]:
    a, i = regions[job.region]
    order = np.argsort(scores[i, a])
    expected = order[::-1][:3] if job.removal == "proponents" else order[:3]
    assert job.removed == tuple(expected)
  for job in jobs[1:3]:
    assert len(set(job.removed)) == 3 and job.region is None
  assert jobs[1].removed != jobs[2].removed


def test_summary_effects_are_differences_from_the_baseline_replay():
  scores, regions, config, jobs = _setup()
  base = [0.9, 0.8, 0.7]
  dice = {"baseline": base, "random_0": [0.89, 0.81, 0.70], "random_1": [0.87, 0.79, 0.72],
          "proponents_0": [0.85, 0.0, 0.0], "opponents_0": [0.95, 0.0, 0.0],
          "proponents_1": [0.0, 0.75, 0.0], "opponents_1": [0.0, 0.82, 0.0],
          "proponents_2": [0.0, 0.0, 0.60], "opponents_2": [0.0, 0.0, 0.71]}
  results = {name: {"region_dice": d, "hard_dice": d} for name, d in dice.items()}
  summary, arrays = validate._summarise(jobs, results, regions, scores, ("A", "B", "C"))
  np.testing.assert_allclose(arrays["effect"]["proponents"], [-0.05, -0.05, -0.10])
  np.testing.assert_allclose(arrays["effect"]["opponents"], [0.05, 0.02, 0.01])
  np.testing.assert_allclose(arrays["effect"]["random"], [-0.02, 0.0, 0.01])  # mean of 2
  assert summary["dice_change"]["proponents"]["mean"] == pytest.approx(-0.2 / 3)
  assert summary["proponents_minus_random"]["mean"] == pytest.approx(
      np.mean([-0.03, -0.05, -0.11]))
  assert set(summary["per_class"]) == {"A", "B", "C"}
  # One point per (region, removed set): each random set counts for every region.
  assert len(arrays["actual"]) == 2 * 3 + 2 * 3
  a, i = regions[1]
  job = next(j for j in jobs if j.name == "proponents_1")
  m = np.flatnonzero((arrays["kinds"] == "proponents"))[1]
  assert arrays["predicted"][m] == pytest.approx(scores[i, a, list(job.removed)].sum())
  assert arrays["actual"][m] == pytest.approx(0.05)  # loss change = -Dice change
  assert summary["sign_agreement"]["all"] == checks_stats.sign_agreement(
      arrays["predicted"], arrays["actual"])
  random = arrays["kinds"] == "random"
  assert summary["sign_agreement"]["random"] == checks_stats.sign_agreement(
      arrays["predicted"][random], arrays["actual"][random])
  assert summary["rank_correlation"]["all"] == checks_stats.rank_correlation(
      arrays["predicted"], arrays["actual"])
  assert "are in the expected order" in validate._verdict(summary)
