"""TracIn for any model and any K-output loss (the paper's eq 4-6).

    scores[a, i, b, j] = sum_t eta_t grad loss_j(theta_t; train b) . grad loss_i(theta_t; test a)

`loss_fn(params, example) -> [K]` (a scalar counts as K = 1) is the only model-specific
piece; `tracin_jax.influence.segmentation` builds the paper's region losses, and JAX users
bring their own. `influence_per_checkpoint` gives each checkpoint's term of the sum as it
finishes, for callers that save or show them one by one.

Data (`train`, `test`) are given as one of:

* a pytree of arrays (numpy or jax) with a leading example axis, all leaves of the same
  leading size: `{"image": [N, H, W, 4], "target": [N, H, W]}` (volumes
  `[N, D, H, W, 4]` alike: nothing here depends on an example's shape or spatial rank);
* a callable taking no argument that returns a fresh iterator over batches, each batch such
  a pytree (batch sizes may vary): `lambda: iter(batches)`, `lambda: loader(path)`;
* a re-iterable object that is not a list, tuple or dict (for instance a
  `grain.MapDataset` of batches), whose `iter()` starts over each time.

Iterables are read more than once (once to count and check them, then once per checkpoint,
and again for each group of blocks when the gradients do not fit in the memory budget), and
must give the same examples in the same order every time. A Python list whose elements are
all batches of one structure (`[{"image": ..., "target": ...}, ...]`, as a data loader
gives them) is read as a list of batches; a tuple stays one pytree (`(images, targets)`).
One-shot iterators and generators are refused.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax import params as params_lib
from tracin_jax import progress as progress_lib
from tracin_jax.influence import arguments
from tracin_jax.influence import data as data_lib
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import gram as gram_lib
from tracin_jax.influence import projection as projection_lib
from tracin_jax.types import Checkpoints, LossFn, Params, State

DEFAULT_MEMORY_BUDGET_BYTES = gram_lib.DEFAULT_MEMORY_BUDGET_BYTES


# Re-exported here, where `influence`'s callbacks have always found it.
Progress = progress_lib.Progress


@jax.jit
def normalize_rows(rows):
  """Each gradient row divided by its Euclidean norm; a zero row stays zero.

  Args:
    rows: [R, P].

  Returns:
    [R, P] unit (or zero) rows.
  """
  norms = jnp.sqrt(jnp.sum(jnp.square(rows), axis=-1, keepdims=True))
  return rows / jnp.where(norms > 0, norms, 1)


def transform_rows(rows, normalize: bool = False, projection=None):
  """What TracIn multiplies: gradient rows [R, P], unit-normalised (`normalize`) and then
  projected (`projection`), or unchanged."""
  if normalize:
    rows = normalize_rows(rows)
  if projection is not None:
    rows = projection(rows)
  return rows


# ----------------------------------------------------------------------------- the computation


class _Prepared:
  """`influence`'s arguments checked, its data counted and its blocks planned: what each
  checkpoint's share of the scores is formed from."""

  def __init__(self, loss_fn, checkpoints, train, test, *,
               memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
               batch_size: int | None = None,
               progress: bool | Callable[[Progress], None] = False, vectorize: str = "auto",
               params_filter: params_lib.ParamsFilter | None = None, normalize: bool = False,
               projection: projection_lib.Projection | None = None):
    self.loss_fn, self.checkpoints = arguments.check_arguments(
        loss_fn, checkpoints, memory_budget_bytes, params_filter)
    arguments.check_transform(normalize, projection)
    self.normalize, self.projection = normalize, projection
    self.train = data_lib.Data(train, "train")
    test = None if test is None else data_lib.Data(test, "test")
    if test is not None:
      data_lib.check_same_spec(test.spec, self.train.spec, "test", "train")
    self.rows = self.train if test is None else test
    self.k, bytes_per_example, self.dtype = arguments.gradient_layout(
        self.loss_fn, self.checkpoints[0], self.train, projection)
    self.vectorize = grads_lib.check_vectorize(vectorize)
    self.plan = gram_lib.plan_blocks(self.rows.n, self.train.n, bytes_per_example,
                                     memory_budget_bytes, batch_size, symmetric=test is None)
    num_checkpoints = len(self.checkpoints)
    self.reporter = progress_lib.Reporter(progress, num_checkpoints,
                                          self.plan.gradient_examples() * num_checkpoints)
    if progress is True:
      summary = InfluencePlan.of(self.plan, num_checkpoints)
      sys.stderr.write(f"tracin plan: {summary}\n")
    self.nonfinite = grads_lib.NonFinite()

  def zeros(self) -> np.ndarray:
    """[n_rows * K, n_train * K] zeros in the gradients' dtype."""
    return np.zeros((self.rows.n * self.k, self.train.n * self.k), self.dtype)

  def add(self, out: np.ndarray, t: int) -> None:
    """out += checkpoint t's eta_t G_rows G_train^T; warns naming non-finite gradients."""
    params, learning_rate, state = self.checkpoints[t]
    self.reporter.checkpoint(t, self.plan.gradient_examples())
    gram_lib.accumulate_gram(out, self.plan, self.k, self._producer(self.rows, params, state),
                             self._producer(self.train, params, state), learning_rate)
    self.nonfinite.warn(t, stacklevel=3)  # the line that called `influence` (or `next`)

  def scores(self, out: np.ndarray) -> np.ndarray:
    """`out` as [n_rows, K, n_train, K]."""
    return out.reshape(self.rows.n, self.k, self.train.n, self.k)

  def _producer(self, data: data_lib.Data, params: Params, state: State):
    loss_fn, k, vectorize, block_size = self.loss_fn, self.k, self.vectorize, self.plan.block_size

    def blocks(start: int, stop: int):
      for index, block, n_valid in data.blocks(block_size, start, stop):
        g, finite = grads_lib.block_grads(loss_fn, k, params, block, vectorize, state)
        self.nonfinite.add(data.name, index * block_size, finite, n_valid)
        self.reporter.examples(n_valid, grads_lib.resolve_vectorize(loss_fn, k, params, block,
                                                                    vectorize, state))
        g = transform_rows(g, self.normalize, self.projection)
        yield index, g
        del g  # not alive while the next block is computed
    return blocks


