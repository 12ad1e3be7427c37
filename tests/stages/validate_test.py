"""Tests of the validate stage's bookkeeping: which slices each retraining removes, how
the measured Dice values become effects, summaries and the rank correlation, and the
randomisation check's random networks."""

import types

import jax
import numpy as np
import pytest
from flax import nnx

from tracin_jax import models
from tracin_jax.checks import stats as checks_stats
from tracin_jax.stages import validate
from tracin_jax.training import train as train_lib


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



# ----------------------------------------------------------------------- the random networks

# Kernel values of random network 1 of seed 0 for a tiny UNet (base width 4, depth 2), as
# the check drew it before models drew their parameters together: the first value of the
# first three kernels and the last of the last (to 1e-6: another CPU's XLA may differ in a
# last bit).
RANDOM_NETWORK_1000 = [-0.024065783247351646, -0.07074733078479767, 0.1352931708097458,
                       -0.1024983823299408]
RUN_MODEL = train_lib.ModelConfig(name="unet", base_width=4, depth=2)


def _randomisation(seed: int = 0) -> validate._Randomisation:
  """The check's networks, for a run of RUN_MODEL (no data is used to build them)."""
  n = 3
  context = types.SimpleNamespace(train_set=types.SimpleNamespace(
      images=np.zeros((n, 8, 8, 4), np.float32), labels=np.zeros((n, 8, 8), np.uint8)))
  inputs = types.SimpleNamespace(train_regions=np.zeros((n, 4), bool), apply_fn=None,
                                 learning_rates=[0.1, 0.05])
  plan = types.SimpleNamespace(index=np.arange(n),
                               run_config=types.SimpleNamespace(model=RUN_MODEL))
  return validate._Randomisation(context, inputs, validate.ValidateConfig(seed=seed), plan)


def _kernel_fingerprint(params) -> list[float]:
  kernels = [np.asarray(x).ravel() for x in jax.tree.leaves(params) if x.ndim == 4]
  return [float(k[0]) for k in kernels[:3]] + [float(kernels[-1][-1])]


def test_the_random_networks_are_those_drawn_before():
  check = _randomisation()
  ckpt = check.random_network(0)
  assert ckpt.learning_rate == 0.1
  np.testing.assert_allclose(_kernel_fingerprint(ckpt.params), RANDOM_NETWORK_1000, rtol=1e-6)
  assert check.random_network(0) is ckpt  # built once
  # Network t has streams nnx.Rngs(1000 + seed + t): other seeds, other draws.
  other_seed = _kernel_fingerprint(_randomisation(seed=1).random_network(0).params)
  assert not np.allclose(other_seed, RANDOM_NETWORK_1000)
  np.testing.assert_array_equal(other_seed, _kernel_fingerprint(check.random_network(1).params))


@pytest.mark.slow  # the plain construction compiles one draw per parameter shape
def test_the_random_networks_are_the_plain_construction():
  """Random network t: the run's model built eagerly, draw by draw, from
  `nnx.Rngs(1000 + seed + t)`, bit for bit."""
  check = _randomisation()
  for t in range(2):
    plain = models.UNet(base_width=4, depth=2, background_bias=RUN_MODEL.background_bias,
                        rngs=nnx.Rngs(1000 + t))
    got = jax.tree.leaves(check.random_network(t).params)
    want = jax.tree.leaves(nnx.state(plain, nnx.Param))
    assert len(got) == len(want) > 10
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
