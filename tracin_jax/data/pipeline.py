"""Grain input pipelines over a `SliceSet`: shuffled, augmented training and ordered eval.

An example is a dict::

  {"image": [H, W, 4] float32 in [-1, 1], "label": [H, W] int32, "index": int32}

where `index` is the example's position in the SliceSet (so `slices.ids[index]` gives its
(case id, slice index)); batches stack these along a new first axis.

Training (`train_dataset`, `train_batches`): one epoch at a time. The order is
`MapDataset.source(...).seed(seed).shuffle().random_map(augment).repeat()` cut at the
epoch's boundaries, so every epoch is a fresh permutation of all examples, epochs never mix,
and the permutation and each example's augmentation are fixed by (seed, epoch, position).

Augmentation (the paper's three), each applied with probability 0.5, to image and label
alike:

* elastic deformation: a smooth random displacement field (Gaussian displacements on a
  coarse grid of control points, cubic-spline upsampled); images resampled bilinearly,
  labels by nearest neighbour;
* random crop: the slices are already centre-cropped (240 -> 192), so the random crop is
  a pad-and-crop random translation of up to `max_shift` of the side in each direction
  (default 1/8: +-24 px at 192, the offsets a random 192 crop of the 240 plane allows);
  pixels shifted in are background (image -1, label 0);
* mirroring: left-right, which is the first image axis (H) for slices taken as
  `volume[:, :, z]` from BraTS' LPS-stored volumes.

The augmentations are pure numpy functions of (image, label, rng), exposed for tests and
notebooks. Iteration uses threads only (`grain.ReadOptions`); no worker processes, which
would read absl flags.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import grain
import numpy as np
from scipy import ndimage

from tracin_jax.data.slices import SliceSet

# The image axis that is anatomical left-right (x of the NIfTI volume).
LEFT_RIGHT_AXIS = 0
# Fill values for pixels that come from outside the image.
IMAGE_BACKGROUND = -1.0
LABEL_BACKGROUND = 0


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training augmentation settings.

  Attributes:
    p_elastic: probability of the elastic deformation.
    p_crop: probability of the random crop (pad-and-crop translation).
    p_mirror: probability of the left-right mirror.
    elastic_grid: control points per side of the coarse displacement grid.
    elastic_sigma: standard deviation of the control-point displacements, as a fraction
      of the image side (0.02 at 192 px: about 4 px).
    max_shift: largest translation of the random crop, as a fraction of the image side.
  """

  p_elastic: float = 0.5
  p_crop: float = 0.5
  p_mirror: float = 0.5
  elastic_grid: int = 5
  elastic_sigma: float = 0.02
  max_shift: float = 0.125


@functools.lru_cache(maxsize=16)
def _spline_basis(n: int, grid: int) -> np.ndarray:
  """[n, grid] cubic-spline weights: row i interpolates `grid` control values at pixel i.

  The control points span the image (first and last on the first and last pixel). A
  tensor-product spline is separable, so `B_h @ coarse @ B_w.T` equals 2D cubic spline
  interpolation of the coarse grid (`ndimage.map_coordinates(order=3, mode="nearest")`).
  """
  positions = np.linspace(0, grid - 1, n)
  basis = [ndimage.map_coordinates(unit, [positions], order=3, mode="nearest")
           for unit in np.eye(grid)]
  basis = np.stack(basis, axis=1)
  basis.flags.writeable = False
  return basis


def elastic_deform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                   grid: int = 5, sigma: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
  """Warps image and label with one smooth random displacement field.

  Args:
    image: [H, W, C] float32.
    label: [H, W] int.
    rng: the random generator.
    grid: control points per side of the coarse field.
    sigma: displacement standard deviation, as a fraction of the mean side.

  Returns:
    (image [H, W, C] float32, bilinear; label [H, W], nearest neighbour). Samples from
    outside the image are background.
  """
  h, w = label.shape
  coarse = rng.normal(0.0, sigma * (h + w) / 2, size=(2, grid, grid))
  displacement = _spline_basis(h, grid) @ coarse @ _spline_basis(w, grid).T  # [2, H, W]
  coords = np.mgrid[:h, :w] + displacement
  warped = np.empty_like(image)
  for c in range(image.shape[-1]):
    ndimage.map_coordinates(image[..., c], coords, output=warped[..., c], order=1,
                            mode="constant", cval=IMAGE_BACKGROUND)
  warped_label = ndimage.map_coordinates(label, coords, order=0, mode="constant",
                                         cval=LABEL_BACKGROUND)
  return warped, warped_label.astype(label.dtype)