def _each_checkpoint(prepared: _Prepared) -> Iterator[np.ndarray]:
  for t in range(len(prepared.checkpoints)):
    out = prepared.zeros()
    prepared.add(out, t)
    yield prepared.scores(out)
    del out  # not alive while the next checkpoint's scores are formed


# ----------------------------------------------------------------------------- public API


@dataclasses.dataclass(frozen=True)
class InfluencePlan:
  """What a memory budget forces on `influence`, before it starts.

  Attributes:
    block_size: examples per gradient block.
    held_side: "rows" (test) or "cols" (train): the side whose blocks are held.
    groups: groups of held blocks; the other side's gradients are computed once per group.
    gradient_passes: example gradients computed per example and checkpoint, on average
      (1.0 when a whole side fits; more when the budget forces recomputation).
    gradient_examples: example gradients computed in all (every checkpoint).
    seconds: estimated time, given a speed (None otherwise).
  """

  block_size: int
  held_side: str
  groups: int
  gradient_passes: float
  gradient_examples: int
  seconds: float | None = None

  @classmethod
  def of(cls, plan: gram_lib.BlockPlan, num_checkpoints: int,
         seconds_per_example: float | None = None) -> "InfluencePlan":
    n = plan.n_rows + (0 if plan.symmetric else plan.n_cols)
    per_checkpoint = plan.gradient_examples()
    total = per_checkpoint * num_checkpoints
    return cls(plan.block_size, plan.hold, len(plan.groups()), per_checkpoint / n, total,
               None if seconds_per_example is None else total * seconds_per_example)

  def __str__(self) -> str:
    eta = "" if self.seconds is None else f", about {self.seconds / 3600:.2g} h"
    return (f"blocks of {self.block_size}, {self.groups} group(s) of held {self.held_side} "
            f"blocks, {self.gradient_passes:.2f} gradient passes per example, "
            f"{self.gradient_examples} example gradients in all{eta}")


def plan_influence(
    n_train: int,
    n_test: int | None,
    num_outputs: int,
    num_parameters: int,
    num_checkpoints: int,
    *,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    batch_size: int | None = None,
    itemsize: int = 4,
    projection: projection_lib.Projection | None = None,
    seconds_per_example: float | None = None,
) -> InfluencePlan:
  """How `influence` would cut a problem under a memory budget, without running it.

  Args:
    n_train, n_test: examples (n_test None: train-influence).
    num_outputs: K; num_parameters: P (of the kept parameters).
    num_checkpoints: checkpoints summed over.
    memory_budget_bytes, batch_size, projection: as for `influence`.
    itemsize: bytes per gradient number (4 for float32).
    seconds_per_example: measured seconds of one example's K gradients, for the estimate.

  Returns:
    The plan, with the number of gradient passes the budget forces and the estimated time.
  """
  width = num_parameters if projection is None else projection.dim
  plan = gram_lib.plan_blocks(n_train if n_test is None else n_test, n_train,
                              num_outputs * width * itemsize, memory_budget_bytes, batch_size,
                              symmetric=n_test is None)
  return InfluencePlan.of(plan, num_checkpoints, seconds_per_example)


