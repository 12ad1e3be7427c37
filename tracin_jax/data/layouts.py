"""The BraTS folder layouts since 2019: how cases and files are named, and what labels mean.

A `Layout` says how a cohort's case folders and files are named and which label values its
segmentations use; `LAYOUTS` holds them by name:

  brats2019  <root>/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz, labels {0,1,2,4}
  brats2020  <root>/BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}.nii,
             labels {0,1,2,4}
  brats2021  <root>/BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz,
             labels {0,1,2,4}
  brats2023  <root>/BraTS-GLI-NNNNN-NNN/BraTS-GLI-NNNNN-NNN-{t1n,t1c,t2w,t2f,seg}.nii.gz,
             labels {0,1,2,3} (3 is the enhancing tumour)
  files      four modality files (and a seg) given one by one, labels {0,1,2,4}

`detect_layout` recognises a root from its entries (HGG/ or LGG/: 2019; else the names of
its case folders); `detect_case_layout` a single case folder from its files' names.
`find_case_files` matches a case folder's files by their modality suffix, case-insensitively
(`_t1.`, `_t1ce.`, ... or `-t1n.`, ...), with `.nii.gz` preferred to `.nii`.

Every layout's labels map to the class indices 0 background, 1 NCR/NET, 2 ED, 3 ET
(`to_classes`) and back (`to_layout_labels`, to write predictions in the layout's
convention).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Mapping, NamedTuple

import numpy as np

from tracin_jax import errors
from tracin_jax.data import constants

# Accepted file extensions, in order of preference when both exist.
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
# The kinds of file of a case: the modalities (channel order) and the segmentation.
KINDS = constants.MODALITIES + (constants.SEG_SUFFIX,)
# Entries of a root named when no layout matches it.
_ENTRIES_SHOWN = 5


class BratsDataError(errors.UserError, ValueError):
  """A BraTS directory, case or file that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """One way of naming a BraTS cohort's folders and files, with its label convention.

  Attributes:
    name: the layout's name ("brats2019", "brats2020", "brats2021", "brats2023", "files").
    pattern: a description of its files, e.g.
      "<root>/BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz".
    example: the path of one T1 file relative to the root ("" for "files").
    label_map: label value in the layout's seg files -> class index (0 background,
      1 NCR/NET, 2 ED, 3 ET).
    suffixes: kind ("t1", "t1ce", "t2", "flair", "seg") -> the end of its file names'
      stems, after `separator` ("t1n" for the 2023 T1).
    separator: between the case id and the suffix ("_", or "-" for 2023).
    case_pattern: a regular expression that its case folders' names match ("" where the
      layout is not recognised from folder names).
    grouped: whether the cases sit in group folders (HGG/, LGG/) under the root.
  """

  name: str
  pattern: str
  example: str
  label_map: Mapping[int, int]
  suffixes: Mapping[str, str]
  separator: str = "_"
  case_pattern: str = ""
  grouped: bool = False

  @property
  def labels(self) -> tuple[int, ...]:
    """The label values of its seg files, sorted."""
    return tuple(sorted(self.label_map))

  def file_name(self, case_id: str, kind: str, ext: str = NIFTI_EXTENSIONS[0]) -> str:
    """The name a case's file of one kind has in this layout."""
    return f"{case_id}{self.separator}{self.suffixes[kind]}{ext}"

  def matches_case(self, name: str) -> bool:
    """Whether a folder's name is one of this layout's case folder names."""
    return bool(self.case_pattern) and re.fullmatch(self.case_pattern, name, re.I) is not None

  def kind_of(self, stem: str) -> str | None:
    """The kind of file whose name, without its extension, is `stem` (case-insensitive),
    or None if its end is no suffix of this layout."""
    stem = stem.lower()
    for kind, suffix in self.suffixes.items():
      if stem == suffix or stem.endswith(self.separator + suffix):
        return kind
    return None


_UNDERSCORE_SUFFIXES = {kind: kind for kind in KINDS}
_LABELS_2019 = {0: 0, 1: 1, 2: 2, 4: 3}  # as `constants.remap_labels`

