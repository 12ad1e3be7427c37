"""Fixed-size batches over n examples: one compiled shape for every batch.

The last batch is padded by repeating the last example; callers keep the first `valid`
results of each batch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


def padded_batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """Yields (index [batch_size] int, valid) covering 0..n-1 in order.

  `index` of the last batch repeats n - 1 after the `valid` real examples.

  Raises:
    ValueError: batch_size < 1.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
  for start in range(0, n, batch_size):
    yield np.minimum(np.arange(start, start + batch_size), n - 1), min(batch_size, n - start)
