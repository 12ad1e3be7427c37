"""The paper's TracIn for multiclass segmentation (section 3.3, eq 6): region losses.

A segmentation image z is split into regions by the explained model's prediction:
z_j = pixels where argmax softmax = j and p_j > threshold, for the foreground classes
j = 1..C-1 (background, class 0, is never explained). The regions come from one set of
parameters (by default the final checkpoint's) and stay fixed over the TracIn checkpoints.
Loss j of an example is 1 - soft Dice of class j restricted to region j:

    loss_j = 1 - 2 sum_{z_j} p_j y_j / (sum_{z_j} p_j + sum_{z_j} y_j + smooth)

with y_j = [target == j] (the ground truth, or the model's own prediction for unlabelled
images). Gradients do not flow through the region mask. `influence` with this loss gives
T[a, i, b, j] = sum_t eta_t grad D_j(z_j^b) . grad D_i(z'_i^a) (eq 6; the signs of the two
"1 -" cancel).

An empty region has no score: its gradient is exactly zero, and `mask_absent` turns its
rows and columns into NaN using the presence masks (never a silent zero). A present region
whose target has no pixel of its class in it has Dice 0 whatever p is, a zero gradient and
score 0 (it can happen with ground-truth targets, never with the model's own prediction).

Every function here works for images of any spatial rank, channels last: slices
[N, H, W, C_in] and volumes [N, D, H, W, C_in] (D the axial slices) alike, written
[N, *spatial, C_in]; a "pixel" is then a voxel, and a volume's region z_j is one 3-D
region (every voxel of class j above the threshold), so a 3-D score is between two volumes'
regions. A volume of depth 1 gives exactly its slice's scores under the same model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax import batching
from tracin_jax.influence import core
from tracin_jax.types import ApplyFn, Array, Checkpoints, LossFn, Params, State

DEFAULT_THRESHOLD = 0.8
DEFAULT_SMOOTH = 1e-6


def call_model(apply_fn: ApplyFn, params: Params, images: Array, state: State = None):
  """`apply_fn(params, images)`, or `apply_fn(params, images, state)` when a state is given."""
  return apply_fn(params, images) if state is None else apply_fn(params, images, state)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _predict_batch(apply_fn: ApplyFn, params: Params, images: Array, threshold: Array,
                   state: State):
  probs = jax.nn.softmax(call_model(apply_fn, params, images, state), axis=-1)  # [B, *sp, C]
  labels = jnp.argmax(probs, axis=-1)
  classes = jnp.arange(1, probs.shape[-1])
  regions = (labels[..., None] == classes) & (probs[..., 1:] > threshold)
  return regions, labels.astype(jnp.int32)


def _check_threshold(threshold) -> float:
  value = float(threshold)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"threshold must be in [0, 1], got {threshold!r}.")
  return value


def _predict(apply_fn, params, images, threshold, batch_size, state=None):
  """(regions [N, *spatial, C-1] bool, labels [N, *spatial] int32) in batches of one
  compiled shape."""
  threshold = _check_threshold(threshold)
  images = np.asarray(images) if not isinstance(images, jax.Array) else images
  if images.ndim < 3:
    raise ValueError(f"images must be [N, *spatial, C_in] (at least one spatial axis), got "
                     f"shape {images.shape}.")
  n = images.shape[0]
  if n == 0:
    raise ValueError("images is empty.")
  batch_size = min(int(batch_size), n)
  regions, labels = [], []
  for index, valid in batching.padded_batches(n, batch_size):
    r, l = _predict_batch(apply_fn, params, images[index], threshold, state)
    regions.append(np.asarray(r)[:valid])
    labels.append(np.asarray(l)[:valid])
  return np.concatenate(regions), np.concatenate(labels)


def predict_regions(apply_fn: ApplyFn, params: Params, images,
                    threshold: float = DEFAULT_THRESHOLD, *, batch_size: int = 32,
                    state: State = None) -> np.ndarray:
  """The regions z_j: pixels where argmax softmax = j and p_j > threshold (strictly).

  Args:
    apply_fn: `apply_fn(params, images [N, *spatial, C_in]) -> logits [N, *spatial, C]`
      (slices [N, H, W, C_in] or volumes [N, D, H, W, C_in]); compiled once per function
      object and batch shape.
    params: the explained model's parameters (the final checkpoint's by default).
    images: [N, *spatial, C_in].
    threshold: probability a pixel's class must exceed, in [0, 1] (the paper: 0.8).
    batch_size: images per compiled call (the last batch is padded).
    state: the model's non-parameter state, passed as `apply_fn(params, images, state)`
      when given (see `tracin_jax.models.functional`).

  Returns:
    [N, *spatial, C-1] bool: region j - 1 holds class j, for the foreground classes
    j = 1..C-1.
  """
  return _predict(apply_fn, params, images, threshold, batch_size, state)[0]


def predict_regions_and_labels(apply_fn: ApplyFn, params: Params, images, threshold: float,
                               *, batch_size: int = 32, state: State = None):
  """`predict_regions` and the predicted labels (argmax, 0 = background) in one pass.

  Returns:
    regions [N, *spatial, C-1] bool and labels [N, *spatial] int32.
  """
  return _predict(apply_fn, params, images, threshold, batch_size, state)


def region_presence(regions) -> np.ndarray:
  """Whether each region has a pixel (a voxel): regions [N, *spatial, C-1] -> [N, C-1] bool.

  Raises:
    ValueError: regions without a spatial axis.
  """
  regions = np.asarray(regions)
  if regions.ndim < 3:
    raise ValueError(f"regions must be [N, *spatial, C-1], got shape {regions.shape}.")
  return regions.any(axis=tuple(range(1, regions.ndim - 1)))


def mask_absent(scores, presence_test, presence_train) -> np.ndarray:
  """Scores with NaN wherever the test or the train region is empty.

  Args:
    scores: [n_test, K, n_train, K] from `influence`.
    presence_test: [n_test, K] bool (for train-influence, the train presence).
    presence_train: [n_train, K] bool.

  Returns:
    float copy of scores, NaN at [a, i, b, j] unless presence_test[a, i] and
    presence_train[b, j].
  """
  scores = np.array(scores, dtype=np.result_type(np.asarray(scores).dtype, np.float32))
  presence_test, presence_train = np.asarray(presence_test, bool), np.asarray(presence_train, bool)
  n_test, k, n_train, k2 = scores.shape
  if presence_test.shape != (n_test, k) or presence_train.shape != (n_train, k2):
    raise ValueError(f"presence masks {presence_test.shape}, {presence_train.shape} do not "
                     f"match scores {scores.shape}.")
  present = presence_test[:, :, None, None] & presence_train[None, None, :, :]
  scores[~present] = np.nan
  return scores


@functools.lru_cache(maxsize=32)
def make_region_losses(apply_fn: ApplyFn, smooth: float = DEFAULT_SMOOTH) -> LossFn:
  """The region losses of eq 6 as one `loss_fn(params, example) -> [C-1]`.

  The returned function (the same object for the same arguments, so compiled code is
  reused) computes, for one example (and the model's state, if it has one:
  `loss_fn(params, example, state)` calls `apply_fn(params, images, state)`)
      {"image": [*spatial, C_in] float, "target": [*spatial] int in 0..C-1,
       "region": [*spatial, C-1] bool (from `predict_regions`)},
  spatial being (H, W) for a slice and (D, H, W) for a volume:
  loss_j = 1 - 2 sum_r p_j y_j / (sum_r p_j + sum_r y_j + smooth) for j = 1..C-1, where
  sums run over region j's pixels (voxels), p = softmax(apply_fn(params, image[None]))[0]
  and y_j = [target == j]. The region mask is held constant (no gradient through it).

  Args:
    apply_fn: `apply_fn(params, images [N, *spatial, C_in]) -> logits [N, *spatial, C]`.
    smooth: added to the Dice denominator only.

  Returns:
    loss_fn(params, example, state=None) -> [C-1] float.
  """

  def loss_fn(params: Params, example, state: State = None) -> Array:
    logits = call_model(apply_fn, params, example["image"][None], state)[0]
    probs = jax.nn.softmax(logits, axis=-1)[..., 1:]
    region = jax.lax.stop_gradient(jnp.asarray(example["region"]))
    if region.shape != probs.shape:
      raise ValueError(f"region has shape {region.shape}; the model's foreground "
                       f"probabilities have shape {probs.shape}.")
    target = jnp.asarray(example["target"])
    if target.shape != probs.shape[:-1]:
      raise ValueError(f"target has shape {target.shape}; the model's output has spatial "
                       f"shape {probs.shape[:-1]}.")
    region = region.astype(probs.dtype)
    classes = jnp.arange(1, probs.shape[-1] + 1)
    y = (target[..., None] == classes).astype(probs.dtype)
    space = tuple(range(probs.ndim - 1))  # every spatial axis: (H, W) or (D, H, W)
    intersection = jnp.sum(region * probs * y, axis=space)
    denominator = jnp.sum(region * probs, axis=space) + jnp.sum(region * y, axis=space)
    return 1.0 - 2.0 * intersection / (denominator + smooth)

  return loss_fn


def segmentation_influence(
    apply_fn: ApplyFn,
    checkpoints: Checkpoints,
    train_images,
    train_targets=None,
    test_images=None,
    test_targets=None,
    *,
    regions_params: Params,
    regions_state: State = None,
    threshold: float = DEFAULT_THRESHOLD,
    smooth: float = DEFAULT_SMOOTH,
    region_batch_size: int = 32,
    **influence_kwargs,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """TracIn between predicted regions of test and train images (eq 6), NaN where empty.

  Images are slices or volumes alike (`[N, *spatial, C_in]`, see the module docstring); for
  volumes the regions, and so the proponents and opponents, are training volumes' 3-D
  regions.

  Args:
    apply_fn: `apply_fn(params, images [N, *spatial, C_in]) -> logits [N, *spatial, C]`.
    checkpoints: (params, learning_rate eta_t) pairs.
    train_images: [n_train, *spatial, C_in].
    train_targets: [n_train, *spatial] int ground truth, or None for the model's own
      prediction (argmax under `regions_params`).
    test_images: [n_test, *spatial, C_in], or None for train-influence.
    test_targets: [n_test, *spatial] int, or None for the model's own prediction.
    regions_params: parameters of the explained model that define the regions (usually the
      final checkpoint's); the regions are held fixed over `checkpoints`.
    regions_state: that model's non-parameter state, if it has one.
    threshold: region threshold on the probability (strict: p_j > threshold).
    smooth: Dice denominator smoothing.
    region_batch_size: images per compiled call when predicting regions.
    **influence_kwargs: passed to `influence` (memory_budget_bytes, batch_size, progress,
      vectorize).

  Returns:
    scores: [n_test, C-1, n_train, C-1] (test class i, train class j), NaN where either
      region is empty.
    presence_train: [n_train, C-1] bool.
    presence_test: [n_test, C-1] bool (the train presence for train-influence).
    `layout.to_class_blocks(scores)` gives the paper's matrices [C-1, n_test, (C-1) n_train]
    (Fig. 4 for train-influence).
  """

  def examples(images, targets):
    regions, labels = _predict(apply_fn, regions_params, images, threshold, region_batch_size,
                               regions_state)
    targets = labels if targets is None else np.asarray(targets, dtype=np.int32)
    if targets.shape != labels.shape:
      raise ValueError(f"targets have shape {targets.shape}, expected {labels.shape}.")
    return {"image": images, "target": targets, "region": regions}, region_presence(regions)

  train, presence_train = examples(train_images, train_targets)
  if test_images is None:
    if test_targets is not None:
      raise ValueError("test_targets given without test_images.")
    test, presence_test = None, presence_train
  else:
    test, presence_test = examples(test_images, test_targets)
  loss_fn = make_region_losses(apply_fn, float(smooth))
  scores = core.influence(loss_fn, checkpoints, train, test, **influence_kwargs)
  return mask_absent(scores, presence_test, presence_train), presence_train, presence_test
