"""BraTS cases as preprocessed 3D volumes: the slices' steps, by spatial rank.

    from tracin_jax.data import volumes
    config = volumes.VolumeConfig()                 # 2 mm isotropic, [80, 96, 96]
    train, skipped = volumes.load_cached(root, config, cache_dir)
    train.images.shape                              # [N, 80, 96, 96, 4] float32
    batches = pipeline.train_batches(train, 2, seed=0, epoch=0)   # [2, 80, 96, 96, 4]

The cases are those `tracin_jax.data.brats` reads (every layout, the synthetic cohort
alike), read and checked by `brats.read_case`. Per case, in this order:

1. Brain mask = voxels where any modality is nonzero (as for the slices).
2. Per volume and modality, the slices' robust min-max (`brats.normalise`): the 0.5 and
   99.5 percentiles of the brain's voxels map to -1 and 1, clipped, background -1.
3. The sample's grid: `size` = [D, H, W] voxels of `spacing` mm on each axis (D along the
   volume's z, the axial slices; H along x; W along y, as a slice is `volume[:, :, z]`).
   The box is placed by the slices' rule for their axial range, on all three axes: centred
   on the brain mask's centre of mass, rounded to a whole source voxel, then shifted as
   little as needed to lie inside the volume (or, where the box is the larger, to hold the
   whole volume). Voxels of the box outside the volume are background (image -1, label 0).
   `size=None` keeps the whole volume (the box starts at its corner).
4. Resampling onto that grid, the sample's voxels tiling the source's (a 2 mm voxel covers
   two 1 mm voxels per axis): images by trilinear interpolation at the sample voxels'
   centres (from 1 mm to 2 mm: the mean of the 2 x 2 x 2 source voxels), labels by nearest
   neighbour (the source voxel holding the sample voxel's centre, as the slices' resize
   picks). Without resampling (`spacing=None`, or the source's spacing) the values are
   the source's: a volume's axial slices are `brats.load_case`'s slices of the same voxels.
   (The slices' in-plane crop is centred on the plane, the volume's box on the brain; the
   two agree where the brain's centre of mass rounds to the plane's centre.)
5. Labels to class indices, as the layout says (`layouts.to_classes`).

A sample's `VolumeRecord` says where it came from: the source grid's shape and affine (the
T1 file's), the box's corner (`origin`, in source voxels) and its voxels' size in source
voxels (`step`), the layout and the T1 file. `to_volume` puts a map or label volume
[D, H, W] back on the patient's grid (labels by nearest neighbour, maps by trilinear
interpolation; `fill` outside the box) and `write_nifti` writes it with the T1's affine and
header (`patient_space.write_nifti`, which never writes beside the inputs).

`load_cached` keeps the volumes in the cache directory the slices use: `volumes_<key>.npz`
and `volumes_<key>.json` with their checksums (`tracin_jax.outputs`), keyed by the source
files (path, size, mtime), their layout and the `VolumeConfig` (spacing and size included);
a damaged entry is detected by its checksum, logged and rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Literal, Sequence

import numpy as np

from tracin_jax import outputs
from tracin_jax.data import brats
from tracin_jax.data import constants
from tracin_jax.data import layouts
from tracin_jax.data import patient_space
from tracin_jax.data import slices
from tracin_jax.settings import setting

_log = logging.getLogger(__name__)

# Bump when the volumes' preprocessing changes in a way the config does not capture.
CACHE_VERSION = 1
# Fill values outside the source volume (the slices' background).
IMAGE_BACKGROUND = -1.0
LABEL_BACKGROUND = 0
# The sample's axes (D, H, W) are the source's (z, x, y): a sample is `volume.transpose(
# SAMPLE_AXES)`, and its axis k is the source's axis SAMPLE_AXES[k].
SAMPLE_AXES = (2, 0, 1)
# The slice index of a volume (`VolumeSet.ids`): it has none.
NO_SLICE = -1



@dataclasses.dataclass(frozen=True)
class VolumeConfig:
  """How a case becomes one volume sample.

  Attributes:
    spacing: the samples' voxel size in mm, the same on every axis; None keeps the source
      grid (no resampling).
    size: (D, H, W) voxels of the sample: D axial (the volume's z), H along x, W along y;
      None keeps the whole (resampled) volume. A network of depth L needs each divisible
      by 2**L; the default (80, 96, 96) at 2 mm (160 x 192 x 192 mm: BraTS' whole 155 mm
      in z, the slices' 192 mm crop in-plane) serves up to L = 4.
    groups: cohort groups read under the root (brats2019 layout), as for the slices.
  """

  spacing: float | None = setting(2.0, "Voxel size of the 3D samples in mm, every axis "
                                  "(unset: the source grid).", flag="volume_spacing", minimum=0.0,
                                  exclusive=True)
  size: tuple[int, int, int] | None = setting(
      (80, 96, 96), "Voxels (D, H, W) of a 3D sample around the brain (unset: the whole "
      "volume).", flag="volume_size")
  groups: tuple[str, ...] = setting(("HGG",), "Cohort groups read under the data root, as "
                                    "3D samples.", flag="volume_groups",
                                    choices=constants.GROUPS)

  def __post_init__(self):
    number = (isinstance(self.spacing, (int, float, np.integer, np.floating))
              and not isinstance(self.spacing, (bool, np.bool_)))
    if self.spacing is not None and not (number and np.isfinite(self.spacing)
                                         and self.spacing > 0):
      raise ValueError(f"spacing must be None or a positive number of mm, got "
                       f"{self.spacing!r}.")
    if self.size is not None:
      size = tuple(self.size)
      if len(size) != 3 or not all(isinstance(n, (int, np.integer)) and not isinstance(
          n, bool) and n >= 1 for n in size):
        raise ValueError(f"size must be None or three positive ints (D, H, W), got "
                         f"{self.size!r}.")
      object.__setattr__(self, "size", tuple(int(n) for n in size))
    object.__setattr__(self, "groups", brats.check_groups(self.groups))


@dataclasses.dataclass(frozen=True)
class VolumeRecord(slices.SampleRecord):
  """Where each sample lies on its source volume, to put a map on it back on the scan.

  Along each source axis a (x, y, z), the sample's voxel i (on the sample's axis that is a,
  see `SAMPLE_AXES`) covers source voxels [origin_a + i * step_a, origin_a + (i + 1) *
  step_a), source voxel j covering [j, j + 1): its centre is source voxel position
  origin_a + (i + 0.5) * step_a - 0.5.

  Attributes:
    volume_shape: [N, 3] int32, the source volume's (X, Y, Z) shape.
    origin: [N, 3] float64, the box's corner on the source grid (x, y, z), in source voxels
      (whole voxels; negative where the box starts outside the volume).
    step: [N, 3] float64, a sample voxel's size in source voxels along x, y, z (spacing /
      the source's voxel size; 1 without resampling).
    affine: [N, 4, 4] float64, the source T1 file's affine (voxel to world).
    layout: [N] str, the layout of the case's files (its label convention).
    source: [N] str, the absolute path of the case's T1 file.
  """

  FIELDS = {
      "volume_shape": (np.int32, (3,)),
      "origin": (np.float64, (3,)),
      "step": (np.float64, (3,)),
      "affine": (np.float64, (4, 4)),
      "layout": (str, ()),
      "source": (str, ()),
  }

  volume_shape: np.ndarray
  origin: np.ndarray
  step: np.ndarray
  affine: np.ndarray
  layout: np.ndarray
  source: np.ndarray

  def sample_affine(self, i: int = 0) -> np.ndarray:
    """[4, 4] float64: sample i's voxel (d, h, w) to world (mm), through the source grid."""
    to_source = np.zeros((4, 4))
    for k, a in enumerate(SAMPLE_AXES):
      to_source[a, k] = self.step[i, a]
      to_source[a, 3] = self.origin[i, a] + 0.5 * self.step[i, a] - 0.5
    to_source[3, 3] = 1.0
    return self.affine[i] @ to_source


@dataclasses.dataclass(frozen=True)
class VolumeSet:
  """Preprocessed 3D samples, one per case, with their identities.

  Attributes:
    images: [N, D, H, W, 4] float32 in [-1, 1], channels T1, T1Gd, T2, FLAIR.
    labels: [N, D, H, W] int32 in {0, 1, 2, 3}; -1 everywhere on a case without ground
      truth.
    case_ids: [N] str.
    record: each sample's `VolumeRecord`.
  """

  images: np.ndarray
  labels: np.ndarray
  case_ids: np.ndarray
  record: VolumeRecord

  def __post_init__(self):
    n = len(self.images)
    if self.images.ndim != 5 or self.labels.shape != self.images.shape[:4]:
      raise ValueError(f"VolumeSet: images {list(self.images.shape)} and labels "
                       f"{list(self.labels.shape)} are not [N, D, H, W, C] and [N, D, H, W].")
    for name in ("case_ids", "record"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"VolumeSet.{name} has {len(getattr(self, name))} entries, images "
                         f"has {n}.")

  def __len__(self) -> int:
    return len(self.images)

  @property
  def cases(self) -> list[str]:
    """Case ids in order."""
    return [str(c) for c in self.case_ids]

  @property
  def slice_indices(self) -> np.ndarray:
    """[N] int32, all -1: a volume is its case's one example and has no slice index (the
    slices' `SliceSet.slice_indices`; a figure names the axial slice it draws)."""
    return np.full(len(self), NO_SLICE, np.int32)

  @property
  def ids(self) -> list[tuple[str, int]]:
    """(case, -1) of every sample, as `SliceSet.ids` gives (case, slice)."""
    return [(str(c), NO_SLICE) for c in self.case_ids]

  def subset(self, index) -> "VolumeSet":
    """The samples selected by an integer index array or a boolean mask."""
    index = np.asarray(index)
    return VolumeSet(self.images[index], self.labels[index], self.case_ids[index],
                     self.record.subset(index))

  def select_cases(self, cases) -> "VolumeSet":
    """The samples of the given cases, in this set's order."""
    return self.subset(np.isin(self.case_ids.astype(str), np.asarray(list(cases), str)))

  def save(self, path: str | os.PathLike) -> None:
    """Writes an uncompressed .npz (no pickle; labels as int8) and its checksum sidecar,
    atomically."""
    with outputs.atomic_path(path, unique=True, checksum=True) as tmp:
      np.savez(tmp, images=self.images, labels=self.labels.astype(np.int8),  # -1..3
               case_ids=np.asarray(self.case_ids, dtype=str), **self.record.arrays())

  @classmethod
  def load(cls, path: str | os.PathLike) -> "VolumeSet":
    """Reads a `save`d set, checked against its checksum first.

    Raises:
      outputs.DamagedFile: its bytes are not those written.
    """
    outputs.verify(path)
    with np.load(path, allow_pickle=False) as f:
      return cls(f["images"], f["labels"].astype(np.int32), f["case_ids"],
                 VolumeRecord.from_arrays(f))

  @classmethod
  def concatenate(cls, sets: list["VolumeSet"]) -> "VolumeSet":
    return cls(np.concatenate([s.images for s in sets]),
               np.concatenate([s.labels for s in sets]),
               np.concatenate([s.case_ids for s in sets]),
               VolumeRecord.concatenate([s.record for s in sets]))


# ----------------------------------------------------------------------------- the grid


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
  """[3] float64: the voxel size in mm along x, y, z (the lengths of the affine's columns)."""
  return np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))


