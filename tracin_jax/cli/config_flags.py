"""Flags derived from a config dataclass: one flag per setting, written nowhere else.

Each leaf field of the (nested) config becomes a flag named by its `setting(..., flag=)`
metadata (default: the field's name), with the field's default and help text, and its
allowed values appended to the help. `define_flags(ExperimentConfig)` returns a holder whose
`value()` builds the config from the parsed flags.

The flagfiles ship with the package (`tracin_jax/configs/`): `--flagfile=demo` (or
`demo.flags`) names the packaged one from any directory (`resolve_flagfiles`), while a path
that exists is read as it is.
"""

from __future__ import annotations

import fractions
import os
import pathlib
import textwrap
import typing
from typing import Any, Callable, Sequence

from absl import flags

from tracin_jax import settings
from tracin_jax import stages as stages_lib

# The packaged flagfiles, in the order the help lists them; each is `CONFIGS/<name>.flags`.
FLAGFILES = ("demo", "smoke", "brats19_paper", "demo3d", "smoke3d")
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
# `--stages=all`: every stage, in run order.
ALL_STAGES = "all"
# The stages a run without `--stages` runs: the demo's chain, every stage but the checks by
# retraining (validate, lds), whose tens to hundreds of retrainings take hours to days.
DEFAULT_STAGES = ("train", "influence", "interpret", "saliency", "export")

# absl's DEFINE function of each kind of setting.
_DEFINE = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer,
           "float": flags.DEFINE_float, "str": flags.DEFINE_string}


def _kind(leaf: settings.Leaf) -> tuple[str, Any]:
  """('bool' | 'int' | 'float' | 'str' | 'list', element type)."""
  tp = leaf.base_type
  if typing.get_origin(tp) is typing.Literal:
    return "str", str
  if typing.get_origin(tp) is tuple:
    return "list", typing.get_args(tp)[0]
  for name, t in (("bool", bool), ("int", int), ("float", float), ("str", str)):
    if tp is t:
      return name, t
  raise TypeError(f"setting {'.'.join(leaf.path)}: no flag for type {tp}.")


def _allowed(leaf: settings.Leaf) -> str:
  """The allowed values in words; a list takes any of its choices, each item in its range."""
  text = settings.describe(leaf)
  if text and _kind(leaf)[0] == "list":
    text = (text.replace("one of ", "any of ", 1) if leaf.field.metadata.get("choices")
            else f"each {text}")
  return text


def _help(leaf: settings.Leaf) -> str:
  allowed = _allowed(leaf)
  return leaf.help + (f" Allowed: {allowed}." if allowed else "")


def format_default(value: Any) -> str:
  """A default as the help shows it: a float rounded to 4 significant digits where it is
  longer, with the fraction it is where that is simple (52/259: "0.2008 (52/259)")."""
  if value is None:
    return "unset"
  if isinstance(value, tuple):
    return ",".join(format_default(v) for v in value)
  if isinstance(value, float) and float(f"{value:.4g}") != value:
    fraction = fractions.Fraction(value).limit_denominator(1000)
    exact = float(fraction) == value and fraction.denominator > 1
    return f"{value:.4g}" + (f" ({fraction})" if exact else "")
  return str(value)


class ConfigFlags:
  """The flags of one config class; `value()` is the config they describe."""

  def __init__(self, config_cls: type, converters: dict[tuple[str, ...], tuple[str, Callable]],
               flag_values: flags.FlagValues):
    self._cls = config_cls
    self._converters = converters
    self._flag_values = flag_values

  def value(self) -> Any:
    values = {}
    for path, (name, convert) in self._converters.items():
      values[path] = convert(self._flag_values[name].value)
    settings.check_values(self._cls, values)
    return settings.build(self._cls, values)


