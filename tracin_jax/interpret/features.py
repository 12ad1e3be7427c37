"""Global explanation: TracIn ordering against the last hidden layer (paper section 3.5).

Pure functions a notebook can call on any model whose `apply_fn` exposes its last hidden
layer (`apply_fn(params, images, channel_mask=None, return_hidden=False)`, as
`tracin_jax.models.functional` gives):

  - `region_features`, `hidden_features`: f(z_j)_k = max of feature map k over region z_j
    -> [N, K, C], NaN where the region is empty;
  - `region_cosine`: the cosine of two regions' feature vectors f(z_j) (a similarity
    baseline for TracIn that uses no gradients) -> [n_test, K, n_train, K];
  - `similarity` (eq 7): S(z_j, z'_i)_k = f(z'_i)_k f(z_j)_k / max(|f(z'_i)_k|, |f(z_j)_k|)^2;
  - `feature_importance` (eq 8): FI[i, k, r] = mean over the test regions of class i of S
    with the train region at TracIn rank r (the ranked scatter plot of the paper's Fig. 6);
  - `select_predictive`: the operational rule "U shape or negative slope, and FI > 0.65 at
    the first proponent" on each FI curve;
  - `feature_impact` (eq 9): F[k, i] = mean over images of the hard Dice of class i lost when
    feature map k of the last hidden layer is masked (Fig. 7).

Index conventions follow `tracin_jax.influence`: K foreground classes (class i is label
i + 1), scores [n_test, K, n_train, K] with entry [a, i, b, j] = T_{i,j}(z_j^b, z'^a_i), and
a class block's column j * n_train + b names train region (b, j) (as in
`tracin_jax.influence.layout.to_class_blocks` and the global explainers' `column`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax import batching
from tracin_jax.influence import layout
from tracin_jax.types import ApplyFn, Array, Params

DEFAULT_FI_THRESHOLD = 0.65


# ---------------------------------------------------------------------------------------------
# Region features f(z_j)_k.


def region_features(hidden, regions):
  """f(z_j)_k: the maximum of each feature map over each region.

  Works on numpy or JAX arrays (and under `jit`). The regions are reduced one class at a
  time, so the peak memory is one [N, H, W, C] array besides the inputs.

  Args:
    hidden: [N, H, W, C] float, the last hidden layer's feature maps.
    regions: [N, H, W, K] bool, region j of each image (e.g. from `predict_regions`).

  Returns:
    [N, K, C] float (hidden's dtype): entry [n, j, k] = max of hidden[n, ..., k] over the
    pixels of regions[n, ..., j]; NaN where that region is empty.

  Raises:
    ValueError: if the leading three axes of hidden and regions differ.
  """
  if hidden.ndim != 4 or regions.ndim != 4 or hidden.shape[:3] != regions.shape[:3]:
    raise ValueError(f"hidden [N, H, W, C] and regions [N, H, W, K] must share N, H, W; got "
                     f"{hidden.shape} and {regions.shape}.")
  hidden = jnp.asarray(hidden)
  regions = jnp.asarray(regions, bool)
  out = []
  for j in range(regions.shape[-1]):
    inside = regions[..., j, None]  # [N, H, W, 1]
    peak = jnp.max(jnp.where(inside, hidden, -jnp.inf), axis=(1, 2))  # [N, C]
    present = jnp.any(inside, axis=(1, 2))  # [N, 1]
    out.append(jnp.where(present, peak, jnp.nan))
  return jnp.stack(out, axis=1)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _features_batch(apply_fn: ApplyFn, params: Params, images: Array, regions: Array):
  _, hidden = apply_fn(params, images, return_hidden=True)
  return region_features(hidden, regions)


def hidden_features(apply_fn: ApplyFn, params: Params, images, regions, *,
                    batch_size: int = 32) -> np.ndarray:
  """Region features of a set of images, one compiled batch at a time.

  Only one batch of hidden maps exists at any time; each batch is reduced to its region
  maxima inside the compiled call.

  Args:
    apply_fn: `apply_fn(params, images, return_hidden=True) -> (logits, hidden [B, H, W, C])`;
      compiled once per function object and batch shape.
    params: the explained model's parameters.
    images: [N, H, W, C_in] float.
    regions: [N, H, W, K] bool (e.g. `predict_regions(apply_fn, params, images)`).
    batch_size: images per compiled call (the last batch is padded).

  Returns:
    [N, K, C] float32 numpy array; NaN where a region is empty.

  Raises:
    ValueError: for empty inputs or mismatched image and region counts.
  """
  n = len(images)
  if n == 0 or len(regions) != n:
    raise ValueError(f"need as many region maps as images (> 0); got {len(regions)} and {n}.")
  images = images if isinstance(images, jax.Array) else np.asarray(images)
  regions = np.asarray(regions, bool)
  batch_size = min(int(batch_size), n)
  out = []
  for index, valid in batching.padded_batches(n, batch_size):
    f = _features_batch(apply_fn, params, images[index], regions[index])
    out.append(np.asarray(f)[:valid])
  return np.concatenate(out)


def region_cosine(f_test, f_train) -> np.ndarray:
  """The cosine of the region feature vectors of every test and train region.

  A representation-similarity score beside TracIn: it uses the same ingredients as eq 7
  (f(z_j), the maxima of the last hidden layer's maps over a region), compared as whole
  vectors, and no gradient.

  Args:
    f_test: [n_test, K, C] region features (`hidden_features`), NaN where a region is empty.
    f_train: [n_train, K, C].

  Returns:
    [n_test, K, n_train, K] float64: entry [a, i, b, j] = cos(f_test[a, i], f_train[b, j]);
    NaN where either region is empty, 0 where either vector is 0.
  """
  f_test, f_train = np.asarray(f_test, np.float64), np.asarray(f_train, np.float64)
  if f_train.ndim != 3 or f_test.ndim != 3 or f_train.shape[1:] != f_test.shape[1:]:
    raise ValueError(f"f_train [n_train, K, C] and f_test [n_test, K, C] must share K and C; "
                     f"got {f_train.shape} and {f_test.shape}.")

  def unit(f):
    norm = np.linalg.norm(f, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(norm == 0, 0.0, f / norm)

  return np.einsum("aic,bjc->aibj", unit(f_test), unit(f_train))


# ---------------------------------------------------------------------------------------------
# Similarity (eq 7) and feature importance (eq 8).


def _pair_similarity(f_test: np.ndarray, f_train: np.ndarray) -> np.ndarray:
  """Eq 7 elementwise on broadcastable arrays; 0 where both features are 0."""
  scale = np.maximum(np.abs(f_test), np.abs(f_train)) ** 2
  product = f_test * f_train
  with np.errstate(invalid="ignore", divide="ignore"):
    s = product / scale
  return np.where(scale == 0, 0.0, s)


def similarity(f_train, f_test, *, test_class: int | None = None) -> np.ndarray:
  """Eq 7 for every pair of a test region and a train region.

      S(z_j, z'_i)_k = f(z'_i)_k f(z_j)_k / max(|f(z'_i)_k|, |f(z_j)_k|)^2

  S lies in [-1, 1]: 1 when the two features are equal, 0 when one is 0, negative when their
  signs differ. When both features are 0 the ratio is 0/0; it is defined as 0 here (neither
  region activates feature k, so the feature says nothing about their likeness). NaN (an
  empty region) propagates.

  The full array has n_test * K * n_train * K * C entries; pass `test_class` to build one
  test class's slice at a time ([n_test, n_train, K, C]) and bound memory by K.
  `feature_importance` never builds either: it evaluates S only for the ranked pairs it
  averages.

  Args:
    f_train: [n_train, K, C] region features of the train set (`hidden_features`).
    f_test: [n_test, K, C] region features of the test set.
    test_class: None, or a test class index i in [0, K).

  Returns:
    float array: [n_test, K, n_train, K, C] with entry [a, i, b, j, k] = S(z_j^b, z'^a_i)_k,
    or [n_test, n_train, K, C] (entry [a, b, j, k]) for one `test_class`.

  Raises:
    ValueError: if the class or feature axes of the two sets differ.
  """
  f_train, f_test = np.asarray(f_train), np.asarray(f_test)
  if f_train.ndim != 3 or f_test.ndim != 3 or f_train.shape[1:] != f_test.shape[1:]:
    raise ValueError(f"f_train [n_train, K, C] and f_test [n_test, K, C] must share K and C; "
                     f"got {f_train.shape} and {f_test.shape}.")
  if test_class is None:
    return _pair_similarity(f_test[:, :, None, None, :], f_train[None, None])
  return _pair_similarity(f_test[:, test_class, None, None, :], f_train[None])


def _ranked_columns(row_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Columns by descending score, NaN last (ties: lower column first); counts of non-NaN."""
  order = np.argsort(-row_scores, axis=1, kind="stable")  # NaN sorts last
  return order, np.sum(~np.isnan(row_scores), axis=1)


def feature_importance(scores, f_train, f_test, *, exclude_columns: Sequence[int] = (),
                       align: str = "spread") -> np.ndarray:
  """Eq 8: the mean similarity with the train region at each TracIn rank.

  For each present test region (a, i) (a row of scores with a finite entry), the present
  train regions (b, j) of all classes j (finite scores), minus `exclude_columns`, are
  ordered by T_{i,j}(z_j^b, z'^a_i) descending (ties: the lower class-block column first):
  rank 0 is the first proponent, the last rank the strongest opponent. Then

      FI[i, k, r] = mean over the present test regions a of class i of
                    S(train region at rank r of (a, i), z'^a_i)_k.

  Every row usually ranks the same number of train regions (presence of a train region does
  not depend on the test region). If the counts differ, R = the smallest count over all
  present test regions, and a row with m > R ranked regions contributes R of them:
  `align="spread"` (default) takes the ranks round(r (m - 1) / (R - 1)), r = 0..R-1, so the
  first proponent and the last opponent of every row stay aligned; `align="truncate"`
  takes its first R ranks (its weakest opponents are dropped). With equal counts both give
  the ranks 0..R-1.

  Vectorised: one argsort per row, one gather of the train features, eq 7 on
  [n_test, R, C] per test class (the full S of `similarity` is never built).

  Args:
    scores: [n_test, K, n_train, K] TracIn scores, NaN where a region is absent.
    f_train: [n_train, K, C] train region features (NaN where absent).
    f_test: [n_test, K, C] test region features.
    exclude_columns: class-block columns j * n_train + b of train regions to drop (the
      global explainers' `column`).
    align: "spread" or "truncate", how rows with more ranked regions than R contribute.

  Returns:
    FI [K, C, R] float64, entry [i, k, r]; NaN for a test class with no present region.
    R = 0 (an empty last axis) when no test region has a ranked train region.

  Raises:
    ValueError: for inconsistent shapes, an out-of-range column or an unknown `align`.
  """
  scores = np.asarray(scores, np.float64)
  f_train, f_test = np.asarray(f_train, np.float64), np.asarray(f_test, np.float64)
  n_test, k, n_train, k2 = scores.shape
  if (k != k2 or f_train.shape[:2] != (n_train, k) or f_test.shape[:2] != (n_test, k)
      or f_train.shape[2] != f_test.shape[2]):
    raise ValueError(f"scores {scores.shape}, f_train {f_train.shape} and f_test "
                     f"{f_test.shape} do not agree ([n_test, K, n_train, K], [n_train, K, C], "
                     "[n_test, K, C]).")
  if align not in ("spread", "truncate"):
    raise ValueError(f"align must be 'spread' or 'truncate', got {align!r}.")
  c = f_train.shape[2]
  exclude = np.asarray(list(exclude_columns), int)
  if exclude.size and (exclude.min() < 0 or exclude.max() >= k * n_train):
    raise ValueError(f"exclude_columns must lie in [0, {k * n_train}); got {exclude}.")

  # Class-block layout: rows [K, n_test, K * n_train], train features [K * n_train, C].
  blocks = layout.to_class_blocks(scores).copy()
  blocks[:, :, exclude] = np.nan
  train_flat = np.transpose(f_train, (1, 0, 2)).reshape(k * n_train, c)

  order, counts = [], []
  for i in range(k):
    o, m = _ranked_columns(blocks[i])
    order.append(o)
    counts.append(m)
  present = [m > 0 for m in counts]
  all_counts = np.concatenate([m[p] for m, p in zip(counts, present)])
  r_len = int(all_counts.min()) if all_counts.size else 0
  fi = np.full((k, c, r_len), np.nan)
  if r_len == 0:
    return fi
  ranks = np.arange(r_len)
  for i in range(k):
    if not present[i].any():
      continue
    o, m = order[i][present[i]], counts[i][present[i]]  # [n_i, K * n_train], [n_i]
    if align == "spread" and r_len > 1:
      pick = np.rint(ranks[None, :] * (m[:, None] - 1) / (r_len - 1)).astype(int)
    else:
      pick = np.broadcast_to(ranks, (len(m), r_len))
    columns = np.take_along_axis(o, pick, axis=1)  # [n_i, R]
    s = _pair_similarity(f_test[present[i], i][:, None, :], train_flat[columns])  # [n_i, R, C]
    fi[i] = np.mean(s, axis=0).T
  return fi


# ---------------------------------------------------------------------------------------------
# Predictive feature selection.


def _fit(x: np.ndarray, y: np.ndarray, degree: int) -> tuple[np.ndarray, np.ndarray]:
  """Least-squares polynomial fit of each column of y [R, M]: (coefficients [degree+1, M]
  highest power first, residual sum of squares [M])."""
  design = np.vander(x, degree + 1)
  coef, *_ = np.linalg.lstsq(design, y, rcond=None)
  residual = y - design @ coef
  return coef, np.sum(residual ** 2, axis=0)


def select_predictive(fi, fi_threshold: float = DEFAULT_FI_THRESHOLD, *, n_first: int = 3,
                      end_fraction: float = 0.1, middle_fraction: float = 0.5,
                      u_margin: float = 0.05, min_slope: float = 0.05,
                      r2_threshold: float = 0.5) -> dict[str, np.ndarray]:
  """The paper's predictive features: U shape or negative slope, and FI > 0.65 first.

  Each curve y_r = FI[i, k, r] is read against the normalised rank x_r = r / (R - 1) in
  [0, 1] (0: first proponent, 1: last opponent):

    - line: least squares y = slope x + intercept, with r2 = 1 - SS_res / SS_tot
      (r2 = 0 for a constant curve: there is no variation to explain);
    - quadratic: least squares y = curvature x^2 + b x + c;
    - head, tail: means of y over the first and the last `end_fraction` of the ranks
      (ceil(end_fraction R) ranks, at least 1); middle: mean over the central
      `middle_fraction` of the ranks (x in [0.25, 0.75] by default);
    - u_shape: curvature > 0, head - middle > u_margin and tail - middle > u_margin
      (proponents and opponents both above the neutral middle, Fig. 6 a, b);
    - negative_slope: slope < -min_slope and r2 >= r2_threshold (a clear linear fall from
      proponents to opponents, the helping case of Fig. 6 d); slope is the change of FI
      over the whole rank range, so min_slope is in FI units;
    - fi_first: the mean of FI over the first min(n_first, R) ranks, an estimate of FI at
      the first proponent that is less noisy than rank 0 alone;
    - predictive: fi_first > fi_threshold and (u_shape or negative_slope).
  A curve with a NaN (a test class without regions) gets NaN statistics and False verdicts.

  Args:
    fi: [K, C, R] from `feature_importance`, R >= 3.
    fi_threshold: the FI the first proponents must exceed (the paper: 0.65).
    n_first: how many leading ranks fi_first averages.
    end_fraction: fraction of the ranks in the head and in the tail.
    middle_fraction: fraction of the ranks, centred, in the middle.
    u_margin: how far head and tail must both lie above the middle.
    min_slope: how steep (in FI over the rank range) a negative slope must be.
    r2_threshold: how well the line must fit for a negative slope to count.

  Returns:
    dict of [K, C] arrays: "slope", "intercept", "r2", "curvature", "head", "middle",
    "tail", "fi_first" (float64) and "u_shape", "negative_slope", "predictive" (bool).

  Raises:
    ValueError: if fi is not [K, C, R] with R >= 3 or a fraction is out of (0, 1].
  """
  fi = np.asarray(fi, np.float64)
  if fi.ndim != 3 or fi.shape[2] < 3:
    raise ValueError(f"fi must be [K, C, R] with R >= 3 ranks, got {fi.shape}.")
  for name, value in (("end_fraction", end_fraction), ("middle_fraction", middle_fraction)):
    if not 0.0 < value <= 1.0:
      raise ValueError(f"{name} must be in (0, 1], got {value}.")
  k, c, r_len = fi.shape
  y = fi.reshape(k * c, r_len).T  # [R, M]
  valid = ~np.any(np.isnan(y), axis=0)
  y = np.where(valid, y, 0.0)
  x = np.arange(r_len) / (r_len - 1)

  (slope, intercept), ss_res = _fit(x, y, 1)
  ss_tot = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    r2 = np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, 0.0)
  curvature = _fit(x, y, 2)[0][0]

  n_end = max(1, int(np.ceil(end_fraction * r_len)))
  head, tail = y[:n_end].mean(axis=0), y[-n_end:].mean(axis=0)
  lo, hi = 0.5 - middle_fraction / 2, 0.5 + middle_fraction / 2
  middle_sel = (x >= lo - 1e-12) & (x <= hi + 1e-12)
  if not middle_sel.any():
    middle_sel[r_len // 2] = True
  middle = y[middle_sel].mean(axis=0)
  fi_first = y[:min(n_first, r_len)].mean(axis=0)

  u_shape = valid & (curvature > 0) & (head - middle > u_margin) & (tail - middle > u_margin)
  negative_slope = valid & (slope < -min_slope) & (r2 >= r2_threshold)
  predictive = valid & (fi_first > fi_threshold) & (u_shape | negative_slope)

  def out(a, nan=True):
    a = np.where(valid, a, np.nan) if nan else a
    return a.reshape(k, c)

  return {
      "slope": out(slope), "intercept": out(intercept), "r2": out(r2),
      "curvature": out(curvature), "head": out(head), "middle": out(middle),
      "tail": out(tail), "fi_first": out(fi_first),
      "u_shape": out(u_shape, False), "negative_slope": out(negative_slope, False),
      "predictive": out(predictive, False),
  }


# ---------------------------------------------------------------------------------------------
# Feature impact (eq 9).


def _hard_dice_per_image(logits: Array, labels: Array) -> Array:
  """Hard Dice per image and foreground class: [B, H, W, K+1], [B, H, W] -> [B, K].

  1.0 where prediction and truth of a class are both empty (as `losses.hard_dice`).
  """
  pred = jnp.argmax(logits, axis=-1)
  classes = jnp.arange(1, logits.shape[-1])
  p = pred[..., None] == classes
  t = labels[..., None] == classes
  inter = jnp.sum(p & t, axis=(1, 2))
  denom = jnp.sum(p, axis=(1, 2)) + jnp.sum(t, axis=(1, 2))
  return jnp.where(denom == 0, 1.0, 2.0 * inter / jnp.maximum(denom, 1))


@functools.partial(jax.jit, static_argnames=("apply_fn", "channel_batch"))
def _impact_batch(apply_fn: ApplyFn, params: Params, images: Array, labels: Array,
                  masks: Array, channel_batch: int) -> Array:
  """Dice lost per mask, image and class: masks [M, C] -> [M, B, K]."""
  full = _hard_dice_per_image(apply_fn(params, images), labels)

  def masked(mask):
    return _hard_dice_per_image(apply_fn(params, images, channel_mask=mask), labels)

  return full[None] - jax.lax.map(masked, masks, batch_size=channel_batch)


def hidden_channels(apply_fn: ApplyFn, params: Params, images) -> int:
  """C, the number of feature maps of the last hidden layer (shape inference only)."""
  spec = jax.ShapeDtypeStruct((1,) + tuple(images.shape[1:]), images.dtype)
  _, hidden = jax.eval_shape(lambda p, x: apply_fn(p, x, return_hidden=True), params, spec)
  return hidden.shape[-1]


def feature_impact(apply_fn: ApplyFn, params: Params, images, labels, *, batch_size: int = 8,
                   channel_batch: int | None = None) -> np.ndarray:
  """Eq 9: F[k, i] = mean over images of D_i(y_pred) - D_i(y_pred with feature map k masked).

  y_pred is argmax of the logits; the masked prediction multiplies feature map k of the last
  hidden layer by 0 before the head (`channel_mask` = 1 - e_k). D_i is the hard Dice of
  foreground class i (label i + 1) of one image's prediction against its labels, 1.0 when
  both are empty (the convention of `tracin_jax.training.losses.hard_dice`); the mean is
  over images (slices), each image counted once. F > 0: masking k loses Dice.

  All C masks are applied in one compiled call per image batch: `jax.lax.map` over the
  one-hot-complement masks with `channel_batch` masks vectorised at a time (default: all
  C, i.e. a vmap). Each mask reruns the model (apply_fn exposes no separate head), so one
  call holds channel_batch x batch_size forward passes; lower either to bound memory.

  Args:
    apply_fn: `apply_fn(params, images, channel_mask=None|[C], return_hidden=False)`.
    params: the model's parameters.
    images: [N, H, W, C_in] float (the validation set).
    labels: [N, H, W] int, classes 0 (background) .. K.
    batch_size: images per compiled call (the last batch is padded; padding is not counted).
    channel_batch: masks vectorised together (a divisor of C is best); None for all C.

  Returns:
    F [C, K] float64.

  Raises:
    ValueError: for empty inputs or mismatched images and labels.
  """
  n = len(images)
  if n == 0 or np.shape(labels) != tuple(np.shape(images)[:3]):
    raise ValueError(f"labels must be [N, H, W] matching images [N, H, W, C_in] with N > 0; "
                     f"got {np.shape(labels)} and {np.shape(images)}.")
  images = images if isinstance(images, jax.Array) else np.asarray(images)
  labels = np.asarray(labels, np.int32)
  c = hidden_channels(apply_fn, params, images)
  masks = 1.0 - jnp.eye(c, dtype=jnp.float32)
  channel_batch = c if channel_batch is None else max(1, min(int(channel_batch), c))
  batch_size = min(int(batch_size), n)
  total = None
  for index, valid in batching.padded_batches(n, batch_size):
    lost = _impact_batch(apply_fn, params, images[index], labels[index], masks, channel_batch)
    part = np.asarray(lost, np.float64)[:, :valid].sum(axis=1)  # [C, K]
    total = part if total is None else total + part
  return total / n
