"""Shared machinery of the saliency methods: chunked sums over samples, memory budget,
baselines, resizing and display normalisation.

Every method sums (or averages) per-sample results over S samples (noise draws, integration
nodes, deletion steps). `chunked_sum` evaluates them `chunk_size` at a time: one jitted
kernel, vmapped over a chunk, called from a Python loop over chunks (not a `lax.scan`:
XLA:CPU runs convolutions about 3x slower inside a while loop), so that at most one chunk of
per-sample intermediates is alive. chunk_size = S is a plain vmap, chunk_size = 1 a
sequential loop, and the result does not depend on the choice (up to floating-point
summation order). When no `chunk_size` is given, `auto_chunk_size` picks the largest chunk
whose estimated memory fits `memory_budget_bytes`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax import params as params_lib
from tracin_jax.types import Array, PyTree

DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30


def spatial_axes(x: Array) -> tuple[int, ...]:
  """The spatial axes of a [N, *spatial, C] array: (1, ..., ndim - 2)."""
  return tuple(range(1, x.ndim - 1))


def check_input(x: Array, *, allow_3d: bool = True) -> Array:
  """x as an array of shape [N, H, W, C] (or [N, D, H, W, C] when allowed).

  Raises:
    ValueError: for another rank.
  """
  x = jnp.asarray(x)
  ranks = (4, 5) if allow_3d else (4,)
  if x.ndim not in ranks:
    shapes = "[N, H, W, C]" + (" or [N, D, H, W, C]" if allow_3d else "")
    raise ValueError(f"x must be {shapes}, got shape {tuple(x.shape)}")
  return x


def make_baseline(x: Array, baseline: Any) -> Array:
  """The baseline image of integrated gradients and deletion curves.

  Args:
    x: [N, *spatial, C] input.
    baseline: a number (0.0: black image; in [-1, 1]-scaled MRI -1 is the darkest value),
      "min" (each example's per-channel minimum over space), or an array broadcastable to x.

  Returns:
    [N, *spatial, C], x's dtype.
  """
  if isinstance(baseline, str):
    if baseline != "min":
      raise ValueError(f"baseline must be a number, 'min' or an array, got {baseline!r}")
    value = jnp.min(x, axis=spatial_axes(x), keepdims=True)
  else:
    value = jnp.asarray(baseline, x.dtype)
  return jnp.broadcast_to(value, x.shape).astype(x.dtype)


def chunks(num: int, chunk_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Splits sample indices 0..num-1 into chunks of exactly `chunk_size` (>= 1).

  Returns:
    [(indices [chunk], valid [chunk] bool)]: the last chunk is padded with index 0 and
    valid False, so that every chunk has the same shape (one compilation).
  """
  chunk = max(1, min(int(chunk_size), num))
  out = []
  for start in range(0, num, chunk):
    idx = np.arange(start, start + chunk)
    valid = idx < num
    out.append((np.where(valid, idx, 0), valid))
  return out


def chunked_sum(kernel: Callable[..., PyTree], samples: PyTree, weights: np.ndarray,
                chunk_size: int) -> PyTree:
  """sum_s weights[s] * f(samples[s]), one jitted `kernel` call per chunk of samples.

  The loop over chunks is a Python loop, not a `lax.scan`: XLA:CPU runs convolutions inside
  a while loop about 3x slower than the same ops outside one (measured on the UNets here),
  and one compiled chunk kernel is reused for every chunk.

  Args:
    kernel: kernel(sample_chunk, weight_chunk) -> the weighted sum over the chunk (vmapped
      over its leading axis and jitted by the caller).
    samples: pytree of arrays (numpy preferred: slicing is free) with a leading axis S.
    weights: [S] weights; padding samples of the last chunk get weight 0.
    chunk_size: samples per call.

  Returns:
    The pytree of weighted sums.
  """
  weights = np.asarray(weights)
  total = None
  for idx, valid in chunks(len(weights), chunk_size):
    part = kernel(jax.tree.map(lambda leaf: leaf[idx], samples),
                  np.where(valid, weights[idx], 0).astype(weights.dtype))
    total = part if total is None else jax.tree.map(jnp.add, total, part)
  return total


def _jaxpr_bytes(jaxpr) -> int:
  """Bytes of every value an (open) jaxpr and its sub-jaxprs define: no buffer reuse."""
  total = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      aval = getattr(var, "aval", None)
      if hasattr(aval, "shape") and hasattr(aval, "dtype"):
        total += int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += _jaxpr_bytes(inner)
  return total


_BYTES_CACHE: dict = {}


def estimate_bytes(fn: Callable[..., Any], static: tuple, *args: PyTree) -> int:
  """Upper bound on the memory of one call `fn(*static, *args)`: the bytes of all values its
  jaxpr defines, as if no buffer were ever freed or reused. Cached per (fn, static, the
  args' structure, shapes and dtypes); `fn` and `static` must be hashable.

  Args:
    fn: a function of (*static, *args).
    static: hashable leading arguments (functions, ints, strings).
    *args: pytrees of arrays (only their shapes and dtypes are used).
  """
  leaves, treedef = jax.tree.flatten(args)
  avals = tuple((tuple(np.shape(a)), jnp.result_type(a)) for a in leaves)
  key = (fn, static, treedef, avals)
  try:
    return _BYTES_CACHE[key]
  except TypeError:
    key = None
  except KeyError:
    pass
  abstract = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in avals])
  value = _jaxpr_bytes(jax.make_jaxpr(lambda *a: fn(*static, *a))(*abstract).jaxpr)
  if key is not None:
    if len(_BYTES_CACHE) > 256:
      _BYTES_CACHE.clear()
    _BYTES_CACHE[key] = value
  return value


