"""The data: BraTS layouts and their loader, slices, the synthetic cohort, patient space."""

import os
import pathlib


def default_cache_dir() -> pathlib.Path:
  """Where cohorts and slices are cached: `$TRACIN_JAX_CACHE`, else `~/.cache/tracin_jax`."""
  env = os.environ.get("TRACIN_JAX_CACHE")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "tracin_jax"


def synthetic_root(cache_dir: str | os.PathLike, num_cases: int, seed: int) -> pathlib.Path:
  """The folder of the synthetic cohort of these settings in a cache."""
  return pathlib.Path(cache_dir) / f"synthetic_{num_cases}cases_seed{seed}"
