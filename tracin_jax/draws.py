"""Random draws equal to JAX's, drawn as a vector and reshaped: they compile in a fraction
of the time on XLA:CPU.

JAX's random bits depend only on the number of elements drawn, not on the shape (every key
implementation: threefry, partitionable or not, and RBG), and the normal and truncated
normal samplers transform the bits element by element. So `normal(key, shape)` here is
bit-identical to `jax.random.normal(key, shape)`. XLA:CPU, though, compiles a draw of a
4-dimensional shape in 1 to 1.7 s and the same draw as a vector in 0.2 s (a 3x3 kernel of
4 -> 8 channels, 2 cores): building a small UNet eagerly compiled one draw per parameter
shape, 11 of the 20 s it took to train the tests' tiny run. `tests/draws_test.py` checks
the equality against JAX and Flax for every key implementation and for every parameter of
a UNet (standard and transposed kernel layouts).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

Shape = Sequence[int]

_LECUN_2D = jax.nn.initializers.lecun_normal()  # fan_in = rows of a 2-D shape


def normal(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
  """`jax.random.normal(key, shape, dtype)`, the same values."""
  shape = tuple(shape)
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def fan_in(shape: Shape, in_axis: int | Sequence[int] = -2,
           out_axis: int | Sequence[int] = -1) -> int:
  """The fan-in of a kernel of `shape` as `jax.nn.initializers.variance_scaling` counts it:
  the input axes' size times the receptive field (the axes neither input nor output)."""
  shape = tuple(shape)

  def size(axes):
    return shape[axes] if isinstance(axes, int) else math.prod(shape[a] for a in axes)

  field = math.prod(shape) // (size(in_axis) * size(out_axis))
  return size(in_axis) * field


def lecun_normal(in_axis: int | Sequence[int] = -2, out_axis: int | Sequence[int] = -1):
  """`flax.nnx.initializers.lecun_normal(in_axis, out_axis)`, the same values.

  Drawn as the 2-D kernel [fan_in, rest], whose fan-in is the same, and reshaped.
  """

  def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
    shape = tuple(shape)
    rows = fan_in(shape, in_axis, out_axis)
    return _LECUN_2D(key, (rows, math.prod(shape) // rows), dtype).reshape(shape)

  return init
