"""The statistics of the retraining and randomisation checks, each written once.

Pure numpy and scipy, so a notebook can summarise any measured results:
  - `spearman_rows`: Spearman's rho of every row of two arrays, vectorised (the LDS per
    output, the similarity of saliency maps);
  - `spearman`: Spearman's rho of two vectors with its two-sided p-value;
  - `rank_correlation`: `spearman` of the pairs where both are finite, None when undefined;
  - `mean_ci`: a mean with its Student-t confidence interval;
  - `paired_test`: the mean of paired differences with its interval and a Wilcoxon p-value;
  - `sign_agreement`: the share of pairs with the same sign and its binomial p-value;
  - `bootstrap_interval`: a percentile bootstrap of a mean over rows that resamples both
    the rows and the columns.

Why two Spearman functions: both rank with average ranks for ties and correlate the ranks,
but `spearman` is scipy's (`scipy.stats.spearmanr`, which also gives the p-value and computes
the correlation through `np.corrcoef`), while `spearman_rows` sums centred ranks itself. The
two differ in the last bit in about half of all cases; each caller keeps the one it always
used, so no number it reports changes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import stats


def spearman_rows(a, b, *, rank_infinite: bool = False) -> np.ndarray:
  """Spearman's rho between a[r] and b[r] for every row r (ties get average ranks).

  Args:
    a, b: [R, M] float.
    rank_infinite: how a row with an infinite entry counts. False (the LDS's convention):
      it has no rho, like a row with a NaN. True (the saliency maps' convention): +inf and
      -inf rank as the largest and smallest values and only a NaN leaves the row undefined.

  Returns:
    [R] float64; NaN for a row that is constant in a or b, or has a NaN entry (or, unless
    `rank_infinite`, an infinite one).

  Raises:
    ValueError: a and b are not both [R, M].
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"a and b must both be [R, M]; got {a.shape} and {b.shape}.")
  usable = np.isnan if rank_infinite else (lambda x: ~np.isfinite(x))
  bad_a, bad_b = usable(a), usable(b)
  ok = ~bad_a.any(axis=1) & ~bad_b.any(axis=1)
  ra = stats.rankdata(np.where(bad_a, 0.0, a), axis=1)
  rb = stats.rankdata(np.where(bad_b, 0.0, b), axis=1)
  ra -= ra.mean(axis=1, keepdims=True)
  rb -= rb.mean(axis=1, keepdims=True)
  denominator = np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))
  with np.errstate(invalid="ignore", divide="ignore"):
    rho = (ra * rb).sum(axis=1) / denominator
  rho[~ok | (denominator == 0)] = np.nan
  return rho


def spearman(x, y) -> tuple[np.float64, np.float64]:
  """Spearman's rho of two vectors and its two-sided p-value (`scipy.stats.spearmanr`).

  Args:
    x, y: [M] float, finite.

  Returns:
    (rho, p_value) as scipy gives them; both NaN when x or y is constant (scipy warns).
  """
  res = stats.spearmanr(x, y)
  return res.statistic, res.pvalue


def rank_correlation(predicted, actual) -> dict[str, float | int | None]:
  """Spearman's rho (with its two-sided p-value) of predicted against actual changes.

  Pairs where either is not finite are left out; rho and p are None with fewer than 3
  pairs or when either side is constant.
  """
  p, a = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
  ok = np.isfinite(p) & np.isfinite(a)
  p, a = p[ok], a[ok]
  if p.size < 3 or np.ptp(p) == 0 or np.ptp(a) == 0:
    return {"rho": None, "p_value": None, "n": int(p.size)}
  rho, p_value = spearman(p, a)
  return {"rho": float(rho), "p_value": float(p_value), "n": int(p.size)}


def mean_ci(values, level: float = 0.95) -> dict[str, float | int | None]:
  """Mean with a Student-t confidence interval (sample standard deviation, ddof = 1).

  Args:
    values: [N] float; entries that are not finite are left out.
    level: the interval's coverage.

  Returns:
    {"mean", "low", "high", "n"}; the bounds are None with fewer than 2 values.
  """
  x = np.asarray(values, np.float64)
  x = x[np.isfinite(x)]
  if x.size == 0:
    return {"mean": None, "low": None, "high": None, "n": 0}
  mean = float(x.mean())
  if x.size < 2:
    return {"mean": mean, "low": None, "high": None, "n": 1}
  half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
  return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(x.size)}


def paired_test(a, b, level: float = 0.95) -> dict[str, float | int | None]:
  """a - b per pair: mean with confidence interval (`mean_ci`), and a two-sided Wilcoxon
  signed-rank p-value (None when every difference is 0 or fewer than 2 pairs); pairs whose
  difference is not finite are left out."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  d = d[np.isfinite(d)]
  out = mean_ci(d, level)
  out["p_value"] = None
  if d.size >= 2 and np.any(d != 0):
    out["p_value"] = float(stats.wilcoxon(d).pvalue)
  return out


def sign_agreement(predicted, actual) -> dict[str, float | int | None]:
  """The share of pairs whose predicted and actual changes have the same sign (pairs where
  either is 0 or not finite are left out), with a two-sided binomial p-value against 1/2."""
  p, a = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
  ok = np.isfinite(p) & np.isfinite(a) & (p != 0) & (a != 0)
  n = int(ok.sum())
  if n == 0:
    return {"share": None, "p_value": None, "n": 0}
  agree = int(np.sum(np.sign(p[ok]) == np.sign(a[ok])))
  return {"share": agree / n, "p_value": float(stats.binomtest(agree, n).pvalue), "n": n}


def bootstrap_interval(statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
                       shape: tuple[int, int], *, level: float, num_bootstrap: int,
                       seed: int) -> tuple[float | None, float | None]:
  """Percentile bootstrap interval of the mean over rows of a per-row statistic, resampling
  both the rows and the columns (both are samples when the rows share the columns, as the
  LDS's outputs share its subsets: resampling rows alone would understate the uncertainty).

  Args:
    statistic: `statistic(rows [R] int, cols [M] int) -> [R] float`, the per-row value on
      the resampled rows and columns (NaN where undefined; the mean leaves it out).
    shape: (R, M).
    level: the interval's coverage.
    num_bootstrap: resamples.
    seed: the resampling's seed.

  Returns:
    (low, high); (None, None) when no resample has a defined value.
  """
  rng = np.random.default_rng(seed)
  r, m = shape
  means = []
  for _ in range(num_bootstrap):
    rows, cols = rng.integers(r, size=r), rng.integers(m, size=m)
    sample = statistic(rows, cols)
    if np.isfinite(sample).any():
      means.append(np.nanmean(sample))
  if not means:
    return None, None
  low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(low), float(high)
