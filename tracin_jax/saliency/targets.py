"""Scalar targets F(output) -> [N] that saliency methods explain, and masks for them.

A target maps a model's output batch to one score per example:

    target(output) -> [N]

`output` is what `apply_fn(params, x)` returns: segmentation logits [N, H, W, K] (or
[N, D, H, W, K] for volumes), or classifier logits [N, K]. Methods differentiate
`sum_n target(output)[n]`; because every example's score depends on that example alone
(models without batch statistics, such as the GroupNorm UNets of `tracin_jax.models`),
this gives each example's own gradient.

Two optional methods extend the protocol (`Target`):

* `bind(output) -> Target`: called once by every method with the output at the clean,
  unperturbed input, before noise, interpolation or deletion; it returns the target that is
  actually differentiated. Targets whose mask comes from the model's prediction fix the mask
  there (under `jax.lax.stop_gradient`), so that the region explained does not move with the
  noise or along the integration path.
* `terms(output) -> [N, V]`: the target as a sum over V terms (one per voxel for region
  targets, `target(output) == terms(output).sum(-1)`). SmoothGrad's "max" aggregation
  (Spagnolo et al.'s IES) needs it.

Targets are frozen dataclasses registered as pytrees: a mask is an array leaf (a new mask of
the same shape does not recompile a jitted method) and the class index is static. A plain
function `output -> [N]` is a valid target as well (without `bind`/`terms`).

    target = masked_class_sum(3, predicted_region("ET"))       # fixed at the clean input
    target = masked_class_sum(1, region_mask(labels, "TC"))    # ground-truth mask
    target = class_softmax_sum(2)                              # NeuroXAI's segmentation target
    target = class_score(0)                                    # a classifier's logit
    target = masked_class_sums([1, 2, 3], masks)               # a class per example
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.types import Array

# BraTS evaluation regions as sets of label classes (1 NCR/NET, 2 ED, 3 ET).
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
ON_CHOICES: tuple[str, ...] = ("logits", "probabilities")


@runtime_checkable
class Target(Protocol):
  """What every method accepts as `target`: `target(output) -> [N]`.

  Optional (see the module docstring): `bind(output) -> Target` and
  `terms(output) -> [N, V]`.
  """

  def __call__(self, output: Array) -> Array:
    """output [N, ..., K] -> scores [N]."""
    ...


def bind_target(target: Callable[[Array], Array], output: Array) -> Callable[[Array], Array]:
  """`target.bind(output)` for targets that have it, else `target` itself.

  Args:
    target: a target (see `Target`).
    output: the model's output at the clean input, [N, ..., K].
  """
  bind = getattr(target, "bind", None)
  return target if bind is None else bind(output)


def target_terms(target: Callable[[Array], Array], output: Array) -> Array:
  """`target.terms(output)` -> [N, V]; a target without `terms` is one term: [N, 1]."""
  terms = getattr(target, "terms", None)
  if terms is None:
    return target(output)[:, None]
  return terms(output)


def _flat_spatial(values: Array) -> Array:
  """[N, *spatial] -> [N, prod(spatial)]."""
  return values.reshape(values.shape[0], -1)


def _masked_terms(mask: Array, values: Array) -> Array:
  """mask * values per voxel, [N, prod(spatial)]; the mask is held fixed (no gradient)."""
  mask = jax.lax.stop_gradient(jnp.asarray(mask, values.dtype))
  if mask.shape != values.shape:
    raise ValueError(f"mask has shape {mask.shape}; the output's class channel has shape "
                     f"{values.shape}")
  return _flat_spatial(mask * values)


def _check_class(c: int) -> int:
  if int(c) != c or c < 0:
    raise ValueError(f"class index must be a non-negative integer, got {c!r}")
  return int(c)


# ---------------------------------------------------------------------------------------------
# Masks.


def _classes_of(region: str | int | Sequence[int]) -> tuple[int, ...]:
  if isinstance(region, str):
    if region not in REGIONS:
      raise ValueError(f"unknown region {region!r}; expected one of {sorted(REGIONS)} or "
                       "class indices")
    return REGIONS[region]
  if isinstance(region, (int, np.integer)):
    return (int(region),)
  classes = tuple(int(c) for c in region)
  if not classes:
    raise ValueError("region must name at least one class")
  return classes


def region_mask(labels: Array, region: str | int | Sequence[int]) -> Array:
  """Boolean mask of the voxels whose label is in a region.

  Args:
    labels: [N, *spatial] integer labels (ground truth, or a prediction's argmax).
    region: "WT" (classes 1, 2, 3), "TC" (1, 3), "ET" (3), one class index or a sequence
      of class indices.

  Returns:
    [N, *spatial] bool.
  """
  labels = jnp.asarray(labels)
  return jnp.isin(labels, jnp.asarray(_classes_of(region), labels.dtype))


@dataclasses.dataclass(frozen=True)
class PredictedRegion:
  """A mask rule: voxels whose predicted class (argmax over the last axis) is in `classes`.

  Called with the clean output by `MaskedClassSum.bind`: `rule(output [N, *spatial, K])`
  -> [N, *spatial] float (0/1).
  """

  classes: tuple[int, ...]

  def __call__(self, output: Array) -> Array:
    labels = jnp.argmax(output, axis=-1)
    return jnp.isin(labels, jnp.asarray(self.classes, labels.dtype)).astype(output.dtype)


def predicted_region(region: str | int | Sequence[int]) -> PredictedRegion:
  """Mask rule: the model's predicted region ("WT", "TC", "ET" or class indices).

  `predicted_region(c)` is the predicted region of class c (argmax == c).
  """
  return PredictedRegion(_classes_of(region))


# ---------------------------------------------------------------------------------------------
# Targets.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClassSoftmaxSum:
  """NeuroXAI's segmentation target: the softmax probability of class c summed over the
  whole image, F = sum_{voxels} softmax(output)[..., c].

  output [N, *spatial, K] -> [N]; `terms` [N, prod(spatial)].
  """

  c: int = dataclasses.field(metadata=dict(static=True))

  def terms(self, output: Array) -> Array:
    return _flat_spatial(jax.nn.softmax(output, axis=-1)[..., self.c])

  def __call__(self, output: Array) -> Array:
    return self.terms(output).sum(-1)


def class_softmax_sum(c: int) -> ClassSoftmaxSum:
  """Whole-image sum of the softmax channel c (NeuroXAI): output [N, *spatial, K] -> [N]."""
  return ClassSoftmaxSum(_check_class(c))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskedClassSum:
  """Sum over a mask of channel c of the logits or of the softmax probabilities.

  F = sum_{voxels} mask * output[..., c] (on="logits") or mask * softmax(output)[..., c]
  (on="probabilities"). output [N, *spatial, K] -> [N]; `terms` [N, prod(spatial)].

  Attributes:
    c: the class channel.
    on: "logits" or "probabilities".
    mask: [N, *spatial] float mask, or None until `bind` computes it with `rule`.
    rule: a mask rule `output -> [N, *spatial]` (e.g. `predicted_region("WT")`), applied to
      the clean output by `bind`; None when `mask` is given.
  """

  mask: Array | None
  c: int = dataclasses.field(metadata=dict(static=True))
  on: str = dataclasses.field(default="logits", metadata=dict(static=True))
  rule: Callable[[Array], Array] | None = dataclasses.field(default=None,
                                                            metadata=dict(static=True))

  def bind(self, output: Array) -> "MaskedClassSum":
    """Fixes the mask at the clean output (a no-op when the mask was given)."""
    if self.mask is not None:
      return self
    mask = jax.lax.stop_gradient(jnp.asarray(self.rule(output), output.dtype))
    return dataclasses.replace(self, mask=mask)

  def terms(self, output: Array) -> Array:
    bound = self.bind(output)  # unbound: the rule is applied to this output (stop_gradient)
    values = output[..., self.c]
    if self.on == "probabilities":
      values = jax.nn.softmax(output, axis=-1)[..., self.c]
    return _masked_terms(bound.mask, values)

  def __call__(self, output: Array) -> Array:
    return self.terms(output).sum(-1)


def masked_class_sum(c: int, mask: Array | Callable[[Array], Array],
                     on: str = "logits") -> MaskedClassSum:
  """Sum of channel c over a mask: output [N, *spatial, K] -> [N].

  Args:
    c: class channel (0 background, 1 NCR/NET, 2 ED, 3 ET).
    mask: [N, *spatial] array (bool or float; the ground truth from `region_mask(labels,
      ...)`, or any mask), or a mask rule applied once to the clean output
      (`predicted_region(c)`, `predicted_region("WT")`, or any `output -> [N, *spatial]`
      function; it must be hashable, as functions and frozen dataclasses are).
    on: "logits" (default) or "probabilities" (softmax over the class axis).

  Raises:
    ValueError: for an unknown `on` or class index.
  """
  if on not in ON_CHOICES:
    raise ValueError(f"on must be one of {ON_CHOICES}, got {on!r}")
  c = _check_class(c)
  if callable(mask) and not hasattr(mask, "shape"):
    return MaskedClassSum(mask=None, c=c, on=on, rule=mask)
  return MaskedClassSum(mask=jnp.asarray(mask, jnp.float32), c=c, on=on)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskedClassSums:
  """`MaskedClassSum` with a class per example: F_n = sum_{voxels} mask_n * output_n[..., c_n]
  (logits, or softmax probabilities). Explains several classes of one image in one batch.

  output [N, *spatial, K] -> [N]; `terms` [N, prod(spatial)].

  Attributes:
    mask: [N, *spatial] float masks.
    classes: [N] int class channels.
    on: "logits" or "probabilities".
  """

  mask: Array
  classes: Array
  on: str = dataclasses.field(default="logits", metadata=dict(static=True))

  def terms(self, output: Array) -> Array:
    values = output if self.on == "logits" else jax.nn.softmax(output, axis=-1)
    index = jnp.asarray(self.classes, jnp.int32).reshape((-1,) + (1,) * (output.ndim - 1))
    return _masked_terms(self.mask, jnp.take_along_axis(values, index, axis=-1)[..., 0])

  def __call__(self, output: Array) -> Array:
    return self.terms(output).sum(-1)


def masked_class_sums(classes: Sequence[int], masks: Array,
                      on: str = "logits") -> MaskedClassSums:
  """Sum of channel classes[n] over masks[n], per example: output [N, *spatial, K] -> [N].

  Args:
    classes: [N] class channels, one per example.
    masks: [N, *spatial] masks (bool or float).
    on: "logits" (default) or "probabilities".
  """
  if on not in ON_CHOICES:
    raise ValueError(f"on must be one of {ON_CHOICES}, got {on!r}")
  classes = [_check_class(c) for c in classes]
  masks = jnp.asarray(masks, jnp.float32)
  if masks.shape[0] != len(classes):
    raise ValueError(f"{len(classes)} classes for {masks.shape[0]} masks")
  return MaskedClassSums(masks, jnp.asarray(classes, jnp.int32), on)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClassScore:
  """A classifier's logit of class c: output [N, K] -> output[:, c], [N]."""

  c: int = dataclasses.field(metadata=dict(static=True))

  def terms(self, output: Array) -> Array:
    return output[:, self.c][:, None]

  def __call__(self, output: Array) -> Array:
    if output.ndim != 2:
      raise ValueError(f"class_score expects classifier output [N, K], got {output.shape}")
    return output[:, self.c]


def class_score(c: int) -> ClassScore:
  """A classifier's logit of class c: output [N, K] -> [N]."""
  return ClassScore(_check_class(c))


# ---------------------------------------------------------------------------------------------
# Passing targets through jit.


@dataclasses.dataclass(frozen=True)
class _StaticTarget:
  """Wraps a target that is not a pytree of arrays (a plain function) as a static pytree."""

  fn: Any

  def __call__(self, output: Array) -> Array:
    return self.fn(output)

  def __getattr__(self, name: str) -> Any:
    if name == "fn":
      raise AttributeError(name)
    return getattr(self.fn, name)


jax.tree_util.register_pytree_node(
    _StaticTarget, lambda t: ((), t.fn), lambda fn, _: _StaticTarget(fn))


def as_jit_arg(target: Any) -> Any:
  """A target as a pytree that `jax.jit` can take: array leaves traced, the rest static."""
  leaves = jax.tree.leaves(target)
  if all(isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, int)) for leaf in leaves):
    if callable(target):
      return target
  if not callable(target):
    raise TypeError(f"target must be callable (output -> [N]), got {target!r}")
  return _StaticTarget(target)
