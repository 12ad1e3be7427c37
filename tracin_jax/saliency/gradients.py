"""Input-gradient saliency: vanilla and guided gradients, integrated gradients, guided IG and
SmoothGrad, for any `apply_fn(params, x) -> output` and target `output -> [N]`.

Shapes: x is [N, H, W, C] (or [N, D, H, W, C]); every map has x's shape (a signed
attribution per input element; reduce the channel axis for display, e.g. `maps.sum(-1)` or
`abs(maps).max(-1)`). The target is differentiated as sum_n target(output)[n]: each example
gets its own gradient for models without batch statistics.

Compilation: each method's kernels (the gradient, one chunk of integration nodes or noise
samples, one guided-IG step, ...) are `jax.jit`-compiled once per input shape and set of
static options (the model function, the target's structure, the chunk size); a target of
the same structure with new mask values, new params or new inputs of the same shape reuse
them. Sums over noise samples or integration nodes are evaluated `chunk_size` at a time
(vmapped) by a Python loop over chunks (`core.chunked_sum`); by default the chunk is the
largest whose estimated memory fits `memory_budget_bytes` (1 GiB). Targets with `bind` are
bound once, at the clean x, before the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.saliency import core
from tracin_jax.saliency import guided_interpreter as guided_lib
from tracin_jax.saliency import targets as targets_lib
from tracin_jax.types import Array, Params

QUADRATURES: tuple[str, ...] = ("midpoint", "gauss_legendre", "trapezoid", "left", "right",
                                 "pair")
GRADIENT_AT: tuple[str, ...] = ("path", "input")
AGGREGATIONS: tuple[str, ...] = ("mean", "mean_of_squares", "max")


# ---------------------------------------------------------------------------------------------
# Building blocks (traced inside the jitted methods).


def _model(apply_fn: Callable, guided_relu: bool) -> Callable:
  return guided_lib.guided(apply_fn) if guided_relu else apply_fn


def _bind(fn: Callable, params: Params, x: Array, target: Any) -> Any:
  """The target fixed at the clean input (one forward pass, only for targets with `bind`)."""
  if getattr(target, "bind", None) is None:
    return target
  return targets_lib.bind_target(target, jax.lax.stop_gradient(fn(params, x)))


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _bind_jit(apply_fn, params, x, target):
  return targets_lib.bind_target(target, jax.lax.stop_gradient(apply_fn(params, x)))


def bind_once(apply_fn: Callable, params: Params, x: Array, target: Any) -> Any:
  """The target bound at the clean x, computed once before the chunk loop (a jitted forward
  pass), so that chunk kernels get a fixed mask (their own `_bind` is then a no-op whose
  forward pass XLA removes). A target whose bound form is not a pytree of arrays is
  returned unbound: each kernel binds it at the same clean x instead."""
  if getattr(target, "bind", None) is None:
    return target
  try:
    return _bind_jit(apply_fn, params, x, target)
  except TypeError:
    return target


def _input_grad(fn: Callable, params: Params, x: Array, target: Any) -> Array:
  """d sum_n target(fn(params, x))[n] / dx, [N, ...]."""
  return jax.grad(lambda z: jnp.sum(target(fn(params, z))))(x)


def _bound_grad(fn: Callable, params: Params, x: Array, target: Any) -> Array:
  """The gradient at x of the target bound at x itself, in one forward/backward pass."""

  def total(z):
    out = fn(params, z)
    bound = targets_lib.bind_target(target, jax.lax.stop_gradient(out))
    return jnp.sum(bound(out))

  return jax.grad(total)(x)


def _per_example_sum(values: Array) -> Array:
  return values.reshape(values.shape[0], -1).sum(-1)


def _chunk(num_samples: int, chunk_size: int | None, memory_budget_bytes: int | None,
           apply_fn: Callable, params: Params, x: Array, target: Any,
           factor: int = 1) -> int:
  """`chunk_size`, or the most samples whose estimated gradient memory (times `factor`)
  fits the budget (the guided interpreter needs about the same memory as the plain model)."""
  if chunk_size is not None:
    return core.auto_chunk_size(num_samples, 0, chunk_size, None)
  per_sample = core.estimate_bytes(_input_grad, (apply_fn,), params, x, target)
  return core.auto_chunk_size(num_samples, per_sample * factor, None, memory_budget_bytes)


# ---------------------------------------------------------------------------------------------
# Vanilla gradient and guided backpropagation.


@functools.partial(jax.jit, static_argnames=("apply_fn", "guided_relu"))
def _gradient_jit(apply_fn, params, x, target, guided_relu):
  return _bound_grad(_model(apply_fn, guided_relu), params, x, target)


def vanilla_gradient(apply_fn: Callable, params: Params, x: Array, target: Any) -> Array:
  """Signed input gradient dF/dx (Simonyan et al., 2014).

  Args:
    apply_fn: (params, x) -> output.
    params: the model's parameters (a pytree).
    x: [N, H, W, C] or [N, D, H, W, C] input batch.
    target: output -> [N] (see `targets`); bound at x.

  Returns:
    [N, *spatial, C] signed gradient.
  """
  x = core.check_input(x)
  return _gradient_jit(apply_fn, params, x, targets_lib.as_jit_arg(target), False)


def guided_backprop(apply_fn: Callable, params: Params, x: Array, target: Any) -> Array:
  """Guided backpropagation (Springenberg et al., 2015): the input gradient with every ReLU's
  backward pass replaced by 1[upstream > 0] * 1[input > 0] * upstream.

  Works on any JAX `apply_fn` without editing it: `guided_interpreter.guided` re-evaluates
  its jaxpr with the max(x, 0) patterns swapped for a `custom_vjp` guided ReLU (see that
  module for what is caught). On a model without ReLU it equals `vanilla_gradient`.

  Args:
    apply_fn, params, x, target: as in `vanilla_gradient`.

  Returns:
    [N, *spatial, C].
  """
  x = core.check_input(x)
  return _gradient_jit(apply_fn, params, x, targets_lib.as_jit_arg(target), True)


# ---------------------------------------------------------------------------------------------
# Integrated gradients.


def quadrature(steps: int, rule: str = "midpoint") -> tuple[np.ndarray, np.ndarray]:
  """Nodes alpha_k in [0, 1] and weights w_k with sum_k w_k g(alpha_k) ~ int_0^1 g.

  Rules (m = steps):
    "midpoint": alpha_k = (k + 1/2) / m, w_k = 1/m (k = 0..m-1); error O(1/m^2) for a
      smooth integrand, never evaluates the end points.
    "gauss_legendre": m-point Gauss-Legendre mapped to [0, 1]; exact for polynomials of
      degree 2m - 1, best for smooth models (not for piecewise-constant ReLU gradients).
    "trapezoid": alpha_k = k / (m - 1) (k = 0..m-1), end weights 1 / (2 (m - 1)), inner
      1 / (m - 1); m >= 2.
    "left" / "right": Riemann sums alpha_k = k/m (k = 0..m-1) or k/m (k = 1..m), w = 1/m.
    "pair": PAIR's (and NeuroXAI's) rule: alpha_k = k / (m - 1) (k = 0..m-1, both end points;
      alpha_0 = 0 when m = 1), every w_k = 1/m. The weights sum to 1 but the end points get
      the inner points' weight: the sum is biased by about ((g(0) + g(1)) / 2 - int g) / m,
      O(1/m).

  Raises:
    ValueError: for an unknown rule or too few steps.
  """
  m = int(steps)
  if m < 1 or (rule == "trapezoid" and m < 2):
    raise ValueError(f"steps={steps} is too few for the {rule!r} rule")
  if rule == "midpoint":
    return (np.arange(m) + 0.5) / m, np.full(m, 1.0 / m)
  if rule == "gauss_legendre":
    nodes, weights = np.polynomial.legendre.leggauss(m)
    return (nodes + 1.0) / 2.0, weights / 2.0
  if rule == "trapezoid":
    weights = np.full(m, 1.0 / (m - 1))
    weights[[0, -1]] /= 2.0
    return np.linspace(0.0, 1.0, m), weights
  if rule == "left":
    return np.arange(m) / m, np.full(m, 1.0 / m)
  if rule == "right":
    return np.arange(1, m + 1) / m, np.full(m, 1.0 / m)
  if rule == "pair":
    return np.linspace(0.0, 1.0, m), np.full(m, 1.0 / m)
  raise ValueError(f"unknown quadrature {rule!r}; expected one of {QUADRATURES}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IntegratedGradientsResult:
  """Attributions of integrated gradients (or guided IG) and their completeness.

  Attributes:
    attributions: [N, *spatial, C].
    completeness_error: [N], sum(attributions) - (F(x) - F(baseline)); 0 for exact IG.
    delta: [N], F(x) - F(baseline).
    baseline: [N, *spatial, C], the baseline used.
  """

  attributions: Array
  completeness_error: Array
  delta: Array
  baseline: Array


def _completeness(fn, params, x, baseline, target, attributions) -> tuple[Array, Array]:
  # F(x) and F(baseline) in one vmapped forward pass.
  scores = jax.vmap(lambda z: target(fn(params, z)))(jnp.stack([x, baseline]))
  delta = scores[0] - scores[1]
  return _per_example_sum(attributions) - delta, delta


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _ig_chunk(apply_fn, params, x, baseline, target, alphas, weights):
  """sum_k weights[k] dF/dx(b + alphas[k] (x - b)) over one chunk of nodes (vmapped)."""
  target = _bind(apply_fn, params, x, target)
  diff = x - baseline
  grads = jax.vmap(lambda a: _input_grad(apply_fn, params, baseline + a * diff, target))(
      alphas.astype(x.dtype))
  return jnp.tensordot(weights.astype(x.dtype), grads, axes=(0, 0))


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _finish_jit(apply_fn, params, x, baseline, target, attributions):
  target = _bind(apply_fn, params, x, target)
  error, delta = _completeness(apply_fn, params, x, baseline, target, attributions)
  return IntegratedGradientsResult(attributions, error, delta, baseline)


def integrated_gradients(apply_fn: Callable, params: Params, x: Array, target: Any, *,
                         baseline: Any = 0.0, steps: int = 50, rule: str = "midpoint",
                         gradient_at: str = "path", chunk_size: int | None = None,
                         memory_budget_bytes: int | None = None) -> IntegratedGradientsResult:
  """Integrated gradients (Sundararajan et al., 2017) along the straight path from baseline.

      attr = (x - b) * int_0^1 dF/dx(b + alpha (x - b)) d alpha
           ~ (x - b) * sum_k w_k dF/dx(b + alpha_k (x - b))

  with the quadrature `rule` (default: midpoint Riemann sum, alpha_k = (k + 1/2)/steps,
  w_k = 1/steps; see `quadrature`). Completeness: sum(attr) = F(x) - F(b) up to the
  quadrature error, reported as `completeness_error`.

  `gradient_at="input"` is NeuroXAI's integrated gradients: its loop builds the path points
  but takes every gradient at the input x itself, so the result is
  (x - b) * (sum_k w_k) * dF/dx(x), gradient x input for b = 0 and weights summing to 1
  (its preset: 25 steps, rule "pair"; `presets.NEUROXAI`). The steps then only scale the map
  through sum_k w_k, and one gradient is computed; completeness does not hold (the error says
  by how much).

  Args:
    apply_fn, params, x, target: as in `vanilla_gradient`.
    baseline: 0.0 (default), any number, "min" (per-example, per-channel minimum over space)
      or an array broadcastable to x.
    steps: quadrature nodes (gradient evaluations), default 50.
    rule: "midpoint" (default), "gauss_legendre", "trapezoid", "left", "right" or "pair".
    gradient_at: "path" (default: integrated gradients) or "input" (NeuroXAI's: every
      gradient at x, see above).
    chunk_size: nodes per vmapped chunk; None: from the memory budget.
    memory_budget_bytes: budget for the automatic chunk size (default 1 GiB).

  Returns:
    `IntegratedGradientsResult` (attributions [N, *spatial, C], completeness_error [N], ...).

  Raises:
    ValueError: an unknown rule or `gradient_at`, or too few steps.
  """
  x = core.check_input(x)
  if gradient_at not in GRADIENT_AT:
    raise ValueError(f"gradient_at must be one of {GRADIENT_AT}, got {gradient_at!r}")
  alphas, weights = quadrature(steps, rule)
  target = targets_lib.as_jit_arg(target)
  base = core.make_baseline(x, baseline)
  if gradient_at == "input":
    grad = _gradient_jit(apply_fn, params, x, target, False)
    total = np.asarray(weights.sum(), x.dtype) * grad
    return _finish_jit(apply_fn, params, x, base, target, (x - base) * total)
  chunk = _chunk(steps, chunk_size, memory_budget_bytes, apply_fn, params, x, target)
  target = bind_once(apply_fn, params, x, target)
  total = core.chunked_sum(
      lambda a, w: _ig_chunk(apply_fn, params, x, base, target, a, w), alphas, weights, chunk)
  return _finish_jit(apply_fn, params, x, base, target, (x - base) * total)


# ---------------------------------------------------------------------------------------------
# Guided integrated gradients.


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _gig_step(apply_fn, params, x, baseline, target, x_cur, attr, alpha, fraction, max_dist):
  """One step of guided IG for every example: from x_cur to the step's L1 target.

  Returns (x_next, attr_next). alpha = (k + 1) / steps, traced (one compilation).
  """
  target = _bind(apply_fn, params, x, target)
  n = x.shape[0]
  shape = (n,) + (1,) * (x.ndim - 1)
  diff = x - baseline
  l1_total = _per_example_sum(jnp.abs(diff))
  tol = 1e-9 if x.dtype == jnp.float64 else 1e-6
  atol = tol * l1_total
  max_inner = math.prod(x.shape[1:]) + 2
  grad_actual = _input_grad(apply_fn, params, x_cur, target)
  alpha_min = jnp.maximum(alpha - max_dist, 0.0)
  alpha_max = jnp.minimum(alpha + max_dist, 1.0)
  x_min = baseline + alpha_min * diff
  x_max = baseline + alpha_max * diff
  l1_target = l1_total * (1.0 - alpha)

  def cond(state):
    _, _, done, it = state
    return jnp.any(~done) & (it < max_inner)

  def body(state):
    x_old, attr, done, it = state
    active = (~done).reshape(shape)
    # Features behind the band's lower edge jump to it (PAIR: x_alpha < alpha_min).
    safe = jnp.where(diff == 0, 1.0, diff)
    x_alpha = jnp.where(diff == 0, alpha_max, (x_old - baseline) / safe)
    x_new = jnp.where(active & (x_alpha < alpha_min), x_min, x_old)
    l1_current = _per_example_sum(jnp.abs(x_new - x))
    close = jnp.abs(l1_target - l1_current) <= atol + tol * jnp.abs(l1_current)
    # Move the `fraction` of features with the smallest |gradient| not yet at x_max.
    magnitude = jnp.where(x_new == x_max, jnp.inf, jnp.abs(grad_actual)).reshape(n, -1)
    threshold = jnp.quantile(magnitude, fraction, axis=1, method="lower")
    selected = ((magnitude <= threshold[:, None]) & (magnitude != jnp.inf)).reshape(x.shape)
    l1_s = _per_example_sum(jnp.abs(x_new - x_max) * selected)
    gamma = jnp.where(l1_s > 0, (l1_current - l1_target) / jnp.where(l1_s > 0, l1_s, 1.0),
                      jnp.inf)
    gamma = jnp.maximum(gamma, 0.0)
    moved = jnp.where(
        (gamma > 1).reshape(shape), x_max, x_new + (x_max - x_new) * gamma.reshape(shape))
    update = active & ~close.reshape(shape) & selected
    x_new = jnp.where(update, moved, x_new)
    attr = attr + jnp.where(active, (x_new - x_old) * grad_actual, 0.0)
    done = done | close | (gamma <= 1)
    return x_new, attr, done, it + 1

  x_next, attr, _, _ = jax.lax.while_loop(
      cond, body, (x_cur, attr, jnp.zeros((n,), bool), jnp.asarray(0)))
  return x_next, attr


def guided_integrated_gradients(apply_fn: Callable, params: Params, x: Array, target: Any, *,
                                baseline: Any = 0.0, steps: int = 200, fraction: float = 0.25,
                                max_dist: float = 0.02) -> IntegratedGradientsResult:
  """Guided integrated gradients (Kapishnikov et al., CVPR 2021), PAIR's defaults.

  The path from the baseline to x is chosen adaptively: at step k of `steps` (alpha =
  (k+1)/steps) the features with the smallest |gradient| (the `fraction` quantile, taken with
  `method="lower"`, of the elements not yet at the upper bound) move first, and no feature
  leaves the band alpha +- max_dist of the straight path; the L1 distance to x shrinks
  linearly, to 1 - alpha of the total. Attributions accumulate (x_new - x_old) * gradient at
  the step's start (PAIR's Riemann rule along the path), so completeness holds only
  approximately; `completeness_error` reports it. Each example follows its own path (batched:
  per-example reductions, while-loops run until every example is done). One jitted step
  (gradient + inner loop) is called `steps` times from Python.

  Args:
    apply_fn, params, x, target: as in `vanilla_gradient`.
    baseline: as in `integrated_gradients` (default 0.0).
    steps: path steps (gradient evaluations), default 200.
    fraction: share of features moved per inner iteration, default 0.25.
    max_dist: largest deviation from the straight path in alpha, default 0.02.

  Returns:
    `IntegratedGradientsResult`.
  """
  x = core.check_input(x)
  if not 0.0 < fraction <= 1.0 or max_dist < 0.0 or steps < 1:
    raise ValueError(f"need steps >= 1, 0 < fraction <= 1, max_dist >= 0; got {steps}, "
                     f"{fraction}, {max_dist}")
  base = core.make_baseline(x, baseline)
  target = bind_once(apply_fn, params, x, targets_lib.as_jit_arg(target))
  x_cur, attr = base, jnp.zeros_like(x)
  fraction_, max_dist_ = np.asarray(fraction, x.dtype), np.asarray(max_dist, x.dtype)
  for k in range(int(steps)):
    alpha = np.asarray((k + 1.0) / steps, x.dtype)
    x_cur, attr = _gig_step(apply_fn, params, x, base, target, x_cur, attr, alpha, fraction_,
                            max_dist_)
  return _finish_jit(apply_fn, params, x, base, target, attr)


# ---------------------------------------------------------------------------------------------
# SmoothGrad.


def noise_sigma(x: Array, noise_level: float, channel: int | None = None) -> Array:
  """SmoothGrad's sigma per example: noise_level * (max - min) of x's elements.

  Args:
    x: [N, *spatial, C].
    noise_level: the share of the intensity range.
    channel: None (default): the range over all of an example's elements (PAIR, NeuroXAI);
      an index of the last axis: the range of that channel alone (IES: FLAIR's), the same
      sigma then being used for every channel.

  Returns:
    [N, 1, ..., 1] (x.ndim axes).
  """
  if channel is not None:
    c = int(channel) % x.shape[-1]
    x = x[..., c:c + 1]
  axes = tuple(range(1, x.ndim))
  return noise_level * (jnp.max(x, axis=axes, keepdims=True) - jnp.min(x, axis=axes,
                                                                       keepdims=True))


def _check_channel(x: Array, channel: int | None) -> int | None:
  if channel is None:
    return None
  c = x.shape[-1]
  if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or not (
      -c <= channel < c):
    raise ValueError(f"noise_channel must be None or a channel index of x's {c} channels, "
                     f"got {channel!r}")
  return int(channel) % c


def _noisy(x: Array, sigma: Array, key: Array, sample: Array, given_noise: bool) -> Array:
  """x + sigma * eps for one sample: eps is the given noise, or drawn from fold_in(key, s)."""
  if given_noise:
    eps = sample
  else:
    eps = jax.random.normal(jax.random.fold_in(key, sample), x.shape, x.dtype)
  return x + sigma * eps.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("apply_fn", "squares", "guided_relu",
                                             "given_noise", "channel"))
def _sg_chunk(apply_fn, params, x, target, key, samples, weights, noise_level, squares,
              guided_relu, given_noise, channel):
  """sum_s weights[s] g_s (or g_s^2) over one chunk of noise samples (vmapped)."""
  fn = _model(apply_fn, guided_relu)
  target = _bind(apply_fn, params, x, target)
  sigma = noise_sigma(x, noise_level, channel)

  def one(sample):
    g = _input_grad(fn, params, _noisy(x, sigma, key, sample, given_noise), target)
    return g * g if squares else g

  return jnp.tensordot(weights.astype(x.dtype), jax.vmap(one)(samples), axes=(0, 0))


def _term_support(target: Any, output: Array) -> Array:
  """[N, V] bool: the voxels whose term can be non-zero (the mask of a masked target)."""
  mask = getattr(target, "mask", None)
  terms = jax.eval_shape(lambda o: targets_lib.target_terms(target, o), output)
  if mask is not None and math.prod(mask.shape) == math.prod(terms.shape):
    return jnp.asarray(mask).reshape(terms.shape) != 0
  return jnp.ones(terms.shape, bool)


@functools.partial(jax.jit, static_argnames=("apply_fn", "voxel_chunk"))
def _ies_support(apply_fn, params, x, target, voxel_chunk):
  """The target's active voxels first: order [N, V padded to a multiple of voxel_chunk] and
  their count per example [N]."""
  clean = apply_fn(params, x)
  target = targets_lib.bind_target(target, jax.lax.stop_gradient(clean))
  active = _term_support(target, clean)
  order = jnp.argsort(~active, axis=1, stable=True)
  pad = -active.shape[1] % voxel_chunk
  return jnp.pad(order, ((0, 0), (0, pad))), active.sum(-1)


@functools.partial(jax.jit, static_argnames=("apply_fn", "guided_relu", "given_noise",
                                             "voxel_chunk", "channel"))
def _ies_chunk(apply_fn, params, x, target, key, samples, best, order, count, start,
               noise_level, guided_relu, given_noise, voxel_chunk, channel):
  """For a chunk of noise samples and the voxels order[:, start:start + voxel_chunk]:
  per input element, the signed gradient of largest magnitude so far, [S_chunk, N, ...]."""
  fn = _model(apply_fn, guided_relu)
  target = _bind(apply_fn, params, x, target)
  sigma = noise_sigma(x, noise_level, channel)
  cols = jax.lax.dynamic_slice_in_dim(order, start, voxel_chunk, axis=1)  # [N, vc]
  valid = (start + jnp.arange(voxel_chunk))[None, :] < count[:, None]

  def one(sample, best_s):
    xs = _noisy(x, sigma, key, sample, given_noise)
    terms, vjp = jax.vjp(lambda z: targets_lib.target_terms(target, fn(params, z)), xs)
    cotangent = jax.nn.one_hot(cols, terms.shape[1], dtype=terms.dtype) * valid[..., None]
    grads = jax.vmap(lambda ct: vjp(ct)[0])(jnp.swapaxes(cotangent, 0, 1))  # [vc, N, ...]
    pick = jnp.argmax(jnp.abs(grads), axis=0)
    candidate = jnp.take_along_axis(grads, pick[None], axis=0)[0]
    return jnp.where(jnp.abs(candidate) > jnp.abs(best_s), candidate, best_s)

  return jax.vmap(one)(samples, best)


def _ies(apply_fn, params, x, target, key, samples, noise_level, guided_relu, given_noise,
         chunk, voxel_chunk, channel) -> Array:
  """Sum over samples of the per-element max-magnitude voxel gradient (IES), chunked over
  samples (vmapped) and over voxels (a Python loop over the needed voxel chunks only)."""
  order, count = _ies_support(apply_fn, params, x, target, voxel_chunk)
  needed = -(-int(jnp.max(count)) // voxel_chunk)
  total = jnp.zeros_like(x)
  for idx, valid in core.chunks(len(samples), chunk):
    best = jnp.zeros((len(idx),) + x.shape, x.dtype)
    for j in range(needed):
      best = _ies_chunk(apply_fn, params, x, target, key, samples[idx], best, order, count,
                        np.int32(j * voxel_chunk), noise_level, guided_relu, given_noise,
                        voxel_chunk, channel)
    total = total + jnp.tensordot(jnp.asarray(valid, x.dtype), best, axes=(0, 0))
  return total


def smoothgrad(apply_fn: Callable, params: Params, x: Array, target: Any, *,
               key: Array | int | None = None, noise: Array | None = None,
               num_samples: int = 25, noise_level: float = 0.15,
               aggregation: str = "mean_of_squares", guided_relu: bool = False,
               noise_channel: int | None = None, over: Callable | None = None,
               chunk_size: int | None = None, voxel_chunk_size: int = 64,
               memory_budget_bytes: int | None = None) -> Array:
  """SmoothGrad (Smilkov et al., 2017): gradients averaged over noisy copies of x.

  x_s = x + sigma * eps_s, eps_s ~ N(0, 1) per element, sigma = noise_level * (max(x) -
  min(x)) per example (a share of the input's intensity range: over all its elements by
  default, PAIR's and NeuroXAI's; over channel `noise_channel` alone for IES, which takes
  FLAIR's range). The target is bound at the clean x, so a predicted mask stays fixed across
  samples. Aggregations over the S samples:

    "mean_of_squares" (default): mean_s (dF/dx(x_s))^2 (SmoothGrad-Squared; >= 0);
    "mean": mean_s dF/dx(x_s) (signed);
    "max": Spagnolo et al.'s IES. For a target that is a sum over voxels (`terms`), per
      sample the gradient of each voxel's term is computed separately and, per input
      element, the signed value of largest magnitude over the voxels is kept; those are
      averaged over samples. Voxels are processed `voxel_chunk_size` at a time (VJPs with
      one-hot cotangents, active voxels first, chunks without an active voxel skipped), so
      [voxels, *x.shape] is never materialised; the cost is one backward pass per voxel of
      the mask (per sample).

  `over` smooths another method instead of the gradient: map_s = over(apply_fn, params, x_s,
  target) (its `.attributions` if it returns a result), aggregated by "mean" or
  "mean_of_squares", one call per sample (a Python loop). NeuroXAI's SmoothGrad for
  segmentation is the mean of squares of guided IG over 5 samples (`presets.NEUROXAI`).

  Args:
    apply_fn, params, x, target: as in `vanilla_gradient`.
    key: PRNG key (or an int seed) for the noise; sample s uses
      `jax.random.normal(jax.random.fold_in(key, s), x.shape)`, drawn with the
      non-partitionable threefry (`jax.threefry_partitionable(False)`: the same draws under
      any vmap width, so results do not depend on the chunk size, and about 5x faster to
      compile on XLA:CPU than the partitionable default). Default 0.
    noise: [S, *x.shape] standard-normal draws to use instead (scaled by sigma; S then
      overrides num_samples).
    num_samples: S, default 25.
    noise_level: sigma as a share of the intensity range, default 0.15.
    aggregation: "mean_of_squares", "mean" or "max".
    guided_relu: average guided-backprop gradients instead of plain ones.
    noise_channel: None (default): sigma from the range over all channels; a channel index
      (IES: FLAIR, 3 here): from that channel's range alone.
    over: None (default: the gradient), or a method `(apply_fn, params, x, target) -> map
      [N, *spatial, C]` (or a result with `.attributions`) to smooth, e.g.
      `functools.partial(guided_integrated_gradients, steps=5)`.
    chunk_size: samples per vmapped chunk; None: from the memory budget.
    voxel_chunk_size: voxels per vmapped VJP chunk for "max".
    memory_budget_bytes: budget for the automatic chunk size (default 1 GiB).

  Returns:
    [N, *spatial, C].

  Raises:
    ValueError: an unknown aggregation, a bad noise_channel or noise shape, or `over` with
      the "max" aggregation or guided_relu.
  """
  x = core.check_input(x)
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
  channel = _check_channel(x, noise_channel)
  if over is not None and (aggregation == "max" or guided_relu):
    raise ValueError("over= smooths a method's maps by 'mean' or 'mean_of_squares' (without "
                     f"guided_relu); got aggregation={aggregation!r}, guided_relu={guided_relu}")
  if noise is not None:
    noise = jnp.asarray(noise, x.dtype)
    if noise.shape[1:] != x.shape:
      raise ValueError(f"noise must be [S, *x.shape] = [S, {x.shape}], got {noise.shape}")
    num_samples = noise.shape[0]
  if key is None:
    key = 0
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  target = targets_lib.as_jit_arg(target)
  if over is not None:
    return _smooth_over(over, apply_fn, params, x, target, key, noise, num_samples,
                        noise_level, aggregation == "mean_of_squares", channel)
  factor = voxel_chunk_size if aggregation == "max" else 1
  chunk = _chunk(num_samples, chunk_size, memory_budget_bytes, apply_fn, params, x, target,
                 factor)
  target = bind_once(apply_fn, params, x, target)
  given = noise is not None
  samples = noise if given else np.arange(num_samples, dtype=np.int32)
  level = np.asarray(noise_level, x.dtype)
  with jax.threefry_partitionable(False):
    if aggregation == "max":
      total = _ies(apply_fn, params, x, target, key, samples, level, bool(guided_relu), given,
                   chunk, int(voxel_chunk_size), channel)
    else:
      total = core.chunked_sum(
          lambda s, w: _sg_chunk(apply_fn, params, x, target, key, s, w, level,
                                 aggregation == "mean_of_squares", bool(guided_relu), given,
                                 channel),
          samples, np.ones(num_samples, np.float32), chunk)
  return total / num_samples


@functools.partial(jax.jit, static_argnames=("given_noise", "channel"))
def _noisy_copy(x, key, sample, noise_level, given_noise, channel):
  return _noisy(x, noise_sigma(x, noise_level, channel), key, sample, given_noise)


def _smooth_over(over, apply_fn, params, x, target, key, noise, num_samples, noise_level,
                 squares, channel) -> Array:
  """mean_s over(x_s) (or of its squares) with the draws of `smoothgrad`, one call each."""
  target = bind_once(apply_fn, params, x, target)
  level = np.asarray(noise_level, x.dtype)
  total = jnp.zeros_like(x)
  for s in range(num_samples):
    sample = noise[s] if noise is not None else np.int32(s)
    with jax.threefry_partitionable(False):
      xs = _noisy_copy(x, key, sample, level, noise is not None, channel)
    m = over(apply_fn, params, xs, target)
    m = jnp.asarray(getattr(m, "attributions", m), x.dtype)
    total = total + (m * m if squares else m)
  return total / num_samples
