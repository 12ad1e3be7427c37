"""Orbax checkpoints of a training run, behind one small module.

A checkpoint is a dict of named items, `model` (the model's full NNX state as a pure dict)
and `optimizer` (the optimiser's state), plus JSON `metadata`:
`epoch` (1-based, the epoch just finished), `step` (updates done), `phase` ('adam' or
'sgd': the phase of the updates of that epoch), `learning_rate` and `history`.

Convention for `learning_rate` (eta_t): the rate that the next SGD update applies from this
checkpoint's parameters, i.e. `schedule(step)`. After the switch to plain SGD this is the
constant SGD rate; TracIn weights the checkpoint's gradient products by it.

Only this module talks to Orbax, so a later Orbax API change touches one file.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

CHECKPOINT_DIR = "checkpoints"


def _manager(workdir: str | os.PathLike, *, create: bool) -> ocp.CheckpointManager:
  directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
  if not create and not directory.is_dir():
    raise FileNotFoundError(f"No checkpoints under {directory}: run the train stage first.")
  options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create)
  return ocp.CheckpointManager(
      directory, options=options, item_names=("model", "optimizer", "metadata"))


class CheckpointStore:
  """Saves and restores the checkpoints of one run under `<workdir>/checkpoints/<epoch>`."""

  def __init__(self, workdir: str | os.PathLike, *, create: bool = True):
    self._mgr = _manager(workdir, create=create)

  def epochs(self) -> list[int]:
    """The epochs with a finished checkpoint, ascending."""
    return sorted(self._mgr.all_steps())

  def latest_epoch(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, epoch: int, model: nnx.Module, optimizer: nnx.Optimizer | None,
           metadata: dict[str, Any]) -> None:
    """Writes the checkpoint of `epoch` and waits until it is on disk."""
    items = {
        "model": ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
        "metadata": ocp.args.JsonSave(dict(metadata, epoch=int(epoch))),
    }
    if optimizer is not None:
      items["optimizer"] = ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer)))
    self._mgr.save(int(epoch), args=ocp.args.Composite(**items))
    self._mgr.wait_until_finished()

  def metadata(self, epoch: int) -> dict[str, Any]:
    restored = self._mgr.restore(
        int(epoch), args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return dict(restored["metadata"])

  def restore(self, epoch: int, model: nnx.Module,
              optimizer: nnx.Optimizer | None = None) -> dict[str, Any]:
    """Restores `epoch` into `model` (and `optimizer`) in place; returns its metadata."""
    items = {
        "model": ocp.args.StandardRestore(_abstract(model)),
        "metadata": ocp.args.JsonRestore(),
    }
    if optimizer is not None:
      items["optimizer"] = ocp.args.StandardRestore(_abstract(optimizer))
    restored = self._mgr.restore(int(epoch), args=ocp.args.Composite(**items))
    _replace(model, restored["model"])
    if optimizer is not None:
      _replace(optimizer, restored["optimizer"])
    return dict(restored["metadata"])

  def close(self) -> None:
    self._mgr.close()


def _abstract(module) -> Any:
  pure = nnx.to_pure_dict(nnx.state(module))
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, pure)


def _replace(module, pure: Any) -> None:
  state = nnx.state(module)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(module, state)