def centre_of_mass(mask: np.ndarray) -> np.ndarray:
  """[3] float64: the mask's centre of mass in voxels (x, y, z), per axis as
  `brats` finds its slices' centre along z."""
  centre = []
  for a in range(3):
    weights = mask.sum(axis=tuple(b for b in range(3) if b != a), dtype=np.float64)
    centre.append(np.dot(np.arange(len(weights)), weights) / weights.sum())
  return np.asarray(centre)


def sample_grid(volume_shape: Sequence[int], affine: np.ndarray, brain_centre: np.ndarray,
                config: VolumeConfig) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
  """Where a sample's box lies on the source grid (step 3 of the module's docstring).

  Args:
    volume_shape: the source's (X, Y, Z).
    affine: [4, 4] its voxel-to-world affine (for the voxel sizes).
    brain_centre: [3] the brain's centre of mass in source voxels (x, y, z).
    config: spacing and size.

  Returns:
    (origin [3], step [3], shape (n_x, n_y, n_z)): the box's corner and voxel size in
    source voxels, and its voxel counts along x, y, z.
  """
  shape = np.asarray(volume_shape, np.float64)
  step = (np.ones(3) if config.spacing is None
          else float(config.spacing) / voxel_sizes(affine))
  if config.size is None:
    counts = np.maximum(1, np.floor(shape / step + 0.5)).astype(int)
    return np.zeros(3), step, tuple(int(n) for n in counts)
  counts = np.empty(3, int)
  for k, a in enumerate(SAMPLE_AXES):
    counts[a] = config.size[k]
  extent = counts * step
  # The slices' rule for their first axial index, round(centre - (n - 1) / 2), in source
  # voxel edges: the box's centre on the brain's, then inside the volume (or around it).
  start = brain_centre - (extent - 1.0) / 2
  low, high = np.minimum(0.0, shape - extent), np.maximum(0.0, shape - extent)
  origin = np.round(np.clip(start, low, high))
  return origin, step, tuple(int(n) for n in counts)


