"""The experiment: data, then the registered stages in order (the absl app is thin).

`ExperimentConfig` holds every setting (each declared once, with its flag, in the configs'
fields); `run(config, stages)` checks every setting, loads the data and runs the requested
stages through `tracin_jax.stages.run_stage`, which reuses finished work.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from typing import Any, Sequence

from tracin_jax import settings
from tracin_jax import stages as stages_lib
from tracin_jax.data import brats
from tracin_jax.data.slices import SliceSet
from tracin_jax.settings import setting
from tracin_jax.stages.influence import InfluenceConfig
from tracin_jax.stages.interpret import InterpretConfig
from tracin_jax.stages.saliency import SaliencyConfig
from tracin_jax.stages.validate import ValidateConfig
from tracin_jax.training.train import TrainConfig

logger = logging.getLogger("tracin_jax")


def default_cache_dir() -> pathlib.Path:
  """`$TRACIN_JAX_CACHE`, else `~/.cache/tracin_jax`."""
  env = os.environ.get("TRACIN_JAX_CACHE")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "tracin_jax"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data come from and how they are split.

  With `data_dir=None` the embedded synthetic cohort (`synthetic_cases` cases from
  `synthetic_seed`) is generated once under `cache_dir` and reused.
  """

  data_dir: str | None = setting(
      None, "BraTS 2019 root (with HGG/ and LGG/); unset: the embedded synthetic cohort.")
  synthetic_cases: int = setting(40, "Cases in the synthetic cohort.", minimum=2)
  synthetic_seed: int = setting(0, "Seed of the synthetic cohort.", minimum=0)
  cache_dir: str | None = setting(
      None, "Cache of cohorts and slices (unset: $TRACIN_JAX_CACHE or ~/.cache/tracin_jax).")
  preprocess: brats.PreprocessConfig = brats.PreprocessConfig()
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


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Every setting of a run: the data, resources, and each stage's config (by stage name)."""

  workdir: str | None = setting(None, "Directory of the run (outputs, checkpoints); "
                                "required.")
  memory_budget_mb: int = setting(
      1024, "Memory for per-example gradients held at once (MiB), in every stage.", minimum=1)
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  influence: InfluenceConfig = InfluenceConfig()
  interpret: InterpretConfig = InterpretConfig()
  saliency: SaliencyConfig = SaliencyConfig()
  validate: ValidateConfig = ValidateConfig()

  def stage_configs(self) -> dict[str, Any]:
    """Each registered stage's config, by stage name."""
    return {name: getattr(self, name) for name in stages_lib.list_stages()}


def load_data(config: DataConfig, *, progress: bool = True) -> tuple[SliceSet, SliceSet]:
  """Loads (through the slice cache) and splits the data by patient.

  Returns:
    (train slices, validation slices).
  """
  from tracin_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  cache_dir = pathlib.Path(config.cache_dir) if config.cache_dir else default_cache_dir()
  if config.synthetic:
    root = cache_dir / f"synthetic_{config.synthetic_cases}cases_seed{config.synthetic_seed}"
    logger.info(f"Synthetic cohort: {config.synthetic_cases} cases (seed "
                f"{config.synthetic_seed}) in {root}")
    root = synthetic.ensure_cohort(
        root, config.synthetic_cases, config.synthetic_seed, progress=progress)
  else:
    root = pathlib.Path(config.data_dir)
  slices, skipped = brats.load_cached(
      root, config.preprocess, cache_dir / "slices", skip_bad=config.skip_bad_cases,
      progress=progress)
  for case, reason in skipped:
    logger.info(f"Skipped case {case}: {reason}")
  train_ids, val_ids = brats.split_cases(
      slices.cases, num_val=config.num_val, val_fraction=config.val_fraction,
      seed=config.split_seed)
  train_set, val_set = slices.select_cases(train_ids), slices.select_cases(val_ids)
  logger.info(f"Data ({config.name}): {len(train_ids)} train cases ({len(train_set)} slices), "
              f"{len(val_ids)} validation cases ({len(val_set)} slices), images "
              f"{slices.images.shape[1]}x{slices.images.shape[2]}.")
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


def make_context(config: ExperimentConfig, train_set: SliceSet, val_set: SliceSet, *,
                 progress: bool = True) -> stages_lib.Context:
  """The context every stage of the run receives."""
  return stages_lib.Context(
      workdir=pathlib.Path(config.workdir), train_set=train_set, val_set=val_set,
      data_name=config.data.name, synthetic=config.data.synthetic,
      configs=config.stage_configs(),
      memory_budget_bytes=config.memory_budget_mb * 2**20, progress=progress)


def run(config: ExperimentConfig, stages: Sequence[str], *,
        progress: bool = True) -> dict[str, Any]:
  """Checks every setting, loads the data and runs `stages` in the registry's order.

  Returns:
    The stages' results by name.

  Raises:
    SettingsError: a setting outside its allowed values (before any work).
    ValueError: an unknown stage.
  """
  names = check_stages(stages)
  settings.check(config)
  if not config.workdir:
    raise settings.SettingsError("--workdir: required (the run's directory).")
  pathlib.Path(config.workdir).mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  train_set, val_set = load_data(config.data, progress=progress)
  logger.info(f"[data ready in {time.perf_counter() - t0:.0f} s]")
  context = make_context(config, train_set, val_set, progress=progress)
  for name in names:
    stages_lib.run_stage(stages_lib.get_stage(name, getattr(config, name)), context)
  return {name: context.results[name] for name in names}
