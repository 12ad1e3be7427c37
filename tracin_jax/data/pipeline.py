"""Grain input pipelines over a `SliceSet` or a `VolumeSet`: shuffled, augmented training
and ordered eval.

An example is a dict::

  {"image": [H, W, 4] float32 in [-1, 1], "label": [H, W] int32, "index": int32}

(for a `tracin_jax.data.volumes.VolumeSet`: "image" [D, H, W, 4], "label" [D, H, W]) where
`index` is the example's position in the set (so `slices.ids[index]` gives its (case id,
slice index)); batches stack these along a new first axis.

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
  `volume[:, :, z]` from BraTS' LPS-stored volumes (`AugmentConfig.mirror_axes` adds
  the other axes, each flipped on its own draw).

In 3D (examples [D, H, W, C]) each is the same idea by rank: the displacement field is a
3D tensor-product spline, images trilinear; the random crop translates along D, H and W;
left-right is then the second axis (H), D the axial (superior-inferior) one.

The augmentations are pure numpy functions of (image, label, rng), exposed for tests and
notebooks. Iteration uses threads only (`grain.ReadOptions`); no worker processes, which
would read absl flags.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Iterator

import grain
import numpy as np
from scipy import ndimage

from tracin_jax.data.slices import SliceSet

if TYPE_CHECKING:
  from tracin_jax.data.volumes import VolumeSet

# The image axis that is anatomical left-right (x of the NIfTI volume) in a slice [H, W].
LEFT_RIGHT_AXIS = 0
# The spatial axis of each anatomical direction, by the example's spatial rank: a slice is
# [H, W] = (x, y) of the volume, a volume sample [D, H, W] = (z, x, y).
ANATOMICAL_AXES = {
    2: {"left_right": 0, "anterior_posterior": 1},
    3: {"superior_inferior": 0, "left_right": 1, "anterior_posterior": 2},
}
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
    mirror_axes: the anatomical axes mirrored, each with probability p_mirror on its own
      draw: "left_right" (the paper's), "anterior_posterior", and in 3D
      "superior_inferior" (`ANATOMICAL_AXES`).
  """

  p_elastic: float = 0.5
  p_crop: float = 0.5
  p_mirror: float = 0.5
  elastic_grid: int = 5
  elastic_sigma: float = 0.02
  max_shift: float = 0.125
  mirror_axes: tuple[str, ...] = ("left_right",)

  def __post_init__(self):
    axes = (self.mirror_axes,) if isinstance(self.mirror_axes, str) else tuple(
        self.mirror_axes)
    unknown = [a for a in axes if a not in ANATOMICAL_AXES[3]]
    if unknown or len(set(axes)) != len(axes):
      raise ValueError(f"mirror_axes must be distinct names of {sorted(ANATOMICAL_AXES[3])}, "
                       f"got {self.mirror_axes!r}.")
    object.__setattr__(self, "mirror_axes", axes)


def _axis(name: str, rank: int) -> int:
  """The spatial axis of an anatomical direction in an example of spatial rank `rank`."""
  if rank not in ANATOMICAL_AXES:
    raise ValueError(f"examples are [H, W] or [D, H, W] (spatial rank 2 or 3), got rank {rank}.")
  if name not in ANATOMICAL_AXES[rank]:
    raise ValueError(f"mirror_axes: {name!r} is not an axis of a {rank}D example "
                     f"({', '.join(ANATOMICAL_AXES[rank])}).")
  return ANATOMICAL_AXES[rank][name]


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


def smooth_displacement(shape: tuple[int, ...], coarse: np.ndarray) -> np.ndarray:
  """The cubic-spline upsampling of control-point displacements to every pixel or voxel.

  Args:
    shape: the spatial shape, (H, W) or (D, H, W).
    coarse: [rank, grid, ..., grid] displacements at the control points (rank = len(shape)).

  Returns:
    [rank, *shape] float64: per axis, the tensor-product cubic spline of `coarse`
    (`ndimage.map_coordinates(order=3, mode="nearest")` of it on the pixel grid).
  """
  grid = coarse.shape[1]
  if len(shape) == 2:
    h, w = shape
    return _spline_basis(h, grid) @ coarse @ _spline_basis(w, grid).T
  field = coarse
  for a, n in enumerate(shape):  # one separable factor per spatial axis
    field = np.moveaxis(np.tensordot(_spline_basis(n, grid), field, axes=(1, a + 1)), 0, a + 1)
  return field


