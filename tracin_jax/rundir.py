"""The run directory: the interface between the stages that write it and its readers.

    from tracin_jax import rundir
    record = rundir.read_manifest("runs/demo", "saliency")   # None if it has not finished
    grids = rundir.saliency_grids(record)                    # {(case, slice, class): figure}
    path = pathlib.Path("runs/demo") / rundir.INFLUENCE / rundir.INFLUENCE_TRAIN_FILE

A run's directory (the workdir) holds one directory per stage, named as the stage, each
with its `manifest.json`: the stage's settings, fingerprint, timings, versions, every file
it wrote with a description and every figure with its caption, and its headline numbers
(the training stage's own files, its checkpoints, metrics and curves, lie in the workdir
itself). Each file a manifest lists carries its checksum there (`sha256`, `size`), and the
manifest its own (`manifest.json.sha256`): `read_manifest` checks them, so that a damaged
file is named, never read. This module is the lowest layer of that contract: the stages write through it, and
the report, `explain`, the notebooks and users' own code read through it, so that no reader
imports a stage and no stage knows its readers. It depends on nothing of the package but
`outputs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
from typing import Any

from tracin_jax import outputs

MANIFEST = "manifest.json"

# The stages, by the name of their directory, in the order a run runs them.
TRAIN, INFLUENCE, INTERPRET, SALIENCY, EXPORT, VALIDATE, LDS, REPORT = (
    "train", "influence", "interpret", "saliency", "export", "validate", "lds", "report")
STAGES = (TRAIN, INFLUENCE, INTERPRET, SALIENCY, EXPORT, VALIDATE, LDS, REPORT)

# In the workdir itself: what training writes.
CHECKPOINT_DIR = "checkpoints"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"

# <workdir>/influence/
INFLUENCE_TRAIN_FILE = "train_influence.npz"
INFLUENCE_TEST_FILE = "test_influence.npz"
PROPONENTS_FILE = "proponents.json"
GLOBAL_FILE = "global_explainers.json"
STORE_DIR = "store"
TRAIN_INFLUENCE_FIGURE = "train_influence.png"
PROPONENT_CLASSES_FIGURE = "proponent_classes.png"
SELF_INFLUENCE_FIGURE = "self_influence.png"

# <workdir>/interpret/
FEATURE_IMPORTANCE_FILE = "feature_importance.npz"
FEATURE_IMPACT_FILE = "feature_impact.json"
FEATURE_IMPACT_FIGURE = "feature_impact.png"

# <workdir>/saliency/ (`.json` and `.csv` of the first two)
INSTANCES_NAME = "instances"
FAITHFULNESS_NAME = "faithfulness"
CONTEXT_FILE = "context_curves.json"
CONTEXT_FIGURE = "context_curves.png"
SALIENCY_RANDOMISATION_FILE = "randomisation.json"
SALIENCY_RANDOMISATION_FIGURE = "randomisation.png"
MODALITY_SHARES_FIGURE = "modality_shares.png"
SALIENCY_GRID = "saliency_grid"  # the `kind` of a grid's figure entry in the manifest

# <workdir>/export/<case>/ (the NIfTI files' names are `tracin_jax.patient`'s)
EXPORT_GRID_FILE = "grid.npz"
EXPORT_CHECK_FIGURE = "{tag}/check.png"
EXPORT_CHECK = "export_check"  # the `kind` of a case's check figure in the manifest

# <workdir>/validate/
RETRAINING_FILE = "retraining.json"
RETRAINING_FIGURE = "retraining.png"
RANDOMISATION_FILE = "randomisation_check.json"
RANDOMISATION_FIGURE = "randomisation_check.png"
CASCADE_FIGURE = "randomisation_cascade.png"

# <workdir>/lds/
LDS_FILE = "lds.json"
LDS_TABLE_FILE = "lds_table.md"
LDS_FIGURE = "lds.png"

# <workdir>/report/
REPORT_INDEX = "index.html"
REPORT_PAGES = "images"


def safe_name(name: str) -> str:
  """A file-name-safe form of a case's name (runs of other characters become "-")."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).lstrip(".") or "-"


def slice_tag(case_id: str, z: int) -> str:
  """A file-name-safe name of a slice: `<case>_z<slice>`."""
  return f"{safe_name(case_id)}_z{int(z)}"


def image_tag(case_id: str, z: int) -> str:
  """A file-name-safe name of an explained image: `slice_tag` for a slice, the case alone
  for a volume (z = -1, `volumes.NO_SLICE`: a volume has no slice of its own)."""
  return safe_name(case_id) if int(z) == -1 else slice_tag(case_id, z)


def class_file(name: str) -> str:
  """A class name as it appears in file names ("NCR/NET" -> "NCR-NET")."""
  return name.replace("/", "-")


def local_panel(case_id: str, z: int, variant: str | None = None) -> str:
  """The file of a local explanation panel (the influence stage's; the LDS stage's per
  variant)."""
  return f"local_{variant + '_' if variant else ''}{case_id}_{z}.png"


def saliency_file(kind: str, case_id: str, z: int, class_name: str | None = None,
                  suffix: str = ".png") -> str:
  """A per-image file of the saliency stage: `grid`, `tracin`, `information_flow`, `maps`
  (a volume's, z = -1, named by its case alone)."""
  name = f"{kind}_{image_tag(case_id, z)}"
  return f"{name}_{class_file(class_name)}{suffix}" if class_name else f"{name}{suffix}"