def _positions(origin: float, step: float, count: int) -> np.ndarray:
  """[count] the sample voxels' centres along one axis, in source voxel positions."""
  return origin + (np.arange(count) + 0.5) * step - 0.5


def _linear(array: np.ndarray, axis: int, positions: np.ndarray, cval: float) -> np.ndarray:
  """Linear interpolation of `array` along `axis` at `positions` (in voxels); samples past
  the ends are `cval` (mixed with the edge voxel within one voxel of it)."""
  array = np.moveaxis(array, axis, 0)
  n = len(array)
  below = np.floor(positions).astype(int)
  frac = positions - below
  weights = []
  for index, weight in ((below, 1.0 - frac), (below + 1, frac)):
    inside = (index >= 0) & (index < n)
    weights.append((np.clip(index, 0, n - 1), np.where(inside, weight, 0.0),
                    np.where(inside, 0.0, weight)))
  shape = (-1,) + (1,) * (array.ndim - 1)
  out = np.zeros((len(positions),) + array.shape[1:], array.dtype)
  outside = np.zeros(len(positions))
  for index, weight, missing in weights:
    out += array[index] * weight.astype(array.dtype).reshape(shape)
    outside += missing
  if outside.any():
    out += (cval * outside).astype(array.dtype).reshape(shape)
  return np.moveaxis(out, 0, axis)


