"""Per-example gradients against the plain loop and a linear model's closed form."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.influence import grads
import tiny_models as tm

VECTORIZE = ["vmap", "loop", "threads", "auto"]


@pytest.mark.parametrize("vectorize", VECTORIZE)
def test_linear_gradients_match_closed_form(vectorize):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 5)).astype(np.float32)
  params = {"b": jnp.zeros(3), "w": jnp.ones((5, 3))}
  g = np.asarray(grads.per_example_grads(tm.linear_loss, params, {"x": x}, vectorize))
  assert g.shape == (4, 3, 3 + 15)
  for b in range(4):
    for j in range(3):
      # ravel_pytree order: leaves sorted by key, "b" then "w" (row-major [5, 3]).
      expect_b = np.eye(3)[j]
      expect_w = np.outer(x[b], np.eye(3)[j]).ravel()
      np.testing.assert_allclose(g[b, j], np.concatenate([expect_b, expect_w]), rtol=1e-6)


@pytest.mark.parametrize("vectorize", VECTORIZE)
@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_block_grads_match_plain_loop(x64, model, vectorize):
  if model == "mlp":
    loss_fn, params, data = (tm.mlp_loss, tm.mlp_params(0, jnp.float64),
                             tm.mlp_data(1, 5, np.float64))
  else:
    loss_fn, params, data = (tm.conv_loss, tm.conv_params(0, jnp.float64),
                             tm.conv_data(1, 3, dtype=np.float64))
  g, finite = grads.block_grads(loss_fn, 3, params, data, vectorize)
  expect = tm.loop_grads(loss_fn, params, data)
  n, k, p = expect.shape
  assert g.dtype == jnp.float64 and g.shape == (n * k, p)
  np.testing.assert_allclose(np.asarray(g), expect.reshape(n * k, p), rtol=1e-12, atol=1e-12)
  assert np.asarray(finite).all()


@pytest.mark.parametrize("vectorize", VECTORIZE)
def test_squared_norms_match_gradients(vectorize):
  params, data = tm.mlp_params(0), tm.mlp_data(2, 4)
  g = np.asarray(grads.per_example_grads(tm.mlp_loss, params, data, vectorize))
  norms = grads.block_squared_norms(tm.mlp_loss, 3, params, data, vectorize)
  np.testing.assert_allclose(np.asarray(norms), np.sum(g**2, axis=-1), rtol=1e-5)


def test_one_forward_pass_for_the_k_losses():
  traces = []

  def loss_fn(params, example):
    traces.append(1)  # runs once per trace of the loss
    return tm.mlp_loss(params, example)

  grads.block_grads(loss_fn, 3, tm.mlp_params(0), tm.mlp_data(0, 2), "vmap")
  assert len(traces) == 1  # K separate jax.grad calls would trace it 3 times


def test_num_outputs():
  params, example = tm.mlp_params(0), jax.tree.map(lambda x: x[0], tm.mlp_data(0, 1))
  assert grads.num_outputs(tm.mlp_loss, params, example) == 3
  assert grads.num_outputs(lambda p, e: jnp.sum(tm.mlp_loss(p, e)), params, example) == 1
  with pytest.raises(ValueError, match="scalar or a vector"):
    grads.num_outputs(lambda p, e: jnp.ones((2, 3)), params, example)
  with pytest.raises(ValueError, match="floating"):
    grads.num_outputs(lambda p, e: jnp.ones(3, jnp.int32), params, example)
  with pytest.raises(ValueError, match="empty"):
    grads.num_outputs(lambda p, e: jnp.ones(0), params, example)


def test_nonfinite_gradients_are_flagged():
  def loss_fn(params, example):  # sqrt of a negative number: NaN gradient
    return jnp.sqrt(example["x"] @ params["w"])

  data = {"x": np.array([[1.0, 2.0], [-1.0, -2.0]], np.float32)}
  _, finite = grads.block_grads(loss_fn, 1, {"w": jnp.ones(2)}, data, "vmap")
  assert np.asarray(finite).tolist() == [True, False]


def test_low_precision_parameters_give_float32_gradients():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tm.mlp_params(0))
  assert grads.gradient_dtype(params) == np.float32
  g = grads.per_example_grads(tm.mlp_loss, params, tm.mlp_data(0, 2))
  assert g.dtype == jnp.float32


def test_check_vectorize():
  assert grads.check_vectorize("vmap") == "vmap"
  assert grads.check_vectorize("auto") == "auto"
  with pytest.raises(ValueError, match="vectorize must be one of"):
    grads.check_vectorize("pmap")
  with pytest.raises(ValueError, match="vectorize must be one of"):
    grads.block_grads(tm.mlp_loss, 3, tm.mlp_params(0), tm.mlp_data(0, 2), "pmap")


def test_auto_measures_every_path_once_and_keeps_the_fastest(x64, monkeypatch):
  def loss_fn(params, example):  # a new object: nothing measured for it yet
    return tm.conv_loss(params, example)

  params, data = tm.conv_params(0, jnp.float64), tm.conv_data(1, 3, dtype=np.float64)
  calls = []
  block_grads = grads._block_grads

  def spy(loss, k, p, batch, path, state):
    calls.append((path, jax.tree.leaves(batch)[0].shape[0]))
    return block_grads(loss, k, p, batch, path, state)

  monkeypatch.setattr(grads, "_block_grads", spy)
  assert grads.auto_choice(loss_fn, 3, params, data) is None
  g, finite = grads.block_grads(loss_fn, 3, params, data, "auto")
  assert calls == [(path, 3) for path in grads.auto_paths()]  # every path timed on the block
  choice = grads.auto_choice(loss_fn, 3, params, data)
  assert choice in grads.auto_choices() and choice.path in grads.auto_paths()
  assert set(choice.seconds) == set(grads.auto_paths()) and choice.block_size == 3
  assert choice.path == min(choice.seconds, key=choice.seconds.get)
  assert choice.path in str(choice)
  np.testing.assert_allclose(np.asarray(g), tm.loop_grads(loss_fn, params, data).reshape(9, -1),
                             rtol=1e-12, atol=1e-12)
  assert np.asarray(finite).all()
  np.testing.assert_array_equal(  # the chosen path's own gradients, bit for bit
      np.asarray(g), np.asarray(grads.block_grads(loss_fn, 3, params, data, choice.path)[0]))
  # Later blocks, of any size, take the choice without measuring again.
  calls.clear()
  grads.block_grads(loss_fn, 3, params, jax.tree.map(lambda x: x[:2], data), "auto")
  assert calls == [(choice.path, 2)]
  assert grads.resolve_vectorize(loss_fn, 3, params, data, "auto") == choice.path
  assert grads.resolve_vectorize(loss_fn, 3, params, data, "vmap") == "vmap"
  # Another example shape is measured anew.
  calls.clear()
  grads.block_grads(loss_fn, 3, params, tm.conv_data(1, 2, size=4, dtype=np.float64), "auto")
  assert [path for path, _ in calls] == list(grads.auto_paths())


def test_auto_measures_threads_on_a_multicore_cpu(monkeypatch):
  monkeypatch.setattr(grads, "_num_workers", lambda: 2)
  assert grads.auto_paths() == grads.PATHS == ("loop", "vmap", "threads")
  monkeypatch.setattr(grads, "_num_workers", lambda: 1)
  assert grads.auto_paths() == ("loop", "vmap")  # one core: nothing to run side by side


def test_threads_path_runs_examples_at_once(monkeypatch):
  """Two examples on two workers meet at a barrier: it breaks (after 10 s) unless both
  calls run at the same time."""
  monkeypatch.setattr(grads, "_num_workers", lambda: 2)
  barrier, threads = threading.Barrier(2, timeout=10), set()

  class Jitted:  # stands in for a jitted function: lower(...).compile() -> callable

    def lower(self, loss_fn, k, params, example, state):
      return self

    def compile(self):
      def run(params, example, state):
        threads.add(threading.get_ident())
        barrier.wait()
        return jnp.sum(example["x"])
      return run

  out = grads._side_by_side(Jitted(), tm.mlp_loss, 3, tm.mlp_params(0), tm.mlp_data(0, 2), None)
  data = tm.mlp_data(0, 2)
  np.testing.assert_allclose(np.asarray(out), data["x"].sum(axis=1), rtol=1e-6)
  assert len(threads) == 2 and threading.get_ident() not in threads
