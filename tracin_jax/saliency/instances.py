"""Instance-level quantitative saliency: one lesion at a time (Spagnolo et al.'s IES).

An instance is a connected component of a class's predicted mask (8-connected in 2-D,
26-connected in 3-D; components of at most 5 pixels or voxels dropped, IES's minimum lesion
size), matched to the ground truth: a true positive (TP) if it overlaps a true
component of its class, a false positive (FP) if not; true components that no kept
prediction overlaps are false negatives (FN) and are explained through their true mask.

    found = instances.find_instances(predicted, truth, probabilities=probs)   # one image
    target = instances.instance_target(found[0])          # the instance's logit sum, [1]
    maps = instances.instance_smoothgrad(apply_fn, params, image, found[:1], key=0)
    table = instances.quantify(maps[0], found[0].mask, rings=3)
    curve = instances.context_curve(apply_fn, params, image, found[0], max_dilations=20)

Everything works for 2-D images [H, W, C] and 3-D volumes [D, H, W, C] (one code path: the
neighbourhood, the rings and the dilations follow the mask's rank), for any number of
classes (class 0 is background), and for binary segmentation (classes=(1,)). A volume of
depth 1 gives the instances, numbers and curves of its 2-D slice.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from tracin_jax import draws
from tracin_jax.saliency import cam as cam_lib
from tracin_jax.saliency import gradients
from tracin_jax.saliency import targets as targets_lib
from tracin_jax.types import Array, Params

STATUSES = ("TP", "FP", "FN")
MEASURES = ("sum", "mean", "peak", "abs_peak")
# IES's instance SmoothGrad: noise of 5% of the intensity range, 50 samples. IES takes the
# range of FLAIR alone (IES_NOISE_CHANNEL, channel 3 in the order T1, T1Gd, T2, FLAIR); the
# default here is the range over all channels (the "ies" preset, `presets.IES`, sets it).
IES_NOISE_LEVEL = 0.05
IES_SAMPLES = 50
IES_NOISE_CHANNEL = 3
DEFAULT_MIN_SIZE = 6  # components of at most 5 pixels are dropped


@dataclasses.dataclass(frozen=True)
class Instance:
  """One lesion of one image.

  Attributes:
    class_index: its class (1..K-1; 0 is background).
    status: "TP", "FP", "FN", or "predicted" when no ground truth was given.
    mask: [*spatial] bool: the predicted component (TP, FP) or the true one (FN).
    size: pixels (voxels) in the mask.
    probability: mean predicted probability of its class over the mask (NaN when no
      probabilities were given).
    index: its position in `find_instances`' list.
  """

  class_index: int
  status: str
  mask: np.ndarray
  size: int
  probability: float
  index: int = 0

  @property
  def centroid(self) -> tuple[float, ...]:
    return tuple(float(c) for c in ndimage.center_of_mass(self.mask))

  def describe(self, class_names: Sequence[str] | None = None) -> str:
    name = class_names[self.class_index] if class_names else f"class {self.class_index}"
    prob = "" if np.isnan(self.probability) else f", p {self.probability:.2f}"
    unit = "voxels" if self.mask.ndim == 3 else "px"
    return f"{name} #{self.index} ({self.status}, {self.size} {unit}{prob})"


def structure(ndim: int, connectivity: int | None = None) -> np.ndarray:
  """The neighbourhood of connected components and dilations.

  Args:
    ndim: 2 or 3 spatial dimensions.
    connectivity: as `scipy.ndimage.generate_binary_structure`: 1 (4 neighbours in 2-D, 6
      in 3-D) to ndim (8 in 2-D, 26 in 3-D). None: ndim, full connectivity (8 in 2-D, 26 in
      3-D: voxels touching at a face, an edge or a corner are one lesion), so that a volume
      of depth 1 has its slice's 8-connected components; 2 gives 18 in 3-D.

  Returns:
    [3] * ndim bool.

  Raises:
    ValueError: for another rank or a connectivity outside 1..ndim.
  """
  if ndim not in (2, 3):
    raise ValueError(f"instances are defined on 2-D or 3-D masks, got {ndim} dimensions")
  connectivity = ndim if connectivity is None else int(connectivity)
  if not 1 <= connectivity <= ndim:
    raise ValueError(f"connectivity must be between 1 and {ndim}, got {connectivity}")
  return ndimage.generate_binary_structure(ndim, connectivity)


def components(mask: np.ndarray, *, connectivity: int | None = None,
               min_size: int = DEFAULT_MIN_SIZE) -> list[np.ndarray]:
  """The connected components of a mask with at least `min_size` pixels, largest first.

  Args:
    mask: [*spatial] bool (2-D or 3-D).
    connectivity: see `structure`.
    min_size: smallest component kept (default 6: components of at most 5 pixels dropped).

  Returns:
    A list of [*spatial] bool masks.
  """
  mask = np.asarray(mask, bool)
  labels, count = ndimage.label(mask, structure(mask.ndim, connectivity))
  sizes = np.bincount(labels.ravel(), minlength=count + 1)
  kept = [i for i in range(1, count + 1) if sizes[i] >= min_size]
  kept.sort(key=lambda i: (-sizes[i], i))
  return [labels == i for i in kept]


def find_instances(predicted: np.ndarray, truth: np.ndarray | None = None,
                   classes: Sequence[int] = (1, 2, 3), *,
                   probabilities: np.ndarray | None = None, connectivity: int | None = None,
                   min_size: int = DEFAULT_MIN_SIZE) -> list[Instance]:
  """The instances of one image, matched to its ground truth.

  Args:
    predicted: [*spatial] int predicted labels (the argmax over classes).
    truth: [*spatial] int true labels, or None (every instance is then "predicted").
    classes: the classes whose instances are found (default the three tumour classes; (1,)
      for a binary segmentation).
    probabilities: [*spatial, K] softmax probabilities, for each instance's mean
      probability of its class (optional).
    connectivity: see `structure` (default: 8 neighbours in 2-D, 26 in 3-D).
    min_size: smallest component kept, predicted or true (default 6).

  Returns:
    Instances ordered by class, then TP/FP by size, then FN by size; `index` numbers them.

  Raises:
    ValueError: shapes that disagree.
  """
  predicted = np.asarray(predicted)
  if truth is not None and np.shape(truth) != predicted.shape:
    raise ValueError(f"truth has shape {np.shape(truth)}, the prediction {predicted.shape}")
  if probabilities is not None and np.shape(probabilities)[:-1] != predicted.shape:
    raise ValueError(f"probabilities have shape {np.shape(probabilities)}; expected "
                     f"{predicted.shape} + (K,)")
  found = []

  def add(c, status, mask):
    prob = (float(np.asarray(probabilities)[..., c][mask].mean())
            if probabilities is not None else float("nan"))
    found.append(Instance(int(c), status, mask, int(mask.sum()), prob, len(found)))

  for c in classes:
    preds = components(predicted == c, connectivity=connectivity, min_size=min_size)
    if truth is None:
      for mask in preds:
        add(c, "predicted", mask)
      continue
    trues = components(np.asarray(truth) == c, connectivity=connectivity, min_size=min_size)
    for mask in preds:
      add(c, "TP" if any((mask & t).any() for t in trues) else "FP", mask)
    for t in trues:
      if not any((t & mask).any() for mask in preds):
        add(c, "FN", t)
  return found


def instance_target(instance: Instance, on: str = "logits") -> targets_lib.MaskedClassSum:
  """The instance's class logit (or probability) summed over its pixels, the mask frozen at
  the input (the paper's form): output [1, *spatial, K] -> [1]."""
  return targets_lib.masked_class_sum(instance.class_index, instance.mask[None], on=on)


def batch_target(instances: Sequence[Instance], on: str = "logits"
                 ) -> targets_lib.MaskedClassSum:
  """One target for instances of one class, one per example of a batch that repeats the
  image: output [n, *spatial, K] -> [n]."""
  _check_one_class(instances)
  masks = np.stack([i.mask for i in instances])
  return targets_lib.masked_class_sum(instances[0].class_index, masks, on=on)


def _check_one_class(instances: Sequence[Instance]) -> None:
  if not instances:
    raise ValueError("no instances given")
  classes = {i.class_index for i in instances}
  if len(classes) > 1:
    raise ValueError(f"instances of one class expected, got classes {sorted(classes)}; "
                     "call once per class")


def _repeat(image: Array, n: int) -> Array:
  return jnp.broadcast_to(jnp.asarray(image)[None], (n,) + tuple(np.shape(image)))


def instance_smoothgrad(apply_fn: Callable, params: Params, image: Array,
                        instances: Sequence[Instance], *, key: Array | int = 0,
                        num_samples: int = IES_SAMPLES, noise_level: float = IES_NOISE_LEVEL,
                        aggregation: str = "max", on: str = "logits",
                        noise_channel: int | None = None, **options: Any) -> Array:
  """Instance SmoothGrad: SmoothGrad of each instance's target.

  The defaults are IES's settings (50 samples, sigma 5% of the range, signed max
  aggregation on the logits) but for the range: over all channels here, FLAIR's alone in IES
  (`noise_channel=IES_NOISE_CHANNEL`, or `**presets.IES.options("instance_smoothgrad")`).

  Args:
    apply_fn, params: the model (`apply_fn(params, x [N, *spatial, C]) -> logits`).
    image: [*spatial, C] one image.
    instances: instances of one class of that image.
    key: PRNG key or seed; every instance sees the same noise samples (whatever else is
      explained in the same call).
    num_samples: noisy copies (the paper: 50).
    noise_level: sigma as a share of the image's intensity range (the paper: 0.05).
    noise_channel: None (default): the range over all channels; a channel index: that
      channel's range alone (IES: FLAIR, `IES_NOISE_CHANNEL` = 3).
    aggregation: "max" (IES: per input element, the signed gradient of largest magnitude
      over the instance's voxels, averaged over samples) or "mean" (signed mean of the
      gradients of the summed target).
    on: "logits" (the paper) or "probabilities".
    **options: passed to `smoothgrad` (chunk sizes, memory budget).

  Returns:
    [n_instances, *spatial, C] signed maps.
  """
  if aggregation not in ("max", "mean"):
    raise ValueError(f"instance SmoothGrad aggregates by 'max' or 'mean', got {aggregation!r}")
  target = batch_target(instances, on)
  x = _repeat(image, len(instances))
  return gradients.smoothgrad(apply_fn, params, x, target, noise=_shared_noise(
      key, num_samples, x.shape), noise_level=noise_level, aggregation=aggregation,
                              noise_channel=noise_channel, **options)


def _shared_noise(key: Array | int, num_samples: int, shape: tuple[int, ...]) -> Array:
  """[S, *shape] standard-normal draws, the same for every example of the batch (sample s
  from `fold_in(key, s)`), so an instance's map does not depend on the others explained with
  it."""
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  noise = jax.vmap(lambda s: draws.normal(jax.random.fold_in(key, s), shape[1:]))(
      jnp.arange(num_samples))
  return jnp.broadcast_to(noise[:, None], (num_samples,) + tuple(shape))


def instance_grad_cam_plus_plus(apply_fn: Callable, params: Params, image: Array,
                                instances: Sequence[Instance], *, layer: Any,
                                on: str = "logits", **options: Any) -> cam_lib.GradCamResult:
  """Grad-CAM++ of each instance's target at `layer` (see `cam.grad_cam_plus_plus`).

  Returns:
    A `GradCamResult` over the batch [n_instances, ...].
  """
  target = batch_target(instances, on)
  return cam_lib.grad_cam_plus_plus(apply_fn, params, _repeat(image, len(instances)), target,
                                    layer=layer, **options)


# ----------------------------------------------------------------------------- numbers


def rings(mask: np.ndarray, radius: int, *, connectivity: int | None = None
          ) -> list[np.ndarray]:
  """The instance and the rings around it: [mask, ring 1, ..., ring R], ring r being the
  pixels added by the r-th dilation (each [*spatial] bool)."""
  mask = np.asarray(mask, bool)
  st = structure(mask.ndim, connectivity)
  out, inner = [mask], mask
  for _ in range(radius):
    outer = ndimage.binary_dilation(inner, st)
    out.append(outer & ~inner)
    inner = outer
  return out


def quantify(saliency_map: np.ndarray, mask: np.ndarray, *, radius: int = 3,
             connectivity: int | None = None) -> dict[str, np.ndarray]:
  """Quantitative saliency per input channel, inside an instance and in rings around it.

  Args:
    saliency_map: [*spatial, C] one map (signed or not).
    mask: [*spatial] bool, the instance.
    radius: R rings (dilations 1..R).
    connectivity: of the dilations (see `structure`).

  Returns:
    A dict of arrays [R + 1, C] (row 0 inside the instance, row r the r-th ring): "sum",
    "mean", "peak" (the signed value of largest magnitude) and "abs_peak" (its magnitude);
    NaN for an empty ring; and "share" [C]: each channel's share of the summed |map|
    inside the instance (sums to 1; NaN when the map is 0 there).
  """
  saliency_map = np.asarray(saliency_map, np.float64)
  if saliency_map.shape[:-1] != np.shape(mask):
    raise ValueError(f"map has shape {saliency_map.shape}; the mask {np.shape(mask)} must be "
                     "its spatial shape")
  regions = rings(mask, radius, connectivity=connectivity)
  c = saliency_map.shape[-1]
  out = {m: np.full((len(regions), c), np.nan) for m in MEASURES}
  for r, region in enumerate(regions):
    values = saliency_map[region]  # [n, C]
    if not len(values):
      continue
    out["sum"][r] = values.sum(0)
    out["mean"][r] = values.mean(0)
    pick = np.argmax(np.abs(values), axis=0)
    out["peak"][r] = values[pick, np.arange(c)]
    out["abs_peak"][r] = np.abs(out["peak"][r])
  inside = np.abs(saliency_map[regions[0]]).sum(0)
  total = inside.sum()
  out["share"] = inside / total if total > 0 else np.full(c, np.nan)
  return out


def driver(share: np.ndarray, channel_names: Sequence[str]) -> str:
  """"T1Gd 48%, FLAIR 22%, ...": channels by share, largest first."""
  order = np.argsort(-np.nan_to_num(share, nan=-1.0), kind="stable")
  return ", ".join(f"{channel_names[k]} {100 * share[k]:.0f}%" for k in order)


def _background(image: np.ndarray, background: str | float) -> np.ndarray:
  """[C] fill values: the per-channel minimum ("min"), or a number."""
  if isinstance(background, str):
    if background != "min":
      raise ValueError(f"background must be 'min' or a number, got {background!r}")
    return image.reshape(-1, image.shape[-1]).min(0)
  return np.full(image.shape[-1], float(background), image.dtype)


def context_inputs(image: np.ndarray, mask: np.ndarray, dilations: Sequence[int], *,
                   background: str | float = "min",
                   connectivity: int | None = None) -> np.ndarray:
  """The image kept only inside the instance dilated k times, for each k.

  Returns:
    [len(dilations), *spatial, C]: outside the dilated mask, each channel set to the
    background (its minimum, the background of a normalised scan, or a stated value).
  """
  image = np.asarray(image)
  fill = _background(image, background).astype(image.dtype)
  st = structure(np.ndim(mask), connectivity)
  out = []
  for k in dilations:
    keep = np.asarray(mask, bool)
    if k > 0:
      keep = ndimage.binary_dilation(keep, st, iterations=int(k))
    out.append(np.where(keep[..., None], image, fill))
  return np.stack(out)


def context_curve(apply_fn: Callable, params: Params, image: np.ndarray, instance: Instance,
                  *, max_dilations: int = 34, background: str | float = "min",
                  connectivity: int | None = None, min_size: int = DEFAULT_MIN_SIZE,
                  batch_size: int = 8) -> dict[str, np.ndarray]:
  """Perilesional context: how much of the surroundings the network needs to see.

  For k = 0..K the image is kept inside the instance dilated k times and set to the
  background outside (`context_inputs`), and re-predicted.

  Args:
    apply_fn, params: the model.
    image: [*spatial, C].
    instance: the instance (its class and mask).
    max_dilations: K (the paper: 34).
    background: "min" (each channel's minimum) or a value.
    connectivity: of the dilations.
    min_size: the instance counts as detected while at least this many of its pixels are
      still predicted as its class.
    batch_size: images per forward call.

  Returns:
    "dilations" [K + 1], "probability" [K + 1] (the mean probability of the instance's class
    over its pixels), "detected_pixels" [K + 1] and "detected" [K + 1] bool.
  """
  dilations = np.arange(max_dilations + 1)
  x = context_inputs(image, instance.mask, dilations, background=background,
                     connectivity=connectivity)
  probs, hits = [], []
  c, mask = instance.class_index, jnp.asarray(instance.mask)
  for start in range(0, len(x), batch_size):
    p, h = _context_scores(apply_fn, params, jnp.asarray(x[start:start + batch_size]), mask, c)
    probs.append(np.asarray(p))
    hits.append(np.asarray(h))
  hits = np.concatenate(hits)
  return {"dilations": dilations, "probability": np.concatenate(probs),
          "detected_pixels": hits, "detected": hits >= min_size}


@functools.partial(jax.jit, static_argnames=("apply_fn", "c"))
def _context_scores(apply_fn, params, x, mask, c):
  """Mean probability of class c over the mask and the mask's pixels predicted as c: [B]."""
  logits = apply_fn(params, x)
  p = jax.nn.softmax(logits, axis=-1)[..., c]
  axes = tuple(range(1, p.ndim))
  m = mask.astype(p.dtype)
  mean = (p * m).sum(axes) / m.sum()
  hits = ((jnp.argmax(logits, -1) == c) & mask).sum(axes)
  return mean, hits