def _nearest(array: np.ndarray, axis: int, indices: np.ndarray, cval) -> np.ndarray:
  """`array` taken at integer `indices` along `axis`; indices outside it give `cval`."""
  array = np.moveaxis(array, axis, 0)
  pad = np.full((1,) + array.shape[1:], cval, array.dtype)
  padded = np.concatenate([pad, array, pad])
  out = padded[np.clip(indices + 1, 0, len(padded) - 1)]
  return np.moveaxis(out, 0, axis)


def _source_range(origin, step, count, size) -> tuple[int, int]:
  """[start, stop) of the source voxels that linear interpolation at the box's voxels
  reads along one axis, inside [0, size)."""
  p = _positions(origin, step, count)
  return (int(np.clip(np.floor(p[0]), 0, size - 1)),
          int(np.clip(np.floor(p[-1]) + 2, 1, size)))


def resample(images: np.ndarray, labels: np.ndarray | None, origin: np.ndarray,
             step: np.ndarray, counts: Sequence[int], offset: Sequence[int] = (0, 0, 0)
             ) -> tuple[np.ndarray, np.ndarray | None]:
  """Images and labels on the source grid, on the sample's box.

  Args:
    images: [x, y, z, C] float32, a part of the source grid starting at source voxel
      `offset`.
    labels: [x, y, z] int32 class indices on the same part, or None.
    origin, step, counts: the box (`sample_grid`).
    offset: the source voxel at images[0, 0, 0].

  Returns:
    (images [n_x, n_y, n_z, C] float32, trilinear, background outside the volume; labels
    [n_x, n_y, n_z] int32, nearest neighbour, background outside, or None).
  """
  for a in range(3):
    p = _positions(origin[a], step[a], counts[a]) - offset[a]
    images = _linear(images, a, p, IMAGE_BACKGROUND)
    if labels is not None:
      labels = _nearest(labels, a, np.floor(p + 0.5).astype(int), LABEL_BACKGROUND)
  return images.astype(np.float32), labels


