"""Tests of the score layouts: class blocks, columns, rows, the diagonal and subsets."""

import numpy as np

from tracin_jax.influence import layout


def _scores(n_test, n_train, seed=0):
  return np.random.default_rng(seed).normal(size=(n_test, 3, n_train, 3))


def test_class_blocks_layout_and_inverse():
  s = _scores(4, 5)
  blocks = layout.to_class_blocks(s)
  assert blocks.shape == (3, 4, 15)
  for a, i, b, j in [(0, 0, 0, 0), (3, 2, 4, 1), (1, 1, 2, 2)]:
    assert blocks[i, a, j * 5 + b] == s[a, i, b, j]
    assert blocks[i, a, layout.column(j, b, 5)] == s[a, i, b, j]
    assert layout.split_column(layout.column(j, b, 5), 5) == (j, b)
    assert layout.per_class(blocks)[i, a, j, b] == s[a, i, b, j]
  np.testing.assert_array_equal(layout.from_class_blocks(blocks), s)


def test_split_column_of_an_array():
  j, b = layout.split_column(np.array([0, 6, 14]), 5)
  np.testing.assert_array_equal(j, [0, 1, 2])
  np.testing.assert_array_equal(b, [0, 1, 4])


def test_block_row_is_the_class_block_row():
  s = _scores(4, 5, seed=1)
  blocks = layout.to_class_blocks(s)
  for a, i in [(0, 0), (2, 1), (3, 2)]:
    row = layout.block_row(s, a, i)
    np.testing.assert_array_equal(row, blocks[i, a])
    row[0] = 99.0  # a copy: the scores are untouched
    assert blocks[i, a, 0] != 99.0 and s[a, i, 0, 0] != 99.0


def test_self_scores_and_own_columns_of_train_influence():
  s = _scores(6, 6, seed=2)
  diag = layout.self_scores(s)
  assert diag.shape == (6, 3)
  for a in range(6):
    for i in range(3):
      assert diag[a, i] == s[a, i, a, i]
  np.testing.assert_array_equal(layout.own_columns(4, 3, 6), [4, 10, 16])


def test_subset_equals_the_blocks_of_the_subset():
  s = _scores(8, 8, seed=3)
  index = [1, 4, 6]
  np.testing.assert_array_equal(layout.subset(layout.to_class_blocks(s), index),
                                layout.to_class_blocks(s[index][:, :, index]))
