"""Maps on preprocessed slices, put back on the patient's scan as NIfTI volumes.

    from tracin_jax.data import patient_space
    case = slices.select_cases([case_id])                  # the slices of one case
    volume = patient_space.to_volume(predicted, case, kind="labels")   # [X, Y, Z]
    patient_space.write_nifti(volume, case, "runs/demo/nifti/<case>/prediction.nii.gz",
                              kind="labels")

Every slice that `tracin_jax.data.brats` reads keeps its preprocessing record
(`SliceSet.record`: the source volume's shape and affine, the in-plane crop box, the T1
file it came from) and its axial index. Undoing the preprocessing of a map on a slice
[H, W] is then: resample to the crop box's size (nearest neighbour for labels; for maps the
transpose of the area average that made the image, so a map constant over a region stays
that constant), place it in the crop box of an [X, Y] plane of zeros (`fill`), at its axial
index of a [X, Y, Z] volume. The round trip of a mask through preprocessing and back is
exact without resizing and within one voxel of the source grid when the resize halves the
plane (the nearest-neighbour picks move a boundary by at most half the factor).

`write_nifti` writes a volume on the input's grid: the T1 file's affine and, where that file
can be read, its header (data type, scaling and description set for the output), so that
ITK-SNAP, 3D Slicer or NiiVue show it on the input scan. It never writes over or beside an
input: the target may not be one of the case's files or lie in its directory.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Literal

import nibabel
import numpy as np

from tracin_jax import errors
from tracin_jax.data.slices import SliceSet


class PatientSpaceError(errors.UserError, ValueError):
  """Slices that cannot be put back on a scan (no record, several cases, a bad target)."""


@dataclasses.dataclass
class SliceGrid:
  """Where a case's preprocessed slices lie on its scan, without their images.

  Attributes:
    record: the slices' preprocessing record (`tracin_jax.data.slices.PreprocessRecord`).
    slice_indices: [n] the axial index of each slice.
    shape: (H, W), the slices' in-plane size. (`tracin_jax.patient.volume_grid` gives a
      volume's grid in this form: its `volumes.VolumeRecord`, slice_indices [-1] and shape
      (D, H, W).)
  """

  record: Any
  slice_indices: np.ndarray
  shape: tuple[int, int]

  def __len__(self) -> int:
    return len(self.slice_indices)

  @classmethod
  def of(cls, slices: "SliceSet | SliceGrid") -> "SliceGrid":
    """The grid of a SliceSet (or the grid itself)."""
    if isinstance(slices, SliceGrid):
      return slices
    record = getattr(slices, "record", None)
    if record is None:
      raise PatientSpaceError(
          "these slices carry no preprocessing record (made before records were kept, or "
          "built by hand): read the case again with tracin_jax.data.brats to put maps back "
          "on its scan.")
    return cls(record, np.asarray(slices.slice_indices, np.int32),
               tuple(int(d) for d in slices.images.shape[1:3]))


def _resample_weights(n_small: int, n_big: int) -> np.ndarray:
  """[n_big, n_small]: each big pixel's share of the small pixels it overlaps, the
  transpose of the area average from n_big to n_small, rows normalised to sum to 1."""
  edges = np.linspace(0.0, n_big, n_small + 1)
  left = np.arange(n_big)
  overlap = (np.minimum(edges[1:, None], left[None, :] + 1.0)
             - np.maximum(edges[:-1, None], left[None, :]))
  weights = np.clip(overlap, 0.0, None).T  # [n_big, n_small]
  return weights / weights.sum(axis=1, keepdims=True)


def _nearest(n_small: int, n_big: int) -> np.ndarray:
  """The small pixel each big pixel came from in the nearest-neighbour resize."""
  return np.minimum(((np.arange(n_big) + 0.5) * n_small / n_big).astype(int), n_small - 1)


def _one_case(slices: "SliceSet | SliceGrid"):
  """The grid of the slices of one case, checked: (grid, volume shape, source)."""
  grid = SliceGrid.of(slices)
  record = grid.record
  if len(grid) == 0:
    raise PatientSpaceError("no slices to put back on a scan.")
  sources = {str(s) for s in record.source}
  if len(sources) != 1:
    raise PatientSpaceError(f"the slices come from {len(sources)} scans "
                            f"({', '.join(sorted(sources)[:3])}...); give one case's slices "
                            "(SliceSet.select_cases).")
  shapes = {tuple(int(d) for d in s) for s in record.volume_shape}
  if len(shapes) != 1:
    raise PatientSpaceError(f"the slices of {sources.pop()} claim volume shapes "
                            f"{sorted(shapes)}.")
  return grid, shapes.pop(), sources.pop()


def to_volume(maps: np.ndarray, slices: "SliceSet | SliceGrid", *,
              kind: Literal["labels", "map"] = "map", fill: float = 0.0) -> np.ndarray:
  """Puts maps on a case's preprocessed slices back on its scan's grid.

  Args:
    maps: [n, H, W] or [n, H, W, C], one per slice of `slices` (H, W those of its images).
    slices: the case's slices, with their record (`SliceSet.record`) and axial indices, or
      their `SliceGrid`.
    kind: "labels" (integers, nearest neighbour) or "map" (real values, the transpose of
      the area average).
    fill: the value of voxels no slice covers (outside the crop box, other axial slices).

  Returns:
    [X, Y, Z] (or [X, Y, Z, C]) on the source volume's grid: labels in maps' dtype, maps in
    float32.

  Raises:
    PatientSpaceError: no record, slices of several scans, or maps of another shape.
  """
  grid, (nx, ny, nz), _ = _one_case(slices)
  record = grid.record
  maps = np.asarray(maps)
  expected = (len(grid),) + grid.shape
  if maps.shape[:3] != expected:
    raise PatientSpaceError(f"maps have shape {list(maps.shape)}; expected "
                            f"{list(expected)} (one [H, W] map per slice).")
  if kind not in ("labels", "map"):
    raise ValueError(f"kind must be 'labels' or 'map', got {kind!r}.")
  dtype = maps.dtype if kind == "labels" else np.float32
  volume = np.full((nx, ny, nz) + maps.shape[3:], fill, dtype=dtype)
  h, w = maps.shape[1:3]
  for i, z in enumerate(np.asarray(grid.slice_indices, int)):
    x0, y0, x1, y1 = (int(v) for v in record.crop_box[i])
    if not (0 <= x0 < x1 <= nx and 0 <= y0 < y1 <= ny and 0 <= z < nz):
      raise PatientSpaceError(f"slice {i}: crop box {(x0, y0, x1, y1)} at z={z} lies outside "
                              f"the volume {(nx, ny, nz)}.")
    if kind == "labels":
      plane = maps[i][_nearest(h, x1 - x0)][:, _nearest(w, y1 - y0)]
    else:
      wx, wy = _resample_weights(h, x1 - x0), _resample_weights(w, y1 - y0)
      plane = np.tensordot(wx, np.tensordot(wy, maps[i].astype(np.float64), axes=(1, 1)),
                           axes=(1, 1))  # [x, y, ...]: wx @ map @ wy.T per trailing channel
    volume[x0:x1, y0:y1, z] = plane
  return volume


def _inputs_of(source: pathlib.Path) -> pathlib.Path:
  return source.resolve().parent


def check_target(path: str | os.PathLike, slices: "SliceSet | SliceGrid") -> pathlib.Path:
  """The target path, refused if it is an input file or lies in the case's directory."""
  _, _, source = _one_case(slices)
  target = pathlib.Path(path).resolve()
  case_dir = _inputs_of(pathlib.Path(source))
  if target.parent == case_dir or case_dir in target.parents:
    raise PatientSpaceError(f"{path}: lies in the case's own directory {case_dir}; outputs "
                            "are written under the run's directory, never beside the inputs.")
  return target