def define_flags(config_cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> ConfigFlags:
  """Defines one flag per setting of `config_cls`.

  Raises:
    ValueError: two settings claim the same flag name.
  """
  converters = {}
  seen: dict[str, tuple[str, ...]] = {}
  for leaf in settings.leaves(config_cls):
    name = leaf.flag
    if name in seen:
      raise ValueError(f"settings {'.'.join(seen[name])} and {'.'.join(leaf.path)} both "
                       f"claim the flag --{name}.")
    seen[name] = leaf.path
    kind, elem = _kind(leaf)
    default = leaf.field.default
    text = _help(leaf)
    if kind == "list":
      flags.DEFINE_list(name, None if default is None else [str(x) for x in default], text,
                        flag_values=flag_values)
      convert = _list_converter(name, elem, leaf.optional)
    else:
      _DEFINE[kind](name, default, text, flag_values=flag_values)
      if kind == "float":  # absl's help (--helpfull) shows the default rounded, as ours
        flag_values[name].default_as_str = repr(format_default(default))
      convert = lambda v: v  # noqa: E731
    converters[leaf.path] = (name, convert)
  return ConfigFlags(config_cls, converters, flag_values)


def from_flagfile(config_cls: type, path: str, *args: str) -> tuple[Any, list[str]]:
  """The config (and the stages) a flagfile describes, for a notebook.

  Args:
    config_cls: the config class whose flags the file sets (`ExperimentConfig`).
    path: the flagfile, e.g. "demo" (a packaged one) or "runs/mine.flags".
    *args: further flags, e.g. "--workdir=runs/other".

  Returns:
    (config, stages): the stages the file's `--stages` names, in run order.
  """
  fv = flags.FlagValues()
  stages, _ = define_app_flags(fv)
  holder = define_flags(config_cls, fv)
  fv(resolve_flagfiles(["from_flagfile", f"--flagfile={path}", *args]))
  return holder.value(), stage_names(stages.value)


def stages_help() -> str:
  """The help of `--stages`."""
  return (f"Stages to run: any of {', '.join(stages_lib.list_stages())}, or {ALL_STAGES} "
          "(every stage); they run in that order, and every run ends with the report. The "
          "default is the demo's chain, which leaves out the checks by retraining, validate "
          "and lds: tens to hundreds of retrainings of the SGD phase (half an hour and two "
          "hours for the demo on 2 CPU cores, days at the paper's scale).")


def define_app_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """The flags of a run that are not settings: `--stages` and `--progress`."""
  stages = flags.DEFINE_list("stages", list(DEFAULT_STAGES), stages_help(),
                             flag_values=flag_values)
  progress = flags.DEFINE_bool("progress", True, "Show progress bars.",
                               flag_values=flag_values)
  return stages, progress


def stage_names(values: Sequence[str]) -> list[str]:
  """The stages `--stages` names, in run order; `all` is every stage
  (`tracin_jax.stages.list_stages()`).

  Raises:
    SettingsError: an unknown stage (the message lists the known ones).
  """
  known = stages_lib.list_stages()
  unknown = [v for v in values if v not in known and v != ALL_STAGES]
  if unknown:
    raise settings.SettingsError(f"--stages: unknown {', '.join(unknown)}; choose from "
                                 f"{', '.join(known)}, or {ALL_STAGES}.")
  return [s for s in known if s in values or ALL_STAGES in values]


def flagfile_help() -> str:
  """The help of `--flagfile`."""
  return ("Read flags from FILE (one --name=value per line), or from a packaged flagfile "
          f"by name: {', '.join(FLAGFILES)} (e.g. --flagfile=demo); later flags override "
          "it. Relative paths in it, such as the demo's --workdir=runs/demo, are relative "
          "to the current directory.")


def resolve_flagfile(value: str, flag: str = "--flagfile") -> str:
  """The file `--flagfile=value` reads: `value` where it is a file; else the packaged
  flagfile a bare name names (`demo` or `demo.flags`; also the flagfiles' former path in
  the repository, `experiments/configs/demo.flags`).

  Raises:
    SettingsError: neither; the message lists the packaged flagfiles.
  """
  path = pathlib.Path(value).expanduser()
  if path.is_file():
    if not os.access(path, os.R_OK):
      raise settings.SettingsError(f"{flag}={value}: not readable (permission denied)")
    return value
  name = path.name[:-len(".flags")] if path.name.endswith(".flags") else path.name
  bare = path.parent == pathlib.Path(".")
  if name in FLAGFILES and (bare or path.parent.parts[-2:] == ("experiments", "configs")):
    return str(CONFIGS / f"{name}.flags")
  what = "is a directory, not a file" if path.is_dir() else "no such file"
  raise settings.SettingsError(f"{flag}={value}: {what} (packaged flagfiles: "
                               f"{', '.join(FLAGFILES)})")


def resolve_flagfiles(argv: Sequence[str]) -> list[str]:
  """`argv` (argv[0] the program) with the file of every `--flagfile` resolved
  (`resolve_flagfile`), as absl reads them: `--flagfile=F`, `--flagfile F`, one dash or
  two, up to a `--`.

  Raises:
    SettingsError: a flagfile that is neither a file nor a packaged one.
  """
  out, rest = list(argv[:1]), list(argv[1:])
  while rest:
    arg = rest.pop(0)
    if arg == "--":
      out += [arg, *rest]
      break
    if arg in ("--flagfile", "-flagfile") and rest:
      out += [arg, resolve_flagfile(rest.pop(0), arg)]
    elif arg.startswith(("--flagfile=", "-flagfile=")):
      flag, value = arg.split("=", 1)
      out.append(f"{flag}={resolve_flagfile(value, flag)}")
    else:
      out.append(arg)
  return out


def _list_converter(name: str, elem: type, optional: bool) -> Callable:
  def convert(value):
    if not value:
      return None if optional else ()
    try:
      return tuple(elem(v) for v in value)
    except ValueError:
      kind = {int: "an integer", float: "a number"}.get(elem, elem.__name__)
      raise settings.SettingsError(
          f"--{name}={','.join(value)}: every item must be {kind}.") from None
  return convert


_GROUPS = {"data": "data", "train": "train stage", "influence": "influence stage",
           "interpret": "interpret stage", "saliency": "saliency stage", "export": "export stage",
           "validate": "validate stage", "lds": "lds stage", "report": "report"}


def help_entry(heading: str, text: str) -> str:
  """One flag of the help: its heading ("--name (default: ...)") and its text below, wrapped
  at 100 columns."""
  return f"  {heading}\n" + textwrap.fill(text, 100, initial_indent=" " * 6,
                                         subsequent_indent=" " * 6, break_on_hyphens=False,
                                         break_long_words=False)


def help_text(config_cls: type) -> str:
  """Every setting of `config_cls` with its default and one sentence, grouped by stage."""
  groups: dict[str, list[str]] = {}
  for leaf in settings.leaves(config_cls):
    group = _GROUPS.get(leaf.path[0], "run") if len(leaf.path) > 1 else "run"
    groups.setdefault(group, []).append(
        help_entry(f"--{leaf.flag} (default: {format_default(leaf.field.default)})",
                   _help(leaf)))
  order = ["run"] + list(_GROUPS.values())
  return "\n\n".join(f"{name}:\n" + "\n".join(groups[name]) for name in order
                     if name in groups)
