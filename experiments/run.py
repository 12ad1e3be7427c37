r"""Runs the tracin_jax experiment: `python -m experiments.run --flagfile=...`.

Intentionally kept short: flags are derived from the configs' fields (each setting's
default, help text and range are written once, in `tracin_jax`), then the library runs the
stages (`tracin_jax.experiment.run`). Examples:

  python -m experiments.run --flagfile=experiments/configs/demo.flags
  python -m experiments.run --flagfile=experiments/configs/brats19_paper.flags \
      --data_dir=/data/MICCAI_BraTS_2019_Data_Training --workdir=runs/brats19

A bad flag, file or run ends in one line on stderr, `error: <what and where>`, and exit
status 1; `TRACIN_JAX_DEBUG=1` shows the traceback instead.
"""

import errno
import logging
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

from experiments import config_flags
from tracin_jax import errors
from tracin_jax import experiment
from tracin_jax import settings
from tracin_jax import stages as stages_lib


def _define(flag_values: flags.FlagValues):
  """(stages, progress, config) flag holders of the run, defined in `flag_values`."""
  stages, progress = config_flags.define_app_flags(flag_values)
  return stages, progress, config_flags.define_flags(experiment.ExperimentConfig, flag_values)


_FLAGS = _define(flags.FLAGS)


class _StdoutHandler(logging.StreamHandler):
  """Writes to whatever `sys.stdout` is when a record is emitted; warnings say so."""

  def __init__(self):
    super().__init__(sys.stdout)

  @property
  def stream(self):
    return sys.stdout

  @stream.setter
  def stream(self, value):
    pass

  def format(self, record):
    text = super().format(record)
    return f"warning: {text}" if record.levelno >= logging.WARNING else text


def _show_library_log() -> None:
  """The library's INFO lines on stdout, as plain lines (once per process); asyncio's
  reports of Orbax's reads abandoned after a damaged checkpoint's error are not shown (the
  error itself is)."""
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  logger = logging.getLogger("tracin_jax")
  if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


def _message(e: BaseException) -> str:
  """One line for a user error; "" for anything else (a bug: its traceback is shown)."""
  if isinstance(e, errors.USER_ERRORS):
    text = str(e)
  elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    text = f"no space left on device writing {e.filename or 'the outputs'}"
  elif isinstance(e, PermissionError):
    text = f"permission denied: {e.filename or e}"
  elif isinstance(e, OSError):
    text = f"{e.strerror}: {e.filename}" if e.filename else str(e)
  else:
    return ""
  return " ".join(text.split())


def execute(stages, progress, config, argv) -> int:
  """Runs the parsed flags' stages; returns the exit status (user errors: one line, 1)."""
  debug = os.environ.get("TRACIN_JAX_DEBUG", "") not in ("", "0")
  try:
    if len(argv) > 1:
      raise settings.SettingsError(f"unexpected argument {' '.join(argv[1:])!r} (flags are "
                                 "written --name=value).")
    _show_library_log()
    experiment.run(config.value(), stages.value, progress=progress.value)
  except Exception as e:  # pylint: disable=broad-except
    text = _message(e)
    if debug or not text:
      raise
    sys.stderr.write(f"error: {text}\n")
    return 1
  return 0


def cli(argv) -> int:
  """The command line in this process, with its own flags (for tests); the exit status."""
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every file it writes.
  flag_values = flags.FlagValues()
  holders = _define(flag_values)
  try:
    rest = flag_values(list(argv))
  except flags.Error as e:
    sys.stderr.write(f"error: {e}\n")
    return 1
  return execute(*holders, rest)


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(1)


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every file it writes.
  sys.exit(execute(*_FLAGS, argv))


_HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-?")


def usage() -> str:
  """`--help`: how to run, the run's own flags, then every setting grouped by stage."""
  run_flags = [
      "  --flagfile=FILE",
      "      Read flags from FILE (one --name=value per line), e.g. "
      "experiments/configs/demo.flags; later flags override it.",
      "  --stages (default: train)",
      f"      Stages to run, of {', '.join(stages_lib.list_stages())} (run in that order; "
      "the report is written at the end of every run).",
      "  --[no]progress (default: true)",
      "      Show progress bars.",
  ]
  return "\n".join([__doc__.strip(), "", "Flags of the run:", *run_flags, "",
                    config_flags.help_text(experiment.ExperimentConfig), ""])


if __name__ == "__main__":
  if any(a in _HELP_FLAGS for a in sys.argv[1:]):
    sys.stdout.write(usage())
    sys.exit(0)
  app.run(main, flags_parser=_parse)
