"""Random projections: seeded, linear, unbiased with the JL variance; factored = dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.influence import projection as projection_lib
from tracin_jax.influence.projection import Projection

KINDS = projection_lib.KINDS


def _rows(seed, r=3, p=100):
  return np.random.default_rng(seed).normal(size=(r, p)).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded(kind):
  rows = _rows(0)
  a = np.asarray(Projection(16, kind, seed=3, chunk_columns=32)(rows))
  b = np.asarray(Projection(16, kind, seed=3, chunk_columns=32)(rows))
  c = np.asarray(Projection(16, kind, seed=4, chunk_columns=32)(rows))
  assert a.shape == (3, 16)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


@pytest.mark.parametrize("kind", KINDS)
def test_linear(kind):
  proj = Projection(16, kind, seed=1, chunk_columns=32)
  a, b = _rows(1), _rows(2)
  np.testing.assert_allclose(proj(a + b), np.asarray(proj(a)) + np.asarray(proj(b)),
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(proj(2.5 * a), 2.5 * np.asarray(proj(a)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_projected_independently(kind):
  """A row's projection does not depend on the other rows of its block."""
  proj = Projection(16, kind, seed=1, chunk_columns=32)
  rows = _rows(3, r=5)
  np.testing.assert_allclose(proj(rows)[2], proj(rows[2:3])[0], rtol=1e-5, atol=1e-5)


def test_dense_matrix_is_the_projection():
  proj = Projection(8, "dense", seed=2, chunk_columns=30)  # 100 columns: a ragged chunk
  rows = _rows(4)
  matrix = projection_lib.dense_matrix(proj, 100)
  np.testing.assert_allclose(proj(rows), rows @ np.asarray(matrix), rtol=1e-5, atol=1e-5)


def _inner_products(kind, a, b, dim, num_seeds):
  rows = jnp.asarray(np.stack([a, b]))
  keys = jax.random.split(jax.random.key(123), num_seeds)
  out = jax.vmap(lambda key: projection_lib._project(rows, key, dim, kind, 16))(keys)
  return np.asarray(jnp.sum(out[:, 0] * out[:, 1], axis=-1), np.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_unbiased_with_jl_variance(kind):
  rng = np.random.default_rng(5)
  a = rng.normal(size=48).astype(np.float32)
  b = (0.6 * a + rng.normal(size=48)).astype(np.float32)
  dim, num_seeds = 8, 4000
  values = _inner_products(kind, a, b, dim, num_seeds)
  exact = float(np.dot(a.astype(np.float64), b))
  na2, nb2 = float(np.dot(a, a)), float(np.dot(b, b))
  gaussian_variance = (na2 * nb2 + exact**2) / dim
  # Unbiased: the mean over seeds is within 4 standard errors of the exact inner product.
  assert abs(values.mean() - exact) < 4 * np.sqrt(gaussian_variance / num_seeds)
  variance = values.var()
  if kind == "dense":
    expected = gaussian_variance
  elif kind == "countsketch":
    expected = gaussian_variance - 2 * float(np.sum(a.astype(np.float64)**2 * b**2)) / dim
  else:  # srht: at most the Gaussian bound (sampling coordinates of an orthogonal transform)
    assert variance < 1.15 * gaussian_variance
    assert variance > 0.2 * gaussian_variance
    return
  assert variance == pytest.approx(expected, rel=0.15)


def test_variance_falls_as_one_over_dim():
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(2, 64)).astype(np.float32)
  v8 = _inner_products("countsketch", a, b, 8, 3000).var()
  v32 = _inner_products("countsketch", a, b, 32, 3000).var()
  assert v8 / v32 == pytest.approx(4.0, rel=0.3)


def test_walsh_hadamard_matches_the_matrix():
  n = 8
  h = np.array([[1.0]])
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  x = _rows(7, r=2, p=n)
  np.testing.assert_allclose(projection_lib.walsh_hadamard(jnp.asarray(x)), x @ h.T,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(dim=0), dict(dim=2.5), dict(dim=4, kind="gauss"),
                                 dict(dim=4, seed=1.5), dict(dim=4, chunk_columns=0)])
def test_bad_settings_name_the_argument(bad):
  with pytest.raises(ValueError, match="dim|kind|seed|chunk_columns"):
    Projection(**bad)


def test_factored_projection_of_a_convolution_equals_the_dense_projection():
  """LoGra's factored projection of one example's convolution kernel gradient equals the
  Kronecker projection of the gradient jax.grad forms."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(6, 5, 3)), jnp.float32)  # [H, W, C_in]
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)  # [kh, kw, C_in, C_out]
  weights = jnp.asarray(rng.normal(size=(6, 5, 4)), jnp.float32)

  def conv(k, inp):
    return jax.lax.conv_general_dilated(inp[None], k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]

  def loss(k):
    return jnp.sum(weights * jnp.tanh(conv(k, x)))

  grad = jax.grad(loss)(kernel)  # [3, 3, 3, 4], formed
  out = conv(kernel, x)
  output_grads = jax.grad(lambda o: jnp.sum(weights * jnp.tanh(o)))(out)  # [H, W, C_out]
  patches = projection_lib.conv_patches(x, (3, 3))  # [pos, 27]
  # The patches reproduce the formed gradient...
  np.testing.assert_allclose(patches.T @ output_grads.reshape(-1, 4), grad.reshape(27, 4),
                             rtol=1e-4, atol=1e-4)
  a, b = projection_lib.factor_matrices(0, 27, 4, 5, 2)
  factored = projection_lib.factored_projection(patches, output_grads.reshape(-1, 4), a, b)
  dense = grad.reshape(-1) @ jnp.kron(a, b)  # [27 * 4] @ [108, 10]
  np.testing.assert_allclose(factored, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_traceable_form_is_the_projection(kind):
  """The form the statistical tests vmap over keys is the projection users get."""
  proj = Projection(16, kind, seed=9, chunk_columns=16)
  rows = _rows(10)
  np.testing.assert_allclose(
      projection_lib._project(jnp.asarray(rows), jax.random.key(9), 16, kind, 16),  # pylint: disable=protected-access
      proj(rows), rtol=1e-6, atol=1e-6)
