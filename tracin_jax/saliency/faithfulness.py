"""Is a saliency map faithful to the model? Deletion/insertion curves, IG completeness,
relevance mass/rank accuracy against a ground-truth mask, and the model-parameter
randomisation test (Adebayo et al., 2018) scored by Spearman rank correlation and SSIM.

Maps given here are [N, *spatial] (2-D [N, H, W] or 3-D [N, D, H, W]), or [N, *spatial, C]
attributions whose channel axis is reduced first (`reduce_channels`, default: the signed
sum over channels). On volumes, deletion/insertion patches are patch_size along every
spatial axis (or one size per axis), relevance mass and rank count voxels, and SSIM is the
mean over axial slices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax import params as params_lib
from tracin_jax.checks import stats as checks_stats
from tracin_jax.saliency import core
from tracin_jax.saliency import gradients
from tracin_jax.saliency import targets as targets_lib
from tracin_jax.types import Array, Params, PyTree

CHANNEL_REDUCTIONS: tuple[str, ...] = ("sum", "abs_sum", "max_abs")
CURVE_MODES: tuple[str, ...] = ("deletion", "insertion")


def reduce_channels(maps: Array, spatial_ndim: int, how: str = "sum") -> Array:
  """[N, *spatial, C] -> [N, *spatial] ("sum", "abs_sum" or "max_abs" over C); a map that
  already has 1 + spatial_ndim axes is returned as it is."""
  maps = jnp.asarray(maps)
  if maps.ndim == 1 + spatial_ndim:
    return maps
  if maps.ndim != 2 + spatial_ndim:
    raise ValueError(f"map of shape {maps.shape} is neither [N, *spatial] nor "
                     f"[N, *spatial, C] with {spatial_ndim} spatial axes")
  if how == "sum":
    return maps.sum(-1)
  if how == "abs_sum":
    return jnp.abs(maps).sum(-1)
  if how == "max_abs":
    return jnp.abs(maps).max(-1)
  raise ValueError(f"unknown channel reduction {how!r}; expected one of {CHANNEL_REDUCTIONS}")


# ---------------------------------------------------------------------------------------------
# Deletion and insertion.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CurveResult:
  """A deletion or insertion curve.

  Attributes:
    fractions: [S + 1] share of pixels (patches) replaced at each step, 0 to 1.
    scores: [N, S + 1] the target at each step (scores[:, 0] at x for deletion, at the
      baseline for insertion).
    auc: [N] trapezoidal area under scores over fractions (in the target's units; divide by
      scores[:, 0] of the deletion curve for a relative value). Lower is better for
      deletion, higher for insertion.
  """

  fractions: Array
  scores: Array
  auc: Array


def _patch_ranks(saliency: Array, patch: tuple[int, ...]) -> tuple[Array, tuple[int, ...]]:
  """Rank (0 = most salient) of each patch, [N, P], and the patch grid shape."""
  n, spatial = saliency.shape[0], saliency.shape[1:]
  grid = tuple(math.ceil(s / p) for s, p in zip(spatial, patch))
  pad = [(0, 0)] + [(0, g * p - s) for g, p, s in zip(grid, patch, spatial)]
  # A patch's score is the mean over its real pixels (the padding is not counted).
  padded = jnp.pad(saliency, pad)
  counts = jnp.pad(jnp.ones_like(saliency), pad)
  split = (n,) + tuple(v for g, p in zip(grid, patch) for v in (g, p))
  axes = tuple(range(2, 2 * len(grid) + 1, 2))
  means = padded.reshape(split).sum(axes) / counts.reshape(split).sum(axes)
  order = jnp.argsort(-means.reshape(n, -1), axis=1, stable=True)
  ranks = jnp.argsort(order, axis=1, stable=True)
  return ranks, grid


def _expand(patch_mask: Array, grid, patch, spatial) -> Array:
  """[N, P] patch mask -> [N, *spatial] pixel mask."""
  mask = patch_mask.reshape((patch_mask.shape[0],) + tuple(grid))
  for axis, p in enumerate(patch):
    mask = jnp.repeat(mask, p, axis=axis + 1)
  return mask[(slice(None),) + tuple(slice(0, s) for s in spatial)]


@functools.partial(jax.jit, static_argnames=("patch",))
def _ranks_jit(saliency, patch):
  return _patch_ranks(saliency, patch)[0]


@functools.partial(jax.jit, static_argnames=("apply_fn", "patch", "mode"))
def _curve_chunk(apply_fn, params, x, baseline, target, ranks, counts, patch, mode):
  """The target after replacing the `counts[s]` most salient patches, [S_chunk, N]."""
  target = targets_lib.bind_target(target, jax.lax.stop_gradient(apply_fn(params, x)))
  spatial = x.shape[1:-1]
  grid = tuple(-(-s // p) for s, p in zip(spatial, patch))

  def score(count):
    changed = _expand(ranks < count, grid, patch, spatial)[..., None]
    image = jnp.where(changed, baseline, x) if mode == "deletion" else jnp.where(
        changed, x, baseline)
    return target(apply_fn(params, image))

  return jax.vmap(score)(counts)


def perturbation_curve(apply_fn: Callable, params: Params, x: Array, target: Any,
                       saliency: Array, *, mode: str = "deletion", baseline: Any = 0.0,
                       patch_size: int | Sequence[int] = 1, num_steps: int = 20,
                       channel_reduce: str = "sum", chunk_size: int | None = None,
                       memory_budget_bytes: int | None = None) -> CurveResult:
  """Deletion or insertion curve (Petsiuk et al., 2018) of a saliency map.

  Pixels (or patch_size patches, ranked by their mean saliency) are taken in order of
  decreasing saliency; at step k of `num_steps` the first round(k / num_steps * P) of the P
  patches are replaced, in all channels, by the baseline ("deletion", starting from x) or
  copied from x into the baseline image ("insertion"), and the target (bound at the clean
  x) is evaluated again. Steps are vmapped `chunk_size` at a time (one jitted kernel, a
  Python loop over chunks).

  Args:
    apply_fn, params, x, target: as in the methods (x [N, *spatial, C]).
    saliency: [N, *spatial] or [N, *spatial, C] (channels reduced by `channel_reduce`).
    mode: "deletion" or "insertion".
    baseline: the replacement: a number (default 0.0), "min" or an array (see
      `core.make_baseline`).
    patch_size: patch side (an int for all spatial axes, or one per axis); 1 = pixels.
    num_steps: S, steps after the start (S + 1 evaluations).
    channel_reduce: "sum", "abs_sum" or "max_abs".
    chunk_size, memory_budget_bytes: steps per vmapped chunk (None: from the budget).

  Returns:
    `CurveResult` (fractions [S + 1], scores [N, S + 1], auc [N]).
  """
  if mode not in CURVE_MODES:
    raise ValueError(f"mode must be one of {CURVE_MODES}, got {mode!r}")
  x = core.check_input(x)
  spatial_ndim = x.ndim - 2
  saliency = reduce_channels(saliency, spatial_ndim, channel_reduce)
  if saliency.shape != x.shape[:-1]:
    raise ValueError(f"saliency has shape {saliency.shape}; expected {x.shape[:-1]}")
  patch = ((int(patch_size),) * spatial_ndim if np.ndim(patch_size) == 0
           else tuple(int(p) for p in patch_size))
  if len(patch) != spatial_ndim or min(patch) < 1:
    raise ValueError(f"patch_size {patch_size!r} does not fit {spatial_ndim} spatial axes")
  target = targets_lib.as_jit_arg(target)
  if chunk_size is None:
    per_step = core.estimate_bytes(lambda f, p, z, t: t(f(p, z)), (apply_fn,), params, x,
                                   target)
    chunk = core.auto_chunk_size(num_steps + 1, per_step, None, memory_budget_bytes)
  else:
    chunk = core.auto_chunk_size(num_steps + 1, 0, chunk_size, None)
  base = core.make_baseline(x, baseline)
  target = gradients.bind_once(apply_fn, params, x, target)
  ranks = _ranks_jit(saliency.astype(x.dtype), patch)
  num_patches = ranks.shape[1]
  counts = np.round(np.arange(num_steps + 1) / num_steps * num_patches).astype(np.int32)
  parts = [_curve_chunk(apply_fn, params, x, base, target, ranks, counts[idx], patch, mode)
           [valid] for idx, valid in core.chunks(num_steps + 1, chunk)]
  scores = jnp.concatenate(parts).T  # [N, S + 1]
  fractions = jnp.asarray(counts / num_patches, x.dtype)
  auc = jnp.sum((scores[:, 1:] + scores[:, :-1]) / 2 * jnp.diff(fractions), axis=1)
  return CurveResult(fractions, scores, auc)


def deletion_curve(apply_fn, params, x, target, saliency, **options) -> CurveResult:
  """`perturbation_curve(..., mode="deletion")`."""
  return perturbation_curve(apply_fn, params, x, target, saliency, mode="deletion", **options)


def insertion_curve(apply_fn, params, x, target, saliency, **options) -> CurveResult:
  """`perturbation_curve(..., mode="insertion")`."""
  return perturbation_curve(apply_fn, params, x, target, saliency, mode="insertion",
                            **options)


def random_saliency(key: Array | int, shape: Sequence[int]) -> Array:
  """A random map (uniform in [0, 1), numpy generator seeded by an int or a JAX key's data):
  the chance-level ordering for deletion/insertion curves."""
  return jnp.asarray(_numpy_rng(key).random(tuple(shape)), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Completeness and ground-truth localisation.


def completeness_error(apply_fn: Callable, params: Params, x: Array, target: Any,
                       attributions: Array, baseline: Any = 0.0) -> Array:
  """sum(attributions) - (F(x) - F(baseline)) per example, [N] (0 for exact IG); the target
  is bound at x."""
  x = core.check_input(x)
  base = core.make_baseline(x, baseline)
  out = apply_fn(params, x)
  bound = targets_lib.bind_target(target, out)
  delta = bound(out) - bound(apply_fn(params, base))
  return jnp.asarray(attributions).reshape(x.shape[0], -1).sum(-1) - delta


def _flat_pair(saliency, mask, channel_reduce):
  mask = jnp.asarray(mask)
  saliency = reduce_channels(saliency, mask.ndim - 1, channel_reduce)
  if saliency.shape != mask.shape:
    raise ValueError(f"saliency {saliency.shape} and mask {mask.shape} differ")
  n = mask.shape[0]
  return saliency.reshape(n, -1), mask.reshape(n, -1) != 0


def relevance_mass_accuracy(saliency: Array, mask: Array, *, channel_reduce: str = "sum"
                            ) -> Array:
  """Relevance mass accuracy (Arras et al., 2022): the share of the positive relevance that
  falls inside the ground-truth mask, sum_{mask} R+ / sum R+, per example [N] (NaN when there
  is no positive relevance).

  Args:
    saliency: [N, *spatial] or [N, *spatial, C].
    mask: [N, *spatial] ground truth (non-zero = inside).
    channel_reduce: see `reduce_channels`.
  """
  relevance, inside = _flat_pair(saliency, mask, channel_reduce)
  positive = jnp.maximum(relevance, 0.0)
  total = positive.sum(-1)
  return jnp.where(total > 0, (positive * inside).sum(-1) / jnp.where(total > 0, total, 1.0),
                   jnp.nan)


def relevance_rank_accuracy(saliency: Array, mask: Array, *, channel_reduce: str = "sum"
                            ) -> Array:
  """Relevance rank accuracy (Arras et al., 2022): with K = the mask's size, the share of the
  K most relevant pixels that lie inside the mask, per example [N] (NaN for an empty mask).
  Ties are broken by position (stable sort)."""
  relevance, inside = _flat_pair(saliency, mask, channel_reduce)
  size = inside.sum(-1)
  order = jnp.argsort(-relevance, axis=1, stable=True)
  ranks = jnp.argsort(order, axis=1, stable=True)
  hits = ((ranks < size[:, None]) & inside).sum(-1)
  return jnp.where(size > 0, hits / jnp.maximum(size, 1), jnp.nan)


# ---------------------------------------------------------------------------------------------
# Similarity of maps: Spearman and SSIM.


def spearman(a: Array, b: Array) -> np.ndarray:
  """Spearman rank correlation of two [N, ...] batches of maps, per example [N] (average
  ranks for ties; NaN when a map is constant or has a NaN; +-inf rank as the extremes):
  `checks.stats.spearman_rows` of the flattened maps."""
  a = np.asarray(a, np.float64).reshape(np.shape(a)[0], -1)
  b = np.asarray(b, np.float64).reshape(np.shape(b)[0], -1)
  return checks_stats.spearman_rows(a, b, rank_infinite=True)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
  t = np.arange(size) - (size - 1) / 2.0
  w = np.exp(-t * t / (2.0 * sigma * sigma))
  return w / w.sum()


def ssim(a: Array, b: Array, *, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Array:
  """Mean structural similarity (Wang et al., 2004) of 2-D maps, per example; of volumes,
  the mean over their axial slices.

  Local statistics use a separable Gaussian window (`window` taps, shrunk to the largest odd
  size that fits the map, standard deviation `sigma`), evaluated only where the window fits
  ("valid"); sample covariances are not bias-corrected. SSIM = mean over positions of
  (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)),
  C1 = (k1 L)^2, C2 = (k2 L)^2, L = data_range.

  SSIM of volumes is not a 3-D SSIM (no window along D): each axial slice [H, W] is scored
  as a 2-D map and the D scores are averaged with equal weights, so a volume of depth 1
  scores as its slice, and a few thick slices are not blurred together.

  Args:
    a, b: [N, H, W] maps, or [N, D, H, W] volumes (the mean SSIM over the D axial slices).
  Returns:
    [N].
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  if a.shape != b.shape or a.ndim not in (3, 4):
    raise ValueError(f"ssim needs two [N, H, W] (or [N, D, H, W]) maps, got {a.shape}, "
                     f"{b.shape}")
  if a.ndim == 4:
    n, d = a.shape[:2]
    per_slice = ssim(a.reshape(n * d, *a.shape[2:]), b.reshape(n * d, *b.shape[2:]),
                     data_range=data_range, window=window, sigma=sigma, k1=k1, k2=k2)
    return per_slice.reshape(n, d).mean(1)
  size = min(window, a.shape[1], a.shape[2])
  size -= 1 - size % 2
  return _ssim_2d(a, b, float(data_range), size, float(sigma), float(k1), float(k2))