def random_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                max_shift: float = 0.125) -> tuple[np.ndarray, np.ndarray]:
  """Pads by `max_shift` of each side and crops back to [H, W] at a random offset.

  Args:
    image: [H, W, C]; label: [H, W].
    rng: the random generator.
    max_shift: the largest translation, as a fraction of each side.

  Returns:
    (image, label) translated by the same random whole-pixel offset (dx, dy), each in
    [-pad, pad]; pixels shifted in are background.
  """
  h, w = label.shape
  px, py = int(round(max_shift * h)), int(round(max_shift * w))
  ox, oy = rng.integers(0, 2 * px + 1), rng.integers(0, 2 * py + 1)
  pad = ((px, px), (py, py))
  image = np.pad(image, pad + ((0, 0),), constant_values=IMAGE_BACKGROUND)
  label = np.pad(label, pad, constant_values=LABEL_BACKGROUND)
  return image[ox:ox + h, oy:oy + w], label[ox:ox + h, oy:oy + w]


def mirror(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Flips image [H, W, C] and label [H, W] left-right (axis `LEFT_RIGHT_AXIS`)."""
  return np.flip(image, LEFT_RIGHT_AXIS), np.flip(label, LEFT_RIGHT_AXIS)


def augment_example(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    config: AugmentConfig = AugmentConfig()) -> tuple[np.ndarray, np.ndarray]:
  """Elastic deformation, random crop and mirror, each with its probability, in that order.

  Args:
    image: [H, W, C] float32.
    label: [H, W] int32.
    rng: the random generator; the three coin flips are drawn first, so whether an
      augmentation applies does not depend on the others' draws.
    config: probabilities and strengths.

  Returns:
    (image [H, W, C] float32, label [H, W] int32), contiguous.
  """
  flips = rng.random(3) < (config.p_elastic, config.p_crop, config.p_mirror)
  if flips[0]:
    image, label = elastic_deform(image, label, rng, grid=config.elastic_grid,
                                  sigma=config.elastic_sigma)
  if flips[1]:
    image, label = random_crop(image, label, rng, max_shift=config.max_shift)
  if flips[2]:
    image, label = mirror(image, label)
  return (np.ascontiguousarray(image, dtype=np.float32),
          np.ascontiguousarray(label, dtype=np.int32))


class _SliceSource:
  """Random-access source of examples (a grain RandomAccessDataSource)."""

  def __init__(self, slices: SliceSet):
    self._slices = slices

  def __len__(self) -> int:
    return len(self._slices)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {
        "image": self._slices.images[index],
        "label": self._slices.labels[index],
        "index": np.int32(index),
    }


def eval_dataset(slices: SliceSet) -> grain.MapDataset:
  """The examples in SliceSet order, unaugmented: `len(ds)` and `ds[i]` random access."""
  return grain.MapDataset.source(_SliceSource(slices))


def train_dataset(slices: SliceSet, *, seed: int, epoch: int, augment: bool = True,
                  augment_config: AugmentConfig = AugmentConfig()) -> grain.MapDataset:
  """One training epoch as a random-access dataset of `len(slices)` examples.

  Args:
    slices: the training slices.
    seed: the run's data seed.
    epoch: the epoch (0-based); each gets its own permutation and augmentation draws.
    augment: apply `augment_example`.
    augment_config: its settings.

  Returns:
    A MapDataset whose element i is the i-th example of the epoch.
  """
  n = len(slices)
  ds = grain.MapDataset.source(_SliceSource(slices)).seed(seed).shuffle()
  if augment:

    def _augment(example, rng):
      image, label = augment_example(example["image"], example["label"], rng, augment_config)
      return {"image": image, "label": label, "index": example["index"]}

    ds = ds.random_map(_augment)
  # repeat() reseeds the shuffle and the augmentation for every epoch.
  return ds.repeat()[epoch * n:(epoch + 1) * n]


def _batches(ds: grain.MapDataset, batch_size: int, drop_remainder: bool,
             num_threads: int) -> Iterator[dict[str, np.ndarray]]:
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * batch_size)
  return iter(ds.to_iter_dataset(options).batch(batch_size, drop_remainder=drop_remainder))


def train_batches(slices: SliceSet, batch_size: int, *, seed: int, epoch: int,
                  augment: bool = True, augment_config: AugmentConfig = AugmentConfig(),
                  drop_remainder: bool = False,
                  num_threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Batches of one training epoch (see `train_dataset`).

  Args:
    slices, seed, epoch, augment, augment_config: as for `train_dataset`.
    batch_size: examples per batch.
    drop_remainder: drop a last batch shorter than batch_size.
    num_threads: threads preparing examples ahead of the consumer (no processes).

  Yields:
    {"image": [B, H, W, 4] float32, "label": [B, H, W] int32, "index": [B] int32}.
  """
  ds = train_dataset(slices, seed=seed, epoch=epoch, augment=augment,
                     augment_config=augment_config)
  return _batches(ds, batch_size, drop_remainder, num_threads)


def eval_batches(slices: SliceSet, batch_size: int, *,
                 num_threads: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Batches of all examples in SliceSet order, unaugmented; the last one may be short."""
  return _batches(eval_dataset(slices), batch_size, False, num_threads)
