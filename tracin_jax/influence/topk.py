"""Proponents and opponents: the k largest and k smallest scores, NaN-aware."""

from __future__ import annotations

import numpy as np


def _largest(key: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices and values of the k largest keys along the last axis, in descending order.

  Only the k selected entries are sorted (ties by ascending index); keys equal to -inf mark
  entries that are never selected: where fewer than k remain, index -1 and NaN fill in.
  """
  n = key.shape[-1]
  if k == 0:
    shape = key.shape[:-1] + (0,)
    return np.zeros(shape, np.int64), np.zeros(shape, key.dtype)
  if k < n:
    idx = np.argpartition(-key, k - 1, axis=-1)[..., :k]
  else:
    idx = np.broadcast_to(np.arange(n), key.shape).copy()
  vals = np.take_along_axis(key, idx, axis=-1)
  order = np.lexsort((idx, -vals), axis=-1)
  idx = np.take_along_axis(idx, order, axis=-1).astype(np.int64)
  vals = np.take_along_axis(vals, order, axis=-1)
  missing = vals == -np.inf
  idx[missing] = -1
  vals[missing] = np.nan
  return idx, vals


def top_k(scores, k: int, axis: int = -1):
  """The k proponents (largest scores) and k opponents (smallest) along one axis.

  Uses `np.argpartition` and sorts only the k selected entries, never whole rows.
  Non-finite scores (NaN, such as the scores of an empty region, and +-inf) are never
  selected. Where a row has fewer than k finite scores, the results are padded with index
  -1 and score NaN, so every output has exactly k entries along `axis`. Ties at the k-th
  value are broken arbitrarily; selected ties are ordered by ascending index.

  For TracIn scores [n_test, K, n_train, K], the explanation of test region (a, i) ranks
  the train regions (b, j) jointly:
      idx, s, _, _ = top_k(scores.reshape(n_test, K, n_train * K), k)
      train_example, train_class = np.divmod(idx, K)   # where idx >= 0

  Args:
    scores: array of scores.
    k: how many proponents and opponents, k >= 0 (may exceed the axis length: padding).
    axis: the axis to select along.

  Returns:
    prop_idx: int64, `scores.shape` with `axis` of length k: indices of the largest scores,
      largest first (-1 = padding).
    prop_scores: their scores (NaN = padding), float.
    opp_idx: indices of the smallest scores, smallest first (-1 = padding).
    opp_scores: their scores (NaN = padding).
  """
  x = np.asarray(scores)
  if x.ndim == 0:
    raise ValueError("top_k needs an array with at least one axis.")
  if isinstance(k, (bool, np.bool_)) or int(k) != k or k < 0:
    raise ValueError(f"k must be a non-negative integer, got {k!r}.")
  k = int(k)
  if not np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float64)
  x = np.moveaxis(x, axis, -1)
  n = x.shape[-1]
  finite = np.isfinite(x)
  kk = min(k, n)
  prop_idx, prop = _largest(np.where(finite, x, -np.inf), kk)
  opp_idx, opp = _largest(np.where(finite, -x, -np.inf), kk)
  opp = -opp
  if kk < k:
    pad = [(0, 0)] * (x.ndim - 1) + [(0, k - kk)]
    prop_idx, opp_idx = (np.pad(i, pad, constant_values=-1) for i in (prop_idx, opp_idx))
    prop, opp = (np.pad(v, pad, constant_values=np.nan) for v in (prop, opp))
  return (np.moveaxis(prop_idx, -1, axis), np.moveaxis(prop, -1, axis),
          np.moveaxis(opp_idx, -1, axis), np.moveaxis(opp, -1, axis))
