"""The linear datamodeling score (LDS; Park et al. 2023, TRAK) of an attribution method.

An attribution method gives each training example b a score s[r, b] for a test output r
(here: a validation region's soft Dice, or its loss with the sign flipped). Read as a
linear datamodel, it predicts the output of a network trained on a subset S of the
training set as sum_{b in S} s[r, b], up to a constant. The LDS retrains the network on M
random subsets S_1..S_M (each a fixed fraction of the training set), measures the output
y[r, m] after each, and scores the method by Spearman's rho, per output r, between the
predicted sum_{b in S_m} s[r, b] and the measured y[r, m] over the M subsets; then the mean
over outputs. The retrainings do not depend on the method, so every method is scored on the
same ones and adding a method costs no retraining.

Pure numpy, so a notebook can score any method on any measured subsets:
  - `sample_subsets`: the M seeded subsets, each keeping round(fraction n) examples;
  - `predicted_outputs`: the linear datamodel's prediction of each subset's outputs;
  - `lds`: the mean of the per-output rhos (`stats.spearman_rows`) with a bootstrap interval
    (outputs and subsets resampled, `stats.bootstrap_interval`);
  - `lds_difference`: the paired difference of two methods' LDS on the same retrainings,
    with a bootstrap interval (does one method beat another clearly?);
  - `measure_subsets`: retrains and measures each subset once, saving each result as it
    finishes in a store (`SubsetStore`) and reusing finished ones.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Callable, Protocol

import numpy as np

from tracin_jax.checks import stats

logger = logging.getLogger("tracin_jax")


def subset_size(n: int, fraction: float) -> int:
  """Examples kept in each subset: round(fraction n), at least 1 and at most n - 1.

  Raises:
    ValueError: fraction outside (0, 1), or n < 2.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must be in (0, 1), got {fraction!r}.")
  if n < 2:
    raise ValueError(f"need at least 2 training examples to draw subsets, got {n}.")
  return int(min(max(round(fraction * n), 1), n - 1))


def sample_subsets(n: int, num_subsets: int, fraction: float, seed: int = 0) -> np.ndarray:
  """M random subsets of n training examples, each keeping `subset_size(n, fraction)`.

  Subset m is drawn from its own generator (seed, m), so the first M subsets are the same
  whatever `num_subsets` is: raising M adds subsets and keeps the earlier ones.

  Args:
    n: training examples.
    num_subsets: M.
    fraction: share of the examples each subset keeps, in (0, 1).
    seed: the draw's seed.

  Returns:
    [M, n] bool: row m is True for the examples subset m keeps.
  """
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be at least 1, got {num_subsets}.")
  size = subset_size(n, fraction)
  masks = np.zeros((num_subsets, n), bool)
  for m in range(num_subsets):
    rng = np.random.default_rng([seed, m])
    masks[m, rng.choice(n, size, replace=False)] = True
  return masks


def subset_name(mask: np.ndarray) -> str:
  """A name for a subset that changes with its members: 'subset_<hash>'."""
  kept = np.flatnonzero(np.asarray(mask, bool))
  digest = hashlib.sha256(f"{len(mask)}:{kept.tolist()}".encode()).hexdigest()[:12]
  return f"subset_{digest}"


def predicted_outputs(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """The linear datamodel's prediction: the sum of the kept examples' scores.

  Args:
    scores: [R, n] attribution of each of R outputs to each training example (NaN counts
      as 0: an example without a score adds nothing).
    masks: [M, n] bool subsets (`sample_subsets`).

  Returns:
    [R, M] float64: entry [r, m] = sum over the examples b of subset m of scores[r, b].
  """
  scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0)
  masks = np.asarray(masks, bool)
  if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
    raise ValueError(f"scores [R, n] and masks [M, n] must share n; got {scores.shape} and "
                     f"{masks.shape}.")
  return scores @ masks.T.astype(np.float64)