@functools.partial(jax.jit, static_argnames=("data_range", "size", "sigma", "k1", "k2"))
def _ssim_2d(a, b, data_range, size, sigma, k1, k2):
  w = _gaussian_window(size, sigma)

  def blur(m):  # [N, H, W] -> [N, H - size + 1, W - size + 1], separable "valid" filter
    h, w_ = m.shape[1] - size + 1, m.shape[2] - size + 1
    m = sum(w[j] * m[:, j:j + h, :] for j in range(size))
    return sum(w[j] * m[:, :, j:j + w_] for j in range(size))

  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  mu_a, mu_b = blur(a), blur(b)
  var_a = blur(a * a) - mu_a * mu_a
  var_b = blur(b * b) - mu_b * mu_b
  cov = blur(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
      (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
  return s.mean(axis=(1, 2))


# ---------------------------------------------------------------------------------------------
# Model-parameter randomisation.


def _numpy_rng(key: Array | int) -> np.random.Generator:
  """A numpy generator seeded by an int or by a JAX key's data."""
  if isinstance(key, (int, np.integer)):
    return np.random.default_rng(int(key))
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())


def _default_init(rng: np.random.Generator, leaf: Array) -> np.ndarray:
  """Gaussian noise scaled to the leaf's root mean square (1e-2 for an all-zero leaf)."""
  leaf = np.asarray(leaf)
  rms = float(np.sqrt(np.mean(np.square(leaf, dtype=np.float64))))
  return (rng.standard_normal(leaf.shape) * (rms if rms > 0 else 1e-2)).astype(leaf.dtype)


def randomize_groups(params: PyTree, groups: Sequence[str], key: Array | int,
                     init: Callable[[Array, Array], Array] | None = None) -> PyTree:
  """`params` with the leaves of the named top-level groups re-drawn.

  Default: numpy Gaussian noise scaled to each leaf's root mean square (1e-2 for an
  all-zero leaf), from a generator seeded by `key` (an int or a JAX key's data), leaves in
  flattening order; computed eagerly on the host (no compilation: parameters are small).
  With `init`, leaf i becomes init(jax.random.fold_in(key, i), leaf).
  """
  names = set(groups)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  if init is None:
    rng = _numpy_rng(key)
    leaves = [jnp.asarray(_default_init(rng, leaf)) if _group(path) in names else leaf
              for path, leaf in flat]
  else:
    if isinstance(key, (int, np.integer)):
      key = jax.random.key(int(key))
    leaves = [init(jax.random.fold_in(key, i), leaf) if _group(path) in names else leaf
              for i, (path, leaf) in enumerate(flat)]
  # Placed as the leaves they replace: a jitted method then sees the same argument
  # signature (committed or not) at every step and compiles once, not once per step.
  leaves = [_placed_like(new, old) for new, (_, old) in zip(leaves, flat)]
  return jax.tree.unflatten(treedef, leaves)


def _placed_like(new: Any, old: Any) -> Any:
  if new is old or not isinstance(old, jax.Array) or not getattr(old, "committed", False):
    return new
  return jax.device_put(new, old.sharding)


def param_groups(params: PyTree) -> tuple[str, ...]:
  """Top-level groups of a params pytree in flattening order (`core.param_group_names`)."""
  return core.param_group_names(params)


def _group(path) -> str:
  return params_lib.group_of(path)


@dataclasses.dataclass(frozen=True)
class RandomisationResult:
  """Similarity of the maps of randomised models to the trained model's map.

  Attributes:
    mode: "cascading" or "independent".
    layers: the L groups, in the order randomised (cascading: row i has groups 0..i
      randomised, from the head down; independent: row i has group i alone).
    spearman: [L, N] Spearman rank correlation with the trained map.
    spearman_abs: [L, N] the same on absolute values.
    ssim: [L, N] SSIM of the display-normalised maps (|map| / max |map|) in [0, 1].
    maps: the L randomised maps [N, *spatial] when kept, else None.
  """

  mode: str
  layers: tuple[str, ...]
  spearman: np.ndarray
  spearman_abs: np.ndarray
  ssim: np.ndarray
  maps: list | None = None


def _as_map(result: Any) -> Array:
  for attr in ("attributions", "upsampled"):
    if hasattr(result, attr):
      return getattr(result, attr)
  return jnp.asarray(result)


def parameter_randomisation(method_fn: Callable[[PyTree], Any], params: PyTree, key: Array,
                            *, mode: str = "cascading",
                            layer_order: Sequence[str] | None = None,
                            init: Callable[[Array, Array], Array] | None = None,
                            spatial_ndim: int = 2, channel_reduce: str = "sum",
                            keep_maps: bool = False) -> RandomisationResult:
  """Model-parameter randomisation test (Adebayo et al., 2018, "Sanity checks").

  The map of the trained model is compared with the maps of models whose parameters are
  re-drawn, group by group. Groups are the params pytree's top-level entries
  (`param_groups`: "encoder[0]", "bottleneck", "head", ...) taken in `layer_order` (input to
  output; default: the pytree's flattening order, which for dicts and `nnx.State` is by
  key, so pass the network's order, e.g. `NnxModel.param_groups_in_call_order(x)`).

  * cascading: randomise from the last group (the head) down, cumulatively;
  * independent: randomise one group at a time, the others trained.

  A faithful method's maps should change (low Spearman and SSIM) as soon as the layers it
  depends on are randomised.

  Args:
    method_fn: params -> map [N, *spatial] or [N, *spatial, C], or a result with
      `attributions` (IG) or `upsampled` (Grad-CAM); e.g.
      `lambda p: vanilla_gradient(apply_fn, p, x, target)`.
    params: the trained parameters.
    key: PRNG key (or int seed); group i of the order uses fold_in(key, i).
    mode: "cascading" or "independent".
    layer_order: group names, input to output (a subset is allowed).
    init: init(key, leaf) -> new leaf; default Gaussian with the leaf's RMS (see
      `randomize_groups`).
    spatial_ndim: 2 for [N, H, W(, C)] maps, 3 for volumes [N, D, H, W(, C)] (required
      for volumes: a [N, D, H, W] map read with 2 would have its last axis summed as
      channels). SSIM of volumes is the mean over axial slices (see `ssim`).
    channel_reduce: how [N, *spatial, C] maps are reduced (see `reduce_channels`).
    keep_maps: also return the randomised maps.

  Returns:
    `RandomisationResult`.
  """
  if mode not in ("cascading", "independent"):
    raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  groups = tuple(param_groups(params) if layer_order is None else layer_order)
  unknown = set(groups) - set(param_groups(params))
  if unknown:
    raise ValueError(f"unknown parameter groups {sorted(unknown)}; known: "
                     f"{param_groups(params)}")

  def as_2d(result):
    return reduce_channels(_as_map(result), spatial_ndim, channel_reduce)

  reference = as_2d(method_fn(params))
  sequence = tuple(reversed(groups)) if mode == "cascading" else groups
  rows_s, rows_sa, rows_ssim, maps = [], [], [], []
  current = params
  for group in sequence:
    group_key = jax.random.fold_in(key, groups.index(group))
    if mode == "cascading":
      current = randomize_groups(current, [group], group_key, init)
      randomised = current
    else:
      randomised = randomize_groups(params, [group], group_key, init)
    heat = as_2d(method_fn(randomised))
    rows_s.append(spearman(reference, heat))
    rows_sa.append(spearman(jnp.abs(reference), jnp.abs(heat)))
    rows_ssim.append(np.asarray(ssim(core.display(reference, absolute=True),
                                     core.display(heat, absolute=True))))
    if keep_maps:
      maps.append(heat)
  return RandomisationResult(mode, sequence, np.stack(rows_s), np.stack(rows_sa),
                             np.stack(rows_ssim), maps if keep_maps else None)
