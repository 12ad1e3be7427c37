"""Blocked, budgeted Gram products of per-example gradients, accumulated over checkpoints.

The TracIn matrix of one checkpoint is `eta_t G_rows G_cols^T`, with G the per-example
gradients raveled to `[n * K, P]`. G of a whole data set rarely fits in memory, so the
examples are cut into blocks of `block_size` examples (the last block of a side holds what is
left: it is never padded, so no gradient is computed for an example that is not there), and
the product is formed block by block:

* `plan_blocks` derives the block size from the memory budget and the bytes of one example's
  gradients (K * P * itemsize), and how many blocks may be held at once.
* `accumulate_gram` holds a group of blocks of one side and streams the blocks of the other
  side past them. When a whole side fits in the budget it is computed once per checkpoint;
  otherwise the streamed side is recomputed once per group. For train-influence (symmetric)
  only the blocks on or above the block diagonal are formed and each is mirrored.

This module knows nothing of losses or data: the caller hands it functions that produce
gradient blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.types import Array

# Bytes of per-example gradients held at once, unless the caller says otherwise.
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30
# Examples per block unless `batch_size` is given (the budget may lower it): bounds the
# activation memory of one vectorised gradient call, which the budget does not count.
DEFAULT_BATCH_SIZE = 64

# A block producer: blocks(start, stop) yields (block_index, grads [m * K, P]) for the block
# indices start, start + 1, ..., stop - 1, in order; m = block_size except for a side's last
# block, which holds the m <= block_size examples left.
BlockProducer = Callable[[int, int], Iterator[tuple[int, Array]]]


@jax.jit
def gram_block(rows: Array, cols: Array, learning_rate: Array) -> Array:
  """learning_rate * rows @ cols.T at full float32 precision (no TF32 on GPUs).

  Args:
    rows: [R, P] gradients.
    cols: [C, P] gradients.
    learning_rate: scalar eta_t.

  Returns:
    [R, C].
  """
  return learning_rate * jnp.matmul(rows, cols.T, precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """How a Gram matrix is cut into blocks.

  Attributes:
    n_rows: examples on the row side (test, or train for train-influence).
    n_cols: examples on the column side (train).
    block_size: examples per block, B (one compiled shape).
    group_blocks: blocks of the held side held at once.
    hold: "rows" or "cols", the side whose blocks are held while the other is streamed.
    symmetric: train-influence (rows and columns are the same examples).
  """

  n_rows: int
  n_cols: int
  block_size: int
  group_blocks: int
  hold: str
  symmetric: bool

  @property
  def n_row_blocks(self) -> int:
    return -(-self.n_rows // self.block_size)

  @property
  def n_col_blocks(self) -> int:
    return -(-self.n_cols // self.block_size)

  def groups(self) -> list[tuple[int, int]]:
    """[start, stop) block ranges of the held side, one per group."""
    n = self.n_row_blocks if self.hold == "rows" else self.n_col_blocks
    return [(s, min(s + self.group_blocks, n)) for s in range(0, n, self.group_blocks)]

  def gradient_blocks(self) -> int:
    """How many gradient blocks one checkpoint computes (recomputations included)."""
    held, streamed = ((self.n_row_blocks, self.n_col_blocks) if self.hold == "rows"
                      else (self.n_col_blocks, self.n_row_blocks))
    if self.symmetric:
      return held + sum(held - stop for _, stop in self.groups())
    return held + streamed * len(self.groups())

  def gradient_examples(self) -> int:
    """How many example gradients one checkpoint computes (recomputations included; the
    last block of a side is ragged, never padded)."""
    held, streamed = ((self.n_rows, self.n_cols) if self.hold == "rows"
                      else (self.n_cols, self.n_rows))
    if self.symmetric:
      return held + sum(held - min(stop * self.block_size, held) for _, stop in self.groups())
    return held + streamed * len(self.groups())


def plan_blocks(
    n_rows: int,
    n_cols: int,
    bytes_per_example: int,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    batch_size: int | None = None,
    symmetric: bool = False,
) -> BlockPlan:
  """Derives the block size and the held groups from a memory budget.

  The block size is B = min(batch_size (default `DEFAULT_BATCH_SIZE`), the larger side,
  budget // (2 * bytes_per_example)): room for at least one held and one streamed block. The
  budget then holds m = budget // (B * bytes_per_example) blocks. If a whole side fits beside
  one streamed block, it is held and every gradient is computed once per checkpoint;
  otherwise groups of m - 1 blocks are held and the other side is streamed once per group.
  The side to hold is the one that computes fewer example gradients (then fewer blocks).

  Args:
    n_rows: examples on the row side (>= 1).
    n_cols: examples on the column side (>= 1); equal to n_rows when symmetric.
    bytes_per_example: K * P * itemsize, the bytes of one example's gradients.
    memory_budget_bytes: bytes of gradients that may be held at once.
    batch_size: the largest block size wanted, or None.
    symmetric: train-influence; only blocks on or above the diagonal are formed.

  Returns:
    The plan.

  Raises:
    ValueError: the budget cannot hold two examples' gradients, or bad sizes.
  """
  if n_rows < 1 or n_cols < 1:
    raise ValueError(f"Need at least one example on each side, got {n_rows} and {n_cols}.")
  if symmetric and n_rows != n_cols:
    raise ValueError(f"A symmetric plan needs n_rows == n_cols, got {n_rows}, {n_cols}.")
  if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
    raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
  fit = int(memory_budget_bytes) // (2 * bytes_per_example)
  if fit < 1:
    raise ValueError(
        f"memory_budget_bytes={memory_budget_bytes} cannot hold the gradients of two examples "
        f"(2 x K x P x itemsize = {2 * bytes_per_example} bytes); raise the budget.")
  block_size = min(int(batch_size or DEFAULT_BATCH_SIZE), max(n_rows, n_cols), fit)
  capacity = int(memory_budget_bytes) // (block_size * bytes_per_example)  # >= 2 blocks
  candidates = []
  for hold in ("rows",) if symmetric else ("cols", "rows"):
    plan = BlockPlan(n_rows, n_cols, block_size, 1, hold, symmetric)
    n_held = plan.n_row_blocks if hold == "rows" else plan.n_col_blocks
    # A whole side that fits is held; symmetric, it then needs no streamed block beside it.
    group = n_held if n_held <= (capacity if symmetric else capacity - 1) else capacity - 1
    plan = dataclasses.replace(plan, group_blocks=group)
    candidates.append((plan.gradient_examples(), plan.gradient_blocks(), n_held, plan))
  return min(candidates, key=lambda c: c[:3])[3]


class _Sink:
  """Adds Gram blocks into a host array, one block behind the device.

  Reading a block back waits for it; keeping one block pending lets the device work on the
  next block while the host adds the previous one.
  """

  def __init__(self, out: np.ndarray, plan: BlockPlan, k: int):
    self._out, self._plan, self._k = out, plan, k
    self._pending = None

  def _span(self, block: int, n: int) -> slice:
    b, k = self._plan.block_size, self._k
    return slice(block * b * k, min((block + 1) * b, n) * k)

  def add(self, row_block: int, col_block: int, value: Array) -> None:
    self.flush()
    self._pending = (row_block, col_block, value)

  def flush(self) -> None:
    if self._pending is None:
      return
    i, j, value = self._pending
    self._pending = None
    rows, cols = self._span(i, self._plan.n_rows), self._span(j, self._plan.n_cols)
    block = np.asarray(value)
    if block.shape != (rows.stop - rows.start, cols.stop - cols.start):
      raise ValueError(f"Gram block ({i}, {j}) has shape {block.shape}, expected "
                       f"{(rows.stop - rows.start, cols.stop - cols.start)}: a producer "
                       "yielded a block of the wrong size.")
    if self._plan.symmetric and i == j:
      block = 0.5 * (block + block.T)  # exactly symmetric, whatever the matmul's order
    self._out[rows, cols] += block
    if self._plan.symmetric and i != j:
      self._out[cols, rows] += block.T


def accumulate_gram(
    out: np.ndarray,
    plan: BlockPlan,
    k: int,
    row_blocks: BlockProducer,
    col_blocks: BlockProducer,
    learning_rate: float,
) -> None:
  """out += learning_rate * G_rows G_cols^T, block by block, within the plan's budget.

  Args:
    out: [n_rows * K, n_cols * K] host array, updated in place. Row a * K + i, column
      b * K + j holds the product of output i of row example a and output j of column
      example b.
    plan: from `plan_blocks`.
    k: K, outputs per example.
    row_blocks: produces row-side gradient blocks ([m * K, P], the last one ragged).
    col_blocks: produces column-side blocks; ignored when the plan is symmetric.
    learning_rate: eta_t of this checkpoint.
  """
  sink = _Sink(out, plan, k)
  lr = float(learning_rate)  # weakly typed: the product keeps the gradients' dtype
  if plan.symmetric:
    col_blocks = row_blocks
  held_blocks, streamed_blocks = ((row_blocks, col_blocks) if plan.hold == "rows"
                                  else (col_blocks, row_blocks))
  n_streamed = plan.n_col_blocks if plan.hold == "rows" else plan.n_row_blocks

  def product(h: int, gh: Array, s: int, gs: Array) -> None:
    if plan.hold == "rows":
      sink.add(h, s, gram_block(gh, gs, lr))
    else:
      sink.add(s, h, gram_block(gs, gh, lr))

  def group(start: int, stop: int) -> None:  # its locals (the held blocks) die on return
    held = []
    for h, gh in held_blocks(start, stop):
      if plan.symmetric:  # pairs inside the group, on or above the diagonal
        for h2, gh2 in held:
          sink.add(h2, h, gram_block(gh2, gh, lr))
        sink.add(h, h, gram_block(gh, gh, lr))
      held.append((h, gh))
    first = stop if plan.symmetric else 0
    if first < n_streamed:
      for s, gs in streamed_blocks(first, n_streamed):
        for h, gh in held:
          product(h, gh, s, gs)
        del gs  # not alive while the next block is computed

  for start, stop in plan.groups():
    group(start, stop)
  sink.flush()

