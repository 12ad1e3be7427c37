"""Tests of the soft Dice loss (eq 1-2) and the hard Dice metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.training import losses


def test_dice_loss_matches_hand_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 3, 4)).astype(np.int32)
  loss, dice = losses.dice_loss(jnp.asarray(logits), jnp.asarray(labels))

  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  expected = []
  for c in (1, 2, 3):
    y = (labels == c).astype(np.float64)
    inter = (p[..., c] * y).sum()
    expected.append((2 * inter + losses.DICE_SMOOTH) /
                    (p[..., c].sum() + y.sum() + losses.DICE_SMOOTH))
  np.testing.assert_allclose(dice, expected, rtol=1e-5)
  np.testing.assert_allclose(loss, 1 - np.mean(expected), rtol=1e-5)


def test_dice_loss_perfect_prediction_is_near_zero_and_weights_drop_examples():
  labels = np.zeros((2, 4, 4), np.int32)
  labels[0, :2, :2], labels[0, 2:, 2:], labels[0, :2, 2:] = 1, 2, 3
  logits = 50.0 * jax.nn.one_hot(labels, 4)
  loss, _ = losses.dice_loss(logits, jnp.asarray(labels))
  assert float(loss) < 1e-4
  # A wrong second example with weight 0 changes nothing.
  bad = logits.at[1].set(50.0 * jax.nn.one_hot(np.full((4, 4), 2), 4))
  lw, _ = losses.dice_loss(bad, jnp.asarray(labels), jnp.asarray([1.0, 0.0]))
  lu, _ = losses.dice_loss(bad, jnp.asarray(labels))
  assert float(lw) < 1e-4 < float(lu)


def test_hard_dice_conventions():
  a = np.array([1, 1, 0, 0], bool)
  b = np.array([1, 0, 1, 0], bool)
  assert losses.hard_dice(a, b) == pytest.approx(0.5)
  assert losses.hard_dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
  assert losses.hard_dice(a, np.zeros(4, bool)) == 0.0


def test_per_case_dice_averages_over_patients_and_regions():
  truth = np.array([[[1, 2]], [[3, 0]], [[2, 2]]])  # 3 slices of 1x2
  pred = np.array([[[1, 2]], [[0, 0]], [[2, 0]]])
  cases = np.array(["a", "a", "b"])
  d = losses.per_case_dice(pred, truth, cases)
  # case a: NCR 1, ED 1, ET 0 (truth 1 px, pred none); case b: ED 2*1/(1+2), NCR/ET empty.
  assert d["NCR/NET"] == pytest.approx(1.0)
  assert d["ET"] == pytest.approx(0.5)
  assert d["ED"] == pytest.approx((1.0 + 2 / 3) / 2)
  # WT for case a: truth {1,2,3} 3 px, pred 2 px overlap 2 -> 0.8; case b 2/3.
  assert d["WT"] == pytest.approx((0.8 + 2 / 3) / 2)
  assert d["TC"] == pytest.approx((2 * 1 / 3 + 1.0) / 2)


def test_dice_loss_of_volumes_is_that_of_their_slices_stacked():
  """Rank 3: the soft Dice sums over every example and voxel, so a batch of volumes scores
  as the stack of their axial slices (weights repeated per slice), in float64."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 2, 4, 5, 4))
  labels = rng.integers(0, 4, size=(3, 2, 4, 5)).astype(np.int32)
  weights = np.array([1.0, 0.0, 1.0])
  with jax.enable_x64(True):
    loss3, dice3 = losses.dice_loss(jnp.asarray(logits), jnp.asarray(labels),
                                    jnp.asarray(weights))
    loss2, dice2 = losses.dice_loss(jnp.asarray(logits.reshape(6, 4, 5, 4)),
                                    jnp.asarray(labels.reshape(6, 4, 5)),
                                    jnp.asarray(np.repeat(weights, 2)))
    assert dice3.dtype == jnp.float64
  np.testing.assert_allclose(dice3, dice2, rtol=1e-12)
  np.testing.assert_allclose(loss3, loss2, rtol=1e-12)
  # And by hand, over the weighted volumes only.
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = (e / e.sum(-1, keepdims=True))[weights > 0]
  kept = labels[weights > 0]
  expected = [(2 * (p[..., c] * (kept == c)).sum() + losses.DICE_SMOOTH)
              / (p[..., c].sum() + (kept == c).sum() + losses.DICE_SMOOTH) for c in (1, 2, 3)]
  np.testing.assert_allclose(dice3, expected, rtol=1e-12)
