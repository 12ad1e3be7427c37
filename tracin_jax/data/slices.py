"""A set of preprocessed 2D slices that keeps each example's identity, and optionally the
record of how each slice was cut from its source volume."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

# Prefix of a record's arrays in a saved .npz.
_RECORD_PREFIX = "record_"


class SampleRecord:
  """Per-sample arrays of declared dtypes and shapes: the base of `PreprocessRecord` (slices)
  and `volumes.VolumeRecord` (volumes), each a frozen dataclass whose `FIELDS` maps every
  field to (dtype, shape of one sample's entry)."""

  FIELDS: dict = {}

  def __post_init__(self):
    n = len(self.volume_shape)
    for name, (dtype, shape) in self.FIELDS.items():
      value = np.asarray(getattr(self, name), dtype=dtype)
      if value.shape != (n,) + shape:
        raise ValueError(f"{type(self).__name__}.{name} has shape {value.shape}, expected "
                         f"{(n,) + shape}.")
      object.__setattr__(self, name, value)

  def __len__(self) -> int:
    return len(self.volume_shape)

  def subset(self, index):
    """The samples selected by an integer index array or a boolean mask."""
    index = np.asarray(index)
    return type(self)(**{name: getattr(self, name)[index] for name in self.FIELDS})

  @classmethod
  def concatenate(cls, records: list):
    return cls(**{name: np.concatenate([getattr(r, name) for r in records])
                  for name in cls.FIELDS})

  def arrays(self) -> dict[str, np.ndarray]:
    """The fields by name, as stored in a sample set's .npz (with the `record_` prefix)."""
    return {_RECORD_PREFIX + name: getattr(self, name) for name in self.FIELDS}

  @classmethod
  def from_arrays(cls, arrays):
    """The record stored in `arrays` (a mapping such as an open .npz) by `arrays()`; None if
    it holds none. Raises ValueError if it holds only some of its fields."""
    keys = [_RECORD_PREFIX + name for name in cls.FIELDS]
    present = [k for k in keys if k in arrays]
    if not present:
      return None
    if len(present) != len(keys):
      missing = sorted(set(keys) - set(present))
      raise ValueError(f"part of a preprocessing record is stored: {', '.join(missing)} "
                       "missing.")
    return cls(**{name: arrays[_RECORD_PREFIX + name] for name in cls.FIELDS})


@dataclasses.dataclass(frozen=True)
class PreprocessRecord(SampleRecord):
  """How each sample was cut from its source volume, to put a map on a slice back on the scan.

  A sample's image [H, W] is the in-plane box `crop_box` of axial slice z (the SliceSet's
  `slice_indices`) of the volume, resized from the box's size to H x W (area average for
  images, nearest neighbour for labels; no resize when they are equal).

  Attributes:
    volume_shape: [N, 3] int32, the source volume's (X, Y, Z) shape.
    crop_box: [N, 4] int32, (x0, y0, x1, y1): the in-plane box of the source volume that the
      sample's image covers, x0 <= x < x1 along the image's first axis and y0 <= y < y1
      along its second (after the centre crop; the full plane when there is none).
    affine: [N, 4, 4] float64, the source T1 file's affine (voxel to world).
    layout: [N] str, the layout of the case's files (`tracin_jax.data.layouts`), which gives
      the label convention to write predictions in.
    source: [N] str, the absolute path of the case's T1 file: the reference grid whose header
      is copied when writing back.
  """

  FIELDS = {
      "volume_shape": (np.int32, (3,)),
      "crop_box": (np.int32, (4,)),
      "affine": (np.float64, (4, 4)),
      "layout": (str, ()),
      "source": (str, ()),
  }

  volume_shape: np.ndarray
  crop_box: np.ndarray
  affine: np.ndarray
  layout: np.ndarray
  source: np.ndarray

  @classmethod
  def of_case(cls, num: int, *, volume_shape, crop_box, affine, layout: str,
              source: str | os.PathLike) -> "PreprocessRecord":
    """The record of `num` samples cut alike from one volume (one case's slices)."""
    return cls(volume_shape=np.tile(np.asarray(volume_shape), (num, 1)),
               crop_box=np.tile(np.asarray(crop_box), (num, 1)),
               affine=np.tile(np.asarray(affine, np.float64), (num, 1, 1)),
               layout=np.asarray([layout] * num, dtype=str),
               source=np.asarray([str(source)] * num, dtype=str))


@dataclasses.dataclass(frozen=True)
class SliceSet:
  """Preprocessed axial slices with their identities.

  Attributes:
    images: [N, H, W, 4] float32 in [-1, 1], channels T1, T1Gd, T2, FLAIR.
    labels: [N, H, W] int32 in {0, 1, 2, 3} (classes background, NCR/NET, ED, ET; BraTS
      label 4, or 3 in the 2023 layout, is class 3); -1 everywhere on a sample without
      ground truth (a case loaded without its segmentation).
    case_ids: [N] str, the case (patient) each slice comes from.
    slice_indices: [N] int32, the axial index of the slice in its volume.
    record: how each sample was cut from its volume (`PreprocessRecord`), or None where that
      is not known. Not part of `fingerprint`.
  """

  images: np.ndarray
  labels: np.ndarray
  case_ids: np.ndarray
  slice_indices: np.ndarray
  record: PreprocessRecord | None = None

  def __post_init__(self):
    n = len(self.images)
    for name in ("labels", "case_ids", "slice_indices") + (
        ("record",) if self.record is not None else ()):
      if len(getattr(self, name)) != n:
        raise ValueError(
            f"SliceSet.{name} has {len(getattr(self, name))} entries, images has {n}."
        )

  def __len__(self) -> int:
    return len(self.images)

  @property
  def ids(self) -> list[tuple[str, int]]:
    """(case id, slice index) of every example, in order."""
    return [(str(c), int(s)) for c, s in zip(self.case_ids, self.slice_indices)]

  @property
  def cases(self) -> list[str]:
    """Distinct case ids in order of first appearance."""
    return list(dict.fromkeys(str(c) for c in self.case_ids))

  def subset(self, index) -> "SliceSet":
    """Examples selected by an integer index array or a boolean mask."""
    index = np.asarray(index)
    return SliceSet(
        self.images[index], self.labels[index], self.case_ids[index],
        self.slice_indices[index],
        None if self.record is None else self.record.subset(index))

  def select_cases(self, cases) -> "SliceSet":
    """The slices of the given cases, in this set's order."""
    keep = np.isin(self.case_ids.astype(str), np.asarray(list(cases), dtype=str))
    return self.subset(keep)

  def save(self, path: str | os.PathLike) -> None:
    """Writes an uncompressed .npz (strings stored as unicode, no pickle), with the record's
    arrays (`record_<field>`) when there is one."""
    tmp = f"{path}.tmp.npz"
    record = {} if self.record is None else self.record.arrays()
    np.savez(
        tmp, images=self.images, labels=self.labels,
        case_ids=np.asarray(self.case_ids, dtype=str),
        slice_indices=np.asarray(self.slice_indices, dtype=np.int32), **record)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "SliceSet":
    """Reads a `save`d set; a file written without a record gives `record=None`."""
    with np.load(path, allow_pickle=False) as f:
      return cls(f["images"], f["labels"], f["case_ids"], f["slice_indices"],
                 PreprocessRecord.from_arrays(f))

  @classmethod
  def concatenate(cls, sets: list["SliceSet"]) -> "SliceSet":
    """The sets one after another; the record is None unless every set has one."""
    records = [s.record for s in sets]
    return cls(
        np.concatenate([s.images for s in sets]),
        np.concatenate([s.labels for s in sets]),
        np.concatenate([s.case_ids for s in sets]),
        np.concatenate([s.slice_indices for s in sets]),
        None if any(r is None for r in records) else PreprocessRecord.concatenate(records))


def fingerprint(*sets) -> str:
  """A hash of the slices' (or volumes') contents (images, labels) and ids, in order (16
  hex digits); a `volumes.VolumeSet`'s ids are (case, -1)."""
  h = hashlib.sha256()
  for s in sets:
    for a in (s.images, s.labels):
      a = np.ascontiguousarray(a)
      h.update(f"{a.dtype.str}:{a.shape}".encode())
      h.update(a.tobytes())
    h.update("|".join(f"{c}:{z}" for c, z in s.ids).encode())
  return h.hexdigest()[:16]


def spread_over_cases(candidates, case_ids, num: int, chosen=()) -> list[int]:
  """Examples to show: `chosen`, then `candidates` in their order, one per case while
  candidates of other cases remain (neighbouring slices of one patient look alike), up to
  `num` in all.

  Args:
    candidates: example indices, best first.
    case_ids: [N] the case of every example.
    num: how many to return at most.
    chosen: indices taken already (kept, first).
  """
  chosen = [int(a) for a in chosen]
  for one_per_case in (True, False):
    for a in candidates:
      if len(chosen) >= num:
        return chosen
      taken = {str(case_ids[b]) for b in chosen}
      if int(a) not in chosen and not (one_per_case and str(case_ids[a]) in taken):
        chosen.append(int(a))
  return chosen
