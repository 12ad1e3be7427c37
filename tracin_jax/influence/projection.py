"""Random projections of per-example gradients (Johnson-Lindenstrauss), drawn from a seed.

A gradient row g (P numbers) becomes R g (d numbers) with a random R [d, P] such that
E[R^T R] = I, so inner products are kept in expectation, E[<R a, R b>] = <a, b>, and with
variance of order |a|^2 |b|^2 / d. TracIn scores are inner products of gradients, so the
scores of projected gradients estimate the exact ones; the same `Projection` (kind, d, seed)
must be applied to both sides.

No P x d matrix is ever held. Three kinds, all linear, all drawn from `seed`:

* "countsketch" (sparse JL with one non-zero per column; Clarkson and Woodruff 2013):
  coordinate i goes to bucket h(i) with sign s(i); O(P) per row, and 8 bytes per parameter
  for the hash (drawn once per seed, P and d, and kept on the device). Variance (|a|^2 |b|^2 + <a, b>^2 - 2 sum_i a_i^2 b_i^2) / d.
* "srht" (subsampled randomised Hadamard transform, a fast JL transform; Ailon and Chazelle
  2009): random signs, a Walsh-Hadamard transform over P padded to a power of two, d
  coordinates kept; O(P log P) per row (the signs and kept coordinates kept on the device).
* "dense": a Gaussian R drawn chunk by chunk of `chunk_columns` columns (each chunk from the
  seed and its index); O(P d) per row and per block of rows, the reference JL transform.
  Variance (|a|^2 |b|^2 + <a, b>^2) / d.

A fourth kind, "logra", is not applied to rows: it projects each layer inside the model,
from the layer's inputs and output gradients, so that no per-example gradient is formed
(`tracin_jax.influence.logra`; the gradient store builds and queries with it).

`factored_projection` is the per-layer factored projection (LoGra; Choe et al. 2024): for a
layer whose per-example weight gradient is `inputs^T @ output_grads` (a dense layer, or a
convolution with `inputs` its patches), it projects both factors first, so the P_layer =
a x c gradient is never formed; it equals the dense projection of the formed gradient by the
Kronecker matrix `A kron B` (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from tracin_jax.types import Array

KINDS = ("countsketch", "srht", "dense")
DEFAULT_KIND = "countsketch"
# The factored kind: projects inside the model (`tracin_jax.influence.logra`), so it takes a
# loss and its parameters, not formed gradient rows.
LOGRA = "logra"
# Columns of a dense projection drawn at once ([chunk, d] float32 at a time).
DEFAULT_CHUNK_COLUMNS = 8192


@dataclasses.dataclass(frozen=True)
class Projection:
  """A seeded random projection of gradient rows to `dim` numbers.

  Attributes:
    dim: d, the projected size (>= 1; for "logra" the most numbers per row).
    kind: "countsketch" (default), "srht" or "dense" (see the module docstring), or
      "logra": the per-layer factored projection, formed inside the model without the
      per-example gradient (`tracin_jax.influence.logra`; the gradient store takes it).
    seed: the seed; the same seed, kind and dim give the same projection everywhere.
    chunk_columns: columns drawn at once by "dense".
  """

  dim: int
  kind: str = DEFAULT_KIND
  seed: int = 0
  chunk_columns: int = DEFAULT_CHUNK_COLUMNS

  def __post_init__(self):
    if isinstance(self.dim, bool) or int(self.dim) != self.dim or self.dim < 1:
      raise ValueError(f"Projection dim must be a positive integer, got {self.dim!r}.")
    if self.kind not in (*KINDS, LOGRA):
      raise ValueError(f"Projection kind must be one of {(*KINDS, LOGRA)}, got "
                       f"{self.kind!r}.")
    if isinstance(self.seed, bool) or int(self.seed) != self.seed:
      raise ValueError(f"Projection seed must be an integer, got {self.seed!r}.")
    if int(self.chunk_columns) != self.chunk_columns or self.chunk_columns < 1:
      raise ValueError(f"chunk_columns must be a positive integer, got {self.chunk_columns!r}.")

  def __call__(self, rows: Array) -> Array:
    """Projects gradient rows.

    Args:
      rows: [R, P] float gradients.

    Returns:
      [R, dim] in the rows' dtype (at least float32).
    """
    if self.kind == LOGRA:
      raise ValueError("A Projection of kind 'logra' projects inside the model, not formed "
                       "gradient rows: give it to build_store (or use "
                       "tracin_jax.influence.logra.block_rows), or choose a kind of "
                       f"{KINDS} here.")
    rows = jnp.asarray(rows)
    if rows.ndim != 2:
      raise ValueError(f"Projection takes rows [R, P], got shape {rows.shape}.")
    if self.kind == "dense":
      return _dense_project(rows, jax.random.key(self.seed), self.dim, self.chunk_columns)
    return _sparse_project(rows, *_draws(self.kind, int(self.seed), rows.shape[1],
                                         int(self.dim)), kind=self.kind, dim=self.dim)

  def describe(self) -> dict:
    """The settings that define it, for metadata and fingerprints."""
    out = {"kind": self.kind, "dim": int(self.dim), "seed": int(self.seed)}
    if self.kind == "dense":
      out["chunk_columns"] = int(self.chunk_columns)
    return out


def _as_float(rows):
  return rows.astype(jnp.promote_types(rows.dtype, jnp.float32))


@functools.lru_cache(maxsize=4)
def _draws(kind: str, seed: int, num_columns: int, dim: int) -> tuple[Array, Array]:
  """The random draws of a sparse or structured projection of `num_columns` coordinates,
  made once per (kind, seed, P, d) and kept on the device (8 bytes per coordinate), so
  that projecting a block costs only the projection itself."""
  key = jax.random.key(seed)
  if kind == "countsketch":
    return countsketch_hash(key, num_columns, dim)
  return srht_draws(key, num_columns, dim)


@functools.partial(jax.jit, static_argnames=("kind", "dim"))
def _sparse_project(rows, first, second, *, kind, dim):
  rows = _as_float(rows)
  if kind == "countsketch":
    return jax.ops.segment_sum((rows * first.astype(rows.dtype)).T, second,
                               num_segments=dim).T
  return _srht(rows, first, second, dim)


@functools.partial(jax.jit, static_argnames=("dim", "chunk_columns"))
def _dense_project(rows, key, dim, chunk_columns):
  return _dense(_as_float(rows), key, dim, chunk_columns)


def _project(rows, key, dim, kind, chunk_columns):
  """The projection of `rows` with the draws of `key` (traceable: tests vmap it over keys)."""
  rows = _as_float(rows)
  if kind == "dense":
    return _dense(rows, key, dim, chunk_columns)
  if kind == "countsketch":
    signs, buckets = countsketch_hash(key, rows.shape[1], dim)
    return jax.ops.segment_sum((rows * signs).T, buckets, num_segments=dim).T
  return _srht(rows, *srht_draws(key, rows.shape[1], dim), dim)


def countsketch_hash(key, num_columns: int, dim: int) -> tuple[Array, Array]:
  """The sign s(i) and bucket h(i) in [0, dim) of each of `num_columns` coordinates."""
  bucket_key, sign_key = jax.random.split(key)
  buckets = jax.random.randint(bucket_key, (num_columns,), 0, dim)
  signs = jax.random.rademacher(sign_key, (num_columns,), dtype=jnp.float32)
  return signs, buckets


def srht_draws(key, num_columns: int, dim: int) -> tuple[Array, Array]:
  """The signs of the `num_columns` coordinates and the `dim` kept coordinates of the
  Hadamard transform (of length the next power of two)."""
  n = 1 << max(0, (num_columns - 1).bit_length())
  sign_key, pick_key = jax.random.split(key)
  signs = jax.random.rademacher(sign_key, (num_columns,), dtype=jnp.float32)
  picks = jax.random.choice(pick_key, n, (dim,), replace=dim > n)
  return signs, picks


def walsh_hadamard(x: Array) -> Array:
  """The unnormalised Walsh-Hadamard transform of each row of x [R, n], n a power of two."""
  r, n = x.shape
  if n & (n - 1):
    raise ValueError(f"walsh_hadamard needs a power-of-two length, got {n}.")
  h = 1
  while h < n:
    x = jnp.reshape(x, (r, n // (2 * h), 2, h))
    a, b = x[:, :, 0], x[:, :, 1]
    x = jnp.stack([a + b, a - b], axis=2)
    h *= 2
  return jnp.reshape(x, (r, n))


def _srht(rows, signs, picks, dim):
  p = rows.shape[1]
  n = 1 << max(0, (p - 1).bit_length())
  mixed = walsh_hadamard(jnp.pad(rows * signs.astype(rows.dtype), ((0, 0), (0, n - p))))
  return mixed[:, picks] / math.sqrt(dim)


def _dense(rows, key, dim, chunk_columns):
  r, p = rows.shape
  chunk = min(chunk_columns, p)
  n_chunks = -(-p // chunk)
  padded = jnp.pad(rows, ((0, 0), (0, n_chunks * chunk - p)))

  def step(i, acc):
    block = jax.lax.dynamic_slice_in_dim(padded, i * chunk, chunk, axis=1)
    gaussian = dense_chunk(key, i, chunk, dim, rows.dtype)
    # Columns past P are zero in `padded`, so the rows of the last chunk's matrix past P
    # meet zeros: the projection of P columns does not depend on the padding.
    return acc + jnp.matmul(block, gaussian, precision=jax.lax.Precision.HIGHEST)

  acc = jax.lax.fori_loop(0, n_chunks, step, jnp.zeros((r, dim), rows.dtype))
  return acc / math.sqrt(dim)


def dense_chunk(key, index, chunk: int, dim: int, dtype=jnp.float32) -> Array:
  """Rows index * chunk ... (index + 1) * chunk - 1 of the dense projection's Gaussian
  matrix [P, d] (before the 1 / sqrt(d) scale)."""
  return jax.random.normal(jax.random.fold_in(key, index), (chunk, dim), dtype)


def dense_matrix(projection: Projection, num_columns: int) -> Array:
  """The whole [P, d] matrix of a dense projection, scaled: for tests on small P only."""
  if projection.kind != "dense":
    raise ValueError(f"dense_matrix needs a dense projection, got {projection.kind!r}.")
  chunk = min(projection.chunk_columns, num_columns)
  key = jax.random.key(projection.seed)
  parts = [dense_chunk(key, i, chunk, projection.dim) for i in range(-(-num_columns // chunk))]
  return jnp.concatenate(parts)[:num_columns] / math.sqrt(projection.dim)


# ----------------------------------------------------------------------------- factored


def factor_matrices(seed: int, in_features: int, out_features: int, in_dim: int,
                    out_dim: int) -> tuple[Array, Array]:
  """The two Gaussian factors of a layer's factored projection.

  Returns:
    A [in_features, in_dim] / sqrt(in_dim) and B [out_features, out_dim] / sqrt(out_dim):
    `A kron B` is a JL projection of the layer's [in_features * out_features] gradient.
  """
  a_key, b_key = jax.random.split(jax.random.key(seed))
  a = jax.random.normal(a_key, (in_features, in_dim)) / math.sqrt(in_dim)
  b = jax.random.normal(b_key, (out_features, out_dim)) / math.sqrt(out_dim)
  return a, b


@jax.jit
def factored_projection(inputs: Array, output_grads: Array, a: Array, b: Array) -> Array:
  """The projected weight gradient of one layer for one example, never forming it (LoGra).

  The layer's weight gradient is `G = inputs^T @ output_grads` ([a, c]: a dense layer's
  inputs, or a convolution's input patches, one row per output position). Its projection
  `A^T G B` is computed as `(inputs @ A)^T (output_grads @ B)`: pos x (a d_in + c d_out +
  d_in d_out) multiply-adds instead of pos x a x c.

  Args:
    inputs: [pos, a] layer inputs (patches in the kernel's (kh, kw, c_in) order).
    output_grads: [pos, c] gradients of the loss with respect to the layer's outputs.
    a: [a, d_in] and b: [c, d_out], from `factor_matrices`.

  Returns:
    [d_in * d_out], equal to `vec(G) @ kron(a, b)` with vec row-major.
  """
  left = jnp.matmul(inputs, a, precision=jax.lax.Precision.HIGHEST)  # [pos, d_in]
  right = jnp.matmul(output_grads, b, precision=jax.lax.Precision.HIGHEST)  # [pos, d_out]
  return jnp.matmul(left.T, right, precision=jax.lax.Precision.HIGHEST).reshape(-1)


def conv_patches(x: Array, kernel_size: tuple[int, ...], padding="SAME", *,
                 strides: tuple[int, ...] | None = None,
                 lhs_dilation: tuple[int, ...] | None = None,
                 rhs_dilation: tuple[int, ...] | None = None) -> Array:
  """The input patches of a convolution of any spatial rank, in a kernel's
  (spatial..., c_in) order: (kh, kw, c_in) in 2-D, (kd, kh, kw, c_in) in 3-D.

  Args:
    x: [*spatial, C_in] one example's layer input ([H, W, C_in] or [D, H, W, C_in]).
    kernel_size: the window, one size per spatial axis ((kh, kw) or (kd, kh, kw)).
    padding: "SAME", "VALID" or one (low, high) pair per spatial axis, as the
      convolution's.
    strides, lhs_dilation, rhs_dilation: the convolution's, one per spatial axis (None:
      ones, a stride-1 undilated convolution).

  Returns:
    [positions, prod(kernel_size) * C_in]: row p is the patch output position p sees, so
    that a convolution's kernel gradient is `patches^T @ output_grads` reshaped to
    [*kernel_size, C_in, C_out].

  Raises:
    ValueError: a window whose rank is not the input's spatial rank.
  """
  kernel_size = tuple(int(w) for w in kernel_size)
  rank = x.ndim - 1
  if len(kernel_size) != rank:
    raise ValueError(f"kernel_size {kernel_size} has {len(kernel_size)} sizes; x {x.shape} "
                     f"has {rank} spatial axes.")
  if not 1 <= rank <= 3:
    raise ValueError(f"conv_patches handles 1 to 3 spatial axes, x {x.shape} has {rank}.")
  letters = "DHW"[-rank:]
  c = x.shape[-1]
  ones = (1,) * rank
  patches = jax.lax.conv_general_dilated_patches(
      x[None], kernel_size, tuple(strides or ones), padding,
      lhs_dilation=tuple(lhs_dilation or ones), rhs_dilation=tuple(rhs_dilation or ones),
      dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"))
  # Features come out channel-major (c_in, spatial...); reorder to the kernel's (spatial...,
  # c_in).
  patches = jnp.reshape(patches[0], (-1, c, *kernel_size))
  order = (0, *range(2, rank + 2), 1)
  return jnp.reshape(jnp.transpose(patches, order), (-1, math.prod(kernel_size) * c))