def influence(
    loss_fn: LossFn,
    checkpoints: Checkpoints,
    train,
    test=None,
    *,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    batch_size: int | None = None,
    progress: bool | Callable[[Progress], None] = False,
    vectorize: str = "auto",
    params_filter: params_lib.ParamsFilter | None = None,
    normalize: bool = False,
    projection: projection_lib.Projection | None = None,
) -> np.ndarray:
  """TracIn scores between test and train examples, per pair of losses (eq 4-6).

  scores[a, i, b, j] = sum_t eta_t grad loss_j(theta_t; train b) . grad loss_i(theta_t; test a)

  Per-example gradients are computed block by block (`batch_size` examples per block, one
  forward pass per example for its K losses) and multiplied block by block under `jit`; at
  most `memory_budget_bytes` of gradients are held at once. If a whole side fits, its
  gradients are computed once per checkpoint; otherwise the other side is recomputed once per
  group of held blocks. With `test=None` the result is train-influence: only blocks on or
  above the block diagonal are formed, and mirrored.

  Args:
    loss_fn: `loss_fn(params, example) -> [K]` (a scalar counts as K = 1), for one example
      (no leading example axis); `loss_fn(params, example, state)` for checkpoints with a
      state. Keep one function object: compiled code is reused for the same object.
    checkpoints: sequence of (params, learning_rate eta_t) pairs, or of
      `tracin_jax.Checkpoint(params, learning_rate, state)` for models with non-parameter
      state (each checkpoint's gradients then use its own state); params share a structure.
    train: train examples: a pytree of arrays with a leading example axis, or an iterable of
      batches (see the module docstring for what is accepted).
    test: test examples in the same form and with the same example structure, or None for
      train-influence.
    memory_budget_bytes: bytes of per-example gradients (K x P x 4 per example in float32)
      that may be held at once: the held blocks and the streamed one. It does not count the
      activations of one gradient call (bounded by `batch_size`), the host array of scores,
      nor a block that JAX's asynchronous dispatch may start before the last one's products
      are done.
    batch_size: examples per block, i.e. per gradient call and per Gram block side; None
      uses `gram.DEFAULT_BATCH_SIZE`. Lowered if the budget cannot hold two such blocks.
    progress: True writes a progress line to stderr; a callable receives `Progress`.
    vectorize: "auto" (the faster of "loop" and "vmap", measured on the first block and
      remembered per loss, parameter structure, example shape and device; the progress
      line names it), "vmap" or "loop"; see `grads.block_grads`. Every choice gives the
      same scores.
    params_filter: restricts the gradients to some parameters (layer selection, e.g. the
      TracIn paper's last layer): a predicate on a parameter's path ("head/kernel"), a path
      prefix ("head") or a sequence of prefixes (see `tracin_jax.params`). The others are
      held fixed; the dot products run over the kept parameters only, and the backward
      pass stops where no kept parameter is left.
    normalize: renormalised TracIn: every per-example, per-output gradient is divided by its
      norm at each checkpoint before the product, so scores are sums over checkpoints of
      eta_t times the cosine of the two gradients (Hammoudeh and Lowd's renormalised
      influence). It removes the pull of gradient norm: an example whose loss is scaled
      scores the same. A zero gradient (an empty region) stays zero.
    projection: a `tracin_jax.Projection`: gradients are projected to `projection.dim`
      numbers (after `normalize`) before the product, an unbiased estimate of the exact
      scores; the budget then counts projected rows (each block's raw gradients,
      `batch_size` x K x P, are held only while they are projected).

  Returns:
    numpy [n_test, K, n_train, K] (or [n, K, n, K] for train-influence), in the gradients'
    dtype (float32 for float32 parameters; float64 with x64 enabled and float64 parameters).

  Raises:
    ValueError / TypeError: empty checkpoints, a learning rate that is not a finite number,
      leaves of different leading sizes, a test example structure different from train's
      (naming the leaf), a loss that is not a scalar nor [K], or a budget too small for two
      examples' gradients.

  Warns:
    RuntimeWarning: when some gradients are not finite (their scores are not either).
  """
  prepared = _Prepared(loss_fn, checkpoints, train, test,
                       memory_budget_bytes=memory_budget_bytes, batch_size=batch_size,
                       progress=progress, vectorize=vectorize, params_filter=params_filter,
                       normalize=normalize, projection=projection)
  out = prepared.zeros()
  for t in range(len(prepared.checkpoints)):
    prepared.add(out, t)
  return prepared.scores(out)


