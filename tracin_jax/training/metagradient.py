"""Exact metagradients of a run's SGD phase (Ilyas and Engstrom 2025, "MAGIC").

Give every training example b a weight w_b in the loss of each step that uses it (w = 1 is
the run). The final parameters theta_T(w) after the T replayed steps, and any scalar output
f(theta_T(w)) (a validation region's soft Dice), are then differentiable functions of w; the
metagradient is

    g_b = d f(theta_T(w)) / d w_b  at w = 1,

computed exactly by reverse mode through the T steps (`jax.lax.scan` over the steps, each
step under `jax.checkpoint`: only the state entering each step is kept, [T] copies of the
parameters and optimizer state, and each step's activations are recomputed on the way
back). One reverse pass gives g for one output; for R outputs the forward pass is run once
and its reverse pass R times, `chunk_size` outputs at a time (vmapped).

How removing examples is predicted: to first order, setting w_b = 0 for b in a set S
changes f by -sum_{b in S} g_b (`removal_change`). Read as a linear datamodel (the LDS,
`checks.lds`), g itself is the score: a subset S' keeps its examples' weights, so
f(S') ~ f(all) - sum_{b not in S'} g_b = const + sum_{b in S'} g_b.

How the weights enter this project's loss (`weighted_dice_loss`): the training loss is a
soft Dice over the whole batch (eq 2), not a sum over examples, so a weight cannot multiply
an example's loss. Instead w_b scales example b's terms in the batch's sums: for tumour
class c,

    D_c = (2 sum_b w_b sum_px p y + s) / (sum_b w_b sum_px p + sum_b w_b sum_px y + s),

with p and y example b's probabilities and one-hot target of class c over its pixels. With
w in {0, 1} this is `losses.dice_loss` with its padding weights: w_b = 0 takes example b
out of its batch, and the batch is not filled again. That is not what `Retrainer` does
when it removes examples (it re-batches, so that every batch keeps the run's size); the
metagradient is the derivative at w = 1 of the first kind of removal, and predicts the
second only as far as the two agree to first order.

The replay is the run's: plain SGD after the last Adam checkpoint at a constant learning
rate, so the run's optimizer state is carried through the steps unused (its Adam moments
stand still, its step counters count); an optimizer whose state matters (momentum) has it
threaded through the steps and differentiated like the parameters. Memory grows with T
times the parameters and optimizer state, plus one step's activations (times
`chunk_size`): this is for small models.

  - `metagradient(step_fn, params, opt_state, batches, weights, f)`: the generic core, for
    any model and loss written as pure functions (`make_step` builds `step_fn` from a
    weighted loss and an optax optimizer; `stack_batches` the [T, B, ...] batches);
  - `metagradients(...)`: the same for R outputs, `f -> [R]`, with progress;
  - `run_metagradients(retrainer, f)`: this project's runs, built on a `Retrainer`: the
    replay of its SGD phase with nothing removed, by the run's training step with
    `weighted_dice_loss` for its loss.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tracin_jax import models
from tracin_jax.progress import ProgressBar
from tracin_jax.training import losses
from tracin_jax.training.retrain import Retrainer
from tracin_jax.types import Array, Batch, Params, PyTree


class StepFn(Protocol):
  """One replayed training step with per-example weights.

  `step_fn(params, opt_state, batch, weights) -> (params, opt_state)`: `batch` is one step's
  pytree of arrays [B, ...] (with "index" [B]), `weights` [B] the weights of its examples
  (0 for padding); the step must be a differentiable function of `weights`.
  """

  def __call__(self, params: Params, opt_state: PyTree, batch: Batch,
               weights: Array) -> tuple[Params, PyTree]:
    ...


def weighted_dice_loss(logits: Array, labels: Array, weights: Array) -> Array:
  """The training loss of eq 2 with example weights in the batch's sums (see the module).

  L = 1 - (1/3) sum_{c=1..3} D_c, D_c = (2 sum_b w_b I_bc + s) / (sum_b w_b (P_bc + Y_bc)
  + s), where I_bc, P_bc, Y_bc are example b's sums over its pixels of p y, p and y for
  class c. With weights in {0, 1} it equals `losses.dice_loss(logits, labels, weights)`
  (which scales p and y each by w_b, so its intersection holds w_b squared: the same at 0
  and 1, not the same derivative).

  Args:
    logits: [B, H, W, 4] (or [B, D, H, W, 4]) float.
    labels: [B, H, W] (or [B, D, H, W]) int in {0, 1, 2, 3}.
    weights: [B] float, any real values (1: the run, 0: left out of the batch).

  Returns:
    The loss, a float scalar.
  """
  probs = jax.nn.softmax(logits, axis=-1)[..., 1:]
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)[..., 1:]
  space = tuple(range(1, probs.ndim - 1))
  w = jnp.asarray(weights).astype(probs.dtype)
  inter = w @ jnp.sum(probs * onehot, axis=space)  # [C-1]
  denom = w @ (jnp.sum(probs, axis=space) + jnp.sum(onehot, axis=space))
  dice = (2.0 * inter + losses.DICE_SMOOTH) / (denom + losses.DICE_SMOOTH)
  return 1.0 - jnp.mean(dice)


def make_step(loss_fn: Callable[[Params, Batch, Array], Array],
              tx: optax.GradientTransformation) -> StepFn:
  """A `StepFn` from a weighted batch loss and an optax optimizer.

  Args:
    loss_fn: `loss_fn(params, batch, weights [B]) -> scalar`, differentiable in both
      params and weights.
    tx: the optimizer of the replayed steps (e.g. `optax.sgd(learning_rate)`; with
      momentum, its state is carried and differentiated too).

  Returns:
    `step_fn(params, opt_state, batch, weights) -> (params, opt_state)`: one update of
    `tx` on the gradient of `loss_fn`.
  """

  def step_fn(params, opt_state, batch, weights):
    grads = jax.grad(loss_fn)(params, batch, weights)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step_fn


def stack_batches(batches: Iterable[dict[str, Any]], batch_size: int,
                  keys: tuple[str, ...] = ("image", "label")) -> dict[str, np.ndarray]:
  """The replay's batches as arrays with a leading step axis, for `metagradient`.

  Args:
    batches: T dicts, each with `keys` [b, ...] and "index" [b] int (b <= batch_size),
      e.g. `Retrainer.batches()`.
    batch_size: B; a shorter batch is padded with copies of its last example.
    keys: the arrays to stack besides "index".

  Returns:
    {key: [T, B, ...], "index": [T, B] int32}, the padding's index -1 (weight 0).

  Raises:
    ValueError: no batches, or one larger than `batch_size` or empty.
  """
  out: dict[str, list[np.ndarray]] = {key: [] for key in (*keys, "index")}
  for t, batch in enumerate(batches):
    index = np.asarray(batch["index"])
    if not 0 < len(index) <= batch_size:
      raise ValueError(f"batches: batch {t} has {len(index)} examples; each must have 1 to "
                       f"batch_size={batch_size}.")
    pad = batch_size - len(index)
    for key in keys:
      a = np.asarray(batch[key])
      out[key].append(np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a)
    out["index"].append(np.concatenate([index, np.full(pad, -1)]).astype(np.int32))
  if not out["index"]:
    raise ValueError("batches: none given; there is no step to differentiate through.")
  return {key: np.stack(v) for key, v in out.items()}


def _batch_weights(weights: Array, index: Array) -> Array:
  """[T, B]: each slot's example weight, 0 for padding (index -1)."""
  return jnp.where(index >= 0, weights[jnp.maximum(index, 0)], 0.0).astype(weights.dtype)