def elastic_deform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                   grid: int = 5, sigma: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
  """Warps image and label with one smooth random displacement field.

  Args:
    image: [H, W, C] (or [D, H, W, C]) float32.
    label: [H, W] (or [D, H, W]) int.
    rng: the random generator.
    grid: control points per side of the coarse field.
    sigma: displacement standard deviation, as a fraction of the mean side.

  Returns:
    (image float32, bilinear (trilinear in 3D); label, nearest neighbour), shaped as given.
    Samples from outside the image are background.
  """
  shape = label.shape
  coarse = rng.normal(0.0, sigma * sum(shape) / len(shape), size=(len(shape),)
                      + (grid,) * len(shape))
  coords = np.mgrid[tuple(slice(n) for n in shape)] + smooth_displacement(shape, coarse)
  warped = np.empty_like(image)
  for c in range(image.shape[-1]):
    ndimage.map_coordinates(image[..., c], coords, output=warped[..., c], order=1,
                            mode="constant", cval=IMAGE_BACKGROUND)
  warped_label = ndimage.map_coordinates(label, coords, order=0, mode="constant",
                                         cval=LABEL_BACKGROUND)
  return warped, warped_label.astype(label.dtype)


def random_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                max_shift: float = 0.125) -> tuple[np.ndarray, np.ndarray]:
  """Pads by `max_shift` of each side and crops back to the label's shape at a random offset.

  Args:
    image: [H, W, C] (or [D, H, W, C]); label: [H, W] (or [D, H, W]).
    rng: the random generator.
    max_shift: the largest translation, as a fraction of each side.

  Returns:
    (image, label) translated by the same random whole-pixel offset, one per spatial axis,
    each in [-pad, pad]; pixels shifted in are background.
  """
  shape = label.shape
  pads = [int(round(max_shift * n)) for n in shape]
  offsets = [rng.integers(0, 2 * p + 1) for p in pads]  # x then y (then z): the 2D draws
  pad = tuple((p, p) for p in pads)
  image = np.pad(image, pad + ((0, 0),), constant_values=IMAGE_BACKGROUND)
  label = np.pad(label, pad, constant_values=LABEL_BACKGROUND)
  window = tuple(slice(o, o + n) for o, n in zip(offsets, shape))
  return image[window], label[window]


def mirror(image: np.ndarray, label: np.ndarray,
           axis: str = "left_right") -> tuple[np.ndarray, np.ndarray]:
  """Flips image [H, W, C] and label [H, W] (or [D, H, W, C] and [D, H, W]) along one
  anatomical axis (`ANATOMICAL_AXES`; default left-right, `LEFT_RIGHT_AXIS` of a slice)."""
  a = _axis(axis, label.ndim)
  return np.flip(image, a), np.flip(label, a)


def augment_example(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    config: AugmentConfig = AugmentConfig()) -> tuple[np.ndarray, np.ndarray]:
  """Elastic deformation, random crop and mirror, each with its probability, in that order.

  Args:
    image: [H, W, C] (or [D, H, W, C]) float32.
    label: [H, W] (or [D, H, W]) int32.
    rng: the random generator; the coin flips (elastic, crop, then one per mirror axis)
      are drawn first, so whether an augmentation applies does not depend on the others'
      draws.
    config: probabilities and strengths.

  Returns:
    (image float32, label int32), shaped as given, contiguous.
  """
  mirrors = config.mirror_axes
  for name in mirrors:
    _axis(name, label.ndim)
  flips = rng.random(2 + len(mirrors)) < (config.p_elastic, config.p_crop) + (
      config.p_mirror,) * len(mirrors)
  if flips[0]:
    image, label = elastic_deform(image, label, rng, grid=config.elastic_grid,
                                  sigma=config.elastic_sigma)
  if flips[1]:
    image, label = random_crop(image, label, rng, max_shift=config.max_shift)
  for name, flip in zip(mirrors, flips[2:]):
    if flip:
      image, label = mirror(image, label, name)
  return (np.ascontiguousarray(image, dtype=np.float32),
          np.ascontiguousarray(label, dtype=np.int32))


class _SliceSource:
  """Random-access source of examples (a grain RandomAccessDataSource)."""

  def __init__(self, slices: SliceSet | VolumeSet):
    self._slices = slices

  def __len__(self) -> int:
    return len(self._slices)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {
        "image": self._slices.images[index],
        "label": self._slices.labels[index],
        "index": np.int32(index),
    }


def eval_dataset(slices: SliceSet | VolumeSet) -> grain.MapDataset:
  """The examples in SliceSet order, unaugmented: `len(ds)` and `ds[i]` random access."""
  return grain.MapDataset.source(_SliceSource(slices))


def train_dataset(slices: SliceSet | VolumeSet, *, seed: int, epoch: int, augment: bool = True,
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


def train_batches(slices: SliceSet | VolumeSet, batch_size: int, *, seed: int, epoch: int,
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
    {"image": [B, H, W, 4] float32, "label": [B, H, W] int32, "index": [B] int32}; from
    a VolumeSet, "image" [B, D, H, W, 4] and "label" [B, D, H, W].
  """
  ds = train_dataset(slices, seed=seed, epoch=epoch, augment=augment,
                     augment_config=augment_config)
  return _batches(ds, batch_size, drop_remainder, num_threads)


def eval_batches(slices: SliceSet | VolumeSet, batch_size: int, *,
                 num_threads: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Batches of all examples in SliceSet order, unaugmented; the last one may be short."""
  return _batches(eval_dataset(slices), batch_size, False, num_threads)
