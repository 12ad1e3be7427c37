"""Class activation maps at a layer: Grad-CAM, Grad-CAM++, guided Grad-CAM and NeuroXAI's
information flow (Grad-CAM at every convolutional block).

The layer is a `layers.Layers` (from `split_layer(features_fn, head_fn)`, a
`(features_fn, head_fn)` pair, or `NnxModel(model).layer(name)`): one forward pass gives
the activations A [N, *spatial_l, K] and, through an additive zero probe, g = dF/dA.

    Grad-CAM:    w_k = mean_{space} g_k;           cam = ReLU(sum_k w_k A_k)
    Grad-CAM++:  alpha = g^2 / (2 g^2 + sum_{space}(A_k) g^3 + eps)   (0 where g = 0)
                 w_k = sum_{space} alpha * ReLU(g); cam = ReLU(sum_k w_k A_k)

`cam` is at the layer's resolution [N, *spatial_l] (2-D or 3-D); `upsampled` is its
(bi/tri)linear resize to the input's spatial shape. Neither is normalised: `display`
scales a map to [0, 1] for a figure, per example (and, in `information_flow`, per layer).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from tracin_jax.saliency import core
from tracin_jax.saliency import gradients
from tracin_jax.saliency import layers as layers_lib
from tracin_jax.saliency import targets as targets_lib
from tracin_jax.types import Array, Params

VARIANTS: tuple[str, ...] = ("grad_cam", "grad_cam_plus_plus", "grad_cam_plus_plus_monai")
GRADIENT_NORMALISATIONS: tuple[str | None, ...] = (None, "rms", "mean_square")
_RMS_EPS = 1e-5  # both normalisations add it to the divisor
_PP_EPS = 1e-6
_MONAI_EPS = 1e-7


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GradCamResult:
  """A class activation map.

  Attributes:
    cam: [N, *spatial_l] at the layer's resolution ([N, h, w], or [N, d, h, w] for a 3-D
      layer; ReLU-ed unless `relu=False`).
    upsampled: [N, *spatial] cam resized to the input's spatial shape: bilinear in 2-D,
      trilinear in 3-D (half-pixel centres, no antialiasing: `jax.image.resize`'s "linear").
    weights: [N, K] the channel weights w_k.
  """

  cam: Array
  upsampled: Array
  weights: Array

  @property
  def display(self) -> Array:
    """`upsampled` scaled to [0, 1] per example (|.| / max for signed maps)."""
    return core.display(self.upsampled, absolute=bool(jnp.any(self.upsampled < 0)))


def _normalise_gradient(g: Array, gradient_normalisation: str | None) -> Array:
  """g divided per example by a statistic over its whole tensor (space and channels).

  "rms": g / (sqrt(mean(g^2)) + 1e-5), the root mean square (g of RMS 1).
  "mean_square": g / (mean(g^2) + 1e-5), NeuroXAI's Grad-CAM (its code divides by the mean
    square, not its root).
  Both only rescale an example's map (by a positive factor) before the ReLU.
  """
  if gradient_normalisation is None:
    return g
  axes = tuple(range(1, g.ndim))
  mean_square = jnp.mean(g * g, axis=axes, keepdims=True)
  if gradient_normalisation == "mean_square":
    return g / (mean_square + _RMS_EPS)
  return g / (jnp.sqrt(mean_square) + _RMS_EPS)


def channel_weights(activation: Array, grad: Array, variant: str = "grad_cam") -> Array:
  """The channel weights w [N, K] of a CAM variant from A and g = dF/dA [N, *spatial, K].

  "grad_cam": w_k = mean_space g_k.
  "grad_cam_plus_plus": eq. 19 of Chattopadhay et al. (2018) as pytorch-grad-cam computes
    it: alpha = g^2 / (2 g^2 + S_k g^3 + eps), S_k = sum_space A_k (a per-channel scalar,
    multiplying g^3 elementwise), eps = 1e-6, alpha = 0 where g = 0;
    w_k = sum_space alpha * ReLU(g).
  "grad_cam_plus_plus_monai": MONAI's GradCAMpp: the denominator's second term is
    sum_space(A_k * g^3) (the spatial sum of the product, a per-channel scalar) instead of
    sum_space(A_k) * g^3; a zero denominator is replaced by 1 and eps = 1e-7. MONAI also
    multiplies g by exp(score) inside the ReLU; that is a positive per-example factor that
    only rescales each example's map (and overflows for scores summed over many voxels),
    so it is left out.
  Spatial axes are all but the first and last: 2-D and 3-D layers alike.
  """
  axes = tuple(range(1, activation.ndim - 1))
  if variant == "grad_cam":
    return jnp.mean(grad, axis=axes)
  g2, g3 = grad * grad, grad * grad * grad
  if variant == "grad_cam_plus_plus":
    sum_a = jnp.sum(activation, axis=axes, keepdims=True)
    alpha = g2 / (2.0 * g2 + sum_a * g3 + _PP_EPS)
    alpha = jnp.where(grad != 0, alpha, 0.0)
  elif variant == "grad_cam_plus_plus_monai":
    denominator = 2.0 * g2 + jnp.sum(activation * g3, axis=axes, keepdims=True)
    denominator = jnp.where(denominator != 0, denominator, 1.0)
    alpha = g2 / (denominator + _MONAI_EPS)
  else:
    raise ValueError(f"unknown CAM variant {variant!r}; expected one of {VARIANTS}")
  return jnp.sum(alpha * jax.nn.relu(grad), axis=axes)


def _cam(activation, grad, variant, gradient_normalisation, relu, spatial) -> GradCamResult:
  grad = _normalise_gradient(grad, gradient_normalisation)
  weights = channel_weights(activation, grad, variant)
  k = activation.shape[-1]
  cam = jnp.einsum("n...k,nk->n...", activation, weights.reshape(-1, k))
  if relu:
    cam = jax.nn.relu(cam)
  return GradCamResult(cam, core.resize_spatial(cam, spatial), weights)


def layer_gradients(layers: layers_lib.Layers, params: Params, x: Array,
                    target: Any) -> tuple[tuple[Array, ...], tuple[Array, ...], Array]:
  """One forward/backward pass: the activations A_i, g_i = dF/dA_i and the output.

  The target is bound at this (clean) output. Shapes: A_i and g_i [N, *spatial_i, K_i].
  """
  shapes = jax.eval_shape(lambda p, z: layers.forward(p, z, None)[1], params, x)
  probes = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)

  def total(probes):
    out, acts = layers.forward(params, x, probes)
    bound = targets_lib.bind_target(target, jax.lax.stop_gradient(out))
    return jnp.sum(bound(out)), (acts, out)

  grads, (acts, out) = jax.grad(total, has_aux=True)(probes)
  return acts, grads, out


@functools.partial(jax.jit, static_argnames=("layers",))
def _layer_gradients_jit(layers, params, x, target):
  acts, grads, _ = layer_gradients(layers, params, x, target)
  return acts, grads


@functools.partial(jax.jit, static_argnames=("spatial", "variant", "gradient_normalisation",
                                             "relu"))
def _cams_jit(acts, grads, spatial, variant, gradient_normalisation, relu):
  return tuple(_cam(a, g, variant, gradient_normalisation, relu, spatial)
               for a, g in zip(acts, grads))


def _cams(layers, params, x, target, variant, gradient_normalisation, relu):
  """The CAMs of all `layers` from one forward/backward pass (the model's part is compiled
  once per layer set and shape, whatever the variant)."""
  acts, grads = _layer_gradients_jit(layers, params, x, target)
  return _cams_jit(acts, grads, tuple(x.shape[1:-1]), variant, gradient_normalisation,
                   bool(relu))


def _check(variant, gradient_normalisation):
  if variant not in VARIANTS:
    raise ValueError(f"unknown CAM variant {variant!r}; expected one of {VARIANTS}")
  if gradient_normalisation not in GRADIENT_NORMALISATIONS:
    raise ValueError(f"gradient_normalisation must be one of {GRADIENT_NORMALISATIONS}, got "
                     f"{gradient_normalisation!r}")


def grad_cam(apply_fn: Callable, params: Params, x: Array, target: Any, *, layer: Any,
             gradient_normalisation: str | None = None, relu: bool = True,
             variant: str = "grad_cam") -> GradCamResult:
  """Grad-CAM (Selvaraju et al., 2017) at one layer.

  w_k = mean over the layer's spatial axes of dF/dA_k; cam = ReLU(sum_k w_k A_k).

  Args:
    apply_fn: (params, x) -> output; kept for a uniform signature (the layer's own forward
      pass computes the output, which must be the same function).
    params: the parameters the layer's forward takes.
    x: [N, H, W, C] or [N, D, H, W, C].
    target: output -> [N], bound at x.
    layer: `Layers` with one layer, or a (features_fn, head_fn) pair.
    gradient_normalisation: None (default), "rms" (the gradients divided by their root mean
      square + 1e-5, per example, before averaging) or "mean_square" (NeuroXAI's: divided by
      their mean square + 1e-5, not its root; `presets.NEUROXAI`). Either is a per-example
      scale of the map.
    relu: False returns the signed map sum_k w_k A_k.
    variant: "grad_cam" (default), "grad_cam_plus_plus" or "grad_cam_plus_plus_monai"
      (see `channel_weights`).

  Returns:
    `GradCamResult`: cam [N, *spatial_l], upsampled [N, *spatial], weights [N, K].
  """
  del apply_fn
  _check(variant, gradient_normalisation)
  layers = layers_lib.as_layers(layer)
  if len(layers) != 1:
    raise ValueError(f"grad_cam takes one layer, got {layers.names}; use information_flow")
  x = core.check_input(x)
  return _cams(layers, params, x, targets_lib.as_jit_arg(target), variant,
               gradient_normalisation, relu)[0]


def grad_cam_plus_plus(apply_fn: Callable, params: Params, x: Array, target: Any, *,
                       layer: Any, variant: str = "pytorch_grad_cam",
                       gradient_normalisation: str | None = None,
                       relu: bool = True) -> GradCamResult:
  """Grad-CAM++ (Chattopadhay et al., 2018, eq. 19) at one layer, 2-D or 3-D.

  variant "pytorch_grad_cam" (default): alpha = g^2 / (2 g^2 + sum_space(A_k) g^3 + 1e-6),
  alpha = 0 where g = 0, w_k = sum_space alpha * ReLU(g). Variant "monai": MONAI's GradCAMpp,
  whose denominator is 2 g^2 + sum_space(A_k g^3) (zero replaced by 1, eps 1e-7); the
  exp(score) factor MONAI applies is a positive per-example scale and is omitted. See
  `channel_weights`. Other arguments as in `grad_cam`.
  """
  names = {"pytorch_grad_cam": "grad_cam_plus_plus", "monai": "grad_cam_plus_plus_monai"}
  if variant not in names:
    raise ValueError(f"variant must be one of {sorted(names)}, got {variant!r}")
  return grad_cam(apply_fn, params, x, target, layer=layer, variant=names[variant],
                  gradient_normalisation=gradient_normalisation, relu=relu)


def guided_grad_cam(apply_fn: Callable, params: Params, x: Array, target: Any, *, layer: Any,
                    gradient_normalisation: str | None = None) -> Array:
  """Guided Grad-CAM: guided backprop [N, *spatial, C] times the upsampled ReLU Grad-CAM
  [N, *spatial, 1] (Selvaraju et al., 2017). Returns [N, *spatial, C]."""
  cam = grad_cam(apply_fn, params, x, target, layer=layer,
                 gradient_normalisation=gradient_normalisation, relu=True)
  return gradients.guided_backprop(apply_fn, params, x, target) * cam.upsampled[..., None]


def information_flow(apply_fn: Callable, params: Params, x: Array, target: Any, *,
                     layers: Any, variant: str = "grad_cam",
                     gradient_normalisation: str | None = None,
                     relu: bool = True) -> dict[str, GradCamResult]:
  """NeuroXAI's information flow: a CAM at every convolutional block, one map per layer.

  Args:
    apply_fn, params, x, target: as in `grad_cam`.
    layers: a `Layers` of several layers (e.g. `NnxModel(model).layers()`, all conv
      blocks): all probed in ONE forward/backward pass; or, for pure-JAX splits, a mapping
      {name: layer} or a sequence of layers ("layer0", "layer1", ...), each a `Layers` or a
      (features_fn, head_fn) pair, one pass each.
    variant, gradient_normalisation, relu: as in `grad_cam`.

  Returns:
    {layer name: GradCamResult}, in the order the forward pass called the layers when known
    (NNX layers), else as given. Each map keeps its own scale; `result.display` normalises
    each layer separately.
  """
  del apply_fn
  _check(variant, gradient_normalisation)
  x = core.check_input(x)
  target = targets_lib.as_jit_arg(target)
  if isinstance(layers, layers_lib.Layers) or (
      isinstance(layers, tuple) and len(layers) == 2 and all(callable(f) for f in layers)):
    groups: list[tuple[Any, layers_lib.Layers]] = [(None, layers_lib.as_layers(layers))]
  elif isinstance(layers, Mapping):
    groups = [(name, layers_lib.as_layers(layer)) for name, layer in layers.items()]
  else:
    groups = [(f"layer{i}", layers_lib.as_layers(layer)) for i, layer in enumerate(layers)]
  out: dict[str, GradCamResult] = {}
  for key, group in groups:
    results = _cams(group, params, x, target, variant, gradient_normalisation, relu)
    if key is not None and len(group) == 1:
      out[key] = results[0]
      continue
    by_name = dict(zip(group.names, results))
    for name in group.call_order or group.names:
      out[name if key is None else f"{key}.{name}"] = by_name[name]
  return out