# ----------------------------------------------------------------------------- loading


def load_case(case: brats.CaseFiles, config: VolumeConfig = VolumeConfig(), *,
              notes: list[str] | None = None, require_labels: bool = True) -> VolumeSet:
  """Reads and preprocesses one case into one volume sample.

  Args:
    case: the case's files (`brats.list_cases`, `brats.case_files`, `brats.case_from_files`).
    config: spacing and size.
    notes: where warnings about the case go (as `brats.load_case`); default: logged.
    require_labels: a case without a seg file is an error; if False its labels are -1.

  Returns:
    A VolumeSet of one sample: images [1, D, H, W, 4] float32 in [-1, 1], labels
    [1, D, H, W] int32, and its record.

  Raises:
    BratsDataError: a missing, unreadable or inconsistent file, naming the case and file.
  """
  read = brats.read_case(case, require_labels=require_labels)
  for note in read.notes:
    if notes is None:
      _log.warning(note)
    else:
      notes.append(note)
  shape = read.shape
  origin, step, counts = sample_grid(shape, read.affine, centre_of_mass(read.brain), config)
  ranges = [_source_range(origin[a], step[a], counts[a], shape[a]) for a in range(3)]
  (x0, x1), (y0, y1), (z0, z1) = ranges
  zs = np.arange(z0, z1)
  images = np.stack([brats.normalise(v, read.brain, zs, (x0, y0, x1, y1))
                     for v in read.volumes], axis=-1)  # [x, y, z, 4]
  labels = None
  if read.seg is not None:
    labels = layouts.to_classes(read.seg[x0:x1, y0:y1, z0:z1], read.layout)
  images, labels = resample(images, labels, origin, step, counts, (x0, y0, z0))
  if labels is None:
    labels = np.full(counts, -1, np.int32)  # no ground truth
  if not np.isfinite(images).all():
    raise brats.BratsDataError(f"case {case.case_id}: its normalised images are not finite "
                               f"(files in {case.directory}).")
  record = VolumeRecord(
      volume_shape=[shape], origin=[origin], step=[step], affine=[read.affine],
      layout=[read.layout.name],
      source=[str(case.path(constants.MODALITIES[0]).absolute())])
  return VolumeSet(
      images=np.ascontiguousarray(images.transpose(SAMPLE_AXES + (3,)))[None],
      labels=np.ascontiguousarray(labels.transpose(SAMPLE_AXES), dtype=np.int32)[None],
      case_ids=np.asarray([case.case_id], dtype=str), record=record)


