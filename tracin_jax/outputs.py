"""Writing a stage's outputs safely, and recognising unchanged inputs.

Files are written to a temporary name and renamed into place, so an interrupted run never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Iterable

import numpy as np


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON to `path`, atomically."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2) + "\n")
  os.replace(tmp, path)


def save_npz(path: str | os.PathLike, **arrays) -> None:
  """`np.savez(path, **arrays)`, atomically."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def json_ready(x):
  """A number or array as JSON: NaN and inf -> None, numpy -> Python (float arrays
  flattened; booleans and integers kept as they are)."""
  a = np.asarray(x)
  if a.dtype == bool or a.dtype.kind in "iu":
    return a.tolist()
  return [None if not np.isfinite(v) else float(v) for v in a.ravel()] if a.ndim else (
      None if not np.isfinite(a) else float(a))


def fingerprint(paths: Iterable[str | os.PathLike], *settings: Any) -> str:
  """A short hash of the files' contents and the settings (dataclasses or JSON values).

  An npz is hashed array by array (name, dtype, shape, bytes): its zip members carry write
  times, so equal arrays rewritten by a rerun keep the fingerprint.
  """
  h = hashlib.sha256()
  for p in map(pathlib.Path, paths):
    if p.suffix == ".npz":
      with np.load(p) as f:
        for name in sorted(f.files):
          a = np.ascontiguousarray(f[name])
          h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
          h.update(a.tobytes())
    else:
      h.update(p.read_bytes())
  plain = [dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s for s in settings]
  h.update(json.dumps(plain, sort_keys=True).encode())
  return h.hexdigest()[:16]
