"""BraTS loader: NIfTI volumes of any BraTS layout since 2019 to a `SliceSet` of
preprocessed axial slices.

Layouts (`tracin_jax.data.layouts`), recognised from the root (`detect_layout`); in each,
a case folder's files are matched by their modality suffix, case-insensitively, and `.nii`
is read wherever `.nii.gz` is:

- brats2019 (real BraTS 2019 and the synthetic cohort alike):
  `<root>/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`. The cases are those of
  `PreprocessConfig.groups`; labels {0, 1, 2, 4}, 4 the enhancing tumour (ET).
- brats2020: `<root>/BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,...,seg}.nii` (and
  `BraTS20_Validation_NNN`, without seg); labels {0, 1, 2, 4}. A seg file named otherwise
  (the release's case 355: `W39_1998.09.19_Segm.nii`) is read when it is the folder's only
  other NIfTI file, with a note naming it.
- brats2021: `<root>/BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz` (the
  root may be the release's `RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021`); labels
  {0, 1, 2, 4}.
- brats2023 (glioma), hyphen-separated:
  `<root>/BraTS-GLI-NNNNN-NNN/BraTS-GLI-NNNNN-NNN-{t1n,t1c,t2w,t2f,seg}.nii.gz`, where t1n
  is T1, t1c T1Gd, t2w T2 and t2f FLAIR; labels {0, 1, 2, 3}, 3 the enhancing tumour.
- files: one case given file by file (`case_from_files`), labels {0, 1, 2, 4} unless its
  `layout=` says otherwise. `case_files(case_dir)` reads one case folder of any layout,
  recognised from its files' names.

Outside brats2019 every folder of the root is a case and `groups` does not apply. Every
layout's labels become the class indices {0, 1, 2, 3} (`layouts.to_classes`);
`layouts.to_layout_labels` maps predictions back to the layout's convention.

Per case (the paper's preprocessing, section 3.1), in this order:

1. Read the four modalities (channel order `constants.MODALITIES`) and the segmentation;
   check shapes, finiteness and label values.
2. Brain mask = voxels where any modality is nonzero.
3. Pick `num_slices` consecutive axial slices centred on the centre of mass along z of the
   brain mask (`slice_center="brain"`, the paper) or of the tumour (`"tumour"`).
4. Per volume and modality, robust min-max: the 0.5 and 99.5 percentiles of the brain's
   voxels map to -1 and 1, values are clipped to [-1, 1] and the background is exactly -1.
5. Centre crop in-plane to `crop_size`, then optionally resize to `image_size` (area
   average for images, nearest neighbour for labels).
6. Labels to class indices: 4 -> 3 (`constants.remap_labels`), or as the layout says.

`load_case` can instead keep every axial slice or given ones (`slices=`), and load a case
without a seg file (`require_labels=False`): its labels are -1, no ground truth.

The preprocessing record: every loaded slice carries a `PreprocessRecord`
(`SliceSet.record`) that says where it came from: the source volume's shape, the in-plane
box of it that the image covers (`crop_box`, after the centre crop), the T1 file's affine
and path, and the layout. An image [H, W] is that box of slice `slice_indices` resized to
H x W (area average for images, nearest for labels), so a map on a slice can be put back
on the patient's scan and a prediction written in the layout's labels.

Checks (each a `BratsDataError` naming the case and file, which `skip_bad` skips): an
unreadable directory or file (permission denied, said so), a header whose shape claims more
than `MAX_VOLUME_BYTES` or more bytes than an uncompressed file holds (checked before
reading), a truncated or corrupt stream, values that are not finite or overflow float32,
and normalised images that are not finite. An all-zero modality and a file whose affine
differs from the T1's are accepted with a warning naming the case (stored with the cache
and repeated when it is read).

Array axes: nibabel's (x, y, z); a slice is `volume[:, :, z]`, so an image is [x, y] and
its first axis (H) is the left-right axis of BraTS' LPS storage.

`load_cached` stores the result (records included) as an `.npz` keyed by the source files
(path, size, mtime), their layout and the config, so a second run reads no NIfTI; the
entry carries its SHA-256 and a damaged one is rebuilt.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import struct
import zlib
from typing import Iterable, Literal, Sequence

import nibabel
import numpy as np

from tracin_jax.data import constants
from tracin_jax.data import layouts
from tracin_jax.data.layouts import BratsDataError  # the loader's error, kept with the layouts
from tracin_jax.data.slices import PreprocessRecord
from tracin_jax.data.slices import SliceSet
from tracin_jax.progress import ProgressBar
from tracin_jax.settings import setting

_log = logging.getLogger(__name__)

# Accepted file extensions, in order of preference when both exist.
NIFTI_EXTENSIONS = layouts.NIFTI_EXTENSIONS
# Robust min-max percentiles inside the brain.
PERCENTILES = (0.5, 99.5)
# Bump when the preprocessing changes in a way the config does not capture.
CACHE_VERSION = 2
# Largest volume read (bytes of voxel data, from the header); BraTS' are 36 MB in float32.
MAX_VOLUME_BYTES = 1 << 30
# Largest float32 magnitude: images are normalised in float32.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """How volumes become slices.

  Attributes:
    num_slices: consecutive axial slices kept per case.
    slice_center: "brain" (centre of mass of the brain mask along z, the paper) or
      "tumour" (of the tumour labels; falls back to the brain centre, with a warning, for
      a case without tumour).
    crop_size: in-plane centre crop (pixels per side); None keeps the full plane.
    image_size: optional resize after the crop (pixels per side); None keeps crop_size.
    groups: cohort groups read under the root ("HGG", "LGG"); the paper keeps HGG only.
  """

  num_slices: int = setting(10, "Consecutive axial slices kept per case.", minimum=1)
  slice_center: Literal["brain", "tumour"] = setting(
      "brain", "Centre of the slices taken per case: brain (the paper) or tumour.",
      choices=("brain", "tumour"))
  crop_size: int | None = setting(192, "In-plane centre crop, pixels per side (unset: the "
                                  "full plane).", minimum=8)
  image_size: int | None = setting(None, "Resize after the crop, pixels per side (unset: no "
                                   "resize).", minimum=8)
  groups: tuple[str, ...] = setting(("HGG",), "Cohort groups read under the data root.",
                                    choices=constants.GROUPS)

  def __post_init__(self):
    if self.num_slices < 1:
      raise ValueError(f"num_slices must be >= 1, got {self.num_slices}.")
    if self.slice_center not in ("brain", "tumour"):
      raise ValueError(f"slice_center must be 'brain' or 'tumour', got {self.slice_center!r}.")
    for name in ("crop_size", "image_size"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name} must be None or >= 1, got {value}.")
    object.__setattr__(self, "groups", check_groups(self.groups))


def check_groups(groups: str | Sequence[str]) -> tuple[str, ...]:
  """The cohort groups as a tuple (one name or several), each one of `constants.GROUPS`.

  Raises:
    ValueError: for an unknown group or none.
  """
  groups = (groups,) if isinstance(groups, str) else tuple(groups)
  unknown = [g for g in groups if g not in constants.GROUPS]
  if unknown or not groups:
    raise ValueError(f"groups must be a non-empty subset of {constants.GROUPS}, got {groups}.")
  return groups


@dataclasses.dataclass(frozen=True)
class CaseFiles:
  """The files of one case.

  Attributes:
    case_id: the case directory's name (the BraTS patient id).
    group: "HGG" or "LGG" for the brats2019 layout, "" otherwise.
    directory: the case directory.
    files: kind ("t1", "t1ce", "t2", "flair", "seg") -> path, for the files found.
    readable: whether the directory could be read.
    layout: the name of the case's layout (`layouts.LAYOUTS`), which gives its labels.
    notes: warnings about its files (a seg file named irregularly), repeated on load.
    problems: kind -> the error message its use raises (e.g. two files of that kind).
  """

  case_id: str
  group: str
  directory: pathlib.Path
  files: dict[str, pathlib.Path]
  readable: bool = True
  layout: str = layouts.BRATS2019.name
  notes: tuple[str, ...] = ()
  problems: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def has_seg(self) -> bool:
    """Whether the case has a segmentation file (perhaps one that cannot be used)."""
    return constants.SEG_SUFFIX in self.files or constants.SEG_SUFFIX in self.problems

  def path(self, kind: str) -> pathlib.Path:
    """The path of one kind of file; raises BratsDataError, naming it, if it is missing."""
    if not self.readable:
      raise BratsDataError(f"case {self.case_id}: cannot read its directory {self.directory} "
                           "(permission denied).")
    if kind in self.problems:
      raise BratsDataError(self.problems[kind])
    if kind not in self.files:
      name = layouts.get_layout(self.layout).file_name(self.case_id, kind)
      raise BratsDataError(f"case {self.case_id}: missing {kind} file {self.directory / name} "
                           f"(or .nii) in {self.directory}")
    return self.files[kind]


def _file_kinds() -> tuple[str, ...]:
  return layouts.KINDS


def case_files(case_dir: str | os.PathLike, group: str = "",
               layout: str | None = None) -> CaseFiles:
  """The files of the case in `case_dir`, matched by their modality suffixes.

  Missing files are reported when the case is loaded.

  Args:
    case_dir: the case folder, of any layout.
    group: its group ("HGG", "LGG"); default: the parent folder's name if it is one and the
      layout is brats2019, else "".
    layout: the name of its layout; default: recognised from the files' names
      (`layouts.detect_case_layout`).

  Raises:
    BratsDataError: case_dir is not a directory.
  """
  case_dir = pathlib.Path(case_dir)
  if not case_dir.is_dir():
    raise BratsDataError(f"case directory {case_dir} does not exist or is not a directory.")
  layout = layouts.detect_case_layout(case_dir) if layout is None else layout
  if not group and layout == layouts.BRATS2019.name and case_dir.parent.name in constants.GROUPS:
    group = case_dir.parent.name
  readable = os.access(case_dir, os.R_OK | os.X_OK)
  found = layouts.find_case_files(case_dir, layout) if readable else layouts.FoundFiles(
      {}, (), {})
  return CaseFiles(case_dir.name, group, case_dir, found.files, readable, layout, found.notes,
                   found.problems)


def case_from_files(
    t1: str | os.PathLike, t1ce: str | os.PathLike, t2: str | os.PathLike,
    flair: str | os.PathLike, seg: str | os.PathLike | None = None,
    case_id: str | None = None, *, layout: str = layouts.FILES.name) -> CaseFiles:
  """A case given as its files, e.g. one patient's scans to explain.

  Args:
    t1, t1ce, t2, flair: the modalities' NIfTI files (T1, T1Gd, T2, FLAIR).
    seg: the segmentation, if there is one (without it, load with `require_labels=False`).
    case_id: the case's id; default: the T1 file's name less its extension and a T1 suffix
      ("BraTS2021_00000_t1.nii.gz" -> "BraTS2021_00000").
    layout: the layout whose label convention seg follows; default "files" ({0, 1, 2, 4},
      as BraTS 2019 to 2021); "brats2023" for {0, 1, 2, 3}.

  Raises:
    BratsDataError: a file that does not exist.
    ValueError: an unknown layout.
  """
  layouts.get_layout(layout)
  given = dict(zip(_file_kinds(), (t1, t1ce, t2, flair, seg)))
  files = {}
  for kind, path in given.items():
    if path is None:
      continue
    path = pathlib.Path(path)
    if not path.is_file():
      raise BratsDataError(f"{kind} file {path} does not exist or is not a file.")
    files[kind] = path
  t1_path = files[constants.MODALITIES[0]]
  case_id = layouts.case_id_from_file(t1_path.name) if case_id is None else case_id
  return CaseFiles(case_id, "", t1_path.parent, files, True, layout)


def detect_layout(root: str | os.PathLike) -> str:
  """The name of the layout of a BraTS root (see `layouts.detect_layout`)."""
  return layouts.detect_layout(root)


def list_cases(
    root: str | os.PathLike, groups: Sequence[str] = ("HGG",)) -> list[CaseFiles]:
  """Lists the cases of a BraTS root of any layout, sorted (by group, then) by id.

  The layout is recognised from the root (`detect_layout`): for brats2019 the cases are
  `<root>/<group>/<case>/` for each group; for the others every folder in the root is a
  case and `groups` does not apply. Missing files are not an error here (they are reported
  when the case is loaded, so that `skip_bad` can skip the case); a missing or empty
  directory is.

  Args:
    root: the BraTS root (for brats2019 the folder holding HGG/ and LGG/).
    groups: the groups to list (brats2019 only).

  Returns:
    One `CaseFiles` per case directory.

  Raises:
    BratsDataError: the root or a group directory is missing, the root matches no layout,
      or no case is found.
  """
  root = pathlib.Path(root)
  layout = layouts.get_layout(layouts.detect_layout(root))
  if not layout.grouped:
    return [case_files(case_dir, "", layout.name) for case_dir in sorted(root.iterdir())
            if case_dir.is_dir() and not case_dir.name.startswith(".")]
  cases = []
  for group in groups:
    group_dir = root / group
    if not group_dir.is_dir():
      raise BratsDataError(
          f"BraTS data directory {root} has no {group}/ directory (expected {group_dir}).")
    for case_dir in sorted(group_dir.iterdir()):
      if not case_dir.is_dir() or case_dir.name.startswith("."):
        continue
      cases.append(case_files(case_dir, group, layout.name))
  if not cases:
    raise BratsDataError(
        f"No BraTS cases found under {root} in {', '.join(f'{g}/' for g in groups)} "
        f"(expected <root>/<group>/<case>/<case>_{{t1,t1ce,t2,flair,seg}}.nii.gz).")
  return cases


def _first_line(e: BaseException) -> str:
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  text = lines[0] if lines else ""
  return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# What nibabel, gzip and zlib raise on a damaged file (found by fuzzing headers and streams).
_READ_ERRORS = (nibabel.filebasedimages.ImageFileError, nibabel.spatialimages.HeaderDataError,
                nibabel.spatialimages.ImageDataError, OSError, EOFError, zlib.error,
                struct.error, ValueError, TypeError, KeyError, IndexError, OverflowError,
                ZeroDivisionError)


def _check_header(case: CaseFiles, kind: str, path: pathlib.Path, img) -> None:
  """Refuses, before reading any voxel, a header whose shape the file cannot hold."""
  shape = tuple(int(d) for d in img.header.get_data_shape())
  itemsize = np.dtype(img.header.get_data_dtype()).itemsize
  nbytes = int(np.prod(shape, dtype=object)) * itemsize
  where = f"case {case.case_id}: {kind} file {path}"
  if not shape or min(shape) < 1:
    raise BratsDataError(f"{where}: its header claims shape {shape}.")
  if nbytes > MAX_VOLUME_BYTES:
    raise BratsDataError(
        f"{where}: its header claims shape {shape} ({nbytes / 2**30:.3g} GiB of voxels), more "
        f"than the {MAX_VOLUME_BYTES / 2**30:g} GiB read at most; the header is damaged.")
  if not str(path).endswith(".gz"):
    offset = int(img.header.get_data_offset())
    size = path.stat().st_size
    if size < offset + nbytes:
      raise BratsDataError(f"case {case.case_id}: cannot read {kind} file {path} (corrupt or "
                           f"truncated?): its header claims {nbytes} bytes of voxels, the "
                           f"file holds {max(size - offset, 0)}.")


def _read_volume(case: CaseFiles, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one NIfTI volume: (array, affine); unreadable files become BratsDataError."""
  path = case.path(kind)
  where = f"case {case.case_id}: cannot read {kind} file {path}"
  if not os.access(path, os.R_OK):
    raise BratsDataError(f"{where} (permission denied).")
  try:
    img = nibabel.load(path)
    _check_header(case, kind, path, img)
    data = np.asanyarray(img.dataobj)
    affine = np.asarray(img.affine, np.float64)
  except BratsDataError:
    raise
  except PermissionError as e:
    raise BratsDataError(f"{where} (permission denied).") from e
  except MemoryError as e:
    raise BratsDataError(f"{where}: it does not fit in memory (a damaged header?).") from e
  except _READ_ERRORS as e:
    raise BratsDataError(f"{where} (corrupt or truncated?): {_first_line(e)}") from e
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise BratsDataError(
        f"case {case.case_id}: {kind} file {path} has shape {data.shape}, expected a 3D volume.")
  return data, affine


