"""The checks of TracIn's arguments, and the checkpoints and loss they give.

Everything here runs before the first gradient: `check_arguments` checks the loss, the
budget and the checkpoints (`check_checkpoints`) and, for a layer selection, restricts the
loss and checkpoints to the kept parameters; `check_transform` checks `normalize` and
`projection`; `gradient_layout` evaluates the loss on one example's shapes to learn K and
what one example's gradients take.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import numpy as np

from tracin_jax import params as params_lib
from tracin_jax.influence import data as data_lib
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import projection as projection_lib
from tracin_jax.types import Checkpoint, Checkpoints, LossFn


def check_checkpoints(checkpoints: Checkpoints) -> list[Checkpoint]:
  """Checks TracIn checkpoints and gives them as `Checkpoint`s.

  Args:
    checkpoints: a sequence of (params, learning_rate) pairs or of
      `Checkpoint(params, learning_rate, state)`; all params (and all states) share the
      first one's structure, shapes and dtypes.

  Returns:
    The checkpoints, each a `Checkpoint` with its learning rate as a Python float.

  Raises:
    ValueError: None or no checkpoint, an item that is not a pair or triple, a learning rate
      that is not a finite real number, empty params, or params (or states) that differ from
      checkpoint 0's.
  """
  if checkpoints is None:
    raise ValueError("checkpoints is None; give a sequence of (params, learning_rate) pairs.")
  checkpoints = list(checkpoints)
  if not checkpoints:
    raise ValueError("checkpoints is empty; give at least one (params, learning_rate) pair.")
  out, ref = [], None
  for t, item in enumerate(checkpoints):
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
      raise ValueError(f"checkpoint {t} must be a (params, learning_rate) pair or a "
                       f"tracin_jax.Checkpoint(params, learning_rate, state), got "
                       f"{type(item).__name__}.")
    params, learning_rate = item[0], item[1]
    state = item[2] if len(item) == 3 else None
    is_real = isinstance(learning_rate, numbers.Real) or (
        data_lib.is_array(learning_rate) and np.ndim(learning_rate) == 0
        and np.dtype(learning_rate.dtype).kind in "fiu")
    if not is_real or isinstance(learning_rate, (bool, np.bool_)):
      raise ValueError(f"checkpoint {t}: learning_rate must be a real number, got "
                       f"{learning_rate!r}.")
    value = float(learning_rate)
    if not math.isfinite(value):
      raise ValueError(f"checkpoint {t}: learning_rate must be finite, got {value}.")
    spec = tuple(
        (treedef, [(np.shape(x), np.dtype(jax.numpy.result_type(x))) for x in leaves])
        for leaves, treedef in (jax.tree.flatten(params), jax.tree.flatten(state)))
    if ref is None:
      ref = spec
      if not jax.tree.leaves(params):
        raise ValueError("checkpoint 0: params holds no arrays.")
    elif spec[0] != ref[0]:
      raise ValueError(f"checkpoint {t}: params differ in structure, shape or dtype from "
                       "checkpoint 0's.")
    elif spec[1] != ref[1]:
      raise ValueError(f"checkpoint {t}: state differs in structure, shape or dtype from "
                       "checkpoint 0's (give every checkpoint its own state, or none).")
    out.append(Checkpoint(params, value, state))
  return out


def _num_outputs(loss_fn: LossFn, checkpoint: Checkpoint, data: data_lib.Data) -> int:
  """K, from evaluating `loss_fn` on one example's shapes; a failure names the data."""
  try:
    return grads_lib.num_outputs(loss_fn, checkpoint.params, data.spec.example(),
                                 checkpoint.state)
  except Exception as e:
    if not (isinstance(e, ValueError) and "loss_fn" in str(e)):
      hint = (" A tuple (or a list of differently structured batches) is one pytree: pass a "
              "list of batches of one structure, or `lambda: iter(batches)`."
              if data.is_sequence else "")
      e.add_note(f"tracin_jax: while evaluating loss_fn on one {data.name} example of "
                 f"structure {data.spec.treedef}.{hint}")
    raise


