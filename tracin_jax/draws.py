"""Random draws equal to JAX's, drawn as a vector and reshaped: they compile in a fraction
of the time on XLA:CPU.

JAX's random bits depend only on the number of elements drawn, not on the shape (every key
implementation: threefry, partitionable or not, and RBG), and the normal and truncated
normal samplers transform the bits element by element. So `normal(key, shape)` here is
bit-identical to `jax.random.normal(key, shape)` (with JAX 0.10; with 0.12, XLA:CPU's
samplers give arrays whose last axis has 3 or 4 elements other values in the last bit for
some 5% of them: see `lecun_normal`). XLA:CPU, though, compiles a draw of a
4-dimensional shape in 1 to 1.7 s and the same draw as a vector in 0.2 s (a 3x3 kernel of
4 -> 8 channels, 2 cores): building a small UNet eagerly compiled one draw per parameter
shape, 11 of the 20 s it took to train the tests' tiny run. `tests/draws_test.py` checks
the equality against JAX and Flax for every key implementation and for every parameter of
a UNet (standard and transposed kernel layouts).

Drawn together. Each draw of a different size is still a kernel of its own, about 0.2 s of
XLA:CPU compilation, and a model has some twenty sizes. `lecun_normal` can therefore be
recorded and replayed: under `recording()` it notes each draw (key, shape, fan-in) and
returns zeros; `lecun_normal_together(requests)` then makes all of them in one compiled
call, draws of about equal sizes by one kernel in a loop over their keys (`lax.map`: under
`vmap` RBG keys give other bits than one by one), each padded to its group's largest size
and cut back; under `replaying(values)` the construction run again gets them in order. The
values are those of the draws one by one, bit for bit (JAX 0.10 and 0.12): JAX's bits for n
elements are the first n of its bits for more (partitionable threefry, the default, and both
RBG kinds; not the older threefry, whose draws are then made one by one; checked in
`tests/draws_test.py`), the sampler works element by element on vectors alike, and the
scale is computed as Flax computes it.
`tracin_jax.models.get_model` builds every model this way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Shape = Sequence[int]


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
  """`flax.nnx.initializers.lecun_normal(in_axis, out_axis)`: the same distribution, drawn
  as a vector and reshaped.

  `variance_scaling`'s draw (mode "fan_in", scale 1, truncated normal) made as the vector
  of the kernel's size, `truncated_normal(key, -2, 2, (size,)) * stddev`, with
  stddev = sqrt(1 / fan_in) / 0.8796... computed as Flax computes it. With JAX 0.10 the
  values are Flax's own, bit for bit, for every kernel of the models (`tests/draws_test.py`).
  With JAX 0.12, XLA:CPU's sampler gives arrays whose last axis has 3 or 4 elements other
  values in the last bit for some 5% of them (Flax's own head kernel [1, 1, C, 4] among
  them); the vector is the one layout every kernel shares, and the one `recording` and
  `lecun_normal_together` draw: a construction drawn together is the plain one exactly.
  """

  def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
    shape = tuple(shape)
    rows = fan_in(shape, in_axis, out_axis)
    dtype = np.dtype(dtype)
    mode = getattr(_MODE, "current", None)
    if mode is not None:
      return mode.lecun_normal(key, shape, dtype, rows)
    return _lecun_vector(key, _lecun_stddev(rows, dtype), math.prod(shape),
                         dtype.name).reshape(shape)

  return init


@functools.partial(jax.jit, static_argnames=("size", "dtype"))
def _lecun_vector(key: jax.Array, stddev: np.ndarray, size: int, dtype: str) -> jax.Array:
  """[size] `truncated_normal(key, -2, 2) * stddev`, as `variance_scaling` draws it."""
  return jax.random.truncated_normal(key, -2, 2, (size,), dtype) * stddev


# ---------------------------------------------------------------------------------------------
# Drawn together: record, draw in one call, replay.


@dataclasses.dataclass(frozen=True)
class LecunRequest:
  """One `lecun_normal` draw as a construction asked for it.

  Attributes:
    key: the scalar PRNG key it was given (any key implementation).
    shape: the parameter's shape.
    dtype: its dtype.
    fan_in: the fan-in that sets its scale, 1 / sqrt(fan_in) before truncation.
  """

  key: jax.Array
  shape: tuple[int, ...]
  dtype: np.dtype
  fan_in: int

  @property
  def size(self) -> int:
    return math.prod(self.shape)


class Recording:
  """The draws of one construction under `recording()`, in order.

  Attributes:
    requests: the `LecunRequest`s, in the order they were asked for.
    together: False when a key cannot be drawn ahead with the others: traced (the
      construction ran under `jax.jit`, `nnx.eval_shape` or another transform), with a
      batch shape, or of a kind whose bits for n elements are not the first n of its bits
      for more (threefry with `jax_threefry_partitionable` off, or a custom kind). The
      construction should then simply run as it is.
  """

  def __init__(self):
    self.requests: list[LecunRequest] = []
    self.together = True

  def lecun_normal(self, key, shape, dtype, rows) -> np.ndarray:
    if drawn_together(key):
      self.requests.append(LecunRequest(key, shape, dtype, rows))
    else:
      self.together = False
    return np.zeros(shape, dtype)


def drawn_together(key) -> bool:
  """Whether `lecun_normal_together` can draw with `key`: a concrete scalar typed key of a
  kind whose bits for n elements are the first n of its bits for more."""
  if (isinstance(key, jax.core.Tracer) or not isinstance(key, jax.Array)
      or not jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape):
    return False
  impl = str(jax.random.key_impl(key))
  return impl in ("rbg", "unsafe_rbg") or (impl == "threefry2x32"
                                           and jax.config.jax_threefry_partitionable)


class _Replay:

  def __init__(self, requests: Sequence[LecunRequest], values: Sequence[jax.Array]):
    self.requests, self.values, self.position = requests, values, 0

  def lecun_normal(self, key, shape, dtype, rows) -> jax.Array:
    del key  # the recorded one: the construction is run again from the same streams
    i = self.position
    if i >= len(self.requests) or (self.requests[i].shape, self.requests[i].dtype,
                                   self.requests[i].fan_in) != (shape, dtype, rows):
      raise RuntimeError(
          f"draw {i} of the replayed construction is {shape} {dtype} (fan-in {rows}), not the "
          "recorded one: the construction must ask for the same draws in the same order "
          "each time it runs")
    self.position += 1
    return self.values[i]


_MODE = threading.local()


@contextlib.contextmanager
def _mode(mode) -> Iterator:
  previous = getattr(_MODE, "current", None)
  _MODE.current = mode
  try:
    yield mode
  finally:
    _MODE.current = previous


def recording() -> contextlib.AbstractContextManager[Recording]:
  """Within it, `lecun_normal` initialisers draw nothing: they note each request in the
  `Recording` it yields and return zeros (numpy arrays of the shape and dtype asked)."""
  return _mode(Recording())


@contextlib.contextmanager
def replaying(requests: Sequence[LecunRequest], values: Sequence[jax.Array]) -> Iterator[None]:
  """Within it, `lecun_normal` initialisers return `values` in order, each checked against
  the recorded request of its place (shape, dtype, fan-in).

  Raises:
    ValueError: for as many values as requests.
    RuntimeError: when a draw differs from the recorded one (raised by the initialiser),
      or the block asked for fewer or more draws than recorded.
  """
  if len(requests) != len(values):
    raise ValueError(f"{len(requests)} requests and {len(values)} values")
  with _mode(_Replay(requests, values)) as replay:
    yield
  if replay.position != len(requests):
    raise RuntimeError(f"the replayed construction drew {replay.position} of the "
                       f"{len(requests)} recorded draws: it must ask for the same draws "
                       "each time it runs")


# One more compiled draw (0.3 to 0.4 s of XLA:CPU compilation, 2 cores) costs about as much
# as drawing eight million numbers more with RBG (45 ns each, one core), 20 million with
# threefry (15 ns): sizes are grouped, each group padded to its largest, where that saves
# time. A demo model is one group; the paper's (31M parameters) three or four.
_NUMBERS_PER_KERNEL = 1 << 23


def size_groups(sizes: Sequence[int], numbers_per_kernel: int = _NUMBERS_PER_KERNEL
                ) -> list[list[int]]:
  """Indices of `sizes` grouped to be drawn together, each group padded to its largest.

  The groups are runs of the sizes in increasing order that minimise
  `numbers_per_kernel * groups + sum over groups of (members * largest size)`: every draw
  of a group costs as many numbers as its largest. Exact, by dynamic programming over the
  sorted sizes (a few dozen).

  Returns:
    Lists of indices into `sizes`, each in increasing order of size, the groups in
    increasing order of their largest size.
  """
  order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
  s = [sizes[i] for i in order]
  cost, cut = [0] + [math.inf] * len(s), [0] * (len(s) + 1)
  for j in range(1, len(s) + 1):
    for i in range(j):
      c = cost[i] + numbers_per_kernel + (j - i) * s[j - 1]
      if c < cost[j]:
        cost[j], cut[j] = c, i
  groups, j = [], len(s)
  while j:
    groups.append(order[cut[j]:j])
    j = cut[j]
  return groups[::-1]


def _lecun_stddev(fan_in_: int, dtype: np.dtype) -> np.ndarray:
  """The scale `jax.nn.initializers.lecun_normal` multiplies its truncated normal by,
  computed with its operations in `dtype` (`variance_scaling`, mode "fan_in", scale 1:
  sqrt(variance) / 0.8796...); numpy's, as IEEE rounds them (no eager op compiled)."""
  variance = np.asarray(1.0 / fan_in_, dtype=dtype)
  return np.sqrt(variance) / np.asarray(.87962566103423978, dtype)


