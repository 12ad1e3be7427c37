"""Settings written once: a dataclass field carries its default, help text, flag name and range.

Every setting of the library's configs is declared with `setting(...)`:

    @dataclasses.dataclass(frozen=True)
    class InfluenceConfig:
      threshold: float = setting(0.8, "Region threshold on p_j (strict).", minimum=0.0,
                                 maximum=1.0, exclusive=True)

The command line (`tracin_jax/cli/run.py`) derives one flag per field from this metadata, so a
default or help text is never copied by hand, and `check(config)` tests every value against
its declared range before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterator, Sequence

from tracin_jax import errors


class SettingsError(errors.UserError, ValueError):
  """A setting out of its allowed range or choices (the message names it and its flag)."""


def setting(default: Any, help: str, *, flag: str | None = None,  # noqa: A002
            choices: Sequence[Any] | None = None, minimum: float | None = None,
            maximum: float | None = None, exclusive: bool = False) -> Any:
  """A dataclass field with the metadata the command line and `check` read.

  Args:
    default: the default value (immutable: tuples, not lists).
    help: one sentence for `--help`.
    flag: the flag's name; default the field's name.
    choices: the allowed values, if a closed set.
    minimum, maximum: the allowed range (None: unbounded), inclusive unless `exclusive`.
    exclusive: the bounds themselves are not allowed.
  """
  return dataclasses.field(default=default, metadata={
      "help": help, "flag": flag, "choices": None if choices is None else tuple(choices),
      "minimum": minimum, "maximum": maximum, "exclusive": exclusive})


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One setting of a nested config: its path of field names, field and value type."""

  path: tuple[str, ...]
  field: dataclasses.Field
  type: Any

  @property
  def flag(self) -> str:
    return self.field.metadata.get("flag") or self.field.name

  @property
  def help(self) -> str:
    return self.field.metadata.get("help", "")

  @property
  def optional(self) -> bool:
    """Whether None is allowed."""
    return _is_optional(self.type)

  @property
  def base_type(self) -> Any:
    """The type without `| None`."""
    return _strip_none(self.type)


def _is_optional(tp) -> bool:
  return (typing.get_origin(tp) in (typing.Union, types.UnionType)
          and type(None) in typing.get_args(tp))


def _strip_none(tp):
  if _is_optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 else typing.Union[tuple(args)]
  return tp


def _is_config(tp) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaves(config_cls: type, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
  """Every setting of `config_cls`, nested configs walked depth first, in field order."""
  hints = typing.get_type_hints(config_cls)
  for field in dataclasses.fields(config_cls):
    if not field.init:
      continue
    tp = hints[field.name]
    if _is_config(tp):
      yield from leaves(tp, prefix + (field.name,))
    else:
      yield Leaf(prefix + (field.name,), field, tp)


def get(config: Any, path: Sequence[str]) -> Any:
  for name in path:
    config = getattr(config, name)
  return config


def build(config_cls: type, values: dict[tuple[str, ...], Any]) -> Any:
  """`config_cls` with the given leaf values (by path); the rest keep their defaults."""

  def make(cls, prefix):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
      if not field.init:
        continue
      path = prefix + (field.name,)
      if _is_config(hints[field.name]):
        kwargs[field.name] = make(hints[field.name], path)
      elif path in values:
        kwargs[field.name] = values[path]
    return cls(**kwargs)

  return make(config_cls, ())


def describe(leaf: Leaf) -> str:
  """The allowed values of a setting, in words ("an integer >= 1", "one of a, b")."""
  meta = leaf.field.metadata
  if meta.get("choices"):
    text = "one of " + ", ".join(map(str, meta["choices"]))
  else:
    lo, hi, ex = meta.get("minimum"), meta.get("maximum"), meta.get("exclusive")
    if lo is not None and hi is not None:
      text = f"{'strictly ' if ex else ''}between {lo:g} and {hi:g}"
    elif lo is not None:
      text = f"{'>' if ex else '>='} {lo:g}"
    elif hi is not None:
      text = f"{'<' if ex else '<='} {hi:g}"
    else:
      return ""
  return text + (" (or unset)" if leaf.optional else "")


def _bad(leaf: Leaf, value: Any) -> bool:
  meta = leaf.field.metadata
  if value is None:
    return not leaf.optional
  items = value if isinstance(value, tuple) else (value,)
  for v in items:
    if meta.get("choices") and v not in meta["choices"]:
      return True
    lo, hi, ex = meta.get("minimum"), meta.get("maximum"), meta.get("exclusive")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      if lo is not None and (v <= lo if ex else v < lo):
        return True
      if hi is not None and (v >= hi if ex else v > hi):
        return True
  return False


def check_values(config_cls: type, values: dict[tuple[str, ...], Any]) -> None:
  """Raises SettingsError naming the first of `values` (leaf path -> value) of `config_cls`
  outside its allowed values; call it before building the config, whose own checks would
  raise a less helpful error.

  Raises:
    SettingsError: "--image_size=7: must be >= 8 (or unset)." for instance.
  """
  for leaf in leaves(config_cls):
    if leaf.path not in values:
      continue
    value = values[leaf.path]
    if _bad(leaf, value):
      shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
      raise SettingsError(f"--{leaf.flag}={shown}: must be {describe(leaf)}.")


def check(config: Any) -> None:
  """Raises SettingsError naming the first setting of `config` outside its allowed values."""
  check_values(type(config), {leaf.path: get(config, leaf.path)
                              for leaf in leaves(type(config))})
