"""Input-gradient methods: vanilla, guided backprop, IG, guided IG, SmoothGrad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tracin_jax import saliency
from tracin_jax.saliency import guided_interpreter as guided_lib
import saliency_models as sm


# ----------------------------------------------------------------------------- vanilla
def test_linear_model_gradient_is_its_weights():
  params = sm.linear_params()
  x = jnp.asarray(sm.rand((2, 4, 4, 2), 12))
  for c in range(3):
    grad = saliency.vanilla_gradient(sm.linear_apply, params, x, saliency.class_score(c))
    expected = np.broadcast_to(np.asarray(params["w"][..., c]), x.shape)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)


def test_plain_function_target_and_bad_input():
  params = sm.linear_params()
  x = jnp.asarray(sm.rand((1, 4, 4, 2), 13))
  grad = saliency.vanilla_gradient(sm.linear_apply, params, x, lambda out: 2.0 * out[:, 1])
  np.testing.assert_allclose(grad[0], 2.0 * params["w"][..., 1], rtol=1e-6)
  with pytest.raises(ValueError, match="x must be"):
    saliency.vanilla_gradient(sm.linear_apply, params, x[0], saliency.class_score(0))


# ----------------------------------------------------------------------------- guided backprop
def _two_layer(relu):
  def apply(params, x):  # [N, 4, 4, 2] -> [N, 2]: W2 relu(W1 x)
    h = relu(x.reshape(x.shape[0], -1) @ params["w1"])
    return h @ params["w2"]
  return apply


_RELUS = {"jax.nn.relu": jax.nn.relu, "nnx.relu": nnx.relu,
          "jnp.maximum(x, 0)": lambda z: jnp.maximum(z, 0)}
_TWO_LAYER = {name: _two_layer(relu) for name, relu in _RELUS.items()}
_TWO_LAYER_PARAMS = {"w1": jnp.asarray(sm.rand((32, 8), 14, 0.5)),
                     "w2": jnp.asarray(sm.rand((8, 2), 15))}


@pytest.mark.parametrize("relu_name", list(_RELUS))
def test_guided_backprop_matches_hand_rule_for_each_relu_spelling(relu_name):
  apply = _TWO_LAYER[relu_name]
  p = _TWO_LAYER_PARAMS
  x = jnp.asarray(sm.rand((2, 4, 4, 2), 16))
  target = saliency.class_score(0)
  got = saliency.guided_backprop(apply, p, x, target)
  # By hand: upstream at the ReLU output is w2[:, 0]; guided: 1[up > 0] 1[pre > 0] up.
  w1, w2 = np.asarray(p["w1"]), np.asarray(p["w2"])
  pre = np.asarray(x).reshape(2, -1) @ w1
  up = np.broadcast_to(w2[:, 0], pre.shape)
  expected = ((up > 0) * (pre > 0) * up) @ w1.T
  np.testing.assert_allclose(np.asarray(got).reshape(2, -1), expected, rtol=1e-5, atol=1e-6)
  vanilla = saliency.vanilla_gradient(apply, p, x, target)
  assert np.abs(np.asarray(vanilla) - np.asarray(got)).max() > 1e-3
  assert guided_lib.count_relus(lambda z: apply(p, z), x) == 1


def test_guided_backprop_equals_vanilla_without_relu():
  params = sm.smooth_params()
  x = jnp.asarray(sm.rand((1, 5, 5, 2), 17))
  target = saliency.class_softmax_sum(1)
  assert guided_lib.count_relus(lambda z: sm.smooth_apply(params, z), x) == 0
  np.testing.assert_allclose(saliency.guided_backprop(sm.smooth_apply, params, x, target),
                             saliency.vanilla_gradient(sm.smooth_apply, params, x, target),
                             rtol=1e-6, atol=1e-7)


def test_guided_interpreter_nested_and_unchanged_values():
  inner = jax.jit(lambda z: jax.nn.relu(z) * 2.0)
  fn = jax.checkpoint(lambda z: jnp.sum(inner(z) - jnp.maximum(0.0, z)))
  x = jnp.asarray([1.0, -2.0, 3.0])
  assert guided_lib.count_relus(fn, x) == 2
  np.testing.assert_allclose(guided_lib.guided(fn)(x), fn(x))
  # d/dz [2 relu(z) - relu(z)]: upstream of the second ReLU is -1 < 0, so guided drops it.
  np.testing.assert_allclose(jax.grad(guided_lib.guided(fn))(x), [2.0, 0.0, 2.0])
  np.testing.assert_allclose(jax.grad(fn)(x), [1.0, 0.0, 1.0])


# ----------------------------------------------------------------------------- IG
def test_quadrature_rules_integrate_polynomials():
  for rule, steps, tol in (("midpoint", 50, 1e-3), ("gauss_legendre", 4, 1e-12),
                           ("trapezoid", 51, 1e-3), ("right", 200, 1e-2)):
    nodes, weights = saliency.quadrature(steps, rule)
    np.testing.assert_allclose(np.sum(weights * nodes**3), 0.25, atol=tol)
    np.testing.assert_allclose(np.sum(weights), 1.0, atol=1e-12)
  with pytest.raises(ValueError):
    saliency.quadrature(5, "simpson")


def test_ig_completeness_on_a_smooth_model(x64):
  """|sum(attr) - (F(x) - F(0))| <= 1e-6 |F(x) - F(0)| with 16-point Gauss-Legendre, and
  <= 1e-4 with the 200-step midpoint rule (error O(1/m^2); 1 step is far worse)."""
  params = sm.smooth_params(dtype=np.float64)
  x = jnp.asarray(sm.rand((2, 5, 5, 2), 18, 1.0, np.float64))
  target = saliency.class_softmax_sum(1)
  gl = saliency.integrated_gradients(sm.smooth_apply, params, x, target, steps=16,
                                     rule="gauss_legendre")
  assert np.all(np.abs(gl.completeness_error) <= 1e-6 * np.abs(gl.delta))
  mid = saliency.integrated_gradients(sm.smooth_apply, params, x, target, steps=200)
  assert np.all(np.abs(mid.completeness_error) <= 1e-4)
  coarse = saliency.integrated_gradients(sm.smooth_apply, params, x, target, steps=1)
  assert np.all(np.abs(coarse.completeness_error) > np.abs(mid.completeness_error))
  delta = target(sm.smooth_apply(params, x)) - target(sm.smooth_apply(params, 0 * x))
  np.testing.assert_allclose(mid.delta, delta, rtol=1e-12)


def test_ig_min_baseline_and_chunking_agree():
  params = sm.smooth_params()
  x = jnp.asarray(sm.rand((1, 5, 5, 2), 19))
  target = saliency.class_softmax_sum(2)
  whole = saliency.integrated_gradients(sm.smooth_apply, params, x, target, steps=10,
                                        baseline="min", chunk_size=10)
  chunked = saliency.integrated_gradients(sm.smooth_apply, params, x, target, steps=10,
                                          baseline="min", chunk_size=3)
  np.testing.assert_allclose(chunked.attributions, whole.attributions, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(whole.baseline[0, 0, 0], np.asarray(x).min(axis=(0, 1, 2)))


# ----------------------------------------------------------------------------- guided IG
def test_guided_ig_is_exact_on_a_linear_model():
  """Constant gradient: the attributions telescope to (x - b) * w whatever the path."""
  params = sm.linear_params()
  x = jnp.asarray(sm.rand((2, 4, 4, 2), 20))
  result = saliency.guided_integrated_gradients(sm.linear_apply, params, x,
                                                saliency.class_score(1), steps=20)
  np.testing.assert_allclose(result.attributions, x * params["w"][..., 1], rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(result.completeness_error, 0.0, atol=1e-3)


def _gig_loop(grad_fn, x, baseline, steps, fraction, max_dist):
  """Guided IG (Kapishnikov et al., 2021) for one example, as a plain numpy loop."""
  x_input, x_base = np.asarray(x, np.float64), np.asarray(baseline, np.float64)
  diff = x_input - x_base
  point, attr = x_base.copy(), np.zeros_like(x_input)
  l1_total = np.abs(diff).sum()
  for step in range(steps):
    grad_actual = np.asarray(grad_fn(point))
    alpha = (step + 1.0) / steps
    a_min, a_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
    x_min, x_max = x_base + a_min * diff, x_base + a_max * diff
    l1_target = l1_total * (1 - alpha)
    gamma = np.inf
    while gamma > 1:
      old = point.copy()
      with np.errstate(invalid="ignore", divide="ignore"):
        x_alpha = np.where(diff != 0, (point - x_base) / diff, a_max)
      behind = x_alpha < a_min
      point[behind] = x_min[behind]
      l1_current = np.abs(point - x_input).sum()
      if abs(l1_target - l1_current) <= 1e-9 * (l1_total + abs(l1_current)):
        attr += (point - old) * grad_actual
        break
      magnitude = np.abs(grad_actual).copy()
      magnitude[point == x_max] = np.inf
      threshold = np.quantile(magnitude, fraction, method="lower")
      chosen = (magnitude <= threshold) & (magnitude != np.inf)
      l1_s = (np.abs(point - x_max) * chosen).sum()
      gamma = (l1_current - l1_target) / l1_s if l1_s > 0 else np.inf
      if gamma > 1:
        point[chosen] = x_max[chosen]
      else:
        point[chosen] = (point + gamma * (x_max - point))[chosen]
      attr += (point - old) * grad_actual
  return attr


def test_guided_ig_against_a_numpy_loop(x64):
  params = sm.smooth_params(dtype=np.float64)
  x = jnp.asarray(sm.rand((2, 4, 4, 2), 28, 1.0, np.float64))
  target = saliency.class_softmax_sum(1)
  got = saliency.guided_integrated_gradients(sm.smooth_apply, params, x, target, steps=12,
                                             max_dist=0.05)
  grad_fn = jax.jit(jax.grad(lambda z: jnp.sum(target(sm.smooth_apply(params, z)))))
  for n in range(2):
    expected = _gig_loop(lambda z: grad_fn(z[None])[0], x[n], np.zeros(x.shape[1:]), 12,
                         0.25, 0.05)
    np.testing.assert_allclose(got.attributions[n], expected, rtol=1e-7, atol=1e-9)


def test_guided_ig_completeness_approximate_and_differs_from_ig():
  params = sm.smooth_params()
  x = jnp.asarray(sm.rand((1, 5, 5, 2), 21))
  target = saliency.class_softmax_sum(0)
  gig = saliency.guided_integrated_gradients(sm.smooth_apply, params, x, target, steps=50)
  assert np.all(np.abs(gig.completeness_error) <= 0.05 * np.abs(gig.delta))
  ig = saliency.integrated_gradients(sm.smooth_apply, params, x, target, steps=50)
  assert np.abs(np.asarray(gig.attributions - ig.attributions)).max() > 1e-4


# ----------------------------------------------------------------------------- SmoothGrad
def _smooth_target(rule=True):
  if rule:
    return saliency.masked_class_sum(1, saliency.predicted_region(1))
  mask = np.zeros((2, 5, 5), np.float32)
  mask[0, 1:3, 1:4] = 1.0
  mask[1, 4, 0] = 1.0
  return saliency.masked_class_sum(1, mask)


@jax.jit
def _voxel_grad(params, z, n, i, j):
  return jax.grad(lambda zz: sm.smooth_apply(params, zz)[n, i, j, 1])(z)


def _loop_max(params, x, mask, noise, sigma):
  """IES by a plain loop: per sample, per mask voxel, grad of that voxel's logit."""
  total = np.zeros(x.shape)
  for eps in noise:
    xs = x + sigma * eps
    best = np.zeros(x.shape)
    for n in range(x.shape[0]):
      for i, j in zip(*np.nonzero(mask[n])):
        g = np.asarray(_voxel_grad(params, xs, n, i, j))
        best = np.where(np.abs(g) > np.abs(best), g, best)
    total += best
  return total / len(noise)


