"""Building the synthetic cohort's 3D volumes (`tracin_jax.data.volumes`), cold and cached,
beside the slices of the same cohort (`brats.load_cached`) as the baseline of the same run.

    PYTHONPATH=. python benchmarks/volumes_build.py --num_cases=40 --repeats=3

The cohort is made once (or reused) under the cache directory, as the experiment makes it.
Each round builds into a fresh cache directory (cold: every NIfTI read and preprocessed),
then reads that entry again (cached: the checksum verified and the .npz read); the slices
and the volumes take turns, so a busy spell on a shared machine hits both. Prints medians,
the volumes' input size and the cache entries' sizes, with the machine's load before and
after.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import statistics
import tempfile
import time

from absl import app, flags

from tracin_jax import data as data_lib
from tracin_jax.data import brats
from tracin_jax.data import synthetic
from tracin_jax.data import volumes

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_cases", 40, "Cases of the synthetic cohort (the experiment's: 40).")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic cohort.")
flags.DEFINE_float("spacing", 2.0, "Voxel size of the volumes, mm.")
flags.DEFINE_list("size", ["80", "96", "96"], "D, H, W of the volumes.")
flags.DEFINE_integer("repeats", 3, "Rounds; medians are reported.")
flags.DEFINE_integer("num_workers", None, "Threads reading cases (default min(4, CPUs)).")


def _load() -> str:
  return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def _entry_bytes(cache: pathlib.Path, prefix: str) -> int:
  return sum(p.stat().st_size for p in cache.glob(f"{prefix}_*.npz"))


def main(argv):
  del argv
  cache_dir = data_lib.default_cache_dir()
  root = data_lib.synthetic_root(cache_dir, FLAGS.num_cases, FLAGS.seed)
  print(f"cohort: {root} ({FLAGS.num_cases} synthetic cases); {_load()}")
  synthetic.ensure_cohort(root, FLAGS.num_cases, FLAGS.seed)
  config = volumes.VolumeConfig(spacing=FLAGS.spacing, size=tuple(int(n) for n in FLAGS.size))
  preprocess = brats.PreprocessConfig()
  loaders = {
      "slices": lambda cache: brats.load_cached(root, preprocess, cache, progress=False,
                                                num_workers=FLAGS.num_workers)[0],
      "volumes": lambda cache: volumes.load_cached(root, config, cache, progress=False,
                                                   num_workers=FLAGS.num_workers)[0],
  }
  times = {f"{name} {kind}": [] for name in loaders for kind in ("cold", "cached")}
  shapes, sizes = {}, {}
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="volumes_build_"))
  try:
    for r in range(FLAGS.repeats):
      for name, load in loaders.items():
        cache = scratch / f"{name}{r}"
        out, cold = _timed(lambda: load(cache))
        _, cached = _timed(lambda: load(cache))
        times[f"{name} cold"].append(cold)
        times[f"{name} cached"].append(cached)
        shapes[name] = out.images.shape
        sizes[name] = _entry_bytes(cache, "brats" if name == "slices" else name)
        del out
        shutil.rmtree(cache)
        print(f"  round {r}: {name} cold {cold:.2f} s, cached {cached:.2f} s; {_load()}")
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(f"\nvolumes: spacing {config.spacing} mm, size {config.size} -> images "
        f"{list(shapes['volumes'])} float32; slices: {list(shapes['slices'])}")
  for name, t in times.items():
    print(f"{name:16s} median {statistics.median(t):7.2f} s over {len(t)} "
          f"({', '.join(f'{x:.2f}' for x in t)})")
  for kind in ("cold", "cached"):
    ratio = statistics.median(times[f"volumes {kind}"]) / statistics.median(
        times[f"slices {kind}"])
    print(f"volumes / slices, {kind}: {ratio:.2f}x")
  for name, size in sizes.items():
    print(f"{name} cache entry: {size / 2**20:.0f} MiB")
  print(_load())


if __name__ == "__main__":
  app.run(main)
