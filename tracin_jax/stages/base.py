"""The contract every stage of the experiment follows, and what stages share.

A stage is a class registered by name (`register_stage`), with

  * `name`: its name on the command line and its directory under the workdir;
  * `config_cls`: a frozen dataclass of its settings (an instance is `stage.config`);
  * `needs`: the stages whose results it reads;
  * `fingerprint(context) -> str`: a hash of everything its outputs depend on;
  * `run(context) -> result`: computes and writes its outputs, returning a typed result
    whose `manifest` lists them. `StageBase.run` is `compute(context)`, the result, which
    writes nothing of it, then `write(context, result)`, its files and figures and the
    manifest listing them (the stage's `writes` declare each once, with its description);
  * `load(context) -> result`: the same result, read back from a finished run's files
    (the inverse of `write`);
  * optionally `supports_volumes`: whether it runs on volumes (`--spatial_dims=3`); by
    default not, and a 3D run naming it is refused before any work;
  * optionally `check(context)`: raises `StageError` (or another user error) if the stage
    cannot run in this workdir, before anything there is touched.

`run_stage` is the one way a stage is run: it reuses a finished stage whose fingerprint is
unchanged, otherwise checks that it may run, removes the stale manifest, runs the stage and
writes `<workdir>/<stage>/manifest.json` (settings, fingerprint, timings, versions, data, every
file with its description and every figure with its caption, headline numbers; the type
and the file names are `tracin_jax.rundir`'s). Later readers (the report, a notebook) read
manifests and the files they list through `rundir`, never a stage. A stage read back from
the workdir for a later one (`Context.need`) must have the fingerprint this run would give
it: outputs of other settings, data or checkpoints are refused, naming what differs. Its
files must match the checksums its manifest lists: a damaged file is refused, naming it,
and a finished stage whose file is damaged is run again rather than reused.

Work that can be saved in parts (TracIn per checkpoint, one retraining) goes through
`Parts`: a directory keyed by the fingerprint of the inputs, parts written atomically (with
their checksums) as they finish and reused on rerun, a damaged part named and computed
again, and a log line naming what changed when the inputs did.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import pathlib
import platform
import time
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import numpy as np

from tracin_jax import errors
from tracin_jax import outputs
from tracin_jax import rundir
from tracin_jax.data import slices as slices_lib
from tracin_jax.data.slices import SliceSet

logger = logging.getLogger("tracin_jax")

_PACKAGES = ("tracin_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


class StageError(errors.UserError, RuntimeError):
  """A stage cannot run: a needed stage has not run, or its inputs do not match."""


# ----------------------------------------------------------------------------- manifest

# The manifest and its reading live at the bottom (`tracin_jax.rundir`), where the report and
# other readers find them without importing a stage.
MANIFEST = rundir.MANIFEST
Manifest = rundir.Manifest
read_manifest = rundir.read_manifest


def versions() -> dict[str, str]:
  """Versions of Python and of the packages that decide the numbers."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  out = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def machine() -> dict[str, Any]:
  return {"platform": platform.platform(), "processor": platform.machine(),
          "cpus": os.cpu_count()}


# ----------------------------------------------------------------------------- context


@dataclasses.dataclass
class Context:
  """What every stage receives.

  Attributes:
    workdir: the run's directory.
    train_set, val_set: the training and validation slices (with their case and slice ids),
      or volumes (`VolumeSet`, one per case) in a run with `--spatial_dims=3`.
    data_name: "synthetic cohort" or "BraTS data in <dir>".
    synthetic: whether the data are the synthetic cohort.
    configs: every stage's config by stage name (a stage's `load` may need another's).
    memory_budget_bytes: per-example gradients held at once by any stage.
    progress: show progress bars.
    results: results of the stages run or loaded so far, by name.
  """

  workdir: pathlib.Path
  train_set: SliceSet
  val_set: SliceSet
  data_name: str = ""
  synthetic: bool = False
  configs: dict[str, Any] = dataclasses.field(default_factory=dict)
  memory_budget_bytes: int = 1 << 30
  progress: bool = True
  results: dict[str, Any] = dataclasses.field(default_factory=dict)
  _data_fingerprint: str | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    self.workdir = pathlib.Path(self.workdir)

  def log(self, message: str) -> None:
    logger.info(message)

  @property
  def suffix(self) -> str:
    """" (<data name>)" for figure titles."""
    return f" ({self.data_name})" if self.data_name else ""

  def stage_dir(self, name: str) -> pathlib.Path:
    path = self.workdir / name
    path.mkdir(parents=True, exist_ok=True)
    return path

  def data_fingerprint(self) -> str:
    """A hash of the training and validation slices: images, labels and ids."""
    if self._data_fingerprint is None:
      self._data_fingerprint = slices_lib.fingerprint(self.train_set, self.val_set)
    return self._data_fingerprint

  def need(self, name: str) -> Any:
    """The result of stage `name`: from this run, or loaded from the workdir.

    Raises:
      StageError: the stage has not finished in the workdir.
      outputs.DamagedFile: its manifest or a file it lists no longer matches its checksum
        (named; running that stage again rewrites it).
    """
    if name not in self.results:
      record = read_manifest(self.workdir, name)
      if record is None:
        raise StageError(f"{self.workdir} has no finished {name} stage: run it first "
                         f"(--stages=...,{name},...).")
      stage = get_stage(name, self.configs.get(name))
      result = stage.load(self)
      if record.get("fingerprint") != stage.fingerprint(self):
        raise StageError(_changed_since(self.workdir, stage, record))
      self.results[name] = result
    return self.results[name]


