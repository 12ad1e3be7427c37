"""Writes a synthetic cohort: `python -m tracin_jax.data.synthetic`.

  python -m tracin_jax.data.synthetic --out DIR --cases 40 --seed 0 [--workers 2]

Logs progress to stderr and prints the number of cases and the time taken.
"""

import logging
import time

from absl import app
from absl import flags

from tracin_jax.data.synthetic import cohort

_OUT = flags.DEFINE_string("out", None, "Cohort root directory (new or empty).", required=True)
_CASES = flags.DEFINE_integer("cases", 40, "Number of cases.")
_SEED = flags.DEFINE_integer("seed", 0, "Cohort seed.")
_WORKERS = flags.DEFINE_integer("workers", None, "Worker processes (default: up to 4 CPUs).")
_LGG_FRACTION = flags.DEFINE_float(
    "lgg_fraction", 0.0, "Share of lower-grade gliomas, written to LGG/.")
_TEMPLATE_RESOLUTION = flags.DEFINE_integer(
    "template_resolution", 1, "MNI template resolution in mm (1 or 2).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # The library logs its progress; show it as plain lines (this replaces absl's handler).
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  start = time.perf_counter()
  dirs = cohort.generate_cohort(
      _OUT.value, _CASES.value, _SEED.value, workers=_WORKERS.value,
      lgg_fraction=_LGG_FRACTION.value, template_resolution=_TEMPLATE_RESOLUTION.value)
  print(f"{len(dirs)} synthetic cases in {_OUT.value}; {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  app.run(main)
