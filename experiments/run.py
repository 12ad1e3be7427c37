r"""Runs the tracin_jax experiment: `python -m experiments.run --flagfile=...`.

Intentionally kept short: flags are derived from the configs' fields (each setting's
default, help text and range are written once, in `tracin_jax`), then the library runs the
stages (`tracin_jax.experiment.run`). Examples:

  python -m experiments.run --flagfile=experiments/configs/demo.flags
  python -m experiments.run --flagfile=experiments/configs/brats19_paper.flags \
      --data_dir=/data/MICCAI_BraTS_2019_Data_Training --workdir=runs/brats19
"""

import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

from experiments import config_flags
from tracin_jax import experiment
from tracin_jax import settings
from tracin_jax import stages
from tracin_jax.data import brats
from tracin_jax.training import train as train_lib

_STAGES, _PROGRESS = config_flags.define_app_flags()
_CONFIG = config_flags.define_flags(experiment.ExperimentConfig)
flags.mark_flag_as_required("workdir")

# Bad input or a workdir in the way: the message says what and where; no traceback.
_USER_ERRORS = (brats.BratsDataError, train_lib.RunMismatchError, FileNotFoundError,
                settings.SettingsError, stages.StageError)


def _show_library_log() -> None:
  """The library's INFO lines on stdout, as plain lines (absl's handler shows warnings)."""
  logger = logging.getLogger("tracin_jax")
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("%(message)s"))
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    names = experiment.check_stages(_STAGES.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  _show_library_log()
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes.
  try:
    experiment.run(_CONFIG.value(), names, progress=_PROGRESS.value)
  except _USER_ERRORS as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
