r"""Runs the tracin_jax experiment: `tracin-jax run --flagfile=...`.

Intentionally kept short: flags are derived from the configs' fields (each setting's
default, help text and range are written once, in `tracin_jax`), then the library runs the
stages (`tracin_jax.experiment.run`). Examples:

  tracin-jax run --flagfile=demo
  tracin-jax run --flagfile=brats19_paper \
      --data_dir=/data/MICCAI_BraTS_2019_Data_Training --workdir=runs/brats19

A flagfile is a file or a packaged one by name (demo, smoke, brats19_paper, demo3d, smoke3d; in
tracin_jax/configs/); the run's relative paths, such as the demo's workdir runs/demo, are
relative to the current directory. `python -m experiments.run` (from the repository's root)
is the same command.

A bad flag, file or run ends in one line on stderr, `error: <what and where>`, and exit
status 1; `TRACIN_JAX_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from typing import Callable, NamedTuple, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging

from tracin_jax import errors
from tracin_jax import experiment
from tracin_jax import settings
from tracin_jax.cli import config_flags


class RunFlags(NamedTuple):
  """The run's flags, as defined in one set of flags."""

  stages: flags.FlagHolder
  progress: flags.FlagHolder
  config: config_flags.ConfigFlags


def define(flag_values: flags.FlagValues) -> RunFlags:
  """The run's flags (`--stages`, `--progress` and every setting), defined in `flag_values`."""
  stages, progress = config_flags.define_app_flags(flag_values)
  return RunFlags(stages, progress,
                  config_flags.define_flags(experiment.ExperimentConfig, flag_values))


@functools.cache
def global_flags() -> RunFlags:
  """The run's flags in absl's global flags (defined on the first call), for a process that
  runs the command (`main`) or a script built on it."""
  return define(flags.FLAGS)


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


def user_error(e: BaseException) -> str:
  """One line for a user error (`tracin_jax.errors.USER_ERRORS`, a file system error); ""
  for anything else (a bug: its traceback is shown)."""
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


def fail(e: Exception) -> int:
  """Writes `error: <line>` for a user error and returns the exit status, 1; re-raises
  anything else, and anything at all where `TRACIN_JAX_DEBUG=1` asks for the traceback."""
  text = user_error(e)
  if os.environ.get("TRACIN_JAX_DEBUG", "") not in ("", "0") or not text:
    raise e
  sys.stderr.write(f"error: {text}\n")
  return 1


def unexpected(argv: Sequence[str]) -> None:
  """Raises SettingsError if `argv` (what the flags left, argv[0] the program) holds more."""
  if len(argv) > 1:
    raise settings.SettingsError(f"unexpected argument {' '.join(argv[1:])!r} (flags are "
                                 "written --name=value).")


def execute(run_flags: RunFlags, argv: Sequence[str]) -> int:
  """Runs the parsed flags' stages; returns the exit status (user errors: one line, 1)."""
  try:
    unexpected(argv)
    _show_library_log()
    config = run_flags.config.value()
    if not config.workdir:
      raise settings.SettingsError(f"--workdir: required (the run's directory); to run the "
                                   f"demo: {argv[0]} --flagfile=demo")
    names = config_flags.stage_names(run_flags.stages.value)
    experiment.run(config, names, progress=run_flags.progress.value)
  except Exception as e:  # pylint: disable=broad-except
    return fail(e)
  return 0


def parse(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str] | None:
  """`flag_values(argv)`, packaged flagfiles named by name (`config_flags.resolve_flagfiles`):
  the arguments the flags leave; None after writing the error's one line."""
  try:
    return flag_values(config_flags.resolve_flagfiles(argv))
  except settings.SettingsError as e:
    sys.stderr.write(f"error: {e}\n")
  except flags.Error as e:
    sys.stderr.write(f"error: {str(e).removeprefix('ERROR:: ')}\n")
  return None


def cli(argv: Sequence[str]) -> int:
  """The command in this process, with flags of its own (for tests); the exit status."""
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every file it writes.
  flag_values = flags.FlagValues()
  run_flags = define(flag_values)
  rest = parse(flag_values, argv)
  return 1 if rest is None else execute(run_flags, rest)


def parse_global(argv: Sequence[str]) -> list[str]:
  """absl's flags parser of `app.run`, over the global flags: exits 1 on an error."""
  rest = parse(flags.FLAGS, argv)
  if rest is None:
    sys.exit(1)
  return rest


HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-?")


def run_app(command: Callable[[list[str]], int], argv: Sequence[str]) -> int:
  """absl's app over the global flags (its --helpfull and --verbosity too): `command(rest)`
  on what the flags leave; the exit status."""

  def app_main(rest):
    if not flags.FLAGS["verbosity"].present:
      absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every file it writes.
    return command(rest)

  try:
    app.run(app_main, argv=list(argv), flags_parser=parse_global)
  except SystemExit as e:  # app.run ends in sys.exit(status)
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    raise
  return 0


def main(argv: Sequence[str]) -> int:
  """The command as a process runs it, argv[0] the program ("tracin-jax run"): the help, or
  the run; the exit status."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    sys.stdout.write(usage())
    return 0
  run_flags = global_flags()
  return run_app(lambda rest: execute(run_flags, rest), argv)


def usage() -> str:
  """`--help`: how to run, the run's own flags, then every setting grouped by stage."""
  run_flags = [
      config_flags.help_entry("--flagfile=FILE", config_flags.flagfile_help()),
      config_flags.help_entry(f"--stages (default: {','.join(config_flags.DEFAULT_STAGES)})",
                              config_flags.stages_help()),
      config_flags.help_entry("--[no]progress (default: true)", "Show progress bars."),
  ]
  return "\n".join([__doc__.strip(), "", "Flags of the run:", *run_flags, "",
                    config_flags.help_text(experiment.ExperimentConfig), ""])