def load_cases(root: str | os.PathLike, config: VolumeConfig = VolumeConfig(), *,
               skip_bad: bool = False, progress: bool = True,
               num_workers: int | None = None
               ) -> tuple[VolumeSet, list[tuple[str, str]]]:
  """Loads every case under root (of `config.groups` for brats2019), in `brats.list_cases`
  order, one volume each; arguments and errors as `brats.load_cases`."""
  volumes, skipped, notes = _load(brats.list_cases(root, config.groups), config,
                                  skip_bad=skip_bad, progress=progress,
                                  num_workers=num_workers)
  for note in notes:
    _log.warning(note)
  return volumes, skipped


def _load(cases, config, *, skip_bad, progress, num_workers):
  loaded, skipped, notes = brats.map_cases(
      lambda case, notes: load_case(case, config, notes=notes), cases, skip_bad=skip_bad,
      progress=progress, num_workers=num_workers)
  return VolumeSet.concatenate(loaded), skipped, notes


def cache_key(cases: Sequence[brats.CaseFiles], root: str | os.PathLike,
              config: VolumeConfig, skip_bad: bool = False) -> str:
  """A hash of the source files (as `brats.cache_key`), the config (spacing and size
  included) and this module's `CACHE_VERSION`."""
  record = {"kind": "volumes", "version": CACHE_VERSION,
            "sources": brats.cache_key(cases, root, config, skip_bad)}
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def load_cached(root: str | os.PathLike, config: VolumeConfig,
                cache_dir: str | os.PathLike, *, skip_bad: bool = False,
                progress: bool = True, num_workers: int | None = None
                ) -> tuple[VolumeSet, list[tuple[str, str]]]:
  """`load_cases` through an on-disk cache, beside the slices' (`brats.load_cached`).

  The entry is `<cache_dir>/volumes_<key>.npz` (the VolumeSet, no pickle) and
  `volumes_<key>.json` (skipped cases, warnings, config, root), each with its checksum
  sidecar, keyed by `cache_key`. A hit reads no NIfTI and repeats the warnings; an entry
  whose bytes differ from its checksums is logged and rebuilt. The .npz is written last, so
  a present .npz means a complete entry.

  Returns:
    As `load_cases`.
  """
  cases = brats.list_cases(root, config.groups)
  key = cache_key(cases, root, config, skip_bad)[:24]
  cache_dir = pathlib.Path(cache_dir)
  npz_path, json_path = cache_dir / f"volumes_{key}.npz", cache_dir / f"volumes_{key}.json"
  if npz_path.is_file():
    try:
      meta = outputs.read_json(json_path)
      volumes = VolumeSet.load(npz_path)
    except Exception as e:  # pylint: disable=broad-except  # any damage: rebuild
      _log.warning("volume cache %s is damaged (%s); rebuilding it.", npz_path,
                   str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
      for path in (npz_path, json_path):
        outputs.remove(path)
    else:
      return brats.replay_cache_hit("volume", npz_path, volumes, meta)

  volumes, skipped, notes = _load(cases, config, skip_bad=skip_bad, progress=progress,
                                  num_workers=num_workers)
  for note in notes:
    _log.warning(note)
  cache_dir.mkdir(parents=True, exist_ok=True)
  outputs.write_json(json_path, {
      "root": str(pathlib.Path(root).resolve()), "config": outputs.plain(config),
      "num_cases": len(volumes), "shape": list(volumes.images.shape[1:]),
      "skipped": skipped, "notes": notes}, unique=True, checksum=True)
  volumes.save(npz_path)
  _log.info("volume cache written: %s", npz_path)
  return volumes, skipped


# ----------------------------------------------------------------------------- back to the scan


def _one_record(volumes: "VolumeSet | VolumeRecord") -> VolumeRecord:
  record = volumes.record if isinstance(volumes, VolumeSet) else volumes
  if len(record) != 1:
    raise patient_space.PatientSpaceError(
        f"{len(record)} samples given; give one case's (VolumeSet.select_cases or "
        "subset([i])).")
  return record


def _back_positions(origin: float, step: float, count: int, size: int):
  """Along one axis: (positions [size] of the source voxels' centres in sample voxels,
  inside [size] bool: the voxels the box covers)."""
  inside_index = np.floor((np.arange(size) + 0.5 - origin) / step)
  inside = (inside_index >= 0) & (inside_index < count)
  return (np.arange(size) + 0.5 - origin) / step - 0.5, inside


def to_volume(maps: np.ndarray, volumes: "VolumeSet | VolumeRecord", *,
              kind: Literal["labels", "map"] = "map", fill: float = 0.0) -> np.ndarray:
  """Puts a map on a preprocessed sample back on its scan's grid.

  Args:
    maps: [D, H, W] or [D, H, W, C], on the sample's grid.
    volumes: the sample (a VolumeSet of one case) or its record (of one sample).
    kind: "labels" (integers, nearest neighbour: the sample voxel holding each source
      voxel's centre) or "map" (real values, trilinear, the sample's edge values held to
      the box's edge).
    fill: the value of source voxels the box does not cover.

  Returns:
    [X, Y, Z] (or [X, Y, Z, C]) on the source grid: labels in maps' dtype, maps float32.

  Raises:
    PatientSpaceError: several samples, or maps of another shape than the sample's.
  """
  record = _one_record(volumes)
  if kind not in ("labels", "map"):
    raise ValueError(f"kind must be 'labels' or 'map', got {kind!r}.")
  maps = np.asarray(maps)
  shape = tuple(int(n) for n in record.volume_shape[0])
  origin, step = record.origin[0], record.step[0]
  if isinstance(volumes, VolumeSet) and maps.shape[:3] != volumes.labels.shape[1:]:
    raise patient_space.PatientSpaceError(
        f"maps have shape {list(maps.shape)}; expected {list(volumes.labels.shape[1:])} "
        "(the sample's [D, H, W]).")
  if maps.ndim not in (3, 4):
    raise patient_space.PatientSpaceError(
        f"maps have shape {list(maps.shape)}; expected [D, H, W] or [D, H, W, C].")
  out = np.moveaxis(maps, (0, 1, 2), SAMPLE_AXES)  # [x, y, z, ...]
  out = out if kind == "labels" else out.astype(np.float32)
  covered = []
  for a in range(3):
    q, inside = _back_positions(origin[a], step[a], out.shape[a], shape[a])
    if kind == "labels":
      out = _nearest(out, a, np.clip(np.floor(q + 0.5).astype(int), 0, out.shape[a] - 1),
                     0)
    else:
      out = _linear(out, a, np.clip(q, 0, out.shape[a] - 1), 0.0)
    covered.append(inside)
  box = np.ix_(*covered)
  mask = np.zeros(shape, bool)
  mask[box] = True
  result = np.where(mask.reshape(shape + (1,) * (out.ndim - 3)), out,
                    np.asarray(fill).astype(out.dtype))
  return result.astype(maps.dtype if kind == "labels" else np.float32)


def write_nifti(volume: np.ndarray, volumes: "VolumeSet | VolumeRecord",
                path: str | os.PathLike, *, kind: Literal["labels", "map"] = "map",
                description: str = "") -> pathlib.Path:
  """Writes a volume on the case's grid (from `to_volume`) as NIfTI with the T1 file's
  affine and header; as `patient_space.write_nifti`, whose guards it keeps (never beside
  the inputs, the volume on the case's grid).

  Returns:
    The path written.
  """
  record = _one_record(volumes)
  # The writer reads the record's source, volume shape and affine only, which a volume's
  # record has as a slice's does: one "slice" stands for the sample.
  grid = patient_space.SliceGrid(record, np.zeros(1, np.int32), (0, 0))
  return patient_space.write_nifti(volume, grid, path, kind=kind, description=description)
