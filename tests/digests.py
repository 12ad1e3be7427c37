"""Comparing large files and byte strings by digest, with a short message where they differ.

pytest's assertion rewriting diffs two unequal byte strings character by character, which
takes minutes for megabytes; these helpers compare SHA-256 digests and, where the contents
differ, say how (size, first differing byte, and for NIfTI files the voxels that differ).
"""

import hashlib
import pathlib

import nibabel
import numpy as np
import pytest


def digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _first_difference(a: bytes, b: bytes) -> int:
  n = min(len(a), len(b))
  x = np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8)
  return int(np.argmax(x)) if x.any() else n


def _nifti_difference(got: pathlib.Path, want: pathlib.Path) -> str:
  try:
    a, b = (np.asarray(nibabel.load(p).dataobj) for p in (got, want))
  except Exception as e:  # pylint: disable=broad-except  # the byte-level message stands
    return f"(not comparable as NIfTI: {e})"
  if a.shape != b.shape:
    return f"voxel shapes {a.shape} and {b.shape}"
  diff = a.astype(np.float64) - b.astype(np.float64)
  where = np.argwhere(diff != 0)
  if not len(where):
    return "the voxels are equal (the headers or the compression differ)"
  return (f"{len(where)} of {a.size} voxels differ, by at most {np.abs(diff).max():g}; "
          f"first at {tuple(int(i) for i in where[0])}")


def assert_same_bytes(got: bytes, want: bytes, what: str = "") -> None:
  """Fails with a short message unless got and want are the same bytes."""
  if got == want:
    return
  pytest.fail(f"{what}: {len(got)} and {len(want)} bytes, first difference at byte "
              f"{_first_difference(got, want)} (sha256 {digest(got)[:12]} and "
              f"{digest(want)[:12]})", pytrace=False)


def assert_same_file(got: pathlib.Path, want: pathlib.Path, what: str = "") -> None:
  """Fails with a short message unless the two files hold the same bytes."""
  a, b = got.read_bytes(), want.read_bytes()
  if a == b:
    return
  detail = (_nifti_difference(got, want)
            if got.name.endswith((".nii", ".nii.gz")) else "")
  label = f"{what} " if what else ""
  pytest.fail(f"{label}{got} and {want} differ: {len(a)} and {len(b)} bytes, first "
              f"difference at byte {_first_difference(a, b)}. {detail}".strip(),
              pytrace=False)