def test_smoothgrad_max_against_a_python_loop():
  params = sm.smooth_params()
  x = jnp.asarray(sm.rand((2, 5, 5, 2), 22))
  noise = jnp.asarray(sm.rand((2, 2, 5, 5, 2), 23))
  sigma = np.asarray(saliency.gradients.noise_sigma(x, 0.15))
  for target in (_smooth_target(rule=False), _smooth_target(rule=True)):
    got = saliency.smoothgrad(sm.smooth_apply, params, x, target, noise=noise,
                              aggregation="max", voxel_chunk_size=2)
    # The mask is fixed at the clean input (the rule is not re-applied to noisy inputs).
    mask = np.asarray(target.bind(sm.smooth_apply(params, x)).mask)
    assert mask.sum() > 1
    expected = _loop_max(params, np.asarray(x), mask, np.asarray(noise), sigma)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_smoothgrad_mean_and_squares_against_a_loop_and_chunking():
  params = sm.smooth_params()
  x = jnp.asarray(sm.rand((2, 5, 5, 2), 24))
  noise = jnp.asarray(sm.rand((5, 2, 5, 5, 2), 25))
  target = _smooth_target(rule=True)
  sigma = saliency.gradients.noise_sigma(x, 0.15)
  bound = target.bind(sm.smooth_apply(params, x))
  grads = [saliency.vanilla_gradient(sm.smooth_apply, params, x + sigma * e, bound)
           for e in noise]
  for aggregation, expected, chunks in (("mean", np.mean(grads, 0), (5,)),
                                        ("mean_of_squares", np.mean(np.square(grads), 0),
                                         (2, 5))):
    for chunk in chunks:
      got = saliency.smoothgrad(sm.smooth_apply, params, x, target, noise=noise,
                                aggregation=aggregation, chunk_size=chunk)
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_seeded_smoothgrad_is_reproducible_and_seeds_differ():
  params = sm.smooth_params()
  x = jnp.asarray(sm.rand((1, 5, 5, 2), 26))
  target = saliency.class_softmax_sum(2)

  def run(key, chunk, **kw):
    return saliency.smoothgrad(sm.smooth_apply, params, x, target, key=key, num_samples=4,
                               chunk_size=chunk, **kw)

  a = run(jax.random.key(7), 4)
  np.testing.assert_array_equal(a, run(jax.random.key(7), 4))
  assert np.abs(np.asarray(run(jax.random.key(8), 4) - a)).max() > 1e-6
  np.testing.assert_array_equal(run(7, 4), a)
  # Budget-chunked (1 byte: 4 chunks of 1): the same draws (fold_in per sample index).
  np.testing.assert_allclose(run(7, None, memory_budget_bytes=1), a, rtol=1e-5, atol=1e-8)


def test_auto_chunk_size_from_the_budget():
  from tracin_jax.saliency import core
  assert core.auto_chunk_size(25, 100, None, 1000) == 10
  assert core.auto_chunk_size(25, 10**9, None, 1000) == 1
  assert core.auto_chunk_size(25, 1, 7, None) == 7
  assert core.auto_chunk_size(25, 1, None, None) == 25
  with pytest.raises(ValueError):
    core.auto_chunk_size(25, 1, 0, None)
