"""Type aliases shared across the library."""

from typing import Any, Callable, Sequence

import jax

PyTree = Any
Params = PyTree
Example = PyTree  # one example's pytree (no leading example axis)
Batch = PyTree  # pytree of arrays with a leading example axis
Array = jax.Array
ApplyFn = Callable[[Params, Array], Array]  # (params, images [N,H,W,C]) -> logits [N,H,W,K+1]
LossFn = Callable[[Params, Example], Array]  # (params, example) -> [K] (or scalar)
Checkpoint = tuple[Params, float]  # (params, learning_rate eta_t)
Checkpoints = Sequence[Checkpoint]