@dataclasses.dataclass(frozen=True)
class _Restricted:
  """A loss of the kept parameters only: the other parameters (and the model's state, if
  any) arrive as the state argument, so they get no gradient. Hashable and equal for the
  same loss, structure and selection: one compiled function serves every checkpoint."""

  loss_fn: LossFn
  treedef: Any
  mask: tuple[bool, ...]
  with_state: bool

  def __call__(self, kept, example, frozen):
    others, state = frozen
    params = params_lib.merge(self.treedef, self.mask, kept, others)
    if self.with_state:
      return self.loss_fn(params, example, state)
    return self.loss_fn(params, example)


def _restrict(loss_fn, checkpoints: list[Checkpoint], params_filter):
  """(loss of the kept parameters, checkpoints of the kept parameters)."""
  params0 = checkpoints[0].params
  mask = params_lib.selection(params0, params_filter)
  restricted = _Restricted(loss_fn, jax.tree.structure(params0), mask,
                           checkpoints[0].state is not None)
  out = []
  for ckpt in checkpoints:
    kept, others = params_lib.split(ckpt.params, mask)
    out.append(Checkpoint(kept, ckpt.learning_rate, (others, ckpt.state)))
  return restricted, out


def check_arguments(loss_fn: LossFn, checkpoints: Checkpoints, memory_budget_bytes: int,
                    params_filter: params_lib.ParamsFilter | None = None
                    ) -> tuple[LossFn, list[Checkpoint]]:
  """The cheap checks of `influence`'s arguments, before any data are read.

  Args:
    loss_fn: `loss_fn(params, example[, state]) -> [K]`.
    checkpoints: as for `check_checkpoints`.
    memory_budget_bytes: the budget, a positive integer.
    params_filter: a layer selection (see `tracin_jax.params`), or None for all parameters.

  Returns:
    (the loss to differentiate, its checkpoints): `loss_fn` and the checked checkpoints, or,
    with `params_filter`, a loss of the kept parameters only and checkpoints whose params
    are the kept ones (the others travel in the state, with the model's own state, and get
    no gradient).

  Raises:
    TypeError / ValueError: a loss that is not callable, a budget that is not a positive
      integer, or bad checkpoints (see `check_checkpoints`).
  """
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
  if int(memory_budget_bytes) != memory_budget_bytes or memory_budget_bytes <= 0:
    raise ValueError(f"memory_budget_bytes must be a positive integer, got "
                     f"{memory_budget_bytes!r}.")
  checkpoints = check_checkpoints(checkpoints)
  if params_filter is None:
    return loss_fn, checkpoints
  return _restrict(loss_fn, checkpoints, params_filter)


def gradient_layout(loss_fn: LossFn, checkpoint: Checkpoint, data: data_lib.Data,
                    projection: projection_lib.Projection | None = None
                    ) -> tuple[int, int, np.dtype]:
  """What one example's gradients take.

  Args:
    loss_fn: the loss to differentiate (from `check_arguments`).
    checkpoint: a checkpoint of that loss (its params are the differentiated ones).
    data: the data; the loss is evaluated on the shapes of one of its examples (test
      examples share train's structure, hence K).
    projection: the projection the rows go through, or None.

  Returns:
    (K, the bytes of one example's K gradient rows, projected if a projection is given,
    their dtype).

  Raises:
    ValueError: a loss that is neither a scalar nor [K]; any error of evaluating the loss
      gets a note naming the data and the example structure.
  """
  k = _num_outputs(loss_fn, checkpoint, data)  # test examples share the structure, hence K
  dtype = grads_lib.gradient_dtype(checkpoint.params)
  width = grads_lib.parameter_count(checkpoint.params) if projection is None else projection.dim
  return k, k * width * dtype.itemsize, dtype


def check_transform(normalize: bool, projection: projection_lib.Projection | None) -> None:
  """Checks the `normalize` and `projection` arguments.

  Raises:
    TypeError: `normalize` is not a bool, or `projection` is neither a `Projection` nor None.
  """
  if not isinstance(normalize, (bool, np.bool_)):
    raise TypeError(f"normalize must be True or False, got {normalize!r}.")
  if projection is not None and not isinstance(projection, projection_lib.Projection):
    raise TypeError("projection must be a tracin_jax.Projection or None, got "
                    f"{type(projection).__name__}.")