def _header(source: pathlib.Path, affine: np.ndarray):
  """The input's header (copied) where it can be read, else a new one with the affine."""
  try:
    header = nibabel.load(source).header.copy()
  except (OSError, nibabel.filebasedimages.ImageFileError):
    header = None
  if not isinstance(header, nibabel.Nifti1Header):
    header = nibabel.Nifti1Header()
  return header


def write_nifti(volume: np.ndarray, slices: "SliceSet | SliceGrid", path: str | os.PathLike, *,
                kind: Literal["labels", "map"] = "map",
                description: str = "") -> pathlib.Path:
  """Writes a volume on the case's grid (the T1 file's affine and header) as NIfTI.

  Args:
    volume: [X, Y, Z] (or [X, Y, Z, C]) from `to_volume`.
    slices: the case's slices or their `SliceGrid` (the record names the T1 file and its
      affine).
    path: the target, `.nii.gz` or `.nii`; its directory is made. Written atomically.
    kind: "labels" (stored as uint8, or int16 above 255) or "map" (float32).
    description: the header's description (80 characters at most are kept).

  Returns:
    The path written.

  Raises:
    PatientSpaceError: the target is an input or lies beside them; the volume's grid is not
      the case's.
  """
  grid, shape, source = _one_case(slices)
  record = grid.record
  target = check_target(path, grid)
  volume = np.asarray(volume)
  if volume.shape[:3] != shape:
    raise PatientSpaceError(f"{path}: volume of shape {list(volume.shape)} is not on the "
                            f"case's grid {list(shape)}.")
  affine = np.asarray(record.affine[0], np.float64)
  header = _header(pathlib.Path(source), affine)
  if kind == "labels":
    dtype = np.uint8 if volume.min(initial=0) >= 0 and volume.max(initial=0) <= 255 \
        else np.int16
  else:
    dtype = np.float32
  data = volume.astype(dtype)
  image = nibabel.Nifti1Image(data, affine, header=header)
  image.set_data_dtype(dtype)
  image.header.set_slope_inter(1.0, 0.0)
  image.header.set_data_shape(data.shape)
  image.header["descrip"] = description.encode()[:79]
  image.header.set_intent("label" if kind == "labels" else "estimate")
  if kind == "map":
    finite = data[np.isfinite(data)]
    image.header["cal_min"], image.header["cal_max"] = (
        (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0))
  target.parent.mkdir(parents=True, exist_ok=True)
  suffix = ".nii.gz" if target.name.endswith(".nii.gz") else ".nii"
  tmp = target.with_name(f".{target.name}.tmp{os.getpid()}{suffix}")
  nibabel.save(image, tmp)
  os.replace(tmp, target)
  return target