def replay(step_fn: StepFn, params: Params, opt_state: PyTree, batches: Batch,
           weights: Array, *, remat: bool = True) -> tuple[Params, PyTree]:
  """The parameters and optimizer state after the T steps, with example weights.

  Args:
    step_fn: one step (`StepFn`).
    params: the parameters before the first step (any pytree of arrays the steps update).
    opt_state: the optimizer state before the first step.
    batches: pytree of arrays [T, B, ...] with "index" [T, B] int into `weights` (-1:
      padding), e.g. from `stack_batches`.
    weights: [n] float, one weight per training example (ones: the run).
    remat: put each step under `jax.checkpoint` (keep only the state entering each step
      for the reverse pass, recompute the rest).

  Returns:
    (params, opt_state) after the last step.
  """
  def body(carry, xs):
    batch, w = xs
    return step_fn(*carry, batch, w), None

  body = jax.checkpoint(body) if remat else body
  bw = _batch_weights(weights, batches["index"])
  (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), (batches, bw))
  return params, opt_state


def _check_weights(weights, batches) -> jax.Array:
  weights = jnp.asarray(weights)
  if weights.ndim != 1 or not jnp.issubdtype(weights.dtype, jnp.floating):
    raise ValueError(f"weights must be [n] float (one per training example), got "
                     f"{weights.dtype} {weights.shape}.")
  index = np.asarray(batches["index"])
  if index.ndim != 2 or index.size == 0 or index.max() >= weights.shape[0]:
    raise ValueError(f"batches['index'] must be [T, B] indices into the {weights.shape[0]} "
                     f"weights (-1: padding), got shape {index.shape}"
                     + (f" with index {index.max()}" if index.size else "") + ".")
  return weights


