"""The experiment: data, then the registered stages in order (the absl app is thin).

`ExperimentConfig` holds every setting (each declared once, with its flag, in the configs'
fields); `run(config, stages)` checks every setting, loads the data and runs the requested
stages through `tracin_jax.stages.run_stage`, which reuses finished work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import time
from typing import Any, Sequence

from tracin_jax import rundir
from tracin_jax import settings
from tracin_jax import data as data_lib
from tracin_jax import stages as stages_lib
from tracin_jax.data import brats
from tracin_jax.data import volumes as volumes_lib
from tracin_jax.data.slices import SliceSet
from tracin_jax.data.volumes import VolumeSet
from tracin_jax.settings import setting

logger = logging.getLogger("tracin_jax")


default_cache_dir = data_lib.default_cache_dir


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data come from and how they are split.

  With `data_dir=None` the embedded synthetic cohort (`synthetic_cases` cases from
  `synthetic_seed`) is generated once under `cache_dir` and reused. `preprocess` makes the
  axial slices of a 2D run, `volumes` the whole volumes of a 3D run (`--spatial_dims=3`).
  """

  data_dir: str | None = setting(
      None, "BraTS root of any layout since 2019 (2019: holding HGG/ and LGG/; 2020, 2021, "
      "2023: holding the case folders); unset: the embedded synthetic cohort.")
  synthetic_cases: int = setting(40, "Cases in the synthetic cohort.", minimum=2)
  synthetic_seed: int = setting(0, "Seed of the synthetic cohort.", minimum=0)
  cache_dir: str | None = setting(
      None, "Cache of cohorts and slices (unset: $TRACIN_JAX_CACHE or ~/.cache/tracin_jax).")
  preprocess: brats.PreprocessConfig = brats.PreprocessConfig()
  volumes: volumes_lib.VolumeConfig = volumes_lib.VolumeConfig()
  val_fraction: float = setting(52 / 259, "Validation share of the patients.", minimum=0.0,
                                maximum=1.0, exclusive=True)
  num_val: int | None = setting(None, "Validation patients (overrides --val_fraction).",
                                minimum=1)
  split_seed: int = setting(0, "Seed of the patient split.")
  skip_bad_cases: bool = setting(False, "Skip unreadable cases, listing them.")

  @property
  def synthetic(self) -> bool:
    return self.data_dir is None

  @property
  def name(self) -> str:
    return "synthetic cohort" if self.synthetic else f"BraTS data in {self.data_dir}"


def _stage_configs(self) -> dict[str, Any]:
  """Each registered stage's config, by stage name."""
  return {name: getattr(self, name) for name in stages_lib.list_stages()}


def _experiment_config_cls() -> type:
  """`ExperimentConfig`, derived from the stage registry: the run's own settings, the
  data's, then one field per registered stage (named as the stage, its `config_cls` with
  its defaults), in run order. A new stage adds its field by being registered."""
  fields: list[tuple[str, Any, Any]] = [
      ("workdir", str | None, setting(None, "Directory of the run (outputs, checkpoints); "
                                      "required.")),
      ("memory_budget_mb", int, setting(
          1024, "Memory for per-example gradients held at once (MiB), in every stage.",
          minimum=1)),
      ("data", DataConfig, dataclasses.field(default=DataConfig())),
  ]
  for name in stages_lib.list_stages():
    config_cls = stages_lib.get_stage(name).config_cls
    fields.append((name, config_cls, dataclasses.field(default=config_cls())))
  cls = dataclasses.make_dataclass(
      "ExperimentConfig", fields, frozen=True,
      namespace={"stage_configs": _stage_configs, "__module__": __name__})
  cls.__doc__ = ("Every setting of a run: the data, resources, and each stage's config (by "
                 "stage name: " + ", ".join(stages_lib.list_stages()) + ").")
  return cls


ExperimentConfig = _experiment_config_cls()