def preprocess_of(slices: "SliceSet | SliceGrid"):
  """The in-plane preprocessing that made the slices, read from their record: a
  `brats.PreprocessConfig` whose crop and resize give the same grid on any slice of the
  scan."""
  from tracin_jax.data import brats  # pylint: disable=g-import-not-at-top

  grid, (nx, ny, _), _ = _one_case(slices)
  x0, y0, x1, y1 = (int(v) for v in grid.record.crop_box[0])
  crop = None if (x1 - x0, y1 - y0) == (nx, ny) else x1 - x0
  size = grid.shape[0]
  resized = size != (x1 - x0)
  return brats.PreprocessConfig(num_slices=1, crop_size=crop,
                                image_size=size if resized else None)


def read_scan(slices: SliceSet) -> SliceSet:
  """Every axial slice of the slices' scan, read again and preprocessed as they were (the
  case's folder found from the record's T1 file; labels -1 where it has no segmentation).

  Raises:
    BratsDataError: the case's files cannot be read (moved, say), naming them.
  """
  from tracin_jax.data import brats  # pylint: disable=g-import-not-at-top

  _, _, source = _one_case(slices)
  case = brats.case_files(pathlib.Path(source).parent)
  return brats.load_case(case, preprocess_of(slices), slices="all", require_labels=False)