def influence_per_checkpoint(loss_fn: LossFn, checkpoints: Checkpoints, train, test=None,
                             **options: Any) -> Iterator[np.ndarray]:
  """Each checkpoint's term of `influence`, as it finishes.

      for t, scores_t in enumerate(influence_per_checkpoint(loss_fn, checkpoints, train)):
        np.save(f"part{t}.npy", scores_t)  # eta_t grad loss(theta_t; train) . grad loss(...)

  The arguments are checked, the data counted and the blocks planned once, when this is
  called (errors are raised here, not at the first `next`); each checkpoint's gradients are
  computed when its term is asked for. One `progress` callback sees every checkpoint, its
  `Progress.checkpoint` naming the one in progress.

  Args: as `influence` (`options`: its keyword arguments, `memory_budget_bytes` to
  `projection`).

  Returns:
    An iterator over the checkpoints, in order: checkpoint t's term
    eta_t grad loss_j(theta_t; train b) . grad loss_i(theta_t; test a), numpy
    [n_test, K, n_train, K] (or [n, K, n, K] for train-influence), a fresh array each time,
    bit for bit what `influence(loss_fn, [checkpoints[t]], train, test, ...)` returns.
    Their sum is `influence`'s scores up to the order of floating-point additions.

  Raises:
    ValueError / TypeError: as `influence`.

  Warns:
    RuntimeWarning: as `influence`, as each checkpoint finishes.
  """
  return _each_checkpoint(_Prepared(loss_fn, checkpoints, train, test, **options))


def self_influence(
    loss_fn: LossFn,
    checkpoints: Checkpoints,
    train,
    *,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    batch_size: int | None = None,
    progress: bool | Callable[[Progress], None] = False,
    vectorize: str = "auto",
    params_filter: params_lib.ParamsFilter | None = None,
    normalize: bool = False,
    projection: projection_lib.Projection | None = None,
) -> np.ndarray:
  """Self-influence sum_t eta_t |grad loss_i(theta_t; z)|^2 of every example and loss.

  Computed directly from per-example gradient norms, never via the full matrix; it equals
  the diagonal `scores[a, i, a, i]` of `influence(loss_fn, checkpoints, train)`.

  Args: as `influence`; the budget bounds one block of gradients. With `normalize` or
    `projection`, the squared norms are those of the normalised or projected rows.

  Returns:
    numpy [n, K].
  """
  loss_fn, checkpoints = arguments.check_arguments(loss_fn, checkpoints, memory_budget_bytes,
                                                   params_filter)
  arguments.check_transform(normalize, projection)
  data = data_lib.Data(train, "train")
  k, bytes_per_example, dtype = arguments.gradient_layout(loss_fn, checkpoints[0], data)
  vectorize = grads_lib.check_vectorize(vectorize)
  fit = int(memory_budget_bytes) // bytes_per_example
  if fit < 1:
    raise ValueError(f"memory_budget_bytes={memory_budget_bytes} cannot hold one example's "
                     f"gradients (K x P x itemsize = {bytes_per_example} bytes).")
  if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
    raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
  block_size = min(int(batch_size or gram_lib.DEFAULT_BATCH_SIZE), data.n, fit)
  n_blocks = data.n_blocks(block_size)
  reporter = progress_lib.Reporter(progress, len(checkpoints), data.n * len(checkpoints))
  out = np.zeros((data.n, k), dtype)
  for t, (params, learning_rate, state) in enumerate(checkpoints):
    reporter.checkpoint(t, data.n)
    pending = []
    for index, block, n_valid in data.blocks(block_size, 0, n_blocks):
      if normalize or projection is not None:
        g, _ = grads_lib.block_grads(loss_fn, k, params, block, vectorize, state)
        g = transform_rows(g, normalize, projection)
        norms = jnp.sum(jnp.square(jnp.reshape(g, (n_valid, k, -1))), axis=-1)
      else:
        norms = grads_lib.block_squared_norms(loss_fn, k, params, block, vectorize, state)
      pending.append((index * block_size, n_valid, norms))
      reporter.examples(n_valid, grads_lib.resolve_vectorize(loss_fn, k, params, block,
                                                             vectorize, state))
    bad = []
    for first, n_valid, norms in pending:
      norms = np.asarray(norms)
      out[first:first + n_valid] += learning_rate * norms
      bad.extend((np.flatnonzero(~np.isfinite(norms).all(axis=1)) + first).tolist())
    if bad:
      warnings.warn(f"tracin: checkpoint {t} has non-finite gradients for {len(bad)} train "
                    f"examples (first {bad[:5]}).", RuntimeWarning, stacklevel=2)
  return out
