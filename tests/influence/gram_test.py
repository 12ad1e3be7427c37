"""Blocked Gram products against the dense product, and the budget arithmetic."""

import numpy as np
import pytest

from tracin_jax.influence import gram


def fake_producer(g, block_size, calls):
  """Blocks of a fixed [n * K, P] matrix, the last one ragged like real gradient blocks;
  logs the block indices and the examples produced."""

  def blocks(start, stop):
    for block in range(start, stop):
      rows = g[block * block_size * K: (block + 1) * block_size * K]
      calls.append((block, rows.shape[0] // K))
      yield block, rows

  return blocks


K, P = 2, 7


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n_rows,n_cols,batch_size,budget_blocks", [
    (5, 9, 4, 2),      # nothing fits: groups of one block, block size divides nothing
    (5, 9, 2, 3),      # groups of two
    (7, 7, 3, 100),    # everything fits
    (1, 9, None, 2),   # one test example
    (9, 1, 4, 3),
    (6, 6, 6, 2),      # one block
])
def test_blocked_equals_dense(n_rows, n_cols, batch_size, budget_blocks, symmetric):
  if symmetric:
    n_cols = n_rows
  rng = np.random.default_rng(n_rows * 100 + n_cols)
  g_rows = rng.normal(size=(n_rows * K, P)).astype(np.float32)
  g_cols = g_rows if symmetric else rng.normal(size=(n_cols * K, P)).astype(np.float32)
  bytes_per_example = K * P * 4
  block = batch_size or gram.DEFAULT_BATCH_SIZE
  budget = budget_blocks * min(block, max(n_rows, n_cols)) * bytes_per_example
  plan = gram.plan_blocks(n_rows, n_cols, bytes_per_example, budget, batch_size, symmetric)
  calls = []
  out = np.zeros((n_rows * K, n_cols * K), np.float32)
  for learning_rate in (0.5, 0.25):  # two checkpoints, same gradients: 0.75 G G^T
    gram.accumulate_gram(out, plan, K, fake_producer(g_rows, plan.block_size, calls),
                         fake_producer(g_cols, plan.block_size, calls), learning_rate)
  np.testing.assert_allclose(out, 0.75 * g_rows @ g_cols.T, rtol=1e-5, atol=1e-5)
  assert len(calls) == 2 * plan.gradient_blocks()
  assert sum(m for _, m in calls) == 2 * plan.gradient_examples()
  if symmetric:
    np.testing.assert_array_equal(out, out.T)
  # What the plan holds at once fits in the budget.
  streamed = 0 if symmetric and len(plan.groups()) == 1 else 1
  assert (plan.group_blocks + streamed) * plan.block_size * bytes_per_example <= budget


def test_block_size_comes_from_budget_and_parameter_count():
  bytes_per_example = 3 * 1000 * 4  # K = 3, P = 1000, float32
  plan = gram.plan_blocks(100, 100, bytes_per_example, 10 * bytes_per_example)
  assert plan.block_size == 5  # two blocks of 5 examples fill the budget
  plan = gram.plan_blocks(100, 100, bytes_per_example, 10 * bytes_per_example, batch_size=2)
  assert plan.block_size == 2 and plan.group_blocks == 4  # 5 blocks: 4 held, 1 streamed
  plan = gram.plan_blocks(3, 100, bytes_per_example, 1 << 30)
  assert plan.block_size == gram.DEFAULT_BATCH_SIZE and plan.gradient_blocks() == 1 + 2
  with pytest.raises(ValueError, match="cannot hold the gradients of two examples"):
    gram.plan_blocks(10, 10, bytes_per_example, 2 * bytes_per_example - 1)
  with pytest.raises(ValueError, match="batch_size"):
    gram.plan_blocks(10, 10, bytes_per_example, 1 << 30, batch_size=0)


def test_side_that_fits_is_computed_once():
  bpe = 100
  # 2 test blocks, 10 train blocks, room for 4 blocks: hold the test side, stream train once.
  plan = gram.plan_blocks(2, 10, bpe, 4 * bpe, batch_size=1)
  assert plan.hold == "rows" and plan.gradient_blocks() == 2 + 10
  # Room for 12 blocks: the 10 train blocks are held, the 12 test blocks would not fit.
  plan = gram.plan_blocks(12, 10, bpe, 12 * bpe, batch_size=1)
  assert plan.hold == "cols" and plan.gradient_blocks() == 10 + 12


def test_symmetric_plan_recomputes_only_later_blocks():
  plan = gram.plan_blocks(6, 6, 100, 3 * 100, batch_size=1, symmetric=True)
  # Groups of 2 blocks: (0,1) streams 2..5, (2,3) streams 4..5, (4,5) streams nothing.
  assert plan.groups() == [(0, 2), (2, 4), (4, 6)]
  assert plan.gradient_blocks() == 6 + 4 + 2 + 0
  out = np.zeros((6 * K, 6 * K), np.float32)
  calls = []
  g = np.random.default_rng(0).normal(size=(6 * K, P)).astype(np.float32)
  gram.accumulate_gram(out, plan, K, fake_producer(g, 1, calls), None, 1.0)
  assert len(calls) == plan.gradient_blocks()
  np.testing.assert_allclose(out, g @ g.T, rtol=1e-5, atol=1e-5)


def test_plan_counts_examples_not_padding():
  # 8 test examples against 32 train in blocks of 32: 40 gradients, not 64.
  plan = gram.plan_blocks(8, 32, 100, 1 << 30, batch_size=32)
  assert plan.block_size == 32 and plan.gradient_examples() == 40
  # Symmetric, blocks of 4 over 10 examples held one at a time: block 0 streams examples
  # 4..9 again, block 1 examples 8..9 (a ragged block of 2).
  plan = gram.plan_blocks(10, 10, 100, 2 * 4 * 100, batch_size=4, symmetric=True)
  assert plan.groups() == [(0, 1), (1, 2), (2, 3)]
  assert plan.gradient_examples() == 10 + 6 + 2


def test_a_block_of_the_wrong_size_is_refused():
  plan = gram.plan_blocks(3, 3, K * P * 4, 1 << 20, batch_size=2)
  g = np.ones((4 * K, P), np.float32)  # one example too many
  with pytest.raises(ValueError, match="wrong size"):
    gram.accumulate_gram(np.zeros((3 * K, 3 * K), np.float32), plan, K,
                         fake_producer(g, 2, []), fake_producer(g, 2, []), 1.0)
