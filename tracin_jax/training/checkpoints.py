"""Orbax checkpoints of a training run, behind one small module.

A checkpoint is a dict of named items, `model` (the model's full NNX state as a pure dict)
and `optimizer` (the optimiser's state), plus JSON `metadata`:
`epoch` (1-based, the epoch just finished), `step` (updates done), `phase` ('adam' or
'sgd': the phase of the updates of that epoch), `learning_rate` and `history`.

Convention for `learning_rate` (eta_t): the rate that the next SGD update applies from this
checkpoint's parameters, i.e. `schedule(step)`. After the switch to plain SGD this is the
constant SGD rate; TracIn weights the checkpoint's gradient products by it.

Integrity: `metadata["checksums"]` holds a SHA-256 of each saved item's arrays (key paths,
dtypes, shapes and bytes), computed before saving and verified after every restore, so a
damaged file is an error naming the epoch, never silently different numbers; restored
parameters must be finite. Any failure to read or write a checkpoint is a `CheckpointError`
whose one-line message names the epoch and the directory.

Only this module talks to Orbax, so a later Orbax API change touches one file.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from tracin_jax import errors
from tracin_jax import rundir

CHECKPOINT_DIR = rundir.CHECKPOINT_DIR
# Metadata every checkpoint carries (see the module docstring).
REQUIRED_METADATA = ("epoch", "step", "phase", "learning_rate")


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint that cannot be written, read or trusted; the message names its epoch."""


def _first_line(e: BaseException, limit: int = 160) -> str:
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  text = lines[0] if lines else type(e).__name__
  if any("No space left" in ln for ln in lines):
    text = "no space left on device"
  return text if len(text) <= limit else text[:limit] + "..."


def tree_checksum(tree: Any) -> str:
  """SHA-256 of a pytree's arrays: key paths, dtypes, shapes and bytes, in tree order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{a.dtype.str}:{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _manager(workdir: str | os.PathLike, *, create: bool) -> ocp.CheckpointManager:
  directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
  if directory.exists() and not directory.is_dir():
    raise CheckpointError(f"{directory} is a file, not a checkpoint directory.")
  if not create and not directory.is_dir():
    raise FileNotFoundError(f"No checkpoints under {directory}: run the train stage first.")
  options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create,
                                         cleanup_tmp_directories=create)
  try:
    return ocp.CheckpointManager(
        directory, options=options, item_names=("model", "optimizer", "metadata"))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"cannot open the checkpoints in {directory}: "
                          f"{_first_line(e)}") from e


class CheckpointStore:
  """Saves and restores the checkpoints of one run under `<workdir>/checkpoints/<epoch>`."""

  def __init__(self, workdir: str | os.PathLike, *, create: bool = True):
    self._mgr = _manager(workdir, create=create)
    self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR

  def epochs(self) -> list[int]:
    """The epochs with a finished checkpoint, ascending."""
    return sorted(self._mgr.all_steps())

  def latest_epoch(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, epoch: int, model: nnx.Module, optimizer: nnx.Optimizer | None,
           metadata: dict[str, Any]) -> None:
    """Writes the checkpoint of `epoch` (with its checksums) and waits until it is on disk.

    Raises:
      CheckpointError: it could not be written (a full disk, say), naming the epoch.
    """
    trees = {"model": nnx.to_pure_dict(nnx.state(model))}
    if optimizer is not None:
      trees["optimizer"] = nnx.to_pure_dict(nnx.state(optimizer))
    checksums = {name: tree_checksum(tree) for name, tree in trees.items()}
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    items["metadata"] = ocp.args.JsonSave(dict(metadata, epoch=int(epoch),
                                               checksums=checksums))
    try:
      self._mgr.save(int(epoch), args=ocp.args.Composite(**items))
      self._mgr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"cannot write the checkpoint of epoch {epoch} to "
                            f"{self.directory}: {_first_line(e)}") from e

  def _where(self, epoch: int) -> str:
    return f"the checkpoint of epoch {epoch} ({self.directory / str(epoch)})"

  def metadata(self, epoch: int) -> dict[str, Any]:
    """The metadata of `epoch`.

    Raises:
      CheckpointError: unreadable, or without one of REQUIRED_METADATA.
    """
    try:
      restored = self._mgr.restore(
          int(epoch), args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{self._where(epoch)}: its metadata cannot be read "
                            f"({_first_line(e)}).") from e
    return self._checked_metadata(epoch, restored["metadata"])

  def _checked_metadata(self, epoch: int, meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
      raise CheckpointError(f"{self._where(epoch)}: its metadata is missing or damaged.")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
      raise CheckpointError(f"{self._where(epoch)}: its metadata lacks "
                            f"{', '.join(missing)}.")
    return dict(meta)

  def restore(self, epoch: int, model: nnx.Module,
              optimizer: nnx.Optimizer | None = None) -> dict[str, Any]:
    """Restores `epoch` into `model` (and `optimizer`) in place; returns its metadata."""
    items = {
        "model": ocp.args.StandardRestore(_abstract(model)),
        "metadata": ocp.args.JsonRestore(),
    }
    if optimizer is not None:
      items["optimizer"] = ocp.args.StandardRestore(_abstract(optimizer))
    try:
      restored = self._mgr.restore(int(epoch), args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{self._where(epoch)} cannot be read ({_first_line(e)}); it "
                            "is damaged or incomplete.") from e
    meta = self._checked_metadata(epoch, restored["metadata"])
    saved = meta.get("checksums") or {}  # none: written before checksums were
    for name in ("model", "optimizer"):
      if name in restored and name in saved and tree_checksum(restored[name]) != saved[name]:
        raise CheckpointError(f"{self._where(epoch)}: its {name} arrays do not match the "
                              "checksum written with them; the files are damaged.")
    bad = [jax.tree_util.keystr(path) for path, leaf
           in jax.tree_util.tree_flatten_with_path(restored["model"])[0]
           if np.issubdtype(np.asarray(leaf).dtype, np.floating)
           and not np.isfinite(np.asarray(leaf)).all()]
    if bad:
      raise CheckpointError(f"{self._where(epoch)}: parameters {', '.join(bad[:3])} are not "
                            "finite.")
    _replace(model, restored["model"])
    if optimizer is not None:
      _replace(optimizer, restored["optimizer"])
    return meta

  def close(self) -> None:
    self._mgr.close()


def _abstract(module) -> Any:
  pure = nnx.to_pure_dict(nnx.state(module))
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, pure)


def _replace(module, pure: Any) -> None:
  state = nnx.state(module)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(module, state)
