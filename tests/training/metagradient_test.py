"""Tests of the exact metagradient: finite differences of retraining, remat, the run, removal."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_run

from tracin_jax import models
from tracin_jax.influence import segmentation
from tracin_jax.training import losses
from tracin_jax.training import metagradient as mg
from tracin_jax.training.retrain import Retrainer

# The toy: a per-pixel linear model (a 1x1 convolution) on 9 examples of 4 x 4 pixels,
# batches of 4 (the third of each epoch is short and padded), two epochs: 6 steps.
N, SIDE, B = 9, 4, 4


def _toy_data():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=(N + 2, SIDE, SIDE)).astype(np.int32)
  images = rng.normal(size=(N + 2, SIDE, SIDE, 4)) + 1.5 * np.eye(4)[labels]
  order = np.concatenate([rng.permutation(N), rng.permutation(N)])
  batches = [{"image": images[i], "label": labels[i], "index": i}
             for i in np.split(order, [4, 8, 9, 13, 17])]
  return images, labels, batches


IMAGES, LABELS, BATCH_LIST = _toy_data()
BATCHES = mg.stack_batches(BATCH_LIST, B)
VAL = {"image": IMAGES[N:], "label": LABELS[N:]}


def apply(params, images):
  return images @ params["w"] + params["b"]


def loss_fn(params, batch, weights):
  return mg.weighted_dice_loss(apply(params, batch["image"]), batch["label"], weights)


def outputs(params):
  """[3]: each tumour class's soft Dice on the first validation example."""
  probs = jax.nn.softmax(apply(params, VAL["image"][:1]), -1)[..., 1:]
  y = jax.nn.one_hot(VAL["label"][:1], 4, dtype=probs.dtype)[..., 1:]
  return losses.soft_dice(probs, y, axes=(0, 1, 2))


def first_output(params):
  return outputs(params)[0]


def _params0():
  rng = np.random.default_rng(1)
  return {"w": jnp.asarray(0.3 * rng.normal(size=(4, 4))), "b": jnp.zeros(4)}


# SGD with momentum: its state matters, and is threaded through the steps.
OPTIMIZER = optax.sgd(0.5, momentum=0.9)
STEP = mg.make_step(loss_fn, OPTIMIZER)
JIT_STEP = jax.jit(STEP)


def _retrain(weights):
  """The plain computation: step by step in Python, each batch's weights looked up."""
  params = _params0()
  opt_state = OPTIMIZER.init(params)
  for batch in BATCH_LIST:
    w = np.zeros(B)
    w[:len(batch["index"])] = weights[batch["index"]]
    padded = {k: v[0] for k, v in mg.stack_batches([batch], B).items()}
    params, opt_state = JIT_STEP(params, opt_state, padded, jnp.asarray(w))
  return params


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="module")
def toy_metagradients():
  """(values [3], metagradients [3, N]) of `outputs` in float64, in reverse passes of 2
  outputs."""
  with jax.enable_x64(True):
    params = _params0()
    return mg.metagradients(STEP, params, OPTIMIZER.init(params), BATCHES,
                            jnp.ones(N), outputs, chunk_size=2)


def test_metagradients_equal_finite_differences_of_retraining(toy_metagradients, x64):
  """d f_r / d w_b against central differences (eps 1e-5) of the plain step-by-step
  retraining with w_b perturbed, for examples in full, short and several batches."""
  values, grads = toy_metagradients
  assert grads.dtype == np.float64 and grads.shape == (3, N)
  np.testing.assert_allclose(values, outputs(_retrain(np.ones(N))), rtol=1e-12)
  eps = 1e-5
  examples = [int(BATCH_LIST[0]["index"][0]), int(BATCH_LIST[2]["index"][0]),
              int(BATCH_LIST[4]["index"][1])]  # the short batch's one example among them
  for b in examples:
    up, down = np.ones(N), np.ones(N)
    up[b] += eps
    down[b] -= eps
    fd = (outputs(_retrain(up)) - outputs(_retrain(down))) / (2 * eps)
    np.testing.assert_allclose(grads[:, b], fd, rtol=1e-6, atol=1e-10)
  assert np.all(np.abs(grads) > 1e-6)  # every example matters, the comparison is not 0 = 0
  # The weights enter each batch's Dice sums, which scaling them all together leaves
  # unchanged (but for the smoothing): the metagradients sum to about 0.
  np.testing.assert_array_less(np.abs(grads.sum(1)), 1e-4 * np.abs(grads).sum(1))


def test_without_remat_the_scalar_form_gives_the_same_row(toy_metagradients, x64):
  """`metagradient` of output 0 without `jax.checkpoint` equals row 0 of the remat
  `metagradients` (chunked reverse passes)."""
  params = _params0()
  value, g = mg.metagradient(STEP, params, OPTIMIZER.init(params), BATCHES,
                             jnp.ones(N), first_output, remat=False)
  assert g.dtype == jnp.float64 and g.shape == (N,)
  values, rows = toy_metagradients
  np.testing.assert_allclose(g, rows[0], rtol=1e-12, atol=1e-16)
  assert value == pytest.approx(values[0], rel=1e-14)


def _regression_loss(params, batch, weights):
  """A weighted mean squared error: each example's term scales with its weight."""
  residual = batch["x"] @ params - batch["y"]
  return jnp.sum(weights * residual ** 2) / weights.shape[0]