@functools.partial(jax.jit, static_argnames="plan")
def _draw_groups(keys, scales, plan):
  """plan: ((size, dtype name), ...), one per group; keys: one tuple of M scalar keys per
  group; scales: one [M] array per group. Returns one [M, size] array per group: row r is
  `truncated_normal(key_r, -2, 2, (size,)) * scale_r`, as `variance_scaling` draws it.
  A loop over the keys, not `vmap`: vmapped, RBG keys draw other bits than one by one."""
  out = []
  for (size, dtype), group_keys, scale in zip(plan, keys, scales):
    rows = jax.lax.map(lambda k, size=size, dtype=dtype: jax.random.truncated_normal(
        k, -2, 2, (size,), dtype), jnp.stack(group_keys))
    out.append(rows * scale[:, None])
  return out


def lecun_normal_together(requests: Sequence[LecunRequest],
                          numbers_per_kernel: int = _NUMBERS_PER_KERNEL) -> list[jax.Array]:
  """The values `lecun_normal` draws for `requests`, made by one compiled call.

  Requests of one dtype are grouped by size (`size_groups`); a group's keys are stacked
  and drawn by one kernel in a loop, at the group's largest size, and each row is cut to
  its request's size and shape. Equal to drawing them one by one, bit for bit; the call is
  compiled once per key implementation and list of groups.

  Args:
    requests: the draws, e.g. a `Recording`'s; every key `drawn_together`.
    numbers_per_kernel: what one more group costs, in numbers drawn (`size_groups`).

  Returns:
    One array per request, in order, of its shape and dtype.

  Raises:
    ValueError: for a key that is not `drawn_together`.
  """
  by_dtype: dict[np.dtype, list[int]] = {}
  for i, r in enumerate(requests):
    if not drawn_together(r.key):
      raise ValueError(f"request {i}: its key ({r.key.dtype}, shape {r.key.shape}) cannot "
                       "be drawn together with others; see `drawn_together`")
    by_dtype.setdefault(r.dtype, []).append(i)
  plan, indices, keys, scales = [], [], [], []
  for dtype, members in by_dtype.items():
    for group in size_groups([requests[i].size for i in members], numbers_per_kernel):
      index = [members[g] for g in group]
      plan.append((requests[index[-1]].size, dtype.name))
      indices.append(index)
      keys.append(tuple(requests[i].key for i in index))
      scales.append(np.stack([_lecun_stddev(requests[i].fan_in, dtype) for i in index]))
  rows = _draw_groups(tuple(keys), tuple(scales), plan=tuple(plan))
  values: list[jax.Array | None] = [None] * len(requests)
  for index, group_rows in zip(indices, rows):
    # Cut on the host and put back (`device_put`, not `jnp.asarray`, which compiles a copy
    # per shape): no compiled slice per shape.
    host = np.asarray(group_rows)
    for row, i in zip(host, index):
      values[i] = jax.device_put(row[:requests[i].size].reshape(requests[i].shape))
  return values
