"""tracin_jax.draws: the vector-then-reshape draws equal JAX's and Flax's, bit for bit."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tracin_jax import draws
from tracin_jax import models

KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


@pytest.mark.parametrize("impl", KEY_IMPLS)
def test_normal_equals_jax_random_normal(impl):
  key = jax.random.key(7, impl=impl)
  for shape in [(5,), (2, 6, 6, 4)]:
    np.testing.assert_array_equal(draws.normal(key, shape), jax.random.normal(key, shape))
  keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(3))  # as the saliency
  np.testing.assert_array_equal(jax.vmap(lambda k: draws.normal(k, (6, 6, 4)))(keys),
                                jax.vmap(lambda k: jax.random.normal(k, (6, 6, 4)))(keys))


def test_fan_in_is_the_variance_scaling_count():
  assert draws.fan_in((3, 3, 4, 8)) == 36
  assert draws.fan_in((1, 1, 16, 4)) == 16
  assert draws.fan_in((8, 2, 2, 4), in_axis=0, out_axis=(1, 2, 3)) == 8
  assert draws.fan_in((6, 5)) == 6


@pytest.mark.parametrize("impl", KEY_IMPLS)
def test_lecun_normal_equals_flax(impl):
  key = jax.random.key(3, impl=impl)
  for shape, axes in [((3, 3, 4, 8), {}), ((6, 5), {}),
                      ((8, 2, 2, 4), {"in_axis": 0, "out_axis": (1, 2, 3)})]:
    ours = draws.lecun_normal(**axes)(key, shape)
    theirs = nnx.initializers.lecun_normal(**axes)(key, shape)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


def test_a_unet_is_initialised_as_with_flax_own_initializer(monkeypatch):
  """Every model's convolutions go through `layers.conv` (default axes) and the UNet's
  up-convolution uses the transposed axes: the UNet has both."""
  # RBG keys: Flax's own draws of 4-D kernels then compile in a fifth of the time (the
  # equality holds for every key implementation, above).
  def build():
    rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
    return nnx.state(models.get_model("unet", base_width=4, depth=2, rngs=rngs), nnx.Param)

  ours = build()
  monkeypatch.setattr(draws, "lecun_normal", nnx.initializers.lecun_normal)
  theirs = build()
  leaves, tree = jax.tree.flatten(ours)
  assert tree == jax.tree.structure(theirs) and len(leaves) > 10
  for a, b in zip(leaves, jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)
  assert any(float(jnp.std(leaf)) > 0 for leaf in leaves)  # drawn, not all zeros


def test_the_models_build_every_convolution_through_layers_conv():
  """So that every model's parameters are drawn the fast way (and equal to Flax's)."""
  package = pathlib.Path(models.__file__).parent
  for path in package.glob("*.py"):
    calls = path.read_text().count("nnx.Conv(") + path.read_text().count("nnx.ConvTranspose(")
    assert calls == (1 if path.name == "layers.py" else 0), path.name
