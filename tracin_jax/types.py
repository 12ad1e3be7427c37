"""Type aliases shared across the library, and the checkpoint type of TracIn."""

from typing import Any, Callable, NamedTuple, Sequence

import jax

PyTree = Any
Params = PyTree
State = PyTree  # a model's non-parameter arrays (BatchNorm statistics), or None
Example = PyTree  # one example's pytree (no leading example axis)
Batch = PyTree  # pytree of arrays with a leading example axis
Array = jax.Array
ApplyFn = Callable[..., Array]  # (params, images [N,H,W,C][, state]) -> logits [N,H,W,K+1]
LossFn = Callable[..., Array]  # (params, example[, state]) -> [K] (or scalar)


class Checkpoint(NamedTuple):
  """One TracIn checkpoint: parameters theta_t, learning rate eta_t and, where the model
  has any, its non-parameter state at t (BatchNorm statistics).

  A plain `(params, learning_rate)` pair is a checkpoint without state. With a state, the
  loss is called `loss_fn(params, example, state)`: each checkpoint's gradients use that
  checkpoint's own state, never another's.
  """

  params: Params
  learning_rate: float
  state: State = None


Checkpoints = Sequence[Checkpoint | tuple[Params, float]]