@functools.partial(jax.jit, static_argnames=("step_fn", "f", "remat"))
def _value_and_grad(weights, params, opt_state, batches, *, step_fn, f, remat):
  return jax.value_and_grad(
      lambda w: f(replay(step_fn, params, opt_state, batches, w, remat=remat)[0]))(weights)


def metagradient(step_fn: StepFn, params: Params, opt_state: PyTree, batches: Batch,
                 weights: Array, f: Callable[[Params], Array], *,
                 remat: bool = True) -> tuple[jax.Array, jax.Array]:
  """f(theta_T(w)) and its exact gradient in the example weights w.

  Compiled once per (step_fn, f, remat) and shapes: pass the same function objects again
  to reuse it.

  Args:
    step_fn: one step (`StepFn`; `make_step`).
    params: the parameters before the first step.
    opt_state: the optimizer state before the first step.
    batches: pytree [T, B, ...] with "index" [T, B] (`stack_batches`).
    weights: [n] float, where to differentiate (ones: the run).
    f: `f(params) -> scalar`, of the final parameters.
    remat: each step under `jax.checkpoint` (see `replay`); the result is the same.

  Returns:
    (value scalar, metagradient [n] in the dtype of `weights`): g_b = d f / d w_b; an
    example in no batch gets 0.

  Raises:
    ValueError: `weights` not [n] float, or `batches["index"]` not [T, B] into it.
  """
  weights = _check_weights(weights, batches)
  return _value_and_grad(weights, params, opt_state, batches, step_fn=step_fn, f=f,
                         remat=remat)


@functools.partial(jax.jit, static_argnames=("step_fn", "f", "remat"))
def _forward(weights, params, opt_state, batches, *, step_fn, f, remat):
  return jax.vjp(
      lambda w: f(replay(step_fn, params, opt_state, batches, w, remat=remat)[0]), weights)


@jax.jit
def _backward(pullback, cotangents):
  return jax.vmap(lambda c: pullback(c)[0])(cotangents)