def _changed_since(workdir: pathlib.Path, stage: "Stage", record: dict[str, Any]) -> str:
  """Why a finished stage's outputs do not fit this run: its settings, else its inputs."""
  from tracin_jax import settings as settings_lib  # pylint: disable=g-import-not-at-top

  saved = record.get("settings", {})
  differ = []
  for leaf in settings_lib.leaves(type(stage.config)):
    there = saved
    for part in leaf.path:
      there = there.get(part) if isinstance(there, dict) else None
    here = outputs.plain(settings_lib.get(stage.config, leaf.path))
    if json.dumps(there) != json.dumps(here):
      differ.append(f"--{leaf.flag} ({there} there, {here} here)")
  what = (f"other settings: {', '.join(differ)}" if differ else
          "other inputs (the data, the checkpoints or an earlier stage changed since)")
  return (f"the {stage.name} stage in {workdir} was run with {what}. Run it again "
          f"(--stages=...,{stage.name},...), or use its settings.")


# ----------------------------------------------------------------------------- the contract


@runtime_checkable
class Stage(Protocol):
  """One stage of the experiment (see the module docstring)."""

  name: ClassVar[str]
  config_cls: ClassVar[type]
  needs: ClassVar[tuple[str, ...]]
  config: Any

  def fingerprint(self, context: Context) -> str:
    ...

  def run(self, context: Context) -> Any:
    ...

  def load(self, context: Context) -> Any:
    ...


_STAGES: dict[str, type] = {}


def register_stage(cls: type) -> type:
  """Class decorator: registers a stage class under `cls.name`."""
  if cls.name in _STAGES:
    raise ValueError(f"stage {cls.name!r} is already registered to {_STAGES[cls.name]}.")
  order = list(rundir.STAGES)
  for need in cls.needs:
    runs_before = (need in _STAGES and (need not in order or cls.name not in order
                                        or order.index(need) < order.index(cls.name)))
    if not runs_before:
      raise ValueError(f"stage {cls.name!r} needs {need!r}, which is not registered to run "
                       "before it.")
  _STAGES[cls.name] = cls
  return cls


def list_stages() -> tuple[str, ...]:
  """Registered stage names, in the order they run: `rundir.STAGES`, then stages registered
  by other code, in the order they were."""
  return (tuple(n for n in rundir.STAGES if n in _STAGES)
          + tuple(n for n in _STAGES if n not in rundir.STAGES))


def get_stage(name: str, config: Any = None) -> Stage:
  """The stage `name` with `config` (default: its config class's defaults).

  Raises:
    ValueError: no stage of that name.
  """
  if name not in _STAGES:
    raise ValueError(f"Unknown stage {name!r}; known stages: {', '.join(_STAGES)}.")
  cls = _STAGES[name]
  return cls(cls.config_cls() if config is None else config)


@dataclasses.dataclass(frozen=True)
class Output:
  """One of a stage's files or figures, declared once with what the manifest says of it.

  Attributes:
    name: the file's name in the stage's directory; a `str.format` template for files per
      image or class (`"maps_{tag}.npz"`).
    text: its description (a file) or caption (a figure), a template of the same fields.
    figure: whether the manifest lists it as a figure.
    in_workdir: it lies in the workdir itself, not in the stage's directory.
  """

  name: str
  text: str
  figure: bool = False
  in_workdir: bool = False

  def path(self, **fields: Any) -> str:
    return self.name.format(**fields)


