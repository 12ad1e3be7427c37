"""The experiment's stages as library functions (the absl app in `experiments/` is thin).

`ExperimentConfig` holds every setting; `run(config)` runs the requested stages in order.
Each stage writes under `config.workdir` and reuses finished work when rerun.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any, Callable, Sequence

from tracin_jax.data import brats
from tracin_jax.data import synthetic
from tracin_jax.data.slices import SliceSet
from tracin_jax.influence import stage as influence_stage_lib
from tracin_jax.interpret import stage as interpret_stage_lib
from tracin_jax.interpret import validate as validate_stage_lib
from tracin_jax.training import train as train_lib

STAGES = ("train", "influence", "interpret", "validate")


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

  data_dir: str | None = None
  synthetic_cases: int = 40
  synthetic_seed: int = 0
  cache_dir: str | None = None
  preprocess: brats.PreprocessConfig = brats.PreprocessConfig()
  val_fraction: float = 52 / 259
  num_val: int | None = None
  split_seed: int = 0
  skip_bad_cases: bool = False

  @property
  def synthetic(self) -> bool:
    return self.data_dir is None

  @property
  def name(self) -> str:
    return "synthetic cohort" if self.synthetic else f"BraTS data in {self.data_dir}"


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  workdir: str
  data: DataConfig = DataConfig()
  train: train_lib.TrainConfig = train_lib.TrainConfig()
  influence: influence_stage_lib.InfluenceConfig = influence_stage_lib.InfluenceConfig()
  interpret: interpret_stage_lib.InterpretConfig = interpret_stage_lib.InterpretConfig()
  validate: validate_stage_lib.ValidateConfig = validate_stage_lib.ValidateConfig()


def load_data(config: DataConfig, *, log: Callable[[str], None] = print,
              progress: bool = True) -> tuple[SliceSet, SliceSet]:
  """Loads (through the slice cache) and splits the data by patient.

  Returns:
    (train slices, validation slices).
  """
  cache_dir = pathlib.Path(config.cache_dir) if config.cache_dir else default_cache_dir()
  if config.synthetic:
    root = cache_dir / f"synthetic_{config.synthetic_cases}cases_seed{config.synthetic_seed}"
    log(f"Synthetic cohort: {config.synthetic_cases} cases (seed {config.synthetic_seed}) "
        f"in {root}")
    root = synthetic.ensure_cohort(
        root, config.synthetic_cases, config.synthetic_seed, progress=progress)
  else:
    root = pathlib.Path(config.data_dir)
  slices, skipped = brats.load_cached(
      root, config.preprocess, cache_dir / "slices", skip_bad=config.skip_bad_cases,
      progress=progress)
  for case, reason in skipped:
    log(f"Skipped case {case}: {reason}")
  train_ids, val_ids = brats.split_cases(
      slices.cases, num_val=config.num_val, val_fraction=config.val_fraction,
      seed=config.split_seed)
  train_set, val_set = slices.select_cases(train_ids), slices.select_cases(val_ids)
  log(f"Data ({config.name}): {len(train_ids)} train cases ({len(train_set)} slices), "
      f"{len(val_ids)} validation cases ({len(val_set)} slices), images "
      f"{slices.images.shape[1]}x{slices.images.shape[2]}.")
  return train_set, val_set


def train_stage(config: ExperimentConfig, train_set: SliceSet, val_set: SliceSet, *,
                log: Callable[[str], None] = print, progress: bool = True):
  """Trains (or resumes or reuses) the model of the run in `config.workdir`."""
  result = train_lib.train(
      config.train, train_set, val_set, config.workdir, progress=progress,
      dataset=config.data.name, log=log)
  val = result.metrics.get("validation", {})
  log("Validation hard Dice (" + config.data.name + "): " +
      ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
  log(f"Wrote {pathlib.Path(config.workdir) / train_lib.METRICS_FILE} and "
      f"{pathlib.Path(config.workdir) / train_lib.CURVES_FILE}")
  return result


def run(config: ExperimentConfig, stages: Sequence[str], *,
        log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
  """Runs `stages` (a subset of STAGES, in that order) and returns their results."""
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"Unknown stage(s) {unknown}; known stages: {', '.join(STAGES)}.")
  pathlib.Path(config.workdir).mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  train_set, val_set = load_data(config.data, log=log, progress=progress)
  log(f"[data ready in {time.perf_counter() - t0:.0f} s]")
  common = dict(dataset=config.data.name, progress=progress, log=log)
  stage_fns = {
      "train": lambda: train_stage(config, train_set, val_set, log=log, progress=progress),
      "influence": lambda: influence_stage_lib.run_influence_stage(
          config.workdir, train_set, val_set, config.influence, **common),
      "interpret": lambda: interpret_stage_lib.run_interpret_stage(
          config.workdir, train_set, val_set, config.interpret, **common),
      "validate": lambda: validate_stage_lib.run_validate_stage(
          config.workdir, train_set, val_set, config.validate, **common),
  }
  results: dict[str, Any] = {}
  for name in STAGES:
    if name in stages:
      t0 = time.perf_counter()
      results[name] = stage_fns[name]()
      log(f"[{name} stage done in {time.perf_counter() - t0:.0f} s]")
  return results
