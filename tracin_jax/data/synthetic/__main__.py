"""Writes a synthetic cohort: `python -m tracin_jax.data.synthetic`.

  python -m tracin_jax.data.synthetic --out DIR --cases 40 --seed 0 [--workers 2]
  python -m tracin_jax.data.synthetic --out DIR --layout=brats2021   # or brats2020, brats2023

With `--layout` the cohort is made (or reused) in the cache, as a run makes it, and written
again under DIR in that release's layout (renamed, relabelled for 2023, images hard-linked).

Logs progress to stderr and prints the number of cases and the time taken.
"""

import logging
import time

from absl import app
from absl import flags

from tracin_jax import data
from tracin_jax.data.synthetic import cohort

_OUT = flags.DEFINE_string("out", None, "Cohort root directory (new or empty).", required=True)
_CASES = flags.DEFINE_integer("cases", 40, "Number of cases.")
_SEED = flags.DEFINE_integer("seed", 0, "Cohort seed.")
_WORKERS = flags.DEFINE_integer("workers", None, "Worker processes (default: up to 4 CPUs).")
_LGG_FRACTION = flags.DEFINE_float(
    "lgg_fraction", 0.0, "Share of lower-grade gliomas, written to LGG/.")
_LAYOUT = flags.DEFINE_enum(
    "layout", "brats2019", ["brats2019"] + list(cohort.LAYOUT_CASE_NAMES),
    "Layout of the files written: BraTS 2019 (HGG/, LGG/), or a later release's.")
_TEMPLATE_RESOLUTION = flags.DEFINE_integer(
    "template_resolution", 1, "MNI template resolution in mm (1 or 2).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # The library logs its progress; show it as plain lines (this replaces absl's handler).
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  start = time.perf_counter()
  out = _OUT.value
  if _LAYOUT.value != "brats2019" and _LGG_FRACTION.value:
    raise app.UsageError("--lgg_fraction: later releases than 2019 have no LGG/ folder; "
                         "use it with --layout=brats2019.")
  if _LAYOUT.value != "brats2019":  # the run's cohort, made once, in the cache
    out = str(data.synthetic_root(data.default_cache_dir(), _CASES.value, _SEED.value))
  dirs = cohort.generate_cohort(
      out, _CASES.value, _SEED.value, workers=_WORKERS.value,
      lgg_fraction=_LGG_FRACTION.value, template_resolution=_TEMPLATE_RESOLUTION.value)
  if _LAYOUT.value != "brats2019":
    dirs = cohort.write_in_layout(out, _OUT.value, _LAYOUT.value)
  print(f"{len(dirs)} synthetic cases in {_OUT.value} ({_LAYOUT.value} layout); "
        f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  app.run(main)