def _check_finite(case: CaseFiles, kind: str, data: np.ndarray) -> None:
  """Finite values that stay finite in float32, the precision images are normalised in."""
  if not np.issubdtype(data.dtype, np.floating):
    if not (np.issubdtype(data.dtype, np.integer) or data.dtype == np.bool_):
      raise BratsDataError(f"case {case.case_id}: {kind} file {case.path(kind)} holds "
                           f"{data.dtype} voxels, not numbers.")
    return
  if not np.isfinite(data).all():
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    raise BratsDataError(
        f"case {case.case_id}: {kind} file {case.path(kind)} has {bad} NaN or infinite voxels.")
  peak = float(np.max(np.abs(data))) if data.size else 0.0
  if peak > _FLOAT32_MAX:
    raise BratsDataError(
        f"case {case.case_id}: {kind} file {case.path(kind)} has values up to {peak:.3g}, "
        f"beyond float32's range ({_FLOAT32_MAX:.3g}); rescale the volume.")


def _check_labels(case: CaseFiles, seg: np.ndarray, layout: layouts.Layout) -> None:
  """Checks that seg holds only the labels of the case's layout ({0, 1, 2, 4}; 2023:
  {0, 1, 2, 3})."""
  if not layouts.labels_in_layout(seg, layout):
    present = np.unique(seg).tolist()
    raise BratsDataError(
        f"case {case.case_id}: seg file {case.path(constants.SEG_SUFFIX)} has labels "
        f"{present[:20]}; expected a subset of {list(layout.labels)} (the {layout.name} "
        "labels).")


