"""Is the influence real? Checks of TracIn explanations against retraining and randomisation.

Pure numpy on score arrays and measured results, so a notebook can call them on any run:
  - `slice_scores`: a test region's TracIn score for each training slice (all its regions);
  - `choose_regions`: test regions to check, the same number per class, seeded;
  - `removal_sets`: a test region's top-k proponent and top-k opponent slices;
  - `class_block_structure`: how strongly a train-influence matrix separates the classes;
  - `ranking_similarity`: how alike two train-influence matrices rank each class's training
    regions. These are the two measures of the randomisation check (model-parameter
    randomisation): an explanation that survives randomising the network does not explain
    what the network learned.
The retraining check's statistics (means with intervals, paired tests, rank correlation,
sign agreement) are `tracin_jax.checks.stats`.

Sign convention: scores are TracIn of losses (eq 6 with loss_j = 1 - D_j), so a proponent
(positive score) is a training region whose updates lowered the test region's loss; removing
proponents is expected to raise that loss (lower its Dice), removing opponents to lower it.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from tracin_jax.checks import stats as checks_stats
from tracin_jax.influence import layout
from tracin_jax.influence import rankings


def slice_scores(blocks: np.ndarray) -> np.ndarray:
  """TracIn of each test region with each training slice as a whole.

  A slice's training loss involves all its classes, so removing the slice removes the
  updates of all its regions; to first order the change of a test loss is the sum of the
  regions' scores. Absent train regions (NaN) contribute nothing.

  Args:
    blocks: [K, n_test, K * n_train] class-block scores (`layout.to_class_blocks`).

  Returns:
    [K, n_test, n_train]: entry [i, a, b] = sum_j T_{i,j}(z_b,j, z'_a,i), NaN where the test
    region (a, i) is absent.
  """
  per_class = layout.per_class(blocks)
  out = np.nansum(per_class, axis=2)
  absent = np.all(np.isnan(per_class), axis=(2, 3))
  out[absent] = np.nan
  return out


def choose_regions(presence: np.ndarray, per_class: int, seed: int = 0
                   ) -> list[tuple[int, int]]:
  """`per_class` present test regions of each class, drawn without replacement.

  Args:
    presence: [n_test, K] bool.
    per_class: regions per class (fewer where a class has fewer present regions).
    seed: the draw's seed.

  Returns:
    [(test index, class index)], class by class, each class's indices ascending.
  """
  if per_class < 1:
    raise ValueError(f"per_class must be at least 1, got {per_class}.")
  rng = np.random.default_rng(seed)
  out = []
  for i in range(presence.shape[1]):
    candidates = np.flatnonzero(presence[:, i])
    take = min(per_class, len(candidates))
    out += [(int(a), i) for a in np.sort(rng.choice(candidates, take, replace=False))]
  return out


def removal_sets(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The `k` training slices with the largest and with the smallest scores.

  Args:
    scores: [n_train] one test region's slice scores (`slice_scores`).
    k: slices per set; at most half of the slices, so the two sets never overlap.

  Returns:
    (proponents [k], opponents [k]) slice indices, strongest first; ties broken by index.
  """
  scores = np.asarray(scores, np.float64)
  if not 1 <= k <= len(scores) // 2:
    raise ValueError(f"k={k}: must be between 1 and half the {len(scores)} training slices.")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores must be finite (an absent test region has no removal sets).")
  order = np.argsort(-scores, kind="stable")
  opponents = np.argsort(scores, kind="stable")[:k]
  return order[:k], opponents


def normalised_influence(blocks: np.ndarray) -> np.ndarray:
  """Train-influence scaled by self-influence: T(a,i; b,j) / sqrt(T(a,i; a,i) T(b,j; b,j)).

  TracIn with positive learning rates is a sum of Gram matrices, so this is a cosine-like
  number in [-1, 1] that does not favour regions with large gradients.

  Args:
    blocks: [K, n, K * n] train-influence (test set = train set), NaN for absent regions.

  Returns:
    [n, K, n, K]; NaN where a region is absent or its self-influence is not positive.
  """
  scores = layout.from_class_blocks(blocks)
  diag = layout.self_scores(scores)
  diag = np.where(diag > 0, diag, np.nan)
  with np.errstate(invalid="ignore"):
    return scores / np.sqrt(diag[:, :, None, None] * diag[None, None, :, :])


def class_block_structure(blocks: np.ndarray, *, top: int = 10) -> dict[str, float]:
  """How strongly train-influence separates the classes.

  Over pairs of present regions of different slices (a != b), with the normalised influence
  C (`normalised_influence`):
    - `auc`: the probability that a same-class pair has a larger C than a pair of different
      classes (0.5: no class structure; 1: every same-class pair above every other);
    - `within`, `between`: the mean C of same-class and of different-class pairs, and
      `contrast` = within - between;
    - `same_class_top`: the share of a region's `top` proponents (raw scores, own slice
      excluded) that have its class, averaged over classes (Fig. 5's diagonal).

  Args:
    blocks: [K, n, K * n] train-influence, NaN for absent regions.
    top: proponents per region for `same_class_top`.

  Returns:
    The numbers above, as floats (NaN where undefined).
  """
  c = normalised_influence(blocks)
  n, k = c.shape[:2]
  same_class = np.eye(k, dtype=bool)[None, :, None, :]
  other_slice = ~np.eye(n, dtype=bool)[:, None, :, None]
  ok = np.isfinite(c) & other_slice
  within = c[ok & same_class]
  between = c[ok & ~same_class]
  auc = np.nan
  if within.size and between.size:
    u = stats.mannwhitneyu(within, between, alternative="two-sided").statistic
    auc = float(u / (within.size * between.size))
  dist = rankings.proponent_class_distribution(blocks, k=top, exclude_self=True)
  w = float(within.mean()) if within.size else np.nan
  b = float(between.mean()) if between.size else np.nan
  return {"auc": auc, "within": w, "between": b, "contrast": w - b,
          "same_class_top": float(np.nanmean(np.diag(dist))),
          "pairs_within": int(within.size), "pairs_between": int(between.size)}


def ranking_similarity(blocks_a: np.ndarray, blocks_b: np.ndarray, *,
                       top: int = 10) -> dict[str, float]:
  """How alike two train-influence matrices of the same regions rank the training regions.

  For each region (a, i) present in both, over the same-class training regions (b, i) of the
  other slices: Spearman's rho between the two rows of scores, and the overlap of the two
  sets of `top` proponents (shared / top), beside the overlap two random sets would have
  (top / candidates). Rows that are constant in either matrix have no rho and are skipped.

  Args:
    blocks_a, blocks_b: [K, n, K * n] train-influence, NaN for absent regions.
    top: proponents compared per region.

  Returns:
    {"median_rho", "rho_q25", "rho_q75", "rows" (rows with a rho), "top_overlap",
     "top_overlap_chance"} (NaN where no row qualifies).
  """
  a, b = layout.from_class_blocks(blocks_a), layout.from_class_blocks(blocks_b)
  if a.shape != b.shape:
    raise ValueError(f"the two matrices differ in shape: {blocks_a.shape}, {blocks_b.shape}.")
  n, k = a.shape[:2]
  rhos, overlap, chance = [], [], []
  for row in range(n):
    for i in range(k):
      x, y = a[row, i, :, i].copy(), b[row, i, :, i].copy()
      x[row] = y[row] = np.nan
      ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
      if ok.size <= top:
        continue
      if np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0:
        rhos.append(checks_stats.spearman(x[ok], y[ok])[0])
      top_x = set(ok[np.argsort(-x[ok], kind="stable")[:top]].tolist())
      top_y = set(ok[np.argsort(-y[ok], kind="stable")[:top]].tolist())
      overlap.append(len(top_x & top_y) / top)
      chance.append(top / ok.size)
  q = np.percentile(rhos, [25, 50, 75]) if rhos else [np.nan] * 3
  return {"median_rho": float(q[1]), "rho_q25": float(q[0]), "rho_q75": float(q[2]),
          "rows": len(rhos),
          "top_overlap": float(np.mean(overlap)) if overlap else np.nan,
          "top_overlap_chance": float(np.mean(chance)) if chance else np.nan}
