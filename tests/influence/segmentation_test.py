"""Regions, region losses, NaN for empty regions, and the segmentation_influence wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.influence import influence, segmentation
import tiny_models as tm

LOW = -1e4  # a logit whose softmax probability is exactly 0 in float32


def logits_model(params, images):
  """The images are the logits (times a scale): lets a test set p exactly."""
  return images * params["scale"]


IDENTITY = {"scale": jnp.ones(())}
apply = jax.jit(tm.conv_apply)


def pixel(*logits):
  return np.array(logits, np.float32)


def test_threshold_is_strict_and_argmax_must_match():
  # p = (0, 0.5, 0.5, 0) exactly; argmax is class 1 (first of the tie).
  tie = pixel(LOW, 0.0, 0.0, LOW)
  # p = (0, 0, 1, 0): class 2 for sure.
  sure = pixel(LOW, LOW, 0.0, LOW)
  # p = (1, 0, 0, 0): background is never a region.
  background = pixel(0.0, LOW, LOW, LOW)
  images = np.stack([tie, sure, background, sure]).reshape(1, 2, 2, 4)
  at = segmentation.predict_regions(logits_model, IDENTITY, images, threshold=0.5)
  assert at.shape == (1, 2, 2, 3) and at.dtype == bool
  np.testing.assert_array_equal(at[0].reshape(4, 3), [[0, 0, 0], [0, 1, 0], [0, 0, 0],
                                                      [0, 1, 0]])
  below = segmentation.predict_regions(logits_model, IDENTITY, images,
                                       threshold=np.nextafter(np.float32(0.5), 0))
  # p_1 = 0.5 > threshold now; p_2 = 0.5 too, but argmax is 1, so not region 2.
  np.testing.assert_array_equal(below[0].reshape(4, 3), [[1, 0, 0], [0, 1, 0], [0, 0, 0],
                                                         [0, 1, 0]])
  with pytest.raises(ValueError, match="threshold"):
    segmentation.predict_regions(logits_model, IDENTITY, images, threshold=1.5)


def test_regions_in_batches_equal_one_batch():
  images = tm.conv_data(3, 4)["image"]
  params = tm.conv_params(0)
  one = segmentation.predict_regions(tm.conv_apply, params, images, 0.3, batch_size=4)
  several = segmentation.predict_regions(tm.conv_apply, params, images[:3], 0.3, batch_size=2)
  np.testing.assert_array_equal(one[:3], several)  # 3 = a batch of 2 and a padded one
  assert one.any() and not one.all()
  probs = jax.nn.softmax(apply(params, images), -1)
  expect = (np.argmax(probs, -1)[..., None] == np.arange(1, 4)) & (probs[..., 1:] > 0.3)
  np.testing.assert_array_equal(one, expect)


def test_region_presence_and_mask_absent():
  regions = np.zeros((3, 2, 2, 3), bool)
  regions[0, 0, 0, 1] = True
  regions[2, 1, 1, 0] = regions[2, 0, 0, 2] = True
  presence = segmentation.region_presence(regions)
  np.testing.assert_array_equal(presence, [[0, 1, 0], [0, 0, 0], [1, 0, 1]])
  scores = np.ones((2, 3, 3, 3), np.float32)
  presence_test = np.array([[1, 1, 1], [0, 1, 0]], bool)
  masked = segmentation.mask_absent(scores, presence_test, presence)
  expect = presence_test[:, :, None, None] & presence[None, None]
  np.testing.assert_array_equal(np.isnan(masked), ~expect)
  np.testing.assert_array_equal(masked[expect], 1.0)
  assert not np.isnan(scores).any()  # a copy
  with pytest.raises(ValueError, match="do not match"):
    segmentation.mask_absent(scores, presence, presence)


def dice_loss_numpy(probs, target, region, smooth):
  out = []
  for j in range(1, probs.shape[-1]):
    r, p, y = region[..., j - 1], probs[..., j], (target == j)
    out.append(1 - 2 * np.sum(r * p * y) / (np.sum(r * p) + np.sum(r * y) + smooth))
  return np.array(out)


def test_region_losses_are_restricted_soft_dice():
  loss_fn = segmentation.make_region_losses(tm.conv_apply)
  assert segmentation.make_region_losses(tm.conv_apply) is loss_fn  # compiled once
  params, images = tm.conv_params(0), tm.conv_data(3, 1)["image"]
  rng = np.random.default_rng(0)
  target = rng.integers(0, 4, size=(6, 6))
  region = rng.random((6, 6, 3)) < 0.5
  region[..., 2] = False  # an empty region: loss 1, zero gradient
  example = {"image": images[0], "target": target}

  @jax.jit
  def losses_and_jacobians(params, region):  # one compile for all the checks below
    f = lambda p, r: loss_fn(p, dict(example, region=r))
    return f(params, region), jax.jacrev(f, argnums=(0, 1))(params, region)

  losses, (d_params, d_region) = losses_and_jacobians(params, region.astype(np.float32))
  probs = np.asarray(jax.nn.softmax(apply(params, images), -1))[0]
  np.testing.assert_allclose(losses, dice_loss_numpy(probs, target, region, 1e-6), rtol=1e-5)
  assert float(losses[2]) == 1.0
  assert all(float(jnp.abs(x[2]).max()) == 0.0 for x in jax.tree.leaves(d_params))
  assert all(float(jnp.abs(x[:2]).max()) > 0.0 for x in jax.tree.leaves(d_params))
  # No gradient through the region mask (here a float one, which could carry one).
  assert float(jnp.abs(d_region).max()) == 0.0


def test_region_shape_mismatch_is_an_error():
  loss_fn = segmentation.make_region_losses(tm.conv_apply)
  example = {"image": np.zeros((6, 6, 2), np.float32), "target": np.zeros((6, 6), np.int32),
             "region": np.zeros((6, 6, 2), bool)}
  with pytest.raises(ValueError, match="region has shape"):
    jax.eval_shape(loss_fn, tm.conv_params(0), example)


def test_segmentation_influence_nan_for_empty_regions_and_fixed_regions():
  checkpoints = [(tm.conv_params(1), 0.1), (tm.conv_params(2), 0.05)]
  regions_params = tm.conv_params(0)
  train_images, test_images = tm.conv_data(3, 4)["image"], tm.conv_data(4, 2)["image"]
  # An image whose logits are flat has p = 0.25 everywhere: no region passes 0.3.
  train_images[1] = 0.0
  rng = np.random.default_rng(0)
  train_targets = rng.integers(0, 4, size=(4, 6, 6))
  scores, presence_train, presence_test = segmentation.segmentation_influence(
      tm.conv_apply, checkpoints, train_images, train_targets, test_images,
      regions_params=regions_params, threshold=0.3, batch_size=3)
  assert scores.shape == (2, 3, 4, 3)
  assert not presence_train[1].any() and presence_train.any() and presence_test.any()
  expect_nan = ~(presence_test[:, :, None, None] & presence_train[None, None])
  np.testing.assert_array_equal(np.isnan(scores), expect_nan)

  # The same by hand: regions from regions_params (not from each checkpoint), test targets
  # from the model's own prediction.
  regions = segmentation.predict_regions(tm.conv_apply, regions_params, train_images, 0.3)
  test_regions = segmentation.predict_regions(tm.conv_apply, regions_params, test_images, 0.3)
  test_labels = np.argmax(apply(regions_params, test_images), -1)
  train = {"image": train_images, "target": train_targets.astype(np.int32), "region": regions}
  test = {"image": test_images, "target": test_labels.astype(np.int32), "region": test_regions}
  by_hand = influence(segmentation.make_region_losses(tm.conv_apply), checkpoints, train, test)
  np.testing.assert_allclose(scores[~expect_nan], by_hand[~expect_nan], rtol=1e-5, atol=1e-7)
  assert np.all(by_hand[expect_nan] == 0.0)  # what the NaN replaces: a silent zero

  # Train-influence: presence_test is the train presence, and the matrix is symmetric.
  scores, presence_train, presence_test = segmentation.segmentation_influence(
      tm.conv_apply, checkpoints, train_images, train_targets,
      regions_params=regions_params, threshold=0.3)
  assert scores.shape == (4, 3, 4, 3) and presence_test is presence_train
  np.testing.assert_array_equal(scores, scores.transpose(2, 3, 0, 1))