def _centre_of_mass_z(mask: np.ndarray) -> float:
  weights = mask.sum(axis=(0, 1), dtype=np.float64)
  return float(np.dot(np.arange(len(weights)), weights) / weights.sum())


def _slice_range(case: CaseFiles, brain: np.ndarray, seg: np.ndarray | None,
                 config: PreprocessConfig, found: list[str]) -> range:
  """The `num_slices` consecutive axial indices around the chosen centre, inside the volume;
  a fallback to the brain's centre is noted in `found`."""
  depth = brain.shape[2]
  if depth < config.num_slices:
    raise BratsDataError(
        f"case {case.case_id}: volume has {depth} axial slices, fewer than "
        f"num_slices={config.num_slices}.")
  centre = _centre_of_mass_z(brain)
  if config.slice_center == "tumour":
    tumour = None if seg is None else seg > 0
    if tumour is not None and tumour.any():
      centre = _centre_of_mass_z(tumour)
    else:
      why = "no seg file" if seg is None else "no tumour label"
      found.append(f"case {case.case_id} has {why}; slices centred on the brain.")
  start = int(round(centre - (config.num_slices - 1) / 2))
  start = min(max(start, 0), depth - config.num_slices)
  return range(start, start + config.num_slices)


def _as_slices(slices) -> None | str | list[int]:
  """`load_case`'s `slices` as None, "all" or a list of ints; anything else is refused."""
  if slices is None or (isinstance(slices, str) and slices == "all"):
    return slices
  try:
    values = None if isinstance(slices, str) else list(slices)
  except TypeError:
    values = None
  if values is None:
    raise ValueError(f"slices must be None, 'all' or axial indices, got {slices!r}.")
  for z in values:
    if isinstance(z, (bool, np.bool_)) or not isinstance(z, (int, np.integer)):
      raise ValueError(f"slices: {z!r} is not an axial index (an int).")
  return [int(z) for z in values]