class StageBase:
  """Shared plumbing of the stage classes: the config, its settings for the manifest, and
  `run` as the two halves a stage defines: `compute` (the result, written nowhere) and
  `write` (the result's files and the manifest listing them; `load` is its inverse)."""

  name: ClassVar[str] = ""
  config_cls: ClassVar[type] = type(None)
  needs: ClassVar[tuple[str, ...]] = ()
  writes: ClassVar[tuple[Output, ...]] = ()  # the files and figures it writes, declared once
  # Whether it takes volumes (a run with --spatial_dims=3); one that does not is refused
  # before any work of such a run.
  supports_volumes: ClassVar[bool] = False

  def __init__(self, config: Any = None):
    self.config = self.config_cls() if config is None else config
    if not isinstance(self.config, self.config_cls):
      raise TypeError(f"{self.name} stage: config must be a {self.config_cls.__name__}, "
                      f"got {type(self.config).__name__}.")

  def fingerprint(self, context: Context) -> str:
    """By default: the fingerprints of the stages it needs, its settings and the data.

    A stage whose outputs depend on more (checkpoints' contents, say) says so itself.
    """
    return inputs_key({
        "needs": {name: context.need(name).manifest.fingerprint for name in self.needs},
        "settings": self.fingerprint_settings(context), "data": context.data_fingerprint(),
        "data_name": context.data_name})

  def fingerprint_settings(self, context: Context) -> dict:
    """The settings that `fingerprint` keys on: all of them by default (a stage leaves out
    those that cannot change its outputs on this context's data)."""
    del context
    return outputs.plain(self.config)

  def manifest(self) -> Manifest:
    """An empty manifest of this stage with its settings; `run_stage` adds the fingerprint
    (computed once, before the stage runs)."""
    return Manifest(self.name, outputs.plain(self.config))

  def rel(self, name: str) -> str:
    """The path of one of the stage's files as a manifest lists it (workdir-relative)."""
    return f"{self.name}/{name}"

  def run(self, context: Context) -> Any:
    """The stage's result, computed and then written; its `manifest` lists what was."""
    result = self.compute(context)
    result.manifest = self.write(context, result)
    return result

  def compute(self, context: Context) -> Any:
    """The stage's result (with an empty manifest); writes no output."""
    raise NotImplementedError(f"the {self.name} stage defines run, not compute and write.")

  def write(self, context: Context, result: Any) -> Manifest:
    """Writes the result's files and figures; returns the manifest listing them."""
    raise NotImplementedError(f"the {self.name} stage defines run, not compute and write.")

  def list_output(self, context: Context, manifest: Manifest, output: Output, *,
                  about: dict[str, Any] | None = None, **fields: Any) -> pathlib.Path:
    """Lists `output` (its templates filled with `fields`) in `manifest`, a figure with what
    it shows (`about`: kind, case, slice, class); returns the path to write it to."""
    name = output.path(**fields)
    rel = name if output.in_workdir else self.rel(name)
    text = output.text.format(**fields)
    if output.figure:
      manifest.figure(rel, text, **(about or {}))
    else:
      manifest.file(rel, text)
    return context.workdir / rel if output.in_workdir else context.stage_dir(self.name) / name


def _finished(context: Context, stage: Stage, key: str) -> bool:
  try:
    manifest = read_manifest(context.workdir, stage.name)
  except outputs.DamagedFile as e:  # its outputs are computed again
    logger.warning(f"{stage.name}: {e.path}: {e.problem}; running the stage again.")
    return False
  if manifest is None or manifest.get("fingerprint") != key:
    return False
  listed = [f["path"] for f in manifest.get("files", []) + manifest.get("figures", [])]
  return all((context.workdir / p).exists() for p in listed)


def run_stage(stage: Stage, context: Context) -> Any:
  """Runs `stage` (or reuses its finished outputs) and writes its manifest.

  Returns:
    The stage's result, also stored in `context.results`.
  """
  for need in stage.needs:
    context.need(need)
  t0 = time.perf_counter()
  key = stage.fingerprint(context)
  reused = _finished(context, stage, key)
  if reused:
    context.log(f"{stage.name}: inputs and settings unchanged since the finished run in "
                f"{context.workdir / stage.name}; reusing it.")
    result = stage.load(context)
  else:
    check = getattr(stage, "check", None)
    if check is not None:  # refuses before the finished outputs' manifest is removed
      check(context)
    (context.workdir / stage.name / MANIFEST).unlink(missing_ok=True)
    result = stage.run(context)
  seconds = time.perf_counter() - t0
  context.results[stage.name] = result
  if not reused:
    result.manifest.fingerprint = key
    write_manifest(context, result.manifest, seconds)
  context.log(f"[{stage.name} stage {'reused' if reused else 'done'} in {seconds:.0f} s]")
  return result