def load_data(config: DataConfig, *, spatial_dims: int = 2,
              progress: bool = True) -> tuple[SliceSet, SliceSet] | tuple[VolumeSet, VolumeSet]:
  """Loads (through the slice or volume cache) and splits the data by patient.

  Args:
    config: the data's settings.
    spatial_dims: 2: axial slices (`config.preprocess`); 3: one volume per case
      (`config.volumes`), cached beside the slices.
    progress: show progress bars.

  Returns:
    (train slices, validation slices), or with `spatial_dims=3` (train volumes, validation
    volumes).
  """
  from tracin_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  cache_dir = pathlib.Path(config.cache_dir) if config.cache_dir else default_cache_dir()
  if config.synthetic:
    root = data_lib.synthetic_root(cache_dir, config.synthetic_cases, config.synthetic_seed)
    logger.info(f"Synthetic cohort: {config.synthetic_cases} cases (seed "
                f"{config.synthetic_seed}) in {root}")
    root = synthetic.ensure_cohort(
        root, config.synthetic_cases, config.synthetic_seed, progress=progress)
  else:
    root = pathlib.Path(config.data_dir)
    groups = config.volumes.groups if spatial_dims == 3 else config.preprocess.groups
    _check_split(config, len(brats.list_cases(root, groups)), f"in {root}")
  if spatial_dims == 3:
    slices, skipped = volumes_lib.load_cached(
        root, config.volumes, cache_dir / "slices", skip_bad=config.skip_bad_cases,
        progress=progress)
  else:
    slices, skipped = brats.load_cached(
        root, config.preprocess, cache_dir / "slices", skip_bad=config.skip_bad_cases,
        progress=progress)
  if skipped:
    logger.info(f"{len(skipped)} case(s) skipped: {', '.join(c for c, _ in skipped)}.")
  _check_split(config, len(slices.cases), "after skipping bad cases" if skipped else "loaded")
  train_ids, val_ids = brats.split_cases(
      slices.cases, num_val=config.num_val, val_fraction=config.val_fraction,
      seed=config.split_seed)
  train_set, val_set = slices.select_cases(train_ids), slices.select_cases(val_ids)
  unit = "volumes" if spatial_dims == 3 else "slices"
  shape = "x".join(str(n) for n in slices.images.shape[1:-1])
  logger.info(f"Data ({config.name}): {len(train_ids)} train cases ({len(train_set)} {unit}), "
              f"{len(val_ids)} validation cases ({len(val_set)} {unit}), images {shape}.")
  return train_set, val_set


def check_stages(names: Sequence[str]) -> list[str]:
  """The requested stages in run order.

  Raises:
    ValueError: an unknown stage (the message lists the known ones).
  """
  known = stages_lib.list_stages()
  unknown = [s for s in names if s not in known]
  if unknown:
    raise ValueError(f"--stages: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(known)}.")
  return [s for s in known if s in names]


def _takes_volumes(name: str) -> bool:
  return bool(getattr(stages_lib.get_stage(name), "supports_volumes", False))


def check_volume_stages(config: ExperimentConfig, names: Sequence[str]) -> None:
  """Refuses, before any work, the stages that do not take volumes yet in a 3D run.

  Raises:
    SettingsError: `--spatial_dims=3` with a stage whose `supports_volumes` is false.
  """
  if config.train.model.spatial_dims != 3:
    return
  refused = [n for n in names if not _takes_volumes(n)]
  if refused:
    supported = [n for n in stages_lib.list_stages() if _takes_volumes(n)]
    raise settings.SettingsError(
        f"--stages={','.join(names)}: {', '.join(refused)} not supported yet with "
        f"--spatial_dims=3 (volumes); run {','.join(supported)}.")