BRATS2019 = Layout(
    "brats2019", "<root>/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz",
    "HGG/BraTS19_2013_2_1/BraTS19_2013_2_1_t1.nii.gz", _LABELS_2019, _UNDERSCORE_SUFFIXES,
    case_pattern=r"BraTS19_\w+", grouped=True)
BRATS2020 = Layout(
    "brats2020", "<root>/BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}.nii "
    "(BraTS20_Validation_NNN without seg)", "BraTS20_Training_001/BraTS20_Training_001_t1.nii",
    _LABELS_2019, _UNDERSCORE_SUFFIXES, case_pattern=r"BraTS20_(Training|Validation|Testing)_\d+")
BRATS2021 = Layout(
    "brats2021", "<root>/BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz",
    "BraTS2021_00000/BraTS2021_00000_t1.nii.gz", _LABELS_2019, _UNDERSCORE_SUFFIXES,
    case_pattern=r"BraTS2021_\d+")
BRATS2023 = Layout(
    "brats2023", "<root>/BraTS-GLI-NNNNN-NNN/BraTS-GLI-NNNNN-NNN-{t1n,t1c,t2w,t2f,seg}.nii.gz",
    "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz", {0: 0, 1: 1, 2: 2, 3: 3},
    {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}, separator="-",
    case_pattern=r"BraTS-GLI-\d+-\d+")
FILES = Layout("files", "four modality files (and a seg) given one by one", "", _LABELS_2019,
               _UNDERSCORE_SUFFIXES)

LAYOUTS: dict[str, Layout] = {
    layout.name: layout for layout in (BRATS2019, BRATS2020, BRATS2021, BRATS2023, FILES)}


def get_layout(layout: str | Layout) -> Layout:
  """The layout of that name (a `Layout` is returned as is).

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if isinstance(layout, Layout):
    return layout
  if layout not in LAYOUTS:
    raise ValueError(f"unknown BraTS layout {layout!r}; choose from {', '.join(LAYOUTS)}.")
  return LAYOUTS[layout]


def _detectable() -> list[Layout]:
  return [layout for layout in LAYOUTS.values() if layout.case_pattern]


def _split_nifti(name: str) -> tuple[str, str] | None:
  """(stem, extension lower-cased) of a NIfTI file's name, or None for another file."""
  for ext in NIFTI_EXTENSIONS:
    if name.lower().endswith(ext):
      return name[:-len(ext)], ext
  return None


def _entries(directory: pathlib.Path) -> list[pathlib.Path]:
  """The directory's entries, sorted, without hidden ones; [] if it cannot be read."""
  try:
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))
  except OSError:
    return []


def _nifti_files(directory: pathlib.Path) -> list[tuple[pathlib.Path, str, str]]:
  """(path, stem, extension) of the NIfTI files in directory, sorted by name."""
  found = []
  for path in _entries(directory):
    split = _split_nifti(path.name)
    if split is not None and path.is_file():
      found.append((path, *split))
  return found


