"""The noise ceiling of the LDS: how well one retraining predicts another.

Retraining on a subset is itself noisy: the same subset retrained with another data order
(`training.retrain.Retrainer(order_seed=...)`) gives other outputs. Retrain each of the M
LDS subsets twice, with two data orders, and measure the R outputs (validation regions'
soft Dice) both times: y_a, y_b [M, R]. Per output r, the Spearman correlation over the
subsets of y_a[:, r] and y_b[:, r] is what a method would score in the LDS if it predicted
one retraining exactly and were scored against the other: the ceiling of the LDS at output r
(DESIGN section 8). Its mean over outputs is the ceiling of the LDS, and a method's LDS is
best read as a fraction of it.

What the ceiling bounds: a method that predicted each subset's expected output (over data
orders) exactly would score higher than one retraining does, about the square root of the
ceiling when the orders' noise adds to the output independently of the subset (the
classical reliability bound; exactly so for Pearson's correlation). `lds_fraction` divides
by the correlation by default, and by its square root with `root=True`.

Pure numpy, with the LDS's statistics (`stats.spearman_rows`, `stats.bootstrap_interval`):
  - `noise_ceiling(measured_a, measured_b)`: per-output correlations, their mean with a
    bootstrap interval (outputs and subsets resampled);
  - `lds_fraction(predicted, measured_a, measured_b)`: a method's LDS (against
    `measured_a`) over the ceiling, a ratio of means over the same outputs, with a bootstrap
    interval in which both move together.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tracin_jax.checks import lds as lds_lib
from tracin_jax.checks import stats


def _measured_pair(measured_a, measured_b) -> tuple[np.ndarray, np.ndarray]:
  """[R, M] views of two [M, R] measurements (the LDS's layout is [R, M])."""
  a, b = np.asarray(measured_a, np.float64), np.asarray(measured_b, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"measured_a and measured_b must both be [num_subsets, num_outputs]; "
                     f"got {a.shape} and {b.shape}.")
  if a.shape[0] < 3:
    raise ValueError(f"measured_a: {a.shape[0]} subsets; a rank correlation over subsets "
                     "needs at least 3.")
  return a.T, b.T


def noise_ceiling(measured_a, measured_b, *, level: float = 0.95, num_bootstrap: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
  """The LDS's noise ceiling: per output, the Spearman rho of two retrainings over subsets.

  Args:
    measured_a: [M, R] float, the R outputs measured after retraining each of the M subsets
      (as `lds.measure_subsets` returns them).
    measured_b: [M, R] float, the same subsets retrained with another data order.
    level: the interval's coverage.
    num_bootstrap: bootstrap resamples (0: no interval).
    seed: the bootstrap's seed.

  Returns:
    {"mean", "low", "high", "median", "n_outputs" (outputs with a defined rho),
     "n_subsets", "per_output" [R] (NaN where undefined: an output constant over the
     subsets in either retraining, or not finite)}, as `lds.lds` gives them.

  Raises:
    ValueError: the arrays are not both [M, R], or M < 3.
  """
  a, b = _measured_pair(measured_a, measured_b)
  # One retraining's measure as the other's prediction: the LDS itself, interval and all.
  return lds_lib.lds(a, b, level=level, num_bootstrap=num_bootstrap, seed=seed)


def _ratio_rows(rho_method: np.ndarray, rho_ceiling: np.ndarray, root: bool) -> np.ndarray:
  """[R] whose mean over the finite entries is mean(rho_method) / mean(ceiling) over the
  outputs where both are defined (NaN elsewhere); the ceiling's square root (of rho
  clipped at 0) with `root`."""
  ceiling = np.sqrt(np.clip(rho_ceiling, 0.0, None)) if root else rho_ceiling
  ok = np.isfinite(rho_method) & np.isfinite(ceiling)
  out = np.full(rho_method.shape, np.nan)
  denominator = ceiling[ok].mean() if ok.any() else 0.0
  if denominator > 0:
    out[ok] = rho_method[ok] / denominator
  return out


def lds_fraction(predicted, measured_a, measured_b, *, root: bool = False,
                 level: float = 0.95, num_bootstrap: int = 1000, seed: int = 0
                 ) -> dict[str, Any]:
  """A method's LDS as a fraction of the noise ceiling, on the same outputs and subsets.

  fraction = mean_r rho(predicted[r], measured_a[:, r]) / mean_r ceiling_r, both means over
  the outputs where both are defined; ceiling_r = rho(measured_a[:, r], measured_b[:, r])
  (with `root`, its square root, the bound for a method that predicts the expected output;
  see the module). A ratio of means, not a mean of ratios: an output whose ceiling is near
  0 would otherwise dominate. The bootstrap resamples outputs and subsets once for both,
  so the interval carries their shared noise.

  Args:
    predicted: [R, M] the method's predicted outputs (`lds.predicted_outputs`).
    measured_a: [M, R] the outputs measured after retraining each subset (the LDS's).
    measured_b: [M, R] the same with another data order.
    root: divide by the square root of the ceiling.
    level, num_bootstrap, seed: as `noise_ceiling`.

  Returns:
    {"fraction", "low", "high" (None without resamples or where undefined), "lds" and
     "ceiling" (the two means over the shared outputs), "n_outputs", "root"}.

  Raises:
    ValueError: shapes that do not match, or M < 3.
  """
  a, b = _measured_pair(measured_a, measured_b)
  p = np.asarray(predicted, np.float64)
  if p.shape != a.shape:
    raise ValueError(f"predicted must be [num_outputs, num_subsets] = {a.shape} like the "
                     f"transposed measurements; got {p.shape}.")

  def rows(r, c):
    pr, ar, br = p[r][:, c], a[r][:, c], b[r][:, c]
    return _ratio_rows(stats.spearman_rows(pr, ar), stats.spearman_rows(ar, br), root)

  rho_method = stats.spearman_rows(p, a)
  rho_ceiling = stats.spearman_rows(a, b)
  ceiling = np.sqrt(np.clip(rho_ceiling, 0.0, None)) if root else rho_ceiling
  ok = np.isfinite(rho_method) & np.isfinite(ceiling)
  ratio = _ratio_rows(rho_method, rho_ceiling, root)
  out = {"fraction": float(np.nanmean(ratio)) if np.isfinite(ratio).any() else None,
         "low": None, "high": None,
         "lds": float(rho_method[ok].mean()) if ok.any() else None,
         "ceiling": float(ceiling[ok].mean()) if ok.any() else None,
         "n_outputs": int(ok.sum()), "root": root}
  if num_bootstrap and ok.sum() >= 2:
    out["low"], out["high"] = stats.bootstrap_interval(
        rows, a.shape, level=level, num_bootstrap=num_bootstrap, seed=seed)
  return out
