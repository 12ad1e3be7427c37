"""A set of preprocessed 2D slices that keeps each example's identity."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class SliceSet:
  """Preprocessed axial slices with their identities.

  Attributes:
    images: [N, H, W, 4] float32 in [-1, 1], channels T1, T1Gd, T2, FLAIR.
    labels: [N, H, W] int32 in {0, 1, 2, 3} (BraTS label 4 is class 3).
    case_ids: [N] str, the case (patient) each slice comes from.
    slice_indices: [N] int32, the axial index of the slice in its volume.
  """

  images: np.ndarray
  labels: np.ndarray
  case_ids: np.ndarray
  slice_indices: np.ndarray

  def __post_init__(self):
    n = len(self.images)
    for name in ("labels", "case_ids", "slice_indices"):
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
        self.slice_indices[index])

  def select_cases(self, cases) -> "SliceSet":
    """The slices of the given cases, in this set's order."""
    keep = np.isin(self.case_ids.astype(str), np.asarray(list(cases), dtype=str))
    return self.subset(keep)

  def save(self, path: str | os.PathLike) -> None:
    """Writes an uncompressed .npz (strings stored as unicode, no pickle)."""
    tmp = f"{path}.tmp.npz"
    np.savez(
        tmp, images=self.images, labels=self.labels,
        case_ids=np.asarray(self.case_ids, dtype=str),
        slice_indices=np.asarray(self.slice_indices, dtype=np.int32))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "SliceSet":
    with np.load(path, allow_pickle=False) as f:
      return cls(f["images"], f["labels"], f["case_ids"], f["slice_indices"])

  @classmethod
  def concatenate(cls, sets: list["SliceSet"]) -> "SliceSet":
    return cls(
        np.concatenate([s.images for s in sets]),
        np.concatenate([s.labels for s in sets]),
        np.concatenate([s.case_ids for s in sets]),
        np.concatenate([s.slice_indices for s in sets]))


def fingerprint(*sets: SliceSet) -> str:
  """A hash of the slices' contents (images, labels) and ids, in order (16 hex digits)."""
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
