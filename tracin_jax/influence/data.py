"""The data TracIn reads: examples given as arrays or as batches, read block by block.

`Data` wraps a data set in any form `influence` accepts (see `tracin_jax.influence.core`
for the forms) and hands it out in blocks of a fixed number of examples, whatever the sizes
of the batches it came in; `ExampleSpec` is the structure of one example, checked for every
batch and between the train and test sets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import numpy as np

from tracin_jax.types import PyTree


def is_array(x) -> bool:
  """Whether `x` is a numpy or JAX array (or a numpy scalar), as leaves of data must be."""
  return isinstance(x, (np.ndarray, np.generic, jax.Array))


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """The structure of one example.

  Attributes:
    treedef: the pytree structure of an example (and of a batch).
    paths: each leaf's path, as `jax.tree_util.keystr` writes it ("['image']").
    shapes: each leaf's shape without the example axis.
    dtypes: each leaf's dtype.
  """

  treedef: Any
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[np.dtype, ...]

  def example(self) -> PyTree:
    """One example as `jax.ShapeDtypeStruct`s (dtypes as JAX holds them: int64 labels are
    int32 without x64, as the arrays become on the device)."""
    return jax.tree.unflatten(
        self.treedef, [jax.ShapeDtypeStruct(s, jax.dtypes.canonicalize_dtype(d))
                       for s, d in zip(self.shapes, self.dtypes)])


def _batch_spec(batch: PyTree, where: str) -> tuple[ExampleSpec, int]:
  """The example structure of a batch and its leading size; checks the leaves."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
  if not flat:
    raise ValueError(f"{where} holds no arrays.")
  paths, shapes, dtypes, sizes = [], [], [], []
  for path, leaf in flat:
    name = jax.tree_util.keystr(path) or "<root>"
    if not is_array(leaf):
      raise TypeError(f"{where}: leaf {name} is a {type(leaf).__name__}, not an array.")
    if np.ndim(leaf) == 0:
      raise ValueError(f"{where}: leaf {name} is a scalar; every leaf needs a leading "
                       "example axis.")
    paths.append(name)
    shapes.append(tuple(leaf.shape[1:]))
    dtypes.append(np.dtype(leaf.dtype))
    sizes.append(leaf.shape[0])
  if len(set(sizes)) > 1:
    detail = ", ".join(f"{p}: {s}" for p, s in zip(paths, sizes))
    raise ValueError(f"{where}: leaves disagree in leading (example) size: {detail}.")
  return ExampleSpec(treedef, tuple(paths), tuple(shapes), tuple(dtypes)), sizes[0]


def check_same_spec(spec: ExampleSpec, ref: ExampleSpec, where: str, ref_name: str) -> None:
  """Checks that two data sets hold examples of one structure.

  Args:
    spec, ref: the two example structures.
    where, ref_name: what they describe, for the message ("test", "train").

  Raises:
    ValueError: naming the first difference (the structure, or a leaf's shape or dtype).
  """
  if spec.treedef != ref.treedef:
    raise ValueError(f"{where}: example structure differs from {ref_name}'s: "
                     f"{spec.treedef} vs {ref.treedef}.")
  for path, shape, dtype, rshape, rdtype in zip(
      spec.paths, spec.shapes, spec.dtypes, ref.shapes, ref.dtypes):
    if shape != rshape or dtype != rdtype:
      raise ValueError(
          f"{where}: leaf {path} is {dtype}{list(shape)} per example, {ref_name} has "
          f"{rdtype}{list(rshape)}.")


def _is_batch_list(data) -> bool:
  """Whether `data` is a list of batches: every element a container (not an array) of
  arrays, all of one structure."""
  if not isinstance(data, list) or not data:
    return False
  structures = set()
  for batch in data:
    leaves = jax.tree.leaves(batch)
    if is_array(batch) or not leaves or not all(is_array(x) for x in leaves):
      return False
    structures.add(jax.tree.structure(batch))
  return len(structures) == 1


