"""Tiny models shared by the saliency tests (module-level functions, so that compiled code is
shared between tests). Imported by the test modules beside it (pytest puts this folder on
sys.path).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax import models
from tracin_jax import saliency

DN = ("NHWC", "HWIO", "NHWC")


def rand(shape, seed=0, scale=1.0, dtype=np.float32):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


# ------------------------------------------------------------- a linear classifier, [N, K]
def linear_apply(params, x):
  """logits[n, k] = sum_{hwc} x[n, h, w, c] W[h, w, c, k] + b[k]: dF_k/dx = W[..., k]."""
  return jnp.einsum("nhwc,hwck->nk", x, params["w"]) + params["b"]


def linear_params(h=4, w=4, c=2, k=3):
  return {"w": jnp.asarray(rand((h, w, c, k), 1)), "b": jnp.asarray(rand((k,), 2))}


# ------------------------------------------------------------- a smooth segmentation net
def smooth_apply(params, x):
  """tanh conv -> 1x1 conv: smooth logits [N, H, W, K] (no ReLU)."""
  h = jnp.tanh(jax.lax.conv_general_dilated(x, params["w1"], (1, 1), "SAME",
                                            dimension_numbers=DN))
  return jnp.einsum("nhwc,ck->nhwk", h, params["w2"])


def smooth_params(c=2, hidden=3, k=3, dtype=np.float32):
  return {"w1": jnp.asarray(rand((3, 3, c, hidden), 3, 0.5, dtype)),
          "w2": jnp.asarray(rand((hidden, k), 4, 1.0, dtype))}


# ------------------------------------------------------------- a pure-JAX ReLU conv net
def conv_features(params, x):
  """relu(3x3 conv, stride 2): [N, H, W, C] -> A [N, H/2, W/2, F]."""
  z = jax.lax.conv_general_dilated(x, params["w1"], (2, 2), "SAME", dimension_numbers=DN)
  return jax.nn.relu(z + params["b1"])


def conv_head(params, a):
  """Nearest 2x upsampling, ReLU'd 3x3 conv and a 1x1 conv: A -> logits [N, H, W, K]."""
  a = jnp.repeat(jnp.repeat(a, 2, axis=1), 2, axis=2)
  h = jnp.maximum(jax.lax.conv_general_dilated(a, params["w2"], (1, 1), "SAME",
                                               dimension_numbers=DN), 0.0)
  return jnp.einsum("nhwc,ck->nhwk", h, params["w3"]) + params["b3"]


def conv_hidden(params, x):
  """The second layer's output (before the 1x1 head)."""
  a = jnp.repeat(jnp.repeat(conv_features(params, x), 2, axis=1), 2, axis=2)
  return jnp.maximum(jax.lax.conv_general_dilated(a, params["w2"], (1, 1), "SAME",
                                                  dimension_numbers=DN), 0.0)


def conv_last(params, h):
  return jnp.einsum("nhwc,ck->nhwk", h, params["w3"]) + params["b3"]


def conv_apply(params, x):
  return conv_head(params, conv_features(params, x))


def conv_params(c=4, f=6, k=4):
  return {"w1": jnp.asarray(rand((3, 3, c, f), 5, 0.4)), "b1": jnp.asarray(rand((f,), 6, 0.1)),
          "w2": jnp.asarray(rand((3, 3, f, f), 7, 0.3)),
          "w3": jnp.asarray(rand((f, k), 8)), "b3": jnp.asarray(rand((k,), 9, 0.1))}


CONV_LAYER = saliency.split_layer(conv_features, conv_head, name="conv1")
CONV_LAST = saliency.split_layer(conv_hidden, conv_last, name="conv2")


# ------------------------------------------------------------- the tiny UNet
@functools.cache
def unet() -> saliency.NnxModel:
  """models.get_model("unet", base_width=4, depth=2, seed=0), as a saliency.NnxModel (built
  once, on first use; about 1 s: get_model draws all parameters in one compiled call, which
  a wrapping `nnx.jit` would only slow down)."""
  return saliency.NnxModel(models.get_model("unet", base_width=4, depth=2, seed=0))


def images(n=1, size=16, c=4, seed=11):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, c)),
                     jnp.float32)