def metagradients(step_fn: StepFn, params: Params, opt_state: PyTree, batches: Batch,
                  weights: Array, f: Callable[[Params], Array], *, chunk_size: int = 1,
                  remat: bool = True, progress: bool = False,
                  desc: str = "metagradients") -> tuple[np.ndarray, np.ndarray]:
  """R outputs f(theta_T(w)) and the metagradient of each: one forward pass, R reverse.

  Args:
    step_fn, params, opt_state, batches, weights, remat: as `metagradient`.
    f: `f(params) -> [R]`, of the final parameters.
    chunk_size: outputs per reverse pass (vmapped; memory grows with it).
    progress: show a progress bar over the outputs.
    desc: the progress bar's label.

  Returns:
    (values [R], metagradients [R, n]) as numpy arrays in the dtype of `weights`: row r is
    d f_r / d w.

  Raises:
    ValueError: as `metagradient`; `f` not [R]; `chunk_size` < 1.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
  weights = _check_weights(weights, batches)
  values, pullback = _forward(weights, params, opt_state, batches, step_fn=step_fn, f=f,
                              remat=remat)
  if values.ndim != 1:
    raise ValueError(f"f must return [R] (one value per output), got shape {values.shape}.")
  num = values.shape[0]
  eye = jnp.eye(num, dtype=values.dtype)
  bar = ProgressBar(num, desc, enabled=progress)
  rows = []
  for start in range(0, num, chunk_size):
    chunk = eye[start:start + chunk_size]
    if chunk.shape[0] < chunk_size:  # one compiled shape: pad the last chunk with zeros
      chunk = jnp.concatenate([chunk, jnp.zeros((chunk_size - chunk.shape[0], num),
                                                chunk.dtype)])
    rows.append(np.asarray(_backward(pullback, chunk))[:min(chunk_size, num - start)])
    bar.update(rows[-1].shape[0])
  bar.close()
  grads = np.concatenate(rows) if rows else np.zeros((0, weights.shape[0]), weights.dtype)
  return np.asarray(values), grads


def removal_change(grads: np.ndarray, removed) -> np.ndarray:
  """The first-order change of the outputs when the `removed` examples' weights go 1 -> 0.

  Args:
    grads: [n] or [R, n] metagradients.
    removed: indices of the removed examples (duplicates count once).

  Returns:
    [] or [R]: -sum over the removed b of grads[..., b].
  """
  grads = np.asarray(grads)
  removed = np.unique(np.asarray(list(removed), np.int64))
  if removed.size and (removed[0] < 0 or removed[-1] >= grads.shape[-1]):
    raise ValueError(f"removed: indices must be in [0, {grads.shape[-1]}), got "
                     f"{removed[0] if removed[0] < 0 else removed[-1]}.")
  return -grads[..., removed].sum(axis=-1)


# The run's step and output, one function object per model structure, so that compiled
# replays are shared by every call on runs of one architecture.
@functools.lru_cache(maxsize=16)
def _run_step(model_def, optimizer_def) -> StepFn:

  def step_fn(model_state, opt_state, batch, weights):
    model = nnx.merge(model_def, model_state)
    optimizer = nnx.merge(optimizer_def, opt_state)
    grads = nnx.grad(
        lambda m: weighted_dice_loss(m(batch["image"]), batch["label"], weights))(model)
    optimizer.update(model, grads)  # the run's update (`train.train_step`)
    return nnx.state(model), nnx.state(optimizer)

  return step_fn


@functools.lru_cache(maxsize=16)
def _run_output(model_def, f) -> Callable[[PyTree], Array]:

  def output(model_state):
    _, params, state = models.functional(nnx.merge(model_def, model_state))
    return f(params, state)

  return output


def run_metagradients(retrainer: Retrainer, f: Callable[[Params, PyTree], Array], *,
                      chunk_size: int = 1, remat: bool = True, progress: bool = False,
                      desc: str = "metagradients") -> tuple[np.ndarray, np.ndarray]:
  """Metagradients of R outputs of a run's final model through its replayed SGD phase.

  The replay is the `Retrainer`'s with nothing removed (its batches, padded as in
  training, from its start checkpoint, with the run's optimizer and model in training
  mode), each step's loss `weighted_dice_loss` (at w = 1 the run's loss); the outputs
  are read from the final model in evaluation mode.

  Args:
    retrainer: a `training.retrain.Retrainer` of the run (its `order_seed` is followed).
    f: `f(params, state) -> [R]`, as `models.functional(model)` gives them (e.g. R
      validation regions' soft Dice, from `influence.segmentation.make_region_losses`).
      Pass the same object again to reuse what was compiled.
    chunk_size, remat, progress, desc: as `metagradients`.

  Returns:
    (values [R] float32, metagradients [R, n] float32), n = len(retrainer.train_set): row r
    is d f_r / d w over the training examples.
  """
  model, optimizer = retrainer.start()
  model_def, model_state = nnx.split(model)
  optimizer_def, opt_state = nnx.split(optimizer)
  batches = stack_batches(retrainer.batches(), retrainer.config.batch_size)
  weights = jnp.ones(len(retrainer.train_set), jnp.float32)
  return metagradients(_run_step(model_def, optimizer_def), model_state, opt_state, batches,
                       weights, _run_output(model_def, f), chunk_size=chunk_size,
                       remat=remat, progress=progress, desc=desc)