def test_removal_prediction_has_the_sign_of_an_actual_removal(x64):
  """On a linear regression with a small learning rate, f (a test prediction) is close to
  linear in w: removing examples (w_b = 0) changes f by about -sum_b g_b, the prediction of
  `removal_change`."""
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(N, 3)), rng.normal(size=N)
  order = np.concatenate([rng.permutation(N), rng.permutation(N)])
  batches = mg.stack_batches([{"x": x[i], "y": y[i], "index": i}
                              for i in np.split(order, [4, 8, 9, 13, 17])], B, keys=("x", "y"))
  tx = optax.sgd(0.003)
  step = mg.make_step(_regression_loss, tx)
  test_x = jnp.asarray(rng.normal(size=3))
  f = lambda p: test_x @ p  # noqa: E731
  params = jnp.asarray(rng.normal(size=3))
  base, grads = mg.metagradient(step, params, tx.init(params), batches, jnp.ones(N), f)
  for removed in ([0], [3], [1, 5]):
    w = np.ones(N)
    w[removed] = 0.0
    after = f(mg.replay(step, params, tx.init(params), batches, jnp.asarray(w))[0])
    actual = float(after - base)
    predicted = float(mg.removal_change(np.asarray(grads), removed))
    assert np.sign(predicted) == np.sign(actual) and abs(actual) > 1e-3
    assert predicted == pytest.approx(actual, rel=0.02)


def test_weighted_dice_loss_is_the_training_loss_at_zero_one_weights():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(3, 4, 4, 4)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, size=(3, 4, 4)), jnp.int32)
  both = jax.jit(lambda w: (mg.weighted_dice_loss(logits, labels, w),
                            losses.dice_loss(logits, labels, w)[0]))
  weighted, training = both(jnp.asarray([1.0, 0.0, 1.0]))
  np.testing.assert_allclose(weighted, training, rtol=1e-6)
  # A weight of 2 counts the example twice in the batch's sums.
  twice = jax.jit(mg.weighted_dice_loss)(logits[jnp.array([0, 0, 2])],
                                         labels[jnp.array([0, 0, 2])], jnp.ones(3))
  np.testing.assert_allclose(both(jnp.asarray([2.0, 0.0, 1.0]))[0], twice, rtol=1e-6)


def test_bad_arguments_are_refused():
  params = _params0()
  step = STEP
  with pytest.raises(ValueError, match=r"weights must be \[n\] float"):
    mg.metagradient(step, params, (), BATCHES, jnp.ones((N, 1)), first_output)
  with pytest.raises(ValueError, match="indices into the 5 weights"):
    mg.metagradient(step, params, (), BATCHES, jnp.ones(5), first_output)
  with pytest.raises(ValueError, match="chunk_size must be at least 1"):
    mg.metagradients(step, params, (), BATCHES, jnp.ones(N), outputs, chunk_size=0)
  with pytest.raises(ValueError, match="batch 0 has 5 examples"):
    mg.stack_batches([{"image": IMAGES[:5], "label": LABELS[:5], "index": np.arange(5)}], B)
  with pytest.raises(ValueError, match=r"removed: indices must be in \[0, 9\)"):
    mg.removal_change(np.ones((2, N)), [9])


# The tiny run (tests/training/tiny_run.py, the session's `full_run`): 2 SGD epochs of 3
# steps replayed; outputs: the soft Dice of the two largest regions of 4 validation slices.
@pytest.fixture(scope="module")
def run_case(full_run):
  workdir, result = full_run
  retrainer = Retrainer(workdir, tiny_run.TRAIN)
  apply_fn, params, state = models.functional(result.model)
  loss = jax.vmap(segmentation.make_region_losses(apply_fn), in_axes=(None, 0, None))
  pred = np.asarray(jnp.argmax(apply_fn(params, tiny_run.VAL.images, state), -1))
  examples = {"image": tiny_run.VAL.images, "target": tiny_run.VAL.labels,
              "region": np.stack([pred == c for c in (1, 2, 3)], -1)}
  sizes = examples["region"].sum(axis=(1, 2))  # [4, 3]
  rows, classes = np.unravel_index(np.argsort(sizes, axis=None)[-2:], sizes.shape)
  assert sizes[rows, classes].min() > 0

  def f(params, state):
    return 1.0 - loss(params, examples, state)[rows, classes]

  return retrainer, f, result


@pytest.mark.slow  # a reverse pass through the UNet's training steps: ~20 s compiling
def test_run_metagradients_replay_the_run(run_case):
  """The run-level convenience: its forward pass is the run's own replay, and its rows have
  the structure of batch-Dice weights. (The gradient itself is the generic core's, checked
  against finite differences of retraining on the toy above.)"""
  retrainer, f, result = run_case
  values, grads = mg.run_metagradients(retrainer, f)
  assert grads.shape == (2, len(tiny_run.TRAIN))
  # Its forward pass is the run's replay: the outputs of the run's final model.
  _, params, state = models.functional(result.model)
  np.testing.assert_allclose(values, f(params, state), rtol=1e-5)
  assert np.all(np.isfinite(grads)) and np.all(np.abs(grads).max(axis=1) > 0)
  # As on the toy, the weights sit inside each batch's Dice sums: the rows sum to about 0.
  np.testing.assert_array_less(np.abs(grads.sum(1)), 1e-4 * np.abs(grads).sum(1))