# ----------------------------------------------------------------------------- manifests


@dataclasses.dataclass
class Manifest:
  """What a stage wrote and found; the stage layer adds timings and versions and writes it.

  Paths are relative to the workdir. A figure entry is {"path", "caption"} and, for a figure
  of one image and class, "kind", "case", "slice" and "class" (`saliency_grids` reads them).
  """

  stage: str
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  fingerprint: str = ""
  files: list[dict[str, str]] = dataclasses.field(default_factory=list)
  figures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  headline: dict[str, Any] = dataclasses.field(default_factory=dict)

  def file(self, path: str | os.PathLike, description: str) -> None:
    self.files.append({"path": str(path), "description": description})

  def figure(self, path: str | os.PathLike, caption: str, **about: Any) -> None:
    """Lists a figure; `about` (kind, case, slice, class) says what it shows."""
    self.figures.append({"path": str(path), "caption": caption, **about})

  def paths(self) -> list[str]:
    return [f["path"] for f in self.files + self.figures]

  @classmethod
  def from_record(cls, record: dict[str, Any]) -> "Manifest":
    """The Manifest of a written `manifest.json` (its timings and versions left out)."""
    return cls(record["stage"], record.get("settings", {}), record.get("fingerprint", ""),
               record.get("files", []), record.get("figures", []), record.get("headline", {}))


def manifest_path(workdir: str | os.PathLike, stage: str) -> pathlib.Path:
  return pathlib.Path(workdir) / stage / MANIFEST


def read_manifest(workdir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
  """The manifest of `stage` in `workdir`, or None if it has not finished there.

  The manifest is checked against its checksum, and every file it lists that is on disk
  against the checksum listed with it (`check_files`), so that what a reader goes on to
  read is what the stage wrote.

  Raises:
    outputs.DamagedFile: the manifest or a file it lists is damaged (named, with what was
      wrong).
  """
  path = manifest_path(workdir, stage)
  if not path.exists():
    return None
  hint = f"run the {stage} stage again"
  record = outputs.read_json(path, hint=hint)
  if not isinstance(record, dict):
    raise outputs.DamagedFile(path, "not a stage's manifest (no JSON object)", hint)
  return check_files(workdir, record)


def _entries(record: dict[str, Any]) -> list[dict[str, Any]]:
  return [e for key in ("files", "figures") for e in record.get(key, [])
          if isinstance(e, dict) and "path" in e]


def check_files(workdir: str | os.PathLike, record: dict[str, Any]) -> dict[str, Any]:
  """Checks the files a manifest lists against their checksums; returns the record.

  Listed files that are not on disk, and directories, are left to the caller. A manifest
  written before checksums were (files listed without one) is accepted: the checksums of
  its files are recorded in it now, and a line says so.

  Raises:
    outputs.DamagedFile: a listed file's size or bytes differ from its checksum.
  """
  workdir = pathlib.Path(workdir)
  hint = f"run the {record.get('stage')} stage again"
  unrecorded = []
  for entry in _entries(record):
    path = workdir / entry["path"]
    if not path.is_file():
      continue
    if "sha256" in entry:
      outputs.check_file(path, entry, hint=hint)
    else:
      unrecorded.append(entry)
  if unrecorded:
    for entry in unrecorded:
      entry.update(outputs.file_checksum(workdir / entry["path"]))
    path = manifest_path(workdir, record.get("stage", ""))
    outputs.say_once(path, f"{path} was written before checksums: its files are accepted "
                     "and their checksums recorded in it now.")
    with contextlib.suppress(OSError):  # a read-only run directory: accepted all the same
      outputs.write_json(path, record, unique=True, checksum=True)
  return record


def write_manifest(workdir: str | os.PathLike, record: dict[str, Any]) -> pathlib.Path:
  """Writes a finished stage's record (atomically, with its checksum) as
  `<workdir>/<stage>/manifest.json`.

  Each listed file's entry gets its checksum ("sha256", "size"), for readers to check it
  against; in place, so that the `Manifest` whose lists the record holds lists them as
  written (and as `read_manifest` reads them back).
  """
  workdir = pathlib.Path(workdir)
  path = manifest_path(workdir, record["stage"])
  path.parent.mkdir(parents=True, exist_ok=True)
  for entry in _entries(record):
    if (workdir / entry["path"]).is_file():
      entry.update(outputs.file_checksum(workdir / entry["path"]))
  outputs.write_json(path, record, checksum=True)
  return path


def read_manifests(workdir: str | os.PathLike,
                   stages: tuple[str, ...] | list[str] = STAGES) -> list[dict[str, Any]]:
  """The manifests of the stages that finished in `workdir`, in run order."""
  return [r for r in (read_manifest(workdir, s) for s in stages) if r is not None]


def saliency_grids(record: dict[str, Any] | None) -> dict[tuple[str, int, str], dict[str, Any]]:
  """The saliency stage's grids (its manifest's figures of kind `SALIENCY_GRID`) by
  (case, slice, class name)."""
  if not record:
    return {}
  return {(str(f["case"]), int(f["slice"]), str(f["class"])): f
          for f in record.get("figures", []) if f.get("kind") == SALIENCY_GRID}
