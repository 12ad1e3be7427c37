"""Tiny models shared by the influence tests, and the plain loop that TracIn replaces.

Loss functions are module-level objects so that compiled code is shared between tests.
Imported by the test modules beside it (pytest puts this folder on sys.path).
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np


# ---------------------------------------------------------------- a linear model, K = 3
def linear_loss(params, example):
  """loss_j = x . W[:, j] + b_j: gradient e_j (x) x for W, e_j for b (closed form)."""
  return example["x"] @ params["w"] + params["b"]


# ---------------------------------------------------------------- squared error, K = 1
def squared_error(params, example):
  """(w . x - y)^2, a scalar: gradient 2 (w . x - y) x."""
  return (jnp.dot(params["w"], example["x"]) - example["y"]) ** 2


# ---------------------------------------------------------------- a small MLP, K = 3
def mlp_loss(params, example):
  h = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
  return (h @ params["w2"] - example["y"]) ** 2


def mlp_params(seed, dtype=jnp.float32):
  """The same values in float32 and float64 (numpy draws, then a cast)."""
  rng = np.random.default_rng(seed)
  return {"w1": jnp.asarray(rng.normal(size=(5, 6)), dtype), "b1": 0.1 * jnp.ones(6, dtype),
          "w2": jnp.asarray(rng.normal(size=(6, 3)) * 0.5, dtype)}


def mlp_data(seed, n, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(n, 5)).astype(dtype), "y": rng.normal(size=(n, 3)).astype(dtype)}


# ---------------------------------------------------------------- a tiny conv net
def conv_apply(params, images):
  """images [N, H, W, 2] -> logits [N, H, W, 4]: two 3x3 convolutions."""
  dn = ("NHWC", "HWIO", "NHWC")
  h = jax.lax.conv_general_dilated(images, params["c1"], (1, 1), "SAME", dimension_numbers=dn)
  h = jnp.tanh(h + params["b1"])
  return jax.lax.conv_general_dilated(h, params["c2"], (1, 1), "SAME", dimension_numbers=dn)


def conv_params(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {"c1": jnp.asarray(rng.normal(size=(3, 3, 2, 4)) * 0.5, dtype),
          "b1": jnp.zeros(4, dtype),
          "c2": jnp.asarray(rng.normal(size=(3, 3, 4, 4)) * 0.5, dtype)}


def conv_loss(params, example):
  """Per-class squared error of the mean logit, K = 3 (classes 1..3)."""
  logits = conv_apply(params, example["image"][None])[0]
  return (jnp.mean(logits, axis=(0, 1))[1:] - example["y"]) ** 2


def conv_data(seed, n, size=6, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, size, size, 2)).astype(dtype),
          "y": rng.normal(size=(n, 3)).astype(dtype)}


# ---------------------------------------------------------------- the plain loop
_GRAD_FNS = {}


def _grad_fn(loss_fn, k):
  """The K separate jax.grad of loss_j, j = 0..K-1, under one jit (fewer compiles)."""
  if (loss_fn, k) not in _GRAD_FNS:
    grads = [jax.grad(lambda p, e, j=j: jnp.reshape(loss_fn(p, e), (k,))[j]) for j in range(k)]
    _GRAD_FNS[loss_fn, k] = jax.jit(lambda p, e: [g(p, e) for g in grads])
  return _GRAD_FNS[loss_fn, k]


def loop_grads(loss_fn, params, data):
  """[n, K, P]: one jax.grad per example and per output, in a Python loop."""
  n = jax.tree.leaves(data)[0].shape[0]
  k = np.size(jax.eval_shape(loss_fn, params, jax.tree.map(lambda x: x[0], data)))
  out = []
  for b in range(n):
    example = jax.tree.map(lambda x: x[b], data)
    out.append([np.asarray(jax.flatten_util.ravel_pytree(g)[0])
                for g in _grad_fn(loss_fn, k)(params, example)])
  return np.asarray(out)


def loop_influence(loss_fn, checkpoints, train, test=None):
  """sum_t eta_t <grad loss_j(train b), grad loss_i(test a)>, example by example."""
  test = train if test is None else test
  total = 0.0
  for params, learning_rate in checkpoints:
    g_train, g_test = loop_grads(loss_fn, params, train), loop_grads(loss_fn, params, test)
    n_test, k, _ = g_test.shape
    scores = np.zeros((n_test, k, g_train.shape[0], k))
    for a in range(n_test):
      for i in range(k):
        for b in range(g_train.shape[0]):
          for j in range(k):
            scores[a, i, b, j] = np.dot(g_test[a, i], g_train[b, j])
    total = total + learning_rate * scores
  return total
