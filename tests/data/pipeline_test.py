"""Tests for tracin_jax.data.pipeline on small in-memory SliceSets."""

import numpy as np
import pytest
from scipy import ndimage

from tracin_jax.data import pipeline
from tracin_jax.data.slices import SliceSet

ONLY = {
    "elastic": pipeline.AugmentConfig(p_elastic=1.0, p_crop=0.0, p_mirror=0.0),
    "crop": pipeline.AugmentConfig(p_elastic=0.0, p_crop=1.0, p_mirror=0.0),
    "mirror": pipeline.AugmentConfig(p_elastic=0.0, p_crop=0.0, p_mirror=1.0),
    "all": pipeline.AugmentConfig(p_elastic=1.0, p_crop=1.0, p_mirror=1.0),
}


def blocky_example(seed, size=48, block=6):
  """An image whose label is a function of it: channel k is 1 where the class is k, else -1.

  Classes are constant on block x block squares, so bilinear resampling leaves the image
  "pure" (every channel exactly +-1) away from block edges, and there the class can be
  read back from the image.
  """
  rng = np.random.default_rng(seed)
  classes = rng.integers(0, 4, size=(size // block, size // block))
  label = np.kron(classes, np.ones((block, block), int)).astype(np.int32)
  image = np.where(label[..., None] == np.arange(4), 1.0, -1.0).astype(np.float32)
  return image, label


def class_of_image(image):
  """The class encoded by a pure pixel; background (all -1, shifted in) is class 0; -1 if mixed."""
  pure = np.all(np.isclose(np.abs(image), 1.0, atol=1e-5), axis=-1)
  hot = np.isclose(image, 1.0, atol=1e-5)
  one_hot = pure & (hot.sum(axis=-1) == 1)
  background = pure & (hot.sum(axis=-1) == 0)
  return np.where(one_hot, hot.argmax(axis=-1), np.where(background, 0, -1))


@pytest.mark.parametrize("name", ONLY)
def test_augmentation_keeps_image_and_label_aligned(name):
  for seed in range(5):
    image, label = blocky_example(seed)
    rng = np.random.default_rng(seed)
    out_image, out_label = pipeline.augment_example(image, label, rng, ONLY[name])
    assert out_image.shape == image.shape and out_image.dtype == np.float32
    assert out_label.shape == label.shape and out_label.dtype == np.int32
    assert not np.array_equal(out_image, image)  # the augmentation did something
    decoded = class_of_image(out_image)
    known = decoded >= 0
    assert known.mean() > 0.5
    np.testing.assert_array_equal(out_label[known], decoded[known])
    assert set(np.unique(out_label)) <= {0, 1, 2, 3}
    assert out_image.min() >= -1.0 and out_image.max() <= 1.0


def test_spline_basis_is_2d_cubic_spline_interpolation():
  coarse = np.random.default_rng(0).normal(size=(5, 5))
  fine = np.meshgrid(np.linspace(0, 4, 40), np.linspace(0, 4, 30), indexing="ij")
  expected = ndimage.map_coordinates(coarse, fine, order=3, mode="nearest")
  basis = pipeline._spline_basis  # pylint: disable=protected-access
  got = basis(40, 5) @ coarse @ basis(30, 5).T
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_elastic_moves_pixels_without_scrambling():
  image, label = blocky_example(0, size=96, block=4)
  _, warped = pipeline.elastic_deform(image, label, np.random.default_rng(1))
  changed = (warped != label).mean()
  assert 0.02 < changed < 0.6
  # Labels are resampled by nearest neighbour: a 0/3 map gains no 1s or 2s at edges.
  _, warped = pipeline.elastic_deform(image, 3 * (label > 1), np.random.default_rng(1))
  assert set(np.unique(warped)) == {0, 3}


def shift(label, dx, dy):
  """label translated by (dx, dy) pixels, zeros shifted in."""
  out = np.zeros_like(label)
  h, w = label.shape
  src = label[max(0, -dx):h - max(0, dx), max(0, -dy):w - max(0, dy)]
  out[max(0, dx):max(0, dx) + src.shape[0], max(0, dy):max(0, dy) + src.shape[1]] = src
  return out


def test_random_crop_is_a_translation_within_max_shift():
  image, label = blocky_example(3, size=48)
  offsets = set()
  for seed in range(20):
    _, out_label = pipeline.random_crop(image, label, np.random.default_rng(seed),
                                        max_shift=0.125)  # 6 px at 48
    found = [(dx, dy) for dx in range(-6, 7) for dy in range(-6, 7)
             if np.array_equal(shift(label, dx, dy), out_label)]
    assert found, "the crop is not a translation of at most 6 px"
    offsets.add(found[0])
  assert len(offsets) > 10  # random offsets


def test_mirror_flips_left_right_both():
  image, label = blocky_example(4)
  label[0, :] = 3  # mark the first row (x = 0)
  out_image, out_label = pipeline.mirror(image, label)
  np.testing.assert_array_equal(out_label, label[::-1])
  np.testing.assert_array_equal(out_image, image[::-1])
  assert (out_label[-1] == 3).all()


def test_augment_example_is_deterministic_and_mixes():
  image, label = blocky_example(5)
  a = pipeline.augment_example(image, label, np.random.default_rng(7))
  b = pipeline.augment_example(image, label, np.random.default_rng(7))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  # With p = 0.5 each, some draws leave the example untouched and some change it.
  same = [np.array_equal(pipeline.augment_example(image, label, np.random.default_rng(s))[1],
                         label) for s in range(40)]
  assert 0 < sum(same) < 40


def make_slices(n=23, size=16):
  rng = np.random.default_rng(0)
  return SliceSet(
      images=rng.uniform(-1, 1, size=(n, size, size, 4)).astype(np.float32),
      labels=rng.integers(0, 4, size=(n, size, size)).astype(np.int32),
      case_ids=np.asarray([f"case{i // 5}" for i in range(n)]),
      slice_indices=np.asarray([50 + i % 5 for i in range(n)], np.int32))


def epoch_indices(slices, seed, epoch, **kw):
  return np.concatenate([b["index"] for b in pipeline.train_batches(
      slices, 5, seed=seed, epoch=epoch, **kw)])


def test_train_batches_shapes_and_short_last_batch():
  slices = make_slices()
  batches = list(pipeline.train_batches(slices, 5, seed=0, epoch=0))
  assert [len(b["index"]) for b in batches] == [5, 5, 5, 5, 3]
  first = batches[0]
  assert first["image"].shape == (5, 16, 16, 4) and first["image"].dtype == np.float32
  assert first["label"].shape == (5, 16, 16) and first["label"].dtype == np.int32
  assert first["index"].dtype == np.int32
  dropped = list(pipeline.train_batches(slices, 5, seed=0, epoch=0, drop_remainder=True))
  assert [len(b["index"]) for b in dropped] == [5, 5, 5, 5]


def test_epochs_are_permutations_that_differ():
  slices = make_slices()
  epochs = [epoch_indices(slices, seed=0, epoch=e) for e in range(4)]
  for order in epochs:
    assert sorted(order) == list(range(len(slices)))  # every example once per epoch
  assert len({tuple(order) for order in epochs}) == 4
  np.testing.assert_array_equal(epoch_indices(slices, seed=0, epoch=2), epochs[2])
  assert not np.array_equal(epoch_indices(slices, seed=1, epoch=0), epochs[0])


def test_train_is_deterministic_across_threads_and_unaugmented_matches_source():
  slices = make_slices()
  a = list(pipeline.train_batches(slices, 5, seed=3, epoch=1, num_threads=1))
  b = list(pipeline.train_batches(slices, 5, seed=3, epoch=1, num_threads=4))
  for x, y in zip(a, b):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(x[key], y[key])
  # Augmentation changes some examples; the index still names the source slice.
  augmented = np.concatenate([batch["label"] for batch in a])
  index = np.concatenate([batch["index"] for batch in a])
  assert not np.array_equal(augmented, slices.labels[index])
  plain = list(pipeline.train_batches(slices, 5, seed=3, epoch=1, augment=False))
  for batch in plain:
    np.testing.assert_array_equal(batch["image"], slices.images[batch["index"]])
    np.testing.assert_array_equal(batch["label"], slices.labels[batch["index"]])
  # The permutation does not depend on augmentation.
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in plain]), index)


def test_augmentation_differs_between_epochs():
  slices = make_slices()
  ds0 = pipeline.train_dataset(slices, seed=0, epoch=0)
  ds1 = pipeline.train_dataset(slices, seed=0, epoch=1)
  by_index0 = {int(ds0[i]["index"]): ds0[i]["image"] for i in range(len(ds0))}
  by_index1 = {int(ds1[i]["index"]): ds1[i]["image"] for i in range(len(ds1))}
  differs = [not np.array_equal(by_index0[k], by_index1[k]) for k in range(len(slices))]
  assert sum(differs) > len(slices) // 2


def test_eval_order_is_stable_and_random_access():
  slices = make_slices()
  ds = pipeline.eval_dataset(slices)
  assert len(ds) == len(slices)
  np.testing.assert_array_equal(ds[7]["image"], slices.images[7])
  assert int(ds[7]["index"]) == 7
  for _ in range(2):
    batches = list(pipeline.eval_batches(slices, 10))
    assert [len(b["index"]) for b in batches] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]),
                                  np.arange(len(slices)))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]),
                                  slices.images)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]),
                                  slices.labels)