def make_context(config: ExperimentConfig, train_set: SliceSet | VolumeSet,
                 val_set: SliceSet | VolumeSet, *,
                 progress: bool = True) -> stages_lib.Context:
  """The context every stage of the run receives."""
  return stages_lib.Context(
      workdir=pathlib.Path(config.workdir), train_set=train_set, val_set=val_set,
      data_name=config.data.name, synthetic=config.data.synthetic,
      configs=config.stage_configs(),
      memory_budget_bytes=config.memory_budget_mb * 2**20, progress=progress)


def _check_directory(flag: str, path: pathlib.Path) -> None:
  """A directory the run may create and write: not a file, and writable where it exists."""
  existing = path
  while not existing.exists():
    if existing.is_symlink() or existing == existing.parent:  # a dangling link, or no root
      break
    existing = existing.parent
  if path.exists() and not path.is_dir():
    raise settings.SettingsError(f"{flag}={path}: is a file, not a directory.")
  if existing.exists() and not existing.is_dir():
    raise settings.SettingsError(f"{flag}={path}: {existing} is a file, not a directory.")
  if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
    raise settings.SettingsError(
        f"{flag}={path}: {existing} is not writable (permission denied).")


def check_config(config: ExperimentConfig) -> None:
  """Checks every setting and how they fit together, before any work.

  Raises:
    SettingsError: naming the flag, its value and what is allowed.
  """
  settings.check(config)
  if not config.workdir:
    raise settings.SettingsError("--workdir: required (the run's directory).")
  _check_directory("--workdir", pathlib.Path(config.workdir))
  _check_directory("--cache_dir", pathlib.Path(config.data.cache_dir) if config.data.cache_dir
                   else default_cache_dir())
  data, train = config.data, config.train
  if data.data_dir is not None and not pathlib.Path(data.data_dir).is_dir():
    what = "is not a directory" if pathlib.Path(data.data_dir).exists() else "does not exist"
    raise settings.SettingsError(f"--data_dir={data.data_dir}: {what} (the BraTS root: "
                                 "HGG/ and LGG/ for 2019, the case folders for 2020 on).")
  multiple = 2 ** train.model.depth
  pre = data.preprocess
  for flag, size in (("--image_size", pre.image_size),
                     ("--crop_size", pre.crop_size if pre.image_size is None else None)):
    if size is not None and size % multiple and train.model.spatial_dims == 2:
      raise settings.SettingsError(
          f"{flag}={size}: must be a multiple of 2**depth = {multiple} (--depth="
          f"{train.model.depth}), e.g. {max(multiple, size // multiple * multiple)}.")
  box = data.volumes.size
  if train.model.conv3d != "direct" and train.model.spatial_dims != 3:
    raise settings.SettingsError(
        f"--conv3d={train.model.conv3d}: computes a 3D model's 3x3x3 convolutions; it needs "
        f"--spatial_dims=3 (this run trains on slices, --spatial_dims="
        f"{train.model.spatial_dims}).")
  if train.model.spatial_dims == 3:
    if box is None:
      raise settings.SettingsError(
          f"--volume_size: required with --spatial_dims=3 (D,H,W, each a multiple of 2**depth "
          f"= {multiple}): the whole volumes' sides are not known before they are read.")
    bad = [n for n in box if n % multiple]
    if bad:
      fixed = ",".join(str(max(multiple, n // multiple * multiple)) for n in box)
      raise settings.SettingsError(
          f"--volume_size={','.join(map(str, box))}: each side must be a multiple of 2**depth "
          f"= {multiple} (--depth={train.model.depth}), e.g. {fixed}.")
  epochs = train.num_epochs
  adam = train.optimizer.adam_epochs
  chosen = config.influence.checkpoint_epochs or ()
  if len(set(chosen)) != len(chosen):
    raise settings.SettingsError(
        f"--checkpoint_epochs={','.join(map(str, chosen))}: an epoch is repeated.")
  for epoch in chosen:
    if epoch > epochs:
      raise settings.SettingsError(
          f"--checkpoint_epochs={','.join(map(str, chosen))}: epoch {epoch} is beyond the "
          f"run's {epochs} epochs (--adam_epochs={adam} + --sgd_epochs={train.sgd_epochs}).")
    if epoch <= adam and not config.influence.allow_adam_checkpoints:
      raise settings.SettingsError(
          f"--checkpoint_epochs={','.join(map(str, chosen))}: epoch {epoch} is an Adam "
          f"epoch (--adam_epochs={adam}); TracIn assumes plain SGD. Choose epochs "
          f"{adam + 1} to {epochs}, or pass --allow_adam_checkpoints to use it anyway (the "
          "outputs record it).")
  start = config.validate.from_epoch
  if start is not None and start >= epochs:
    raise settings.SettingsError(
        f"--retrain_from_epoch={start}: must be before the run's last epoch ({epochs}).")
  if data.synthetic and data.num_val is not None and data.num_val >= data.synthetic_cases:
    raise settings.SettingsError(
        f"--num_val={data.num_val}: the synthetic cohort has {data.synthetic_cases} cases "
        "(--synthetic_cases); at most "
        f"{data.synthetic_cases - 1}, so that one is left to train on.")


def _check_split(config: DataConfig, num_cases: int, where: str) -> None:
  """Raises SettingsError if the split of `num_cases` cases leaves no training case."""
  num_val = config.num_val
  if num_val is None:
    num_val = int(round(config.val_fraction * num_cases))
    if num_val >= num_cases:
      raise settings.SettingsError(
          f"--val_fraction={config.val_fraction:g}: puts all {num_cases} cases {where} in "
          "validation; none is left to train on.")
  elif num_val >= num_cases:
    raise settings.SettingsError(
        f"--num_val={num_val}: the data have {num_cases} cases ({where}); at most "
        f"{num_cases - 1}, so that one is left to train on.")


def _remove_empty_dirs(path: pathlib.Path, keep: set[pathlib.Path]) -> None:
  """Removes the empty directories in and under `path` that are not in `keep` (those that
  existed before the run)."""
  if not path.is_dir():
    return
  for p in sorted([path, *path.rglob("*")], key=lambda p: len(p.parts), reverse=True):
    if p.is_dir() and not p.is_symlink() and p not in keep:
      with contextlib.suppress(OSError):
        p.rmdir()


REPORT = rundir.REPORT


def run(config: ExperimentConfig, stages: Sequence[str], *,
        progress: bool = True) -> dict[str, Any]:
  """Checks every setting, loads the data and runs `stages` in the registry's order, then
  the report (`<workdir>/report/index.html`).

  Nothing is written before every setting is checked; a run that fails leaves no empty
  directory behind.

  Returns:
    The stages' results by name.

  Raises:
    SettingsError: a setting outside its allowed values (before any work).
    ValueError: an unknown stage.
  """
  try:
    names = check_stages(stages)
  except ValueError as e:
    raise settings.SettingsError(str(e)) from None
  check_config(config)
  check_volume_stages(config, names)
  workdir = pathlib.Path(config.workdir)
  existed = ({workdir, *(p for p in workdir.rglob("*") if p.is_dir())}
             if workdir.is_dir() else set())
  try:
    t0 = time.perf_counter()
    train_set, val_set = load_data(config.data, spatial_dims=config.train.model.spatial_dims,
                                   progress=progress)
    logger.info(f"[data ready in {time.perf_counter() - t0:.0f} s]")
    context = make_context(config, train_set, val_set, progress=progress)
    for name in names:
      stages_lib.run_stage(stages_lib.get_stage(name, getattr(config, name)), context)
    if REPORT not in names:  # every run ends with its report
      stages_lib.run_stage(stages_lib.get_stage(REPORT, config.report), context)
  except BaseException:
    _remove_empty_dirs(workdir, keep=existed)
    raise
  index = context.results[REPORT].index.resolve()
  logger.info(f"Report of the run (open it in a browser): {index.as_uri()}")
  return {name: context.results[name] for name in names}