def detect_layout(root: str | os.PathLike) -> str:
  """The name of the layout of a BraTS root, recognised from its entries.

  A root holding HGG/ or LGG/ is "brats2019"; otherwise the layout whose case folder names
  (`Layout.case_pattern`) most of its folders match. Folders that match none are still
  cases of that layout (their files are reported when loaded).

  Raises:
    BratsDataError: the root is missing, unreadable, or matches no layout (the message
      names the layouts, with an example file each, and the root's first entries).
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise BratsDataError(f"BraTS data directory {root} does not exist or is not a directory.")
  try:
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
  except PermissionError as e:
    raise BratsDataError(f"cannot read BraTS data directory {root} (permission denied).") from e
  found = _layout_of_entries(entries)
  if found is None:
    raise BratsDataError(_no_layout_message(root, entries))
  return found


def _layout_of_entries(entries: list[pathlib.Path]) -> str | None:
  if {p.name for p in entries} & set(constants.GROUPS):
    return BRATS2019.name
  folders = [p.name for p in entries if p.is_dir()]
  counts = [(sum(layout.matches_case(name) for name in folders), layout)
            for layout in _detectable() if not layout.grouped]
  count, best = max(counts, key=lambda c: c[0])  # the first of the most matched
  return best.name if count else None


def _no_layout_message(root: pathlib.Path, entries: list[pathlib.Path]) -> str:
  known = "; ".join(f"{layout.name}: {layout.example}" for layout in _detectable())
  shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:_ENTRIES_SHOWN])
  if len(entries) > _ENTRIES_SHOWN:
    shown += f", ... ({len(entries)} entries)"
  hint = ""
  folders = [p for p in entries if p.is_dir()]
  if any(BRATS2019.matches_case(p.name) for p in folders):
    hint = "; BraTS 2019 case folders belong in HGG/ or LGG/ under the root"
  elif len(folders) == 1:
    inner = _layout_of_entries(_entries(folders[0]))
    if inner is not None:
      hint = f"; its folder {folders[0]} looks like a {inner} root"
  holds = f"it holds {shown}" if shown else "it is empty"
  return (f"BraTS data directory {root} has no HGG/ directory and no case folder of a known "
          f"layout ({known}); {holds}{hint}.")


def detect_case_layout(case_dir: str | os.PathLike) -> str:
  """The name of the layout of one case folder, recognised from its files' names.

  The layout whose suffixes name most of its kinds of file wins; between layouts that name
  as many (the 2019, 2020 and 2021 files are named alike), the one whose case folder name
  the folder has; "brats2019" when nothing tells.
  """
  case_dir = pathlib.Path(case_dir)
  stems = [stem for _, stem, _ in _nifti_files(case_dir)]

  def score(layout: Layout) -> tuple[int, bool]:
    kinds = {layout.kind_of(stem) for stem in stems} - {None}
    return len(kinds), layout.matches_case(case_dir.name)

  return max(_detectable(), key=score).name  # the first of the best


class FoundFiles(NamedTuple):
  """The files of a case folder, as `find_case_files` matched them.

  Attributes:
    files: kind -> path, for the kinds found.
    notes: warnings about the match (a seg file named irregularly), one line each.
    problems: kind -> the error message its use raises (several files of that kind).
  """

  files: dict[str, pathlib.Path]
  notes: tuple[str, ...]
  problems: dict[str, str]


def find_case_files(case_dir: str | os.PathLike, layout: str | Layout,
                    case_id: str | None = None) -> FoundFiles:
  """Matches the NIfTI files of a case folder to their kinds by the layout's suffixes.

  A kind matched by several files takes the one named exactly `<case><sep><suffix>` (with a
  note), else is a problem. A folder whose seg file does not follow the pattern (the BraTS
  2020 release's case 355) but whose only other NIfTI file it is, has that file as its
  seg, with a note naming it.

  Args:
    case_dir: the case folder.
    layout: its layout.
    case_id: the case's id (default: the folder's name).

  Returns:
    The match; files missing from it are reported when the case is loaded.
  """
  case_dir, layout = pathlib.Path(case_dir), get_layout(layout)
  case_id = case_dir.name if case_id is None else case_id
  order = {ext: i for i, ext in enumerate(NIFTI_EXTENSIONS)}
  by_kind: dict[str, dict[str, list]] = {}
  others: dict[str, list] = {}
  for path, stem, ext in _nifti_files(case_dir):
    kind = layout.kind_of(stem)
    group = by_kind.setdefault(kind, {}) if kind else others
    group.setdefault(stem, []).append((order[ext], path))
  files, notes, problems = {}, [], {}
  for kind in KINDS:
    stems = by_kind.get(kind, {})
    exact = [s for s in stems if s.lower() == layout.file_name(case_id, kind, "").lower()]
    chosen = exact[0] if exact else (next(iter(stems)) if len(stems) == 1 else None)
    names = ", ".join(min(paths)[1].name for paths in stems.values())
    if chosen is None and stems:
      problems[kind] = (f"case {case_id}: {len(stems)} {kind} files in {case_dir} ({names}); "
                        "keep one.")
    elif chosen is not None:
      files[kind] = min(stems[chosen])[1]
      if len(stems) > 1:
        notes.append(f"case {case_id}: {kind} file {files[kind]} used, of {names} in "
                     f"{case_dir}.")
  seg = constants.SEG_SUFFIX
  if (seg not in files and seg not in problems and len(others) == 1
      and all(kind in files for kind in constants.MODALITIES)):
    files[seg] = min(next(iter(others.values())))[1]
    notes.append(f"case {case_id}: seg file taken to be {files[seg]}, the only other NIfTI "
                 f"file in {case_dir} (not named {layout.file_name(case_id, seg)}).")
  return FoundFiles(files, tuple(notes), problems)


def case_id_from_file(name: str) -> str:
  """A case id from a T1 file's name: its stem less a T1 suffix of any layout
  ("BraTS-GLI-00000-000-t1n.nii.gz" -> "BraTS-GLI-00000-000")."""
  split = _split_nifti(name)
  stem = split[0] if split else name
  for layout in LAYOUTS.values():
    end = layout.separator + layout.suffixes["t1"]
    if stem.lower().endswith(end) and len(stem) > len(end):
      return stem[:-len(end)]
  return stem


def labels_in_layout(seg: np.ndarray, layout: str | Layout) -> bool:
  """Whether seg holds only the layout's label values (integers of `Layout.labels`)."""
  labels = get_layout(layout).labels
  seg = np.asarray(seg)
  if seg.size == 0:
    return True
  if seg.min() < labels[0] or seg.max() > labels[-1]:
    return False
  if any((seg == value).any() for value in range(labels[0], labels[-1]) if value not in labels):
    return False
  return not np.issubdtype(seg.dtype, np.floating) or np.array_equal(seg, np.round(seg))