def write_manifest(context: Context, manifest: Manifest, seconds: float) -> None:
  """Writes `<workdir>/<stage>/manifest.json` from the stage's `Manifest`."""
  missing = [p for p in manifest.paths() if not (context.workdir / p).exists()]
  if missing:
    raise StageError(f"{manifest.stage} stage: its manifest lists files it did not write: "
                     f"{missing}.")
  record = {
      "stage": manifest.stage,
      "data": context.data_name,
      "synthetic": context.synthetic,
      "fingerprint": manifest.fingerprint,
      "settings": manifest.settings,
      "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "seconds": round(seconds, 1),
      "versions": versions(),
      "machine": machine(),
      "headline": outputs.plain(manifest.headline),
      "files": manifest.files,
      "figures": manifest.figures,
  }
  rundir.write_manifest(context.workdir, record)


# ----------------------------------------------------------------------------- parts


def inputs_key(inputs: dict[str, Any]) -> str:
  return hashlib.sha256(
      json.dumps(outputs.plain(inputs), sort_keys=True).encode()).hexdigest()[:16]


class Parts:
  """Work saved in named parts, keyed by what it depends on, reused on rerun.

  Parts live in `<directory>/<key>/`, where key hashes `inputs` (a JSON-able dict of the
  settings and input hashes the parts depend on; kept beside them as `inputs.json`). A part
  is an array (`.npy`) or a JSON dict (`.json`), written atomically with its checksum
  (`outputs.atomic_path`) when it is finished, so an interrupted computation resumes at
  the first missing part; a part that no longer matches its checksum is named in a
  warning, removed and computed again. When earlier parts exist under another key, a log
  line names the inputs that changed.
  """

  def __init__(self, directory: str | os.PathLike, inputs: dict[str, Any], *,
               what: str = "parts"):
    self.root = pathlib.Path(directory)
    self.inputs = outputs.plain(inputs)
    self.key = inputs_key(inputs)
    self.dir = self.root / self.key
    self.what = what
    fresh = not self.dir.exists()
    self.dir.mkdir(parents=True, exist_ok=True)
    if fresh:
      outputs.write_json(self.dir / "inputs.json", self.inputs)
      self._say_what_changed()

  def _say_what_changed(self) -> None:
    others = [p for p in self.root.glob("*/inputs.json") if p.parent != self.dir]
    if not others:
      return
    latest = max(others, key=lambda p: p.stat().st_mtime)
    try:
      before = json.loads(latest.read_text())
    except json.JSONDecodeError:
      return
    changed = sorted(k for k in set(before) | set(self.inputs)
                     if json.dumps(before.get(k), sort_keys=True)
                     != json.dumps(self.inputs.get(k), sort_keys=True))
    logger.info(f"{self.what}: inputs changed since the parts in {latest.parent} were saved "
                f"({', '.join(changed)}); computing them anew in {self.dir}.")

  def _path(self, name: str, suffix: str) -> pathlib.Path:
    return self.dir / f"{name}{suffix}"

  def _damaged(self, e: outputs.DamagedFile) -> None:
    """Says what is wrong with a saved part and removes it, to be computed again."""
    logger.warning(f"{self.what}: {e.path}: {e.problem}; computing it again.")
    outputs.remove(e.path)

  def _sound(self, path: pathlib.Path) -> bool:
    """Whether a part is saved at `path` and matches its checksum (a damaged one is said
    and removed)."""
    if not path.exists():
      return False
    try:
      outputs.verify(path)
    except outputs.DamagedFile as e:
      self._damaged(e)
      return False
    return True

  def has(self, name: str) -> bool:
    """Whether the part `name` is finished (saved, and sound: checked against its
    checksum, not parsed)."""
    return self._sound(self._path(name, ".npy")) or self._sound(self._path(name, ".json"))

  def load(self, name: str) -> np.ndarray | dict | None:
    """The part `name`, or None if it is not finished (or was damaged: that is said, and
    the part removed to be computed again)."""
    for suffix in (".npy", ".json"):
      path = self._path(name, suffix)
      if self._sound(path):
        try:
          return outputs.load_npy(path) if suffix == ".npy" else outputs.read_json(path)
        except outputs.DamagedFile as e:  # sound bytes that do not parse: an old file
          self._damaged(e)
    return None

  def save(self, name: str, value: np.ndarray | dict) -> None:
    """Saves the part `name` atomically, with its checksum."""
    if isinstance(value, dict):
      outputs.write_json(self._path(name, ".json"), value, checksum=True)
    else:
      outputs.save_npy(self._path(name, ".npy"), value, checksum=True)

  def get(self, name: str, compute: Callable[[], Any], *, label: str | None = None) -> Any:
    """The part `name`, computed by `compute()` and saved if it is not finished."""
    label = label or name
    part = self.load(name)
    if part is not None:
      logger.info(f"{self.what}: {label} reused.")
      return part
    t0 = time.perf_counter()
    part = compute()
    self.save(name, part)
    logger.info(f"{self.what}: {label} done in {time.perf_counter() - t0:.1f} s.")
    return part
