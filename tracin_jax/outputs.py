"""Writing outputs safely, hashing their contents, and reading back only what is sound.

Every file a stage writes (JSON, npz, npy, PNG, HTML) goes through `atomic_path`: it is
written under a temporary name in the same directory and renamed into place, so an
interrupted run never leaves a half-written file under the final name.

Nothing read back is trusted blindly. A file that a later process reads back is written
with its checksum (`checksum=True`): the SHA-256 and size of its bytes, in a small sidecar
`<name>.sha256` (JSON) written before the file is renamed into place, so a file under its
final name always has its checksum beside it. `verify` (and the readers `read_json` and
`load_npy`) check a file against its sidecar, `check_file` against a checksum kept
elsewhere (a stage's manifest lists its files' checksums), and raise `DamagedFile` naming
the file and what was wrong (its size, or its bytes). A file is hashed once per process and
version of it (device, inode, size, modification and change times), so reading it again
costs nothing; a file changed within the last two seconds is hashed every time it is read,
since a change that soon can leave its times as they were.

A file written before checksums were (no sidecar) is accepted: its checksum is recorded now,
as the slice cache does, and a line says so once per directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import threading
import time
from typing import Any, Iterator

import numpy as np

from tracin_jax import errors

logger = logging.getLogger("tracin_jax")

CHECKSUM_SUFFIX = ".sha256"
# A file changed this recently is hashed on every read (its times may not show a change).
_RACY_NS = 2_000_000_000


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, unique: bool = False,
                checksum: bool = False) -> Iterator[pathlib.Path]:
  """Yields a temporary path beside `path`; on success it is renamed to `path`.

  The temporary name keeps the suffix (`x.tmp.npz` for `x.npz`), so writers that add or
  check a suffix (numpy, matplotlib) write exactly there. On an error the temporary file is
  removed and `path` is left as it was.

  `unique=True` is for a file that several processes or threads may write at once (the
  same content, say): each writes under its own temporary name (`x.tmp<pid>-<thread>.npz`)
  and the last rename wins, where one shared temporary name would let one writer rename
  the other's half-written file, or find it gone.

  `checksum=True` writes the file's checksum sidecar (`checksum_path`) before the rename,
  for `verify` to check it against when it is read back.
  """
  path = pathlib.Path(path)
  tag = f"{os.getpid()}-{threading.get_ident()}" if unique else ""
  tmp = path.with_name(f"{path.stem}.tmp{tag}{path.suffix}")
  try:
    yield tmp
    if checksum:
      _write_sidecar(path, file_checksum(tmp), unique=unique)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, *, unique: bool = False,
               checksum: bool = False) -> None:
  """Writes `text` (UTF-8) to `path`, atomically (`unique`, `checksum`: see
  `atomic_path`)."""
  with atomic_path(path, unique=unique, checksum=checksum) as tmp:
    tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, *, unique: bool = False,
               checksum: bool = False) -> None:
  """Writes `obj` as indented JSON to `path`, atomically (`unique`, `checksum`: see
  `atomic_path`)."""
  write_text(path, json.dumps(obj, indent=2) + "\n", unique=unique, checksum=checksum)


def save_npz(path: str | os.PathLike, **arrays) -> None:
  """`np.savez(path, **arrays)`, atomically."""
  with atomic_path(path) as tmp:
    np.savez(tmp, **arrays)


def save_npy(path: str | os.PathLike, array: np.ndarray, *, checksum: bool = False) -> None:
  """`np.save(path, array)`, atomically (`checksum`: see `atomic_path`)."""
  with atomic_path(path, checksum=checksum) as tmp:
    np.save(tmp, np.asarray(array))


# ----------------------------------------------------------------------------- checksums


class DamagedFile(errors.UserError, ValueError):
  """A file read back whose bytes are not those written (changed, truncated, extended).

  Attributes:
    path: the file.
    problem: what is wrong with it, in a few words.
  """

  def __init__(self, path: str | os.PathLike, problem: str, hint: str = ""):
    self.path, self.problem, self.hint = pathlib.Path(path), problem, hint
    super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else "") + ".")

  def __reduce__(self):  # pickled whole (across processes), not from its message alone
    return type(self), (self.path, self.problem, self.hint)


def checksum_path(path: str | os.PathLike) -> pathlib.Path:
  """The checksum sidecar of `path`: `<name>.sha256` beside it."""
  path = pathlib.Path(path)
  return path.with_name(path.name + CHECKSUM_SUFFIX)


def file_checksum(path: str | os.PathLike) -> dict[str, Any]:
  """{"sha256": hex digest, "size": bytes} of the file at `path` (read in chunks)."""
  with open(path, "rb") as f:
    digest = hashlib.file_digest(f, "sha256")
    size = f.tell()
  return {"sha256": digest.hexdigest(), "size": size}


_VERIFIED: dict[str, tuple] = {}  # path -> (stat key, sha256) of a version found sound
_ANNOUNCED: set[str] = set()
_LOCK = threading.Lock()


def _stat_key(st: os.stat_result) -> tuple:
  return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_file(path: str | os.PathLike, expected: dict[str, Any], *, hint: str = "") -> None:
  """Checks the file at `path` against `expected` ({"sha256", "size"}, as
  `file_checksum` gives).

  Raises:
    DamagedFile: its size or its bytes differ (`hint` ends the message: what to do).
    FileNotFoundError: there is no file at `path`.
  """
  path = pathlib.Path(path)
  st = os.stat(path)
  key = os.fspath(path.absolute())
  with _LOCK:
    if _VERIFIED.get(key) == (_stat_key(st), expected.get("sha256")):
      return
  size = expected.get("size")
  if size is not None and st.st_size != size:
    raise DamagedFile(path, f"{st.st_size} bytes where {size} were written (truncated or "
                      "overwritten)", hint)
  if file_checksum(path)["sha256"] != expected.get("sha256"):
    raise DamagedFile(path, "its bytes differ from the SHA-256 written with it (damaged or "
                      "changed since it was written)", hint)
  after = os.stat(path)
  if (_stat_key(after) == _stat_key(st)
      and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS):
    with _LOCK:
      _VERIFIED[key] = (_stat_key(st), expected.get("sha256"))


def _write_sidecar(path: pathlib.Path, checksum: dict[str, Any], *, unique: bool = True
                   ) -> None:
  write_text(checksum_path(path), json.dumps(checksum) + "\n", unique=unique)


def say_once(path: str | os.PathLike, message: str) -> None:
  """Logs `message` the first time this process says something of `path`."""
  key = os.fspath(pathlib.Path(path).absolute())
  with _LOCK:
    if key in _ANNOUNCED:
      return
    _ANNOUNCED.add(key)
  logger.info(message)


def verify(path: str | os.PathLike, *, hint: str = "") -> bool:
  """Checks the file at `path` against its checksum sidecar.

  Returns:
    True if it matches; False if it has no checksum (written before checksums were): it
    is accepted, its checksum recorded now (where the directory can be written), and a
    line says so once per directory.

  Raises:
    DamagedFile: its size or bytes differ from its checksum, or the checksum is unreadable
      (`hint` ends the message).
    FileNotFoundError: there is no file at `path`.
  """
  path = pathlib.Path(path)
  sidecar = checksum_path(path)
  os.stat(path)  # FileNotFoundError, naming the file, if it is not there
  try:
    text = sidecar.read_text(encoding="utf-8")
  except FileNotFoundError:
    checksum = file_checksum(path)
    with contextlib.suppress(OSError):  # a read-only directory: accepted all the same
      _write_sidecar(path, checksum)
    say_once(path.parent, f"{path.parent}: files written before checksums (such as "
             f"{path.name}) are accepted; their checksums are recorded now.")
    return False
  try:
    expected = json.loads(text)
    if not isinstance(expected, dict) or not isinstance(expected.get("sha256"), str):
      raise ValueError("no sha256")
  except (ValueError, UnicodeDecodeError):
    raise DamagedFile(path, f"its checksum {sidecar.name} is unreadable", hint) from None
  check_file(path, expected, hint=hint)
  return True


def remove(path: str | os.PathLike) -> None:
  """Removes the file at `path` and its checksum sidecar (either may be absent)."""
  path = pathlib.Path(path)
  path.unlink(missing_ok=True)
  checksum_path(path).unlink(missing_ok=True)


def _first_line(e: BaseException, limit: int = 120) -> str:
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  text = lines[0] if lines else type(e).__name__
  return text if len(text) <= limit else text[:limit] + "..."


def read_json(path: str | os.PathLike, *, hint: str = "") -> Any:
  """The JSON value in the file at `path`, verified first (see `verify`).

  Raises:
    DamagedFile: it does not match its checksum, or is not valid JSON.
    FileNotFoundError: there is no file at `path`.
  """
  verify(path, hint=hint)
  try:
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise DamagedFile(path, f"not valid JSON ({_first_line(e)})", hint) from None


def load_npy(path: str | os.PathLike, *, mmap_mode: str | None = None,
             hint: str = "") -> np.ndarray:
  """The array in the .npy file at `path` (no pickle), verified first (see `verify`).

  Raises:
    DamagedFile: it does not match its checksum, or is not a readable .npy file.
    FileNotFoundError: there is no file at `path`.
  """
  verify(path, hint=hint)
  try:
    return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
  except (ValueError, EOFError, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise DamagedFile(path, f"not a readable .npy file ({_first_line(e)})", hint) from None


def forget_verified() -> None:
  """Forgets which files were found sound, so that each is hashed again when next read
  (for measuring what verification costs)."""
  with _LOCK:
    _VERIFIED.clear()


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