def _integers(values: np.ndarray, what: str) -> np.ndarray:
  values = np.asarray(values)
  if not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
    if not np.array_equal(values, np.round(values)):
      raise ValueError(f"{what} must be integers, got {values.dtype} values that are not.")
  return values.astype(np.int64)


def to_classes(labels: np.ndarray, layout: str | Layout) -> np.ndarray:
  """Maps label values of the layout's convention to class indices {0, 1, 2, 3}.

  Args:
    labels: [...] integer labels, e.g. a seg volume's.
    layout: the labels' layout (name or `Layout`).

  Returns:
    [...] int32 class indices.

  Raises:
    ValueError: a value that is not one of the layout's labels.
  """
  layout = get_layout(layout)
  values = _integers(labels, f"{layout.name} labels")
  table = np.full(layout.labels[-1] + 1, -1, np.int32)
  for label, index in layout.label_map.items():
    table[label] = index
  bad = (values < 0) | (values >= len(table))
  if not bad.any():
    bad = table[values] < 0
  if bad.any():
    raise ValueError(f"labels {np.unique(values[bad]).tolist()[:20]} are not {layout.name} "
                     f"labels {list(layout.labels)}.")
  return table[values]


def to_layout_labels(classes: np.ndarray, layout: str | Layout) -> np.ndarray:
  """Maps class indices {0, 1, 2, 3} to the layout's label values, the inverse of
  `to_classes` (class 3, ET, is label 4 for 2019, 2020, 2021 and "files", 3 for 2023).

  Args:
    classes: [...] integer class indices, e.g. a predicted segmentation.
    layout: the layout whose convention to write (name or `Layout`).

  Returns:
    [...] int32 labels in that layout's convention.

  Raises:
    ValueError: a value outside {0, 1, 2, 3}.
  """
  layout = get_layout(layout)
  values = _integers(classes, "classes")
  table = np.zeros(constants.NUM_CLASSES, np.int32)
  for label, index in layout.label_map.items():
    table[index] = label
  bad = (values < 0) | (values >= constants.NUM_CLASSES)
  if bad.any():
    raise ValueError(f"classes {np.unique(values[bad]).tolist()[:20]} are outside "
                     f"{list(range(constants.NUM_CLASSES))}.")
  return table[values]


def label_description(layout: str | Layout) -> str:
  """The layout's labels in words, e.g. "labels 1 NCR/NET, 2 ED, 4 ET (BraTS 2019)"."""
  layout = get_layout(layout)
  names = {index: constants.CLASS_NAMES[index] for index in range(1, constants.NUM_CLASSES)}
  pairs = sorted((label, names[index]) for label, index in layout.label_map.items() if index)
  return f"labels {', '.join(f'{v} {n}' for v, n in pairs)} ({layout.name})"
