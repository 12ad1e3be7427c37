"""The two layouts of TracIn scores, and the one place that converts between them.

`influence` returns scores as `[n_test, K, n_train, K]`: entry [a, i, b, j] is test example
a's loss i against train example b's loss j. The paper's figures and the stage's files use
class blocks, `[K, n_test, K * n_train]`: row [i, a] is test region (a, i), and column
`j * n_train + b` is train region (b, j), so train class j's scores form one block. Every
conversion, and every mapping between a block column and a train region, goes through here.
"""

from __future__ import annotations

import numpy as np


def to_class_blocks(scores: np.ndarray) -> np.ndarray:
  """[n_test, K, n_train, K] -> [K, n_test, K * n_train]; entry [i, a, j * n_train + b]."""
  scores = np.asarray(scores)
  n_test, k, n_train, k2 = scores.shape
  if k != k2:
    raise ValueError(f"scores must be [n_test, K, n_train, K], got {scores.shape}.")
  return np.transpose(scores, (1, 0, 3, 2)).reshape(k, n_test, k * n_train)


def from_class_blocks(blocks: np.ndarray) -> np.ndarray:
  """Inverse of `to_class_blocks`: [K, n_test, K * n_train] -> [n_test, K, n_train, K]."""
  blocks = np.asarray(blocks)
  k, n_test, kn = blocks.shape
  if kn % k:
    raise ValueError(f"class blocks must be [K, n_test, K * n_train], got {blocks.shape}.")
  return np.transpose(blocks.reshape(k, n_test, k, kn // k), (1, 0, 3, 2))


def per_class(blocks: np.ndarray) -> np.ndarray:
  """[K, n_test, K * n_train] -> [K, n_test, K, n_train] (test class, test, train class,
  train example), a view."""
  k, n_test, kn = blocks.shape
  return blocks.reshape(k, n_test, k, kn // k)


def column(train_class, train_index, n_train: int):
  """The block column of train region (train_index, train_class)."""
  return np.asarray(train_class) * n_train + np.asarray(train_index)


def split_column(col, n_train: int):
  """Block column -> (train class j (0-based), train example b)."""
  j, b = np.divmod(col, n_train)
  return (int(j), int(b)) if np.ndim(j) == 0 else (j, b)


def block_row(scores: np.ndarray, a: int, i: int) -> np.ndarray:
  """Test region (a, i)'s scores against every train region, as a class-block row
  [K * n_train] (a copy), from [n_test, K, n_train, K] scores."""
  return np.ascontiguousarray(np.transpose(scores[a, i], (1, 0))).reshape(-1).copy()


def self_scores(scores: np.ndarray) -> np.ndarray:
  """The diagonal [n, K] of train-influence scores [n, K, n, K] (self-influence)."""
  n, k = scores.shape[:2]
  return np.stack([scores[np.arange(n), i, np.arange(n), i] for i in range(k)], axis=1)


def own_columns(a: int, k: int, n_train: int) -> np.ndarray:
  """The block columns of example a's own K regions (for train-influence rows)."""
  return column(np.arange(k), a, n_train)


def subset(blocks: np.ndarray, index) -> np.ndarray:
  """Train-influence class blocks restricted to the examples `index` (both sides)."""
  scores = from_class_blocks(blocks)
  index = np.asarray(index)
  return to_class_blocks(scores[index][:, :, index])
