"""Tests of the LDS's noise ceiling and of an LDS as a fraction of it."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tracin_jax.checks import ceiling
from tracin_jax.checks import lds

M, R = 40, 12


def _retrainings(noise: float, seed: int = 0):
  """Two measurements [M, R] of the same subsets: a signal per (subset, output) plus
  independent noise per retraining; and the signal [M, R]."""
  rng = np.random.default_rng(seed)
  signal = rng.normal(size=(M, R))
  return (signal + noise * rng.normal(size=(M, R)),
          signal + noise * rng.normal(size=(M, R)), signal)


def test_the_ceiling_of_identical_retrainings_is_one():
  a, _, _ = _retrainings(0.5)
  out = ceiling.noise_ceiling(a, a.copy(), num_bootstrap=50)
  np.testing.assert_allclose(out["per_output"], 1.0, rtol=1e-12)
  assert out["mean"] == pytest.approx(1.0) and out["n_outputs"] == R
  assert out["low"] == pytest.approx(1.0) and out["high"] == pytest.approx(1.0)
  assert out["n_subsets"] == M


def test_the_ceiling_of_independent_noise_is_about_zero():
  rng = np.random.default_rng(1)
  out = ceiling.noise_ceiling(rng.normal(size=(200, 50)), rng.normal(size=(200, 50)),
                              num_bootstrap=100)
  assert abs(out["mean"]) < 0.03
  assert out["low"] < 0.0 < out["high"]


def test_the_ceiling_matches_a_plain_scipy_loop_and_falls_with_the_noise():
  a, b, _ = _retrainings(1.0)
  a[:, 3] = 0.5  # an output constant over the subsets has no rho
  out = ceiling.noise_ceiling(a, b, num_bootstrap=200, seed=3)
  expected = [np.nan if r == 3 else scipy_stats.spearmanr(a[:, r], b[:, r]).statistic
              for r in range(R)]
  np.testing.assert_allclose(out["per_output"], expected, rtol=1e-12)
  assert out["n_outputs"] == R - 1
  assert out["mean"] == pytest.approx(np.nanmean(expected), rel=1e-12)
  assert out["median"] == pytest.approx(np.nanmedian(expected), rel=1e-12)
  assert out["low"] < out["mean"] < out["high"]
  quieter = ceiling.noise_ceiling(*_retrainings(0.3)[:2], num_bootstrap=0)
  assert quieter["mean"] > out["mean"] + 0.2 and quieter["low"] is None


def test_lds_fraction_is_the_ratio_of_the_means_over_the_shared_outputs():
  a, b, signal = _retrainings(0.7, seed=2)
  rng = np.random.default_rng(4)
  predicted = (signal + 0.5 * rng.normal(size=signal.shape)).T  # [R, M]
  b[:, 5] = 1.0  # no ceiling at output 5: left out of both means
  out = ceiling.lds_fraction(predicted, a, b, num_bootstrap=200)
  rho_method = np.array([scipy_stats.spearmanr(predicted[r], a[:, r]).statistic
                         for r in range(R)])
  rho_ceiling = np.array([scipy_stats.spearmanr(a[:, r], b[:, r]).statistic
                          for r in range(R) if r != 5])
  rho_method = np.delete(rho_method, 5)
  assert out["n_outputs"] == R - 1
  assert out["lds"] == pytest.approx(rho_method.mean(), rel=1e-12)
  assert out["ceiling"] == pytest.approx(rho_ceiling.mean(), rel=1e-12)
  assert out["fraction"] == pytest.approx(rho_method.mean() / rho_ceiling.mean(), rel=1e-12)
  assert out["low"] < out["fraction"] < out["high"]
  # Predicting the signal itself beats one retraining: a fraction above 1, and about 1
  # against the square root of the ceiling (the classical reliability bound).
  best = ceiling.lds_fraction(signal.T, a, b, num_bootstrap=0)
  rooted = ceiling.lds_fraction(signal.T, a, b, root=True, num_bootstrap=0)
  assert best["fraction"] > 1.1
  assert rooted["ceiling"] == pytest.approx(np.sqrt(np.clip(rho_ceiling, 0, None)).mean())
  assert rooted["fraction"] == pytest.approx(1.0, abs=0.1) and rooted["root"]
  # The method's LDS is the LDS module's on the same outputs.
  keep = np.arange(R) != 5
  assert out["lds"] == pytest.approx(
      lds.lds(predicted[keep], a.T[keep], num_bootstrap=0)["mean"], rel=1e-12)


def test_bad_shapes_are_refused():
  a, b, _ = _retrainings(0.5)
  with pytest.raises(ValueError, match="must both be"):
    ceiling.noise_ceiling(a, b[:, :3])
  with pytest.raises(ValueError, match="at least 3"):
    ceiling.noise_ceiling(a[:2], b[:2])
  with pytest.raises(ValueError, match="predicted must be"):
    ceiling.lds_fraction(a, a, b)