def _slice_indices(case: CaseFiles, brain: np.ndarray, seg: np.ndarray | None,
                   config: PreprocessConfig, slices, found: list[str]) -> np.ndarray:
  """The axial indices to keep: as `load_case`'s `slices` says, each inside the volume."""
  depth = brain.shape[2]
  if slices is None:
    return np.asarray(_slice_range(case, brain, seg, config, found), np.int64)
  if isinstance(slices, str):
    return np.arange(depth)
  zs = np.asarray(slices, np.int64)
  if not len(zs):
    raise BratsDataError(f"case {case.case_id}: no axial slice asked for (slices is empty).")
  for z in zs:
    if not 0 <= z < depth:
      raise BratsDataError(f"case {case.case_id}: slice index {z} is outside its volume's "
                           f"{depth} axial slices (0..{depth - 1}; files in {case.directory}).")
  return zs


def _take_z(array: np.ndarray, zs: np.ndarray) -> np.ndarray:
  """array[:, :, zs]; a view when zs are consecutive and increasing."""
  if len(zs) and np.array_equal(zs, np.arange(zs[0], zs[0] + len(zs))):
    return array[:, :, zs[0]:zs[0] + len(zs)]
  return array[:, :, zs]


def normalise(volume: np.ndarray, brain: np.ndarray, zs: np.ndarray,
              box: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """Robust min-max of one modality to [-1, 1] on slices zs, from the whole brain's stats.

  Args:
    volume: [X, Y, Z] one modality.
    brain: [X, Y, Z] bool brain mask.
    zs: the axial slices to return.
    box: (x0, y0, x1, y1), the in-plane part to return; default the whole plane. The
      statistics are the whole brain's either way.

  Returns:
    [X, Y, len(zs)] (or [x1 - x0, y1 - y0, len(zs)]) float32 in [-1, 1]; -1 outside the
    brain. A modality that is constant inside the brain maps to -1 there too.
  """
  lo, hi = np.percentile(volume[brain], PERCENTILES)
  scale = 2.0 / (hi - lo) if hi > lo else 0.0
  if box is not None:
    x0, y0, x1, y1 = box
    volume, brain = volume[x0:x1, y0:y1], brain[x0:x1, y0:y1]
  # In float64: values near float32's limits would overflow (hi - lo) in float32.
  out = (_take_z(volume, zs).astype(np.float64) - lo) * scale
  out = np.clip(out - 1.0, -1.0, 1.0).astype(np.float32)
  out[~_take_z(brain, zs)] = -1.0
  return out


def _crop_box(case: CaseFiles, shape: tuple[int, ...],
              crop_size: int | None) -> tuple[int, int, int, int]:
  """(x0, y0, x1, y1): the in-plane centre crop of side crop_size (None: the full plane)."""
  x, y = shape[:2]
  if crop_size is None:
    return 0, 0, x, y
  if x < crop_size or y < crop_size:
    raise BratsDataError(
        f"case {case.case_id}: in-plane size {x}x{y} is smaller than crop_size={crop_size} "
        f"(files in {case.directory}).")
  x0, y0 = (x - crop_size) // 2, (y - crop_size) // 2
  return x0, y0, x0 + crop_size, y0 + crop_size


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights averaging each output pixel's footprint (fractional overlaps)."""
  edges = np.linspace(0.0, n_in, n_out + 1)
  left = np.arange(n_in)
  overlap = (np.minimum(edges[1:, None], left[None, :] + 1.0)
             - np.maximum(edges[:-1, None], left[None, :]))
  weights = np.clip(overlap, 0.0, None)
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _resize(images: np.ndarray, labels: np.ndarray, size: int):
  """Area-average resize of images [X, Y, ...] and nearest resize of labels [X, Y, ...]."""
  x, y = labels.shape[:2]
  if (x, y) == (size, size):
    return images, labels
  wx, wy = _area_weights(x, size), _area_weights(y, size)
  images = np.einsum("ax,xy...,by->ab...", wx, images, wy, optimize=True)
  ix = np.minimum(((np.arange(size) + 0.5) * x / size).astype(int), x - 1)
  iy = np.minimum(((np.arange(size) + 0.5) * y / size).astype(int), y - 1)
  return images.astype(np.float32), labels[ix][:, iy]


@dataclasses.dataclass(frozen=True)
class CaseVolumes:
  """One case's volumes as read and checked, before any preprocessing.

  Attributes:
    volumes: the four modalities (order `constants.MODALITIES`), each [X, Y, Z] as stored.
    seg: [X, Y, Z] the segmentation in the layout's labels, or None (none read).
    brain: [X, Y, Z] bool, voxels where any modality is nonzero.
    affine: [4, 4] float64, the T1 file's affine.
    layout: the case's layout.
    notes: warnings about its files, one line each (not yet logged).
  """

  volumes: list[np.ndarray]
  seg: np.ndarray | None
  brain: np.ndarray
  affine: np.ndarray
  layout: layouts.Layout
  notes: tuple[str, ...]

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.brain.shape


def read_case(case: CaseFiles, *, require_labels: bool = True) -> CaseVolumes:
  """Reads one case's files and checks them (steps 1 and 2 of the preprocessing).

  Args:
    case: the case's files.
    require_labels: a case without a seg file is an error; if False its seg is None.

  Returns:
    Its `CaseVolumes`; the warnings `load_case` gives are in `notes`.

  Raises:
    BratsDataError: a missing, unreadable or inconsistent file, naming the case and file.
  """
  layout = layouts.get_layout(case.layout)
  kinds = _file_kinds() if require_labels or case.has_seg else constants.MODALITIES
  read = [_read_volume(case, kind) for kind in kinds]
  volumes = [v for v, _ in read[:len(constants.MODALITIES)]]
  seg = read[-1][0] if len(kinds) > len(constants.MODALITIES) else None
  shape, affine = volumes[0].shape, read[0][1]
  found = list(case.notes)
  for kind, (data, data_affine) in zip(kinds, read):
    if data.shape != shape:
      raise BratsDataError(
          f"case {case.case_id}: {kind} file {case.path(kind)} has shape {data.shape}, but "
          f"{constants.MODALITIES[0]} file {case.path(constants.MODALITIES[0])} has {shape}.")
    _check_finite(case, kind, data)
    if not np.allclose(data_affine, affine, atol=1e-3):
      found.append(f"case {case.case_id}: the affine of its {kind} file {case.path(kind)} "
                   f"differs from its {constants.MODALITIES[0]} file's (voxels may not "
                   "correspond); used as stored.")
    if kind != constants.SEG_SUFFIX and not np.any(data):
      found.append(f"case {case.case_id}: its {kind} file {case.path(kind)} is zero "
                   "everywhere; that channel is -1 in every slice.")
  if seg is not None:
    _check_labels(case, seg, layout)

  # NIfTI arrays come Fortran-ordered; building the mask from them keeps that order, so
  # the elementwise work below runs over contiguous memory.
  brain = volumes[0] != 0
  for data in volumes[1:]:
    brain |= data != 0
  if not brain.any():
    raise BratsDataError(
        f"case {case.case_id}: every modality is zero everywhere (files in {case.directory}).")
  return CaseVolumes(volumes, seg, brain, affine, layout, tuple(found))


def load_case(case: CaseFiles, config: PreprocessConfig = PreprocessConfig(), *,
              notes: list[str] | None = None, slices=None,
              require_labels: bool = True) -> SliceSet:
  """Reads and preprocesses one case.

  Args:
    case: the case's files, from `list_cases`, `case_files` or `case_from_files`.
    config: preprocessing settings.
    notes: where warnings about the case go (an all-zero modality, an affine that differs
      from the T1's, a seg file named irregularly, slices centred on the brain for want of
      a tumour), one line each; default: logged.
    slices: the axial slices kept: None, `config.num_slices` consecutive slices around the
      centre `config.slice_center` chooses; "all", every one; or a sequence of axial
      indices, in that order. Normalisation uses the whole brain whichever are kept.
    require_labels: a case without a seg file is an error (training); if False, such a case
      loads with labels -1 (no ground truth).

  Returns:
    A SliceSet of the kept slices: images [n, H, W, 4] float32 in [-1, 1] (background -1),
    labels [n, H, W] int32 in {0, 1, 2, 3} (or -1), with H = W = image_size or crop_size
    (or the volume's in-plane size when both are None), and its `PreprocessRecord`.

  Raises:
    BratsDataError: a missing, unreadable or inconsistent file, naming the case and file;
      a slice index outside the volume, naming it and the volume's depth.
    ValueError: `slices` is not None, "all" or a sequence of ints.
  """
  slices = _as_slices(slices)
  read = read_case(case, require_labels=require_labels)
  volumes, seg, brain, shape, affine, layout = (read.volumes, read.seg, read.brain,
                                                read.shape, read.affine, read.layout)
  found = list(read.notes)
  zs = _slice_indices(case, brain, seg, config, slices, found)
  for note in found:
    if notes is None:
      _log.warning(note)
    else:
      notes.append(note)
  box = _crop_box(case, shape, config.crop_size)

  images = np.stack([normalise(v, brain, zs) for v in volumes], axis=-1)  # [X, Y, n, 4]
  if seg is None:
    labels = np.full(shape[:2] + (len(zs),), -1, np.int32)  # no ground truth
  else:
    labels = layouts.to_classes(_take_z(seg, zs), layout)  # [X, Y, n]
  images, labels = images[box[0]:box[2], box[1]:box[3]], labels[box[0]:box[2], box[1]:box[3]]
  if config.image_size is not None:
    images, labels = _resize(images, labels, config.image_size)
  if not np.isfinite(images).all():
    raise BratsDataError(f"case {case.case_id}: its normalised images are not finite "
                         f"(files in {case.directory}).")
  n = len(zs)
  return SliceSet(
      images=np.ascontiguousarray(images.transpose(2, 0, 1, 3), dtype=np.float32),
      labels=np.ascontiguousarray(labels.transpose(2, 0, 1), dtype=np.int32),
      case_ids=np.asarray([case.case_id] * n, dtype=str),
      slice_indices=np.asarray(zs, dtype=np.int32),
      record=PreprocessRecord.of_case(
          n, volume_shape=shape, crop_box=box, affine=affine, layout=layout.name,
          source=case.path(constants.MODALITIES[0]).absolute()))


def load_cases(
    root: str | os.PathLike,
    config: PreprocessConfig = PreprocessConfig(),
    *,
    skip_bad: bool = False,
    progress: bool = True,
    num_workers: int | None = None,
) -> tuple[SliceSet, list[tuple[str, str]]]:
  """Loads every case under root (of `config.groups` for brats2019), in `list_cases` order.

  Args:
    root: the BraTS root, of any layout (`detect_layout`).
    config: preprocessing settings.
    skip_bad: skip (and log) a case that raises BratsDataError instead of raising.
    progress: write a one-line progress counter to stderr.
    num_workers: threads reading cases (default min(4, CPUs)); the order is kept.

  Returns:
    (slices, skipped): all loaded slices, case by case; and (case id, reason) for each
    skipped case (empty unless skip_bad).

  Raises:
    BratsDataError: a bad directory; a bad case unless skip_bad; no case could be loaded.
  """
  cases = list_cases(root, config.groups)
  slices, skipped, notes = _load(cases, config, skip_bad=skip_bad, progress=progress,
                                 num_workers=num_workers)
  for note in notes:
    _log.warning(note)
  return slices, skipped


def _default_workers() -> int:
  return max(1, min(4, os.cpu_count() or 1))


def _load(cases: Sequence[CaseFiles], config: PreprocessConfig, *, skip_bad: bool,
          progress: bool, num_workers: int | None
          ) -> tuple[SliceSet, list[tuple[str, str]], list[str]]:
  """Loads cases' slices on a thread pool, in order (see `map_cases`).

  Returns:
    (slices, skipped (case id, reason), notes: warnings about accepted cases, one line each).
  """
  loaded, skipped, notes = map_cases(
      lambda case, notes: load_case(case, config, notes=notes), cases, skip_bad=skip_bad,
      progress=progress, num_workers=num_workers)
  return SliceSet.concatenate(loaded), skipped, notes


def map_cases(load, cases: Sequence[CaseFiles], *, skip_bad: bool, progress: bool,
              num_workers: int | None) -> tuple[list, list[tuple[str, str]], list[str]]:
  """Applies `load(case, notes)` to every case on a thread pool (gzip inflation and numpy
  release the GIL), keeping the order.

  Args:
    load: reads one case; appends its warnings to `notes` (a list); raises BratsDataError.
    cases: the cases.
    skip_bad: skip (and note) a case whose `load` raises BratsDataError instead of raising.
    progress: write a one-line progress counter to stderr.
    num_workers: threads (default min(4, CPUs)).

  Returns:
    (loaded: what `load` returned, case by case, skipped ones left out; skipped: (case id,
    reason) of each; notes: warnings, one line each).

  Raises:
    BratsDataError: a bad case unless skip_bad; no case could be loaded.
  """

  def load_one(case):
    notes = []
    try:
      return load(case, notes), None, notes
    except BratsDataError as e:
      if not skip_bad:
        raise
      return None, str(e), [f"skipped case {case.case_id}: {e}"]

  loaded, skipped, notes = [], [], []
  bar = ProgressBar(len(cases), "loading cases", enabled=progress)
  pool = concurrent.futures.ThreadPoolExecutor(num_workers or _default_workers())
  try:
    for case, (result, reason, case_notes) in zip(cases, pool.map(load_one, cases)):
      notes += case_notes
      if result is not None:
        loaded.append(result)
      else:
        skipped.append((case.case_id, reason))
      bar.update(1, skipped=len(skipped))
  finally:
    pool.shutdown(wait=True, cancel_futures=True)  # on an error, start no further case
    bar.close()
  if not loaded:
    raise BratsDataError(
        f"None of the {len(cases)} cases could be loaded; first reason: {skipped[0][1]}")
  return loaded, skipped, notes


def split_cases(
    case_ids: Iterable[str],
    num_val: int | None = None,
    val_fraction: float = 52 / 259,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
  """Splits cases (patients) into train and validation with a seeded permutation.

  Every slice of a patient lands on one side. The result does not depend on the order or
  repetition of `case_ids` (they are de-duplicated and sorted first).

  Args:
    case_ids: case ids, e.g. `slices.case_ids` (repeats allowed).
    num_val: validation cases; default round(val_fraction * number of cases)
      (52 of the paper's 259 HGG patients).
    val_fraction: used when num_val is None.
    seed: permutation seed.

  Returns:
    (train_ids, val_ids), each sorted.
  """
  ids = sorted({str(c) for c in case_ids})
  if num_val is None:
    num_val = int(round(val_fraction * len(ids)))
  if not 0 <= num_val <= len(ids):
    raise BratsDataError(f"num_val={num_val} is outside [0, {len(ids)}] (number of cases).")
  perm = np.random.default_rng(seed).permutation(len(ids))
  val = sorted(ids[i] for i in perm[:num_val])
  train = sorted(ids[i] for i in perm[num_val:])
  return train, val


def cache_key(cases: Sequence[CaseFiles], root: str | os.PathLike,
              config: PreprocessConfig, skip_bad: bool = False) -> str:
  """A hash of the source files (absolute root, relative path, size, mtime), their layout
  and the config."""
  root = pathlib.Path(root)
  files = []
  for case in cases:
    for kind in _file_kinds():
      if kind in case.files:
        path = case.files[kind]
        stat = path.stat()  # follows symbolic links: the size and mtime of the data
        files.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns])
      else:
        files.append([f"{case.directory.relative_to(root)}/<missing {kind}>", -1, -1])
  record = {
      "version": CACHE_VERSION,
      "root": str(root.resolve()),
      "layouts": sorted({case.layout for case in cases}),
      "files": files,
      "config": dataclasses.asdict(config),
      "skip_bad": skip_bad,
  }
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def load_cached(
    root: str | os.PathLike,
    config: PreprocessConfig,
    cache_dir: str | os.PathLike,
    *,
    skip_bad: bool = False,
    progress: bool = True,
    num_workers: int | None = None,
) -> tuple[SliceSet, list[tuple[str, str]]]:
  """`load_cases` through an on-disk cache of the preprocessed slices.

  The cache entry is `<cache_dir>/brats_<key>.npz` (the SliceSet, no pickle) plus a JSON
  sidecar (skipped cases, warnings, config, root, the .npz's SHA-256), keyed by
  `cache_key`: any change to a file's size or mtime, to the set of files, the root or the
  config misses. A hit reads no NIfTI; it verifies the checksum, repeats the warnings, and
  a damaged entry is logged and rebuilt. Both files are written atomically (temporary file,
  then rename); the .npz last, so a present .npz means a complete entry.

  Args:
    root, config, skip_bad, progress, num_workers: as for `load_cases`.
    cache_dir: directory of cache entries (created if needed).

  Returns:
    As `load_cases`.
  """
  cases = list_cases(root, config.groups)
  key = cache_key(cases, root, config, skip_bad)[:24]
  cache_dir = pathlib.Path(cache_dir)
  npz_path = cache_dir / f"brats_{key}.npz"
  json_path = cache_dir / f"brats_{key}.json"
  if npz_path.is_file():
    hit = _read_cache(npz_path, json_path)
    if hit is not None:
      return replay_cache_hit("BraTS", npz_path, *hit)

  slices, skipped, notes = _load(cases, config, skip_bad=skip_bad, progress=progress,
                                 num_workers=num_workers)
  for note in notes:
    _log.warning(note)
  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp_npz = npz_path.with_name(npz_path.name + f".tmp{os.getpid()}.npz")
  slices.save(tmp_npz)
  meta = {
      "root": str(pathlib.Path(root).resolve()),
      "config": dataclasses.asdict(config),
      "num_cases": len(slices.cases),
      "num_slices": len(slices),
      "skipped": skipped,
      "notes": notes,
      "sha256": _sha256(tmp_npz),
  }
  tmp = json_path.with_name(json_path.name + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(meta, indent=1))
  os.replace(tmp, json_path)
  os.replace(tmp_npz, npz_path)
  _log.info("BraTS cache written: %s", npz_path)
  return slices, skipped