def lds(predicted: np.ndarray, measured: np.ndarray, *, level: float = 0.95,
        num_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
  """The linear datamodeling score: the mean over outputs of the per-output Spearman rho.

  The interval is a percentile bootstrap that resamples both the outputs and the subsets
  (both are samples: the outputs share the subsets, so resampling outputs alone would
  understate the uncertainty).

  Args:
    predicted: [R, M] the method's predicted outputs (`predicted_outputs`).
    measured: [R, M] the outputs measured after retraining on each subset.
    level: the interval's coverage.
    num_bootstrap: bootstrap resamples (0: no interval).
    seed: the bootstrap's seed.

  Returns:
    {"mean", "low", "high", "median", "n_outputs" (outputs with a defined rho),
     "n_subsets", "per_output" [R] (NaN where undefined)}.
  """
  rho = stats.spearman_rows(predicted, measured)
  ok = np.isfinite(rho)
  out = {"mean": float(rho[ok].mean()) if ok.any() else None, "low": None, "high": None,
         "median": float(np.median(rho[ok])) if ok.any() else None,
         "n_outputs": int(ok.sum()), "n_subsets": int(np.shape(predicted)[1]),
         "per_output": rho}
  if num_bootstrap and ok.sum() >= 2:
    p, y = np.asarray(predicted)[ok], np.asarray(measured)[ok]
    out["low"], out["high"] = stats.bootstrap_interval(
        lambda rows, cols: stats.spearman_rows(p[rows][:, cols], y[rows][:, cols]), y.shape,
        level=level, num_bootstrap=num_bootstrap, seed=seed)
  return out


def lds_difference(predicted_a: np.ndarray, predicted_b: np.ndarray, measured: np.ndarray,
                   *, level: float = 0.95, num_bootstrap: int = 1000, seed: int = 0
                   ) -> dict[str, Any]:
  """LDS of method a minus LDS of method b, paired on the same outputs and subsets.

  Both are computed on every bootstrap resample of outputs and subsets, so the interval
  reflects how much the difference itself varies (much less than the two LDS do).

  Args:
    predicted_a, predicted_b: [R, M] the two methods' predicted outputs.
    measured: [R, M] the measured outputs.
    level, num_bootstrap, seed: as `lds`.

  Returns:
    {"mean", "low", "high", "n_outputs"}: the mean over outputs where both rhos are defined
    of rho_a - rho_b, with its interval (None without resamples).
  """
  rho_a = stats.spearman_rows(predicted_a, measured)
  rho_b = stats.spearman_rows(predicted_b, measured)
  ok = np.isfinite(rho_a) & np.isfinite(rho_b)
  out = {"mean": float((rho_a - rho_b)[ok].mean()) if ok.any() else None, "low": None,
         "high": None, "n_outputs": int(ok.sum())}
  if num_bootstrap and ok.sum() >= 2:
    pa, pb, y = (np.asarray(x)[ok] for x in (predicted_a, predicted_b, measured))
    out["low"], out["high"] = stats.bootstrap_interval(
        lambda rows, cols: (stats.spearman_rows(pa[rows][:, cols], y[rows][:, cols])
                            - stats.spearman_rows(pb[rows][:, cols], y[rows][:, cols])),
        y.shape, level=level, num_bootstrap=num_bootstrap, seed=seed)
  return out


class SubsetStore(Protocol):
  """Where `measure_subsets` keeps finished results (`tracin_jax.stages.Parts` is one)."""

  def load(self, name: str) -> np.ndarray | dict | None:
    ...

  def save(self, name: str, value: np.ndarray | dict) -> None:
    ...


def measure_subsets(masks: np.ndarray, retrain_and_measure: Callable[[np.ndarray], Any],
                    store: SubsetStore, *, log: Callable[[str], None] = logger.info
                    ) -> np.ndarray:
  """The measured outputs of a network retrained on each subset, each computed once.

  A subset's result is saved in `store` under `subset_name(mask)` as soon as it is
  measured, and a saved result is reused (an interrupted series resumes; a larger M, or a
  second method, reuses the subsets already measured).

  Args:
    masks: [M, n] bool subsets.
    retrain_and_measure: `f(removed [n - kept] int) -> [R] or [R, ...] float`: retrains
      without the `removed` training examples and measures the outputs.
    store: `load(name)` / `save(name, array)`.
    log: receives one line per retraining, with the time left.

  Returns:
    [M, R, ...] float64: the measured outputs of each subset.
  """
  masks = np.asarray(masks, bool)
  results: list[np.ndarray | None] = [store.load(subset_name(m)) for m in masks]
  todo = [i for i, r in enumerate(results) if r is None]
  if len(todo) < len(masks):
    log(f"LDS: {len(masks) - len(todo)} of {len(masks)} subsets' retrainings reused.")
  times = []
  for t, i in enumerate(todo):
    t0 = time.perf_counter()
    value = np.asarray(retrain_and_measure(np.flatnonzero(~masks[i])), np.float64)
    store.save(subset_name(masks[i]), value)
    results[i] = value
    times.append(time.perf_counter() - t0)
    left = np.median(times) * (len(todo) - t - 1)
    log(f"LDS: subset {i + 1} of {len(masks)} retrained and measured in {times[-1]:.0f} s "
        f"({t + 1}/{len(todo)} this run); about {left / 60:.0f} min left.")
  return np.stack([np.asarray(r, np.float64) for r in results])
