"""Soft Dice (eq 1) and the training loss (eq 2); hard Dice for evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.data import constants

# Smoothing added to numerator and denominator of the soft Dice, so a class that is absent
# from both prediction and target scores 1 and the loss stays differentiable.
DICE_SMOOTH = 1e-5


def soft_dice(probs: jax.Array, target: jax.Array, axes, smooth: float = DICE_SMOOTH):
  """Soft Dice coefficient (eq 1), reduced over `axes`.

  D = (2 sum p y + smooth) / (sum p + sum y + smooth).

  Args:
    probs: probabilities, any shape, float.
    target: same shape, {0, 1} (one-hot) or soft.
    axes: axes to sum over.
    smooth: smoothing constant.

  Returns:
    Dice with `axes` reduced away.
  """
  inter = jnp.sum(probs * target, axis=axes)
  denom = jnp.sum(probs, axis=axes) + jnp.sum(target, axis=axes)
  return (2.0 * inter + smooth) / (denom + smooth)


def dice_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None):
  """Training loss of eq 2: L = 1 - (1/3) sum_{i=1..3} D_i, background excluded.

  The soft Dice of each class is computed over the whole batch (all examples and pixels or
  voxels): slices and volumes alike, by the rank of `labels`.

  Args:
    logits: [N, H, W, 4] (slices) or [N, D, H, W, 4] (volumes) float32.
    labels: [N, H, W] or [N, D, H, W] int32 in {0, 1, 2, 3}.
    weights: optional [N] float32 example weights in {0, 1}: examples with weight 0 (padding)
      contribute nothing.

  Returns:
    (loss scalar, soft Dice per tumour class [3]).
  """
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=probs.dtype)
  if weights is not None:
    w = weights.astype(probs.dtype).reshape((-1,) + (1,) * (probs.ndim - 1))
    probs, onehot = probs * w, onehot * w
  dice = soft_dice(probs[..., 1:], onehot[..., 1:], axes=tuple(range(probs.ndim - 1)))
  return 1.0 - jnp.mean(dice), dice


def hard_dice(pred: np.ndarray, truth: np.ndarray) -> float:
  """Hard Dice of two boolean masks; 1.0 when both are empty (BraTS convention)."""
  pred = np.asarray(pred, bool)
  truth = np.asarray(truth, bool)
  denom = pred.sum() + truth.sum()
  if denom == 0:
    return 1.0
  return float(2.0 * np.logical_and(pred, truth).sum() / denom)


def region_masks(classes: np.ndarray) -> dict[str, np.ndarray]:
  """Boolean masks per tumour class and BraTS region from a class map.

  Args:
    classes: [...] int in {0, 1, 2, 3}.

  Returns:
    {"NCR/NET", "ED", "ET", "WT", "TC"} -> boolean masks of the same shape. ("ET" the class
    and "ET" the region are the same set.)
  """
  out = {constants.CLASS_NAMES[c]: classes == c for c in constants.TUMOUR_CLASSES}
  for name, members in constants.REGIONS.items():
    out[name] = np.isin(classes, members)
  return out


def per_case_dice(pred: np.ndarray, truth: np.ndarray, case_ids) -> dict[str, float]:
  """Hard Dice per class and region, computed per patient over its slices (or its one
  volume), then averaged.

  Args:
    pred: [N, H, W] (or [N, D, H, W]) predicted classes.
    truth: the true classes, shaped as `pred`.
    case_ids: [N] the patient of each slice or volume.

  Returns:
    {"NCR/NET", "ED", "ET", "WT", "TC"} -> mean over patients of the hard Dice; an empty
    prediction of an empty truth counts 1.0.
  """
  case_ids = np.asarray(case_ids).astype(str)
  scores: dict[str, list[float]] = {}
  for case in dict.fromkeys(case_ids):
    sel = case_ids == case
    pm, tm = region_masks(pred[sel]), region_masks(truth[sel])
    for name in pm:
      scores.setdefault(name, []).append(hard_dice(pm[name], tm[name]))
  return {name: float(np.mean(v)) for name, v in scores.items()}
