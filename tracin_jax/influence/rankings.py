"""From TracIn scores to explanations: class blocks, proponents, global explainers.

Pure numpy on score arrays, so a notebook can call it on any scores:
  - `global_explainers`: train regions in the top `top` proponents or opponents of more than
    `min_fraction` of the test regions;
  - `explain`: top-k proponents and opponents of each test region, with global explainers
    marked;
  - `proponent_class_distribution`: the classes of the top-k proponents per test class
    (the paper's Fig. 5);
  - `ranking_agreement`: how alike two score sets rank each test region's training regions
    (a projection or a layer selection against the full gradients);
  - `local_explanation_examples`: the examples whose local explanations are shown.
Absent regions are NaN in the scores and never selected.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tracin_jax.checks import stats as checks_stats
from tracin_jax.data import slices as slices_lib
from tracin_jax.influence import layout
from tracin_jax.influence.topk import top_k


def global_explainers(blocks: np.ndarray, *, top: int = 20, min_fraction: float = 0.5,
                      exclude_self: bool = False) -> list[dict]:
  """Train regions that explain many test regions alike.

  A train region (b, j) counts for a test region (a, i) when it is among that region's `top`
  proponents or `top` opponents. Regions counted for more than `min_fraction` of the present
  test regions are global explainers (they carry little about any one prediction; the
  global analysis can remove them).

  Args:
    blocks: [K, n_test, K * n_train] scores, NaN where a region is absent.
    top: how many proponents and opponents per test region count.
    min_fraction: the fraction of test regions above which a train region is global.
    exclude_self: for train-influence (test set = train set), ignore a region's own row.

  Returns:
    One dict per global explainer, most frequent first: `column` (in a class block),
    `train_index`, `train_class` (0-based index among the K classes), `fraction`,
    `proponent_fraction`, `opponent_fraction`.
  """
  k, n_test, kn = blocks.shape
  n_train = kn // k
  rows = blocks.reshape(k * n_test, kn).copy()
  if exclude_self:
    for i in range(k):
      for a in range(n_test):
        rows[i * n_test + a, layout.own_columns(a, k, n_train)] = np.nan
  present = ~np.all(np.isnan(rows), axis=1)
  rows = rows[present]
  if len(rows) == 0:
    return []
  pi, _, oi, _ = top_k(rows, top)
  prop_counts = np.zeros(kn)
  opp_counts = np.zeros(kn)
  for idx, counts in ((pi, prop_counts), (oi, opp_counts)):
    valid = idx[idx >= 0]
    np.add.at(counts, valid, 1)
  either = np.zeros(kn)
  for r in range(len(rows)):
    members = np.union1d(pi[r][pi[r] >= 0], oi[r][oi[r] >= 0])
    either[members] += 1
  fraction = either / len(rows)
  out = []
  for col in np.argsort(-fraction, kind="stable"):
    if fraction[col] <= min_fraction:
      break
    j, b = layout.split_column(int(col), n_train)
    out.append({
        "column": int(col), "train_index": int(b), "train_class": int(j),
        "fraction": float(fraction[col]),
        "proponent_fraction": float(prop_counts[col] / len(rows)),
        "opponent_fraction": float(opp_counts[col] / len(rows)),
    })
  return out


def explain(blocks: np.ndarray, test_ids: Sequence[tuple[str, int]],
            train_ids: Sequence[tuple[str, int]], class_names: Sequence[str], *, k: int = 10,
            global_columns: Sequence[int] = (), exclude_self: bool = False) -> list[dict]:
  """Top-k proponents and opponents of every present test region.

  Args:
    blocks: [K, n_test, K * n_train] scores, NaN where a region is absent.
    test_ids, train_ids: (case, slice) of each test and train example.
    class_names: the K class names (e.g. NCR/NET, ED, ET).
    k: how many of each.
    global_columns: columns of global explainers, marked `global_explainer: true`.
    exclude_self: for train-influence, leave a region's own image out.

  Returns:
    A list of {case, slice, class, proponents: [...], opponents: [...]}, each entry
    {case, slice, class, score, global_explainer}, proponents by decreasing score, opponents
    by increasing score.
  """
  kk, n_test, kn = blocks.shape
  n_train = kn // kk
  global_columns = set(int(c) for c in global_columns)
  out = []
  for a in range(n_test):
    for i in range(kk):
      row = blocks[i, a].copy()
      if np.all(np.isnan(row)):
        continue
      if exclude_self:
        row[layout.own_columns(a, kk, n_train)] = np.nan
      pi, ps, oi, os_ = top_k(row[None], k)

      def entries(idx, vals):
        items = []
        for col, val in zip(idx, vals):
          if col < 0:
            continue
          j, b = layout.split_column(int(col), n_train)
          items.append({
              "case": train_ids[b][0], "slice": int(train_ids[b][1]),
              "class": class_names[j], "score": float(val),
              "global_explainer": int(col) in global_columns})
        return items

      out.append({
          "case": test_ids[a][0], "slice": int(test_ids[a][1]), "class": class_names[i],
          "proponents": entries(pi[0], ps[0]), "opponents": entries(oi[0], os_[0])})
  return out


def proponent_class_distribution(blocks: np.ndarray, *, k: int = 10,
                                 exclude_self: bool = False) -> np.ndarray:
  """Fraction of each train class among the top-k proponents, per test class.

  Returns:
    [K, K] array: row i (test class), column j (train class); rows sum to 1 where the test
    class has present regions, NaN otherwise.
  """
  kk, n_test, kn = blocks.shape
  n_train = kn // kk
  counts = np.zeros((kk, kk))
  for i in range(kk):
    rows = blocks[i].copy()
    if exclude_self:
      for a in range(n_test):
        rows[a, layout.own_columns(a, kk, n_train)] = np.nan
    present = ~np.all(np.isnan(rows), axis=1)
    if not present.any():
      continue
    pi, _, _, _ = top_k(rows[present], k)
    valid = pi[pi >= 0]
    np.add.at(counts[i], layout.split_column(valid, n_train)[0], 1)
  with np.errstate(invalid="ignore"):
    return counts / counts.sum(axis=1, keepdims=True)


def ranking_agreement(full: np.ndarray, restricted: np.ndarray, presence_test: np.ndarray,
            presence_train: np.ndarray, top: int):
  """How two TracIn score sets agree on each present validation region's ranking of the
  present training regions: (class, Spearman, proponent overlap, opponent overlap).

  Args:
    full, restricted: [K, n_val, K * n_train] score blocks (test class i, then train class
      j's block), NaN where a region is absent.
    presence_test: [n_val, K] bool; presence_train: [n_train, K] bool.
    top: k of the top-k overlap.

  Returns:
    list of (i, rho, proponent overlap, opponent overlap).
  """
  columns = presence_train.T.reshape(-1)  # train class j's block, example-major inside
  out = []
  for i in range(full.shape[0]):
    for a in np.flatnonzero(presence_test[:, i]):
      f, r = full[i, a, columns], restricted[i, a, columns]
      if not (np.isfinite(f).all() and np.isfinite(r).all()):
        raise ValueError(f"non-finite scores for present regions (class {i}, example {a}).")
      rho, _ = checks_stats.spearman(f, r)
      order_f, order_r = np.argsort(-f), np.argsort(-r)
      pro = len(set(order_f[:top]) & set(order_r[:top])) / top
      opp = len(set(order_f[-top:]) & set(order_r[-top:])) / top
      out.append((i, rho, pro, opp))
  return out


def local_explanation_examples(regions: np.ndarray, num: int, cases: np.ndarray) -> list[int]:
  """The examples whose local explanations are shown: those with the most predicted classes,
  then the largest regions, one per case while other cases remain (neighbouring slices of
  one case explain alike).

  Args:
    regions: [N, *spatial, K] bool, the examples' regions (slices [N, H, W, K] or volumes
      [N, D, H, W, K]; a volume's size is its voxel count).
    num: how many examples at most.
    cases: [N] the case of every example.

  Returns:
    Up to `num` example indices, best first; only examples with a region.
  """
  regions = np.asarray(regions)
  space = tuple(range(1, regions.ndim - 1))
  present = regions.any(axis=space).sum(axis=1)
  size = regions.sum(axis=(*space, regions.ndim - 1))
  order = [int(a) for a in np.lexsort((-size, -present)) if present[a] > 0]
  return slices_lib.spread_over_cases(order, cases, num)
