"""Tests of the checks' statistics: Spearman's rho against scipy on rows with ties, NaN and
infinities, the vectorised rows against one row at a time, the intervals and paired tests
against hand computations."""

import numpy as np
import pytest
from scipy import stats

from tracin_jax.checks import stats as checks_stats


def _rows_with_ties(seed: int, r: int = 60, m: int = 17):
  """[r, m] pairs of rows, a third of them rounded to few values (many ties)."""
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(r, m)), rng.normal(size=(r, m))
  a[::3] = np.round(a[::3])
  b[1::3] = np.round(2 * b[1::3])
  a[2::5, :m // 2] = a[2::5, :1]  # a long run of equal values
  return a, b


def test_spearman_rows_matches_scipy_and_flags_constant_rows():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
  a[1, :10] = a[1, 0]  # ties
  b[3] = 1.0  # constant: undefined
  a[4, 2] = np.nan
  rho = checks_stats.spearman_rows(a, b)
  for r in range(3):
    assert rho[r] == pytest.approx(stats.spearmanr(a[r], b[r]).statistic)
  assert np.isnan(rho[3]) and np.isnan(rho[4])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_spearman_rows_matches_scipy_on_rows_with_ties(seed):
  a, b = _rows_with_ties(seed)
  expected = [stats.spearmanr(x, y).statistic for x, y in zip(a, b)]
  np.testing.assert_allclose(checks_stats.spearman_rows(a, b), expected, rtol=1e-13,
                             atol=1e-15)
  # Average ranks: a tie that scipy's "ordinal" ranks would break changes rho.
  ordinal = [np.corrcoef(stats.rankdata(x, "ordinal"), stats.rankdata(y, "ordinal"))[0, 1]
             for x, y in zip(a, b)]
  assert not np.allclose(checks_stats.spearman_rows(a, b), ordinal)


def test_spearman_rows_is_the_one_row_computation_done_for_every_row():
  a, b = _rows_with_ties(4)
  rho = checks_stats.spearman_rows(a, b)
  one_at_a_time = [checks_stats.spearman_rows(a[r:r + 1], b[r:r + 1])[0]
                   for r in range(len(a))]
  np.testing.assert_array_equal(rho, one_at_a_time)  # bit for bit


def test_spearman_rows_conventions_for_nan_and_infinity():
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(4, 12)), rng.normal(size=(4, 12))
  a[0, 3] = np.inf
  b[1, 0] = -np.inf
  a[2, 5] = np.nan
  # The LDS's convention: a row with any non-finite entry has no rho.
  rho = checks_stats.spearman_rows(a, b)
  assert np.isnan(rho[:3]).all() and np.isfinite(rho[3])
  # The saliency maps' convention: infinities rank as the extremes; a NaN still leaves the
  # row undefined; finite rows are the same either way.
  ranked = checks_stats.spearman_rows(a, b, rank_infinite=True)
  for r in (0, 1):
    assert ranked[r] == pytest.approx(stats.spearmanr(a[r], b[r]).statistic)
  assert np.isnan(ranked[2]) and ranked[3] == rho[3]
  with pytest.raises(ValueError, match=r"\[R, M\]"):
    checks_stats.spearman_rows(a[0], b[0])
  with pytest.raises(ValueError, match=r"\[R, M\]"):
    checks_stats.spearman_rows(a, b[:, :5])


def test_spearman_is_scipys_rho_and_p_value_bit_for_bit():
  a, b = _rows_with_ties(6)
  rows = checks_stats.spearman_rows(a, b)
  differs = 0
  for x, y, rho_rows in zip(a, b, rows):
    rho, p = checks_stats.spearman(x, y)
    res = stats.spearmanr(x, y)
    assert rho == res.statistic and p == res.pvalue
    assert rho == pytest.approx(rho_rows, rel=1e-13)  # one idea, ...
    differs += rho != rho_rows
  # ... two roundings: the callers of each keep their exact numbers (module docstring).
  assert differs > 0


def test_mean_ci_is_the_student_t_interval():
  x = np.array([1.0, 2.0, 4.0, 7.0, 6.0])
  s = checks_stats.mean_ci(x)
  half = 2.7764451 * x.std(ddof=1) / np.sqrt(5)  # t(0.975, 4 degrees of freedom)
  assert s["mean"] == pytest.approx(4.0) and s["n"] == 5
  assert s["low"] == pytest.approx(4.0 - half) and s["high"] == pytest.approx(4.0 + half)
  assert checks_stats.mean_ci([np.nan, 3.0])["low"] is None
  assert checks_stats.mean_ci([])["mean"] is None


def test_paired_test_and_rank_correlation():
  a, b = np.array([0.1, 0.3, 0.2, 0.5]), np.array([0.0, 0.1, 0.1, 0.2])
  p = checks_stats.paired_test(a, b)
  assert p["mean"] == pytest.approx(np.mean(a - b))
  assert p["p_value"] == pytest.approx(stats.wilcoxon(a - b).pvalue)
  assert checks_stats.paired_test(a, a)["p_value"] is None
  x = np.array([1.0, 5.0, 2.0, 8.0, 3.0])
  assert checks_stats.rank_correlation(x, x ** 3)["rho"] == pytest.approx(1.0)
  assert checks_stats.rank_correlation(x, -x)["rho"] == pytest.approx(-1.0)
  assert checks_stats.rank_correlation(x, np.ones(5))["rho"] is None


def test_rank_correlation_leaves_out_pairs_that_are_not_finite():
  x = np.array([1.0, 5.0, 2.0, 8.0, 3.0, np.nan, 4.0])
  y = np.array([2.0, 4.0, 1.0, 9.0, 3.0, 1.0, np.inf])
  c = checks_stats.rank_correlation(x, y)
  res = stats.spearmanr(x[:5], y[:5])
  assert c == {"rho": res.statistic, "p_value": res.pvalue, "n": 5}
  assert checks_stats.rank_correlation(x[:2], y[:2]) == {"rho": None, "p_value": None, "n": 2}


def test_sign_agreement_counts_pairs_with_the_same_sign():
  predicted = np.array([1.0, -2.0, 3.0, -1.0, 0.0, 2.0, np.nan])
  actual = np.array([0.5, -0.1, -1.0, -3.0, 1.0, 0.0, 1.0])
  s = checks_stats.sign_agreement(predicted, actual)
  assert s["n"] == 4 and s["share"] == 0.75  # zeros and NaN left out
  assert s["p_value"] == pytest.approx(stats.binomtest(3, 4).pvalue)
  assert checks_stats.sign_agreement([0.0], [1.0])["share"] is None


def test_bootstrap_interval_resamples_rows_and_columns_as_a_plain_loop_does():
  rng = np.random.default_rng(7)
  values = rng.normal(size=(9, 5))

  def statistic(rows, cols):
    return values[rows][:, cols].mean(axis=1)

  low, high = checks_stats.bootstrap_interval(statistic, values.shape, level=0.9,
                                              num_bootstrap=200, seed=3)
  draws = np.random.default_rng(3)
  means = []
  for _ in range(200):
    rows, cols = draws.integers(9, size=9), draws.integers(5, size=5)
    means.append(np.nanmean(statistic(rows, cols)))
  assert (low, high) == tuple(np.quantile(means, [0.05, 0.95]))
  assert low < values.mean() < high
  nothing = checks_stats.bootstrap_interval(lambda r, c: np.full(len(r), np.nan),
                                            values.shape, level=0.9, num_bootstrap=20, seed=0)
  assert nothing == (None, None)
