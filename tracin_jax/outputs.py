"""Writing outputs safely, and hashing their contents.

Every file a stage writes (JSON, npz, npy, PNG, HTML) goes through `atomic_path`: it is
written under a temporary name in the same directory and renamed into place, so an
interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import threading
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, unique: bool = False) -> Iterator[pathlib.Path]:
  """Yields a temporary path beside `path`; on success it is renamed to `path`.

  The temporary name keeps the suffix (`x.tmp.npz` for `x.npz`), so writers that add or
  check a suffix (numpy, matplotlib) write exactly there. On an error the temporary file is
  removed and `path` is left as it was.

  `unique=True` is for a file that several processes or threads may write at once (the
  same content, say): each writes under its own temporary name (`x.tmp<pid>-<thread>.npz`)
  and the last rename wins, where one shared temporary name would let one writer rename
  the other's half-written file, or find it gone.
  """
  path = pathlib.Path(path)
  tag = f"{os.getpid()}-{threading.get_ident()}" if unique else ""
  tmp = path.with_name(f"{path.stem}.tmp{tag}{path.suffix}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, *, unique: bool = False) -> None:
  """Writes `text` (UTF-8) to `path`, atomically (`unique`: see `atomic_path`)."""
  with atomic_path(path, unique=unique) as tmp:
    tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, *, unique: bool = False) -> None:
  """Writes `obj` as indented JSON to `path`, atomically (`unique`: see `atomic_path`)."""
  write_text(path, json.dumps(obj, indent=2) + "\n", unique=unique)


def save_npz(path: str | os.PathLike, **arrays) -> None:
  """`np.savez(path, **arrays)`, atomically."""
  with atomic_path(path) as tmp:
    np.savez(tmp, **arrays)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
  """`np.save(path, array)`, atomically."""
  with atomic_path(path) as tmp:
    np.save(tmp, np.asarray(array))


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 100) -> None:
  """Saves a matplotlib figure as PNG, atomically."""
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=dpi, format="png")


def json_ready(x):
  """A number or array as JSON: NaN and inf -> None, numpy -> Python (float arrays
  flattened; booleans and integers kept as they are)."""
  a = np.asarray(x)
  if a.dtype == bool or a.dtype.kind in "iu":
    return a.tolist()
  return [None if not np.isfinite(v) else float(v) for v in a.ravel()] if a.ndim else (
      None if not np.isfinite(a) else float(a))


def plain(value: Any) -> Any:
  """Dataclasses, tuples and numpy scalars as plain JSON values."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, dict):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, pathlib.PurePath):
    return str(value)
  return value


def hash_arrays(h, *arrays) -> None:
  """Feeds arrays (dtype, shape and bytes) into the hash object `h`."""
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}:{a.shape}".encode())
    h.update(a.tobytes())