class Data:
  """A data set given as arrays or as an iterable of batches, read block by block.

  Accepts what `influence` accepts (see `tracin_jax.influence.core`): a pytree of arrays with
  a leading example axis, a callable returning a fresh iterator of such batches, a list of
  batches of one structure, or a re-iterable of batches. An iterable is read once here, to
  count and check its examples.

  Attributes:
    name: what the data are ("train", "test"), for messages.
    is_sequence: whether the data were given as a list or tuple (for a hint when a tuple
      was meant as a list of batches).
    spec: the `ExampleSpec` of one example.
    n: the number of examples.

  Raises:
    ValueError / TypeError: None, no arrays, leaves of different leading sizes, batches of
      different structures, a one-shot iterator, or an iterable that yields no example.
  """

  def __init__(self, data, name: str):
    self.name = name
    self.is_sequence = isinstance(data, (list, tuple))
    if data is None:
      raise ValueError(f"{name} is None.")
    if callable(data):
      self._factory = data
    elif _is_batch_list(data):
      self._factory = lambda: iter(data)
    else:
      leaves = jax.tree.leaves(data)
      if leaves and all(is_array(x) for x in leaves):
        self._factory = None
        self._arrays = data
        self.spec, self.n = _batch_spec(data, name)
        return
      if isinstance(data, (list, tuple, dict)) or not hasattr(data, "__iter__"):
        raise TypeError(
            f"{name} must be a pytree of arrays with a leading example axis, a callable "
            "returning a fresh iterator of such batches, or a re-iterable of batches; got "
            f"{type(data).__name__}. A list of batches: pass `lambda: iter(batches)`.")
      if iter(data) is data:
        raise TypeError(
            f"{name} is a one-shot iterator, but the data are read more than once; pass a "
            "callable that returns a fresh iterator, e.g. `lambda: make_batches()`.")
      self._factory = lambda: iter(data)
    # Iterable: one pass to count and check.
    self.spec, self.n = None, 0
    for batch in self._batches():
      self.n += jax.tree.leaves(batch)[0].shape[0]
    if self.n == 0:
      raise ValueError(f"{name} yielded no examples.")

  def _batches(self) -> Iterator[PyTree]:
    """The batches of one pass over an iterable, checked against the first batch's spec."""
    iterator = self._factory()
    if iterator is None or not hasattr(iterator, "__next__"):
      raise TypeError(f"{self.name}: the callable must return an iterator, got "
                      f"{type(iterator).__name__}.")
    for index, batch in enumerate(iterator):
      where = f"{self.name} batch {index}"
      spec, size = _batch_spec(batch, where)
      if self.spec is None:
        self.spec = spec
      else:
        check_same_spec(spec, self.spec, where, f"{self.name} batch 0")
      if size:
        yield batch

  def blocks(self, block_size: int, start: int, stop: int) -> Iterator[tuple[int, PyTree, int]]:
    """Blocks start, ..., stop - 1 of `block_size` examples.

    Yields:
      (block index, block with leaves [m, ...], m): m = block_size except for the last
      block of the data, which holds the m <= block_size examples left (never padding, so
      no gradient is ever computed twice for one example of a block).
    """
    if self._factory is None:
      for block in range(start, stop):
        lo, hi = block * block_size, min((block + 1) * block_size, self.n)
        yield block, jax.tree.map(lambda x: x[lo:hi], self._arrays), hi - lo
      return
    yield from self._stream_blocks(block_size, start, stop)

  def n_blocks(self, block_size: int) -> int:
    """How many blocks of `block_size` examples cover the data (the last one ragged)."""
    return -(-self.n // block_size)

  def _stream_blocks(self, block_size: int, start: int, stop: int):
    skip = start * block_size  # examples to pass over before the first block
    buffered, count, seen, block = [], 0, 0, start
    for batch in self._batches():
      leaves = [np.asarray(x) for x in jax.tree.leaves(batch)]
      size = leaves[0].shape[0]
      seen += size
      if skip >= size:
        skip -= size
        continue
      if skip:
        leaves, size, skip = [x[skip:] for x in leaves], size - skip, 0
      buffered.append(leaves)
      count += size
      while count >= block_size and block < stop:
        out, buffered, count = _take(buffered, block_size)
        yield block, jax.tree.unflatten(self.spec.treedef, out), block_size
        block += 1
      if block == stop and stop < self.n_blocks(block_size):
        return  # a partial pass: the rest is not needed
    if seen != self.n:
      raise ValueError(f"{self.name} yielded {seen} examples on this pass but {self.n} on "
                       "the first; iterables must give the same examples every time.")
    if count and block < stop:
      out, _, _ = _take(buffered, count)
      yield block, jax.tree.unflatten(self.spec.treedef, out), count


def _take(buffered: list[list[np.ndarray]], size: int):
  """The first `size` examples of buffered batches, and what remains (views, no copy, when
  one batch holds them all)."""
  joined = [xs[0] if len(xs) == 1 else np.concatenate(xs) for xs in zip(*buffered)]
  rest = [x[size:] for x in joined]
  count = rest[0].shape[0]
  return [x[:size] for x in joined], ([rest] if count else []), count