def replay_cache_hit(kind: str, path: pathlib.Path, samples, meta: dict):
  """(samples, skipped cases) of a cache hit, its loading warnings repeated (slices or
  volumes: `meta` is the entry's JSON sidecar)."""
  _log.info("%s cache hit: %s", kind, path)
  for note in meta.get("notes", []):
    _log.warning(note)
  return samples, [tuple(s) for s in meta["skipped"]]


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _read_cache(npz_path: pathlib.Path, json_path: pathlib.Path):
  """(slices, sidecar) of a sound cache entry; None (and the entry removed, with a
  warning) if it is damaged."""
  try:
    meta = json.loads(json_path.read_text())
    digest = _sha256(npz_path)
    if meta.get("sha256") not in (None, digest):
      raise ValueError("its checksum does not match")
    slices = SliceSet.load(npz_path)  # reads every array (zip CRCs checked)
    if meta.get("sha256") is None:  # written before checksums: sound, so record one
      meta["sha256"] = digest
      tmp = json_path.with_name(json_path.name + f".tmp{os.getpid()}")
      tmp.write_text(json.dumps(meta, indent=1))
      os.replace(tmp, json_path)
    return slices, meta
  except Exception as e:  # pylint: disable=broad-except  # any damage: rebuild
    _log.warning("slice cache %s is damaged (%s); rebuilding it.", npz_path, _first_line(e))
    for p in (npz_path, json_path):
      p.unlink(missing_ok=True)
    return None
