"""TRAK (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale") for any JAX model.

    scores = trak_influence(loss_fn, [[params_seed0], [params_seed1]], train, test,
                            damping=1e-3, projection=Projection(2048, seed=0))
    # [n_test, K, n_train, K]

For each model m (independently trained seeds; each may bring several checkpoints, every
checkpoint treated as the original's separate "model id"):

    X_m   = [n_train x K, d]  per-example, per-output gradients of the train examples,
    phi_m = [n_test x K, d]   the same of the test examples,
    scores_m = phi_m (X_m^T X_m + damping I)^-1 X_m^T Q_m,

the gradients raveled and, with a `projection`, projected to d numbers (each checkpoint
its own draw: seed + 10000 x its index, as TRAK's projector varies its seed per model id);
then the mean over a model's checkpoints, and the mean over models.

The output function and the sign. TRAK's features are gradients of an output f (a
classifier's margin; here a region's soft Dice D = 1 - loss). The features here are
gradients of `loss_fn`: for the region losses (`make_region_losses`) they are minus those
of the Dice on both sides, so the signs cancel and the scores are the Dice's. Q is TRAK's
diagonal reweighting, minus the derivative of the training loss with respect to f (1 - p
for a classifier's margin): for a soft-Dice output the training loss is 1 - D, so Q = 1,
the identity, which is the default (`q_fn=None`). A positive score is a proponent:
including the train example raises the test output (lowers its loss), the sign of TracIn.
For a model whose output is not its loss, give `loss_fn` = f and `q_fn` = -dL/df.

Two forms of the same product (tested equal): the features form solves the d x d system
(X^T X + damping I) Z = phi^T, used when d < n_train x K; the kernel form solves the
n_train K x n_train K system (X X^T + damping I) W = X phi^T (the push-through identity
(X^T X + l I)^-1 X^T = X^T (X X^T + l I)^-1), used otherwise. Both solve, never invert.

Gradients come from `grads.block_grads` (the path TracIn uses), block by block; the train
features of one checkpoint are held ([n_train x K, d]), as TRAK holds them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.influence import arguments
from tracin_jax.influence import core
from tracin_jax.influence import data as data_lib
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import gram as gram_lib
from tracin_jax.influence import projection as projection_lib
from tracin_jax.types import LossFn, Params

FORMS = ("auto", "features", "kernel")
PROJECTION_SEED_STRIDE = 10_000  # checkpoint e's projection seed: seed + stride x e
DEFAULT_DAMPING_GRID = tuple(10.0 ** e for e in range(-6, 3))
_HI = jax.lax.Precision.HIGHEST


def _check_models(models) -> list[list[Params]]:
  """models as lists of checkpoint params, all of one structure (checked as TracIn's
  checkpoints are)."""
  if not isinstance(models, (list, tuple)) or not models:
    raise ValueError("models must be a non-empty list of models, each a list of its "
                     "checkpoints' params ([params] for its final parameters only).")
  out = []
  for m, model in enumerate(models):
    if not isinstance(model, (list, tuple)) or not model:
      raise ValueError(f"models[{m}] must be a non-empty list of params (a model's "
                       f"checkpoints; [params] for one), got {type(model).__name__}.")
    out.append(list(model))
  arguments.check_checkpoints([(p, 1.0) for model in out for p in model])
  return out


def _check_damping(damping) -> float:
  ok = isinstance(damping, (int, float, np.integer, np.floating)) and not isinstance(
      damping, bool)
  if not ok or not math.isfinite(float(damping)) or damping < 0:
    raise ValueError(f"damping must be a finite number >= 0, got {damping!r}.")
  return float(damping)


def _check_batch_size(batch_size) -> int:
  if batch_size is None:
    return gram_lib.DEFAULT_BATCH_SIZE
  if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
  return int(batch_size)


def features(loss_fn: LossFn, k: int, params: Params, data: data_lib.Data, block_size: int,
             projection: projection_lib.Projection | None, vectorize: str):
  """TRAK's features of some data: their per-example, per-output gradients [n x K, P]
  (`grads.block_grads`), projected to [n x K, d] by `projection` if given."""
  size = min(block_size, data.n)
  parts = []
  for _, block, _ in data.blocks(size, 0, data.n_blocks(size)):
    g, _ = grads_lib.block_grads(loss_fn, k, params, block, vectorize)
    parts.append(core.transform_rows(g, False, projection))
  return jnp.concatenate(parts)


@functools.partial(jax.jit, static_argnames=("q_fn",))
def _q_block(q_fn, params, block):
  return jnp.reshape(jax.vmap(lambda ex: jnp.reshape(q_fn(params, ex), (-1,)))(block), (-1,))


def _q(q_fn, k: int, params: Params, data: data_lib.Data, block_size: int):
  size = min(block_size, data.n)
  q = jnp.concatenate([_q_block(q_fn, params, block)
                       for _, block, _ in data.blocks(size, 0, data.n_blocks(size))])
  if q.shape != (data.n * k,):
    raise ValueError(f"q_fn must return [K] = [{k}] numbers per train example, got "
                     f"{q.shape[0] // data.n} per example.")
  return q


def kernel_scores(phi, x, damping: float, form: str = "auto"):
  """phi (X^T X + damping I)^-1 X^T, by solving.

  Args:
    phi: [R, d] test features.
    x: [N, d] train features.
    damping: >= 0.
    form: "features" (a d x d solve), "kernel" (an N x N solve) or "auto" (features when
      d < N).

  Returns:
    [R, N].
  """
  if form not in FORMS:
    raise ValueError(f"form must be one of {FORMS}, got {form!r}.")
  n, d = x.shape
  if form == "auto":
    form = "features" if d < n else "kernel"
  return _solve(phi, x, damping, form)


@functools.partial(jax.jit, static_argnames=("form",))
def _solve(phi, x, damping, form):
  n, d = x.shape
  if form == "features":
    gram = jnp.matmul(x.T, x, precision=_HI) + damping * jnp.eye(d, dtype=x.dtype)
    z = jnp.linalg.solve(gram, phi.T)  # [d, R]
    return jnp.matmul(z.T, x.T, precision=_HI)
  gram = jnp.matmul(x, x.T, precision=_HI) + damping * jnp.eye(n, dtype=x.dtype)
  w = jnp.linalg.solve(gram, jnp.matmul(x, phi.T, precision=_HI))  # [N, R]
  return w.T


def trak_influence(loss_fn: LossFn, models: Sequence[Sequence[Params]], train, test, *,
         damping: float = 0.0, projection: projection_lib.Projection | None = None,
         q_fn: Callable | None = None, form: str = "auto", batch_size: int | None = None,
         vectorize: str = "auto") -> np.ndarray:
  """TRAK scores between test and train examples, per pair of outputs (see the module
  docstring for the formula and the sign).

  Args:
    loss_fn: `loss_fn(params, example) -> [K]` (a scalar counts as K = 1): the function
      whose per-example gradients are the features (a loss such as the region losses, or
      an output f with `q_fn`).
    models: a list of models, each a list of its checkpoints' params (`[params]` for its
      final parameters only), all of one structure.
    train, test: examples in any form `influence` takes, of one example structure.
    damping: lambda >= 0, added to X^T X's diagonal (0: TRAK's default). At 0 a singular
      system (fewer train rows than d in the features form; in the kernel form any zero
      row, an empty region's gradient, or rows that are linearly dependent) gives
      non-finite scores or finite ones that mean nothing; give damping > 0 then, picked
      on tuning data with `choose_damping`.
    projection: a `tracin_jax.Projection` (not "logra"), or None for the raw gradients.
    q_fn: `q_fn(params, example) -> [K]`, TRAK's Q for each train example and output
      (minus d training loss / d f), evaluated per checkpoint; None: the identity.
    form: "auto", "features" or "kernel" (see `kernel_scores`).
    batch_size: examples per gradient block.
    vectorize: as `influence`.

  Returns:
    numpy [n_test, K, n_train, K].

  Raises:
    ValueError / TypeError: bad models, damping, form, projection, batch size, a
      `q_fn` of the wrong size, or test examples of another structure than train's.
  """
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
  models = _check_models(models)
  damping = _check_damping(damping)
  if form not in FORMS:
    raise ValueError(f"form must be one of {FORMS}, got {form!r}.")
  arguments.check_transform(False, projection)
  if projection is not None and projection.kind == projection_lib.LOGRA:
    raise ValueError("projection: trak projects formed gradient rows; choose a kind of "
                     f"{projection_lib.KINDS}, not 'logra'.")
  if q_fn is not None and not callable(q_fn):
    raise TypeError(f"q_fn must be callable or None, got {type(q_fn).__name__}.")
  block_size = _check_batch_size(batch_size)
  vectorize = grads_lib.check_vectorize(vectorize)
  train_data, test_data = data_lib.Data(train, "train"), data_lib.Data(test, "test")
  data_lib.check_same_spec(test_data.spec, train_data.spec, "test", "train")
  k = grads_lib.num_outputs(loss_fn, models[0][0], train_data.spec.example())
  total, entry = None, 0
  for model in models:
    model_total = None
    for params in model:
      proj = None if projection is None else dataclasses.replace(
          projection, seed=int(projection.seed) + PROJECTION_SEED_STRIDE * entry)
      entry += 1
      x = features(loss_fn, k, params, train_data, block_size, proj, vectorize)
      phi = features(loss_fn, k, params, test_data, block_size, proj, vectorize)
      scores = kernel_scores(phi, x, damping, form)
      if q_fn is not None:
        scores = scores * _q(q_fn, k, params, train_data, block_size)[None, :]
      scores = np.asarray(scores)
      model_total = scores if model_total is None else model_total + scores
    model_mean = model_total / len(model)
    total = model_mean if total is None else total + model_mean
  return (total / len(models)).reshape(test_data.n, k, train_data.n, k)


def choose_damping(evaluate: Callable[[float], float],
                   grid: Sequence[float] = DEFAULT_DAMPING_GRID) -> tuple[float, dict]:
  """The damping of a grid that scores best on tuning data.

      best, table = choose_damping(lambda l: lds_on_tuning_subsets(trak_influence(..., damping=l)))

  Args:
    evaluate: `evaluate(damping) -> score`, higher is better (e.g. the LDS on separately
      drawn tuning subsets, never the ones a method is reported on).
    grid: the dampings tried (each >= 0).

  Returns:
    (the best damping (the first of equal best), {damping: score} for the whole grid).

  Raises:
    ValueError: an empty grid, a damping < 0, or a score that is not a finite number.
  """
  grid = [_check_damping(value) for value in grid]
  if not grid:
    raise ValueError("grid must hold at least one damping.")
  table = {}
  for value in grid:
    score = evaluate(value)
    if not isinstance(score, (int, float, np.integer, np.floating)) or not math.isfinite(
        float(score)):
      raise ValueError(f"evaluate({value}) must return a finite number, got {score!r}.")
    table[value] = float(score)
  best = max(grid, key=lambda value: table[value])
  return best, table


__all__ = ["DEFAULT_DAMPING_GRID", "FORMS", "PROJECTION_SEED_STRIDE", "choose_damping",
           "features", "kernel_scores", "trak_influence"]