def auto_chunk_size(num_samples: int, per_sample_bytes: int, chunk_size: int | None,
                    memory_budget_bytes: int | None) -> int:
  """`chunk_size` if given, else the most samples whose estimated memory fits the budget.

  Raises:
    ValueError: for a chunk size below 1.
  """
  if chunk_size is not None:
    if int(chunk_size) < 1:
      raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return min(int(chunk_size), num_samples)
  budget = DEFAULT_MEMORY_BUDGET_BYTES if memory_budget_bytes is None else memory_budget_bytes
  return int(max(1, min(num_samples, budget // max(1, per_sample_bytes))))


def resize_spatial(maps: Array, spatial: tuple[int, ...]) -> Array:
  """(Bi/tri)linear resize of [N, *spatial_in] maps to [N, *spatial] (half-pixel centres,
  no antialiasing), as `jax.image.resize(..., "linear")` does."""
  if tuple(maps.shape[1:]) == tuple(spatial):
    return maps
  return jax.image.resize(maps, (maps.shape[0], *spatial), method="linear", antialias=False)


def display(maps: Array, *, absolute: bool = False, eps: float = 1e-12) -> Array:
  """Scales each example's map to [0, 1] for display (a figure's colour scale only).

  Args:
    maps: [N, ...] maps.
    absolute: scale |maps| by its maximum (signed maps); otherwise (maps - min) /
      (max - min), which leaves a non-negative map's zeros at 0 only if its minimum is 0.

  Returns:
    [N, ...] in [0, 1]; a constant map becomes 0.
  """
  maps = jnp.asarray(maps)
  axes = tuple(range(1, maps.ndim))
  if absolute:
    maps = jnp.abs(maps)
    return maps / jnp.maximum(jnp.max(maps, axis=axes, keepdims=True), eps)
  low = jnp.min(maps, axis=axes, keepdims=True)
  high = jnp.max(maps, axis=axes, keepdims=True)
  return (maps - low) / jnp.maximum(high - low, eps)


# Parameter groups have one owner, `tracin_jax.params`.
param_group_names = params_lib.group_names
param_group_mask = params_lib.group_mask