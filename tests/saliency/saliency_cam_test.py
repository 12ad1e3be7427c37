"""Grad-CAM, Grad-CAM++ and information flow, by hand (numpy) and on the tiny UNet."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tracin_jax import saliency
import saliency_models as sm

# A one-layer model: A = conv_features(x) [N, 4, 4, F]; a linear classifier on top,
# out[n, k] = sum_{i, j, f} A[n, i, j, f] M[i, j] V[f, k], so dF_c/dA = M[i, j] V[f, c].
_M = np.array([[1.0, 0.0, 2.0, 0.5], [0.0, 1.5, -1.0, 0.0], [1.0, 1.0, 0.0, 3.0],
               [0.2, 0.0, 0.7, -0.4]], np.float32)
_V = sm.rand((6, 3), 31)


def _head(params, a):
  return jnp.einsum("nijf,ij,fk->nk", a, _M, _V)


_LAYER = saliency.split_layer(sm.conv_features, _head, name="conv1")
_PARAMS = sm.conv_params()
_X = jnp.asarray(sm.rand((2, 8, 8, 4), 32))


def _apply(params, x):
  return _head(params, sm.conv_features(params, x))


def _bilinear_up2(a):
  """Numpy 2x (half-pixel, edge-clamped) linear upsampling along axes 1 and 2."""
  def up(v, axis):
    v = np.moveaxis(v, axis, 0)
    prev = np.concatenate([v[:1], v[:-1]])
    nxt = np.concatenate([v[1:], v[-1:]])
    out = np.empty((2 * v.shape[0],) + v.shape[1:], v.dtype)
    out[0::2] = 0.75 * v + 0.25 * prev
    out[1::2] = 0.75 * v + 0.25 * nxt
    return np.moveaxis(out, 0, axis)
  return up(up(a, 1), 2)


def test_grad_cam_of_a_one_layer_model_by_hand():
  c = 2  # a class whose signed map has both signs
  result = saliency.grad_cam(_apply, _PARAMS, _X, saliency.class_score(c), layer=_LAYER)
  a = np.asarray(sm.conv_features(_PARAMS, _X))
  g = _M[None, :, :, None] * _V[None, None, None, :, c]
  weights = g.mean(axis=(1, 2))  # [1, F]
  signed = np.einsum("nijf,nf->nij", a, np.broadcast_to(weights, (2, 6)))
  np.testing.assert_allclose(result.weights, np.broadcast_to(weights, (2, 6)), rtol=1e-5)
  np.testing.assert_allclose(result.cam, np.maximum(signed, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.upsampled, _bilinear_up2(np.maximum(signed, 0)),
                             rtol=1e-5, atol=1e-6)
  assert result.upsampled.shape == (2, 8, 8)
  display = np.asarray(result.display)
  assert display.min() >= 0 and np.allclose(display.max(axis=(1, 2)), 1.0)

  no_relu = saliency.grad_cam(_apply, _PARAMS, _X, saliency.class_score(c), layer=_LAYER,
                              relu=False)
  np.testing.assert_allclose(no_relu.cam, signed, rtol=1e-5, atol=1e-6)
  assert (signed < 0).any()

  rms = saliency.grad_cam(_apply, _PARAMS, _X, saliency.class_score(c), layer=_LAYER,
                          gradient_normalisation="rms")
  scale = 1.0 / (np.sqrt(np.mean(g**2)) + 1e-5)
  np.testing.assert_allclose(rms.weights, np.broadcast_to(weights * scale, (2, 6)), rtol=1e-5)


def _pp_by_hand(a, g, variant):
  """Eq. 19 of Chattopadhay et al. (pytorch-grad-cam's form) or MONAI's, in numpy."""
  axes = tuple(range(1, a.ndim - 1))
  g2, g3 = g**2, g**3
  if variant == "pytorch_grad_cam":
    sum_a = a.sum(axis=axes, keepdims=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    alpha = np.where(g != 0, alpha, 0.0)
  else:
    den = 2 * g2 + (a * g3).sum(axis=axes, keepdims=True)
    alpha = g2 / (np.where(den != 0, den, 1.0) + 1e-7)
  weights = (alpha * np.maximum(g, 0)).sum(axis=axes)
  cam = np.maximum(np.einsum("n...k,nk->n...", a, weights), 0)
  return weights, cam


@pytest.mark.parametrize("variant", ["pytorch_grad_cam", "monai"])
def test_grad_cam_plus_plus_against_eq_19_by_hand(variant):
  result = saliency.grad_cam_plus_plus(_apply, _PARAMS, _X, saliency.class_score(2),
                                       layer=_LAYER, variant=variant)
  a = np.asarray(sm.conv_features(_PARAMS, _X), np.float64)
  g = np.broadcast_to(_M[None, :, :, None] * _V[None, None, None, :, 2], a.shape)
  assert (g == 0).any()
  weights, cam = _pp_by_hand(a, g, variant)
  np.testing.assert_allclose(result.weights, weights, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(result.cam, cam, rtol=1e-4, atol=1e-6)


def test_cam_weights_on_3d_activations():
  a = np.abs(sm.rand((2, 3, 4, 5, 6), 33)).astype(np.float64)
  g = sm.rand((2, 3, 4, 5, 6), 34).astype(np.float64)
  g[:, 0] = 0.0
  for variant, name in (("pytorch_grad_cam", "grad_cam_plus_plus"),
                        ("monai", "grad_cam_plus_plus_monai")):
    weights, _ = _pp_by_hand(a, g, variant)
    np.testing.assert_allclose(saliency.channel_weights(a, g, name), weights, rtol=1e-4)
  np.testing.assert_allclose(saliency.channel_weights(a, g, "grad_cam"), g.mean(axis=(1, 2, 3)),
                             rtol=1e-5)
  # The two Grad-CAM++ forms differ (sum(A) g^3 elementwise vs sum(A g^3)).
  assert not np.allclose(saliency.channel_weights(a, g, "grad_cam_plus_plus"),
                         saliency.channel_weights(a, g, "grad_cam_plus_plus_monai"))


def test_3d_grad_cam_upsamples_to_the_volume():
  def features(p, x):  # [N, D, H, W, C] -> [N, D/2, H/2, W/2, C], a 2x2x2 mean pool
    n, d, h, w, c = x.shape
    return jnp.tanh(x.reshape(n, d // 2, 2, h // 2, 2, w // 2, 2, c).mean((2, 4, 6)) * p)

  def head(p, a):
    return jnp.sum(a * jnp.arange(1.0, 1.0 + a.shape[-1]), axis=(1, 2, 3, 4))[:, None]

  x = jnp.asarray(sm.rand((1, 4, 4, 4, 3), 35))
  target = saliency.class_score(0)
  result = saliency.grad_cam(None, 2.0, x, target, layer=(features, head))
  assert result.cam.shape == (1, 2, 2, 2) and result.upsampled.shape == (1, 4, 4, 4)
  assert np.all(np.isfinite(result.upsampled))
  # The input-gradient methods take volumes too.
  apply = lambda p, z: head(p, features(p, z))
  ig = saliency.integrated_gradients(apply, 2.0, x, target, steps=8, rule="gauss_legendre")
  assert ig.attributions.shape == x.shape
  assert np.all(np.abs(ig.completeness_error) <= 1e-4 * (1 + np.abs(ig.delta)))


def _unet_features(p, x):
  """Hand-written split of the tiny UNet at its head: A = the last hidden layer's output."""
  m = sm.unet()
  return nnx.merge(m.graphdef, p, m.state)(x, return_hidden=True)[1]


def _unet_head(p, a):
  m = sm.unet()
  return nnx.merge(m.graphdef, p, m.state).head(a)


_UNET_SPLIT = (_unet_features, _unet_head)


# The UNet tests share one target (and input) so that the compiled layer passes are reused
# by saliency_models_test.py.
UNET_TARGET = saliency.class_softmax_sum(1)


def test_grad_cam_by_layer_name_equals_a_hand_written_split_on_the_unet():
  m = sm.unet()
  x = sm.images(1)
  by_name = saliency.grad_cam(m.apply_fn, m.params, x, UNET_TARGET,
                              layer=m.layer("last_hidden"))
  by_hand = saliency.grad_cam(m.apply_fn, m.params, x, UNET_TARGET, layer=_UNET_SPLIT)
  assert by_name.cam.shape == (1, 16, 16)
  assert np.abs(np.asarray(by_hand.weights)).max() > 0
  np.testing.assert_allclose(by_name.weights, by_hand.weights, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(by_name.cam, by_hand.cam, rtol=1e-4, atol=1e-6)


def test_information_flow_one_pass_equals_single_layer_cams_on_the_unet():
  m = sm.unet()
  x = sm.images(1)
  target = UNET_TARGET
  flow = saliency.information_flow(m.apply_fn, m.params, x, target, layers=m.layers())
  assert list(flow) == ["encoder[0]", "encoder[1]", "bottleneck", "up[0]", "decoder[0]",
                        "up[1]", "last_hidden", "head"]
  assert flow["bottleneck"].cam.shape == (1, 4, 4)
  for result in flow.values():
    assert result.upsampled.shape == (1, 16, 16)
    assert np.all(np.isfinite(result.cam))
  single = saliency.grad_cam(m.apply_fn, m.params, x, target, layer=m.layer("last_hidden"))
  np.testing.assert_allclose(flow["last_hidden"].cam, single.cam, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(flow["last_hidden"].weights, single.weights, rtol=1e-4,
                             atol=1e-7)


def test_information_flow_of_pure_jax_splits():
  x = jnp.asarray(sm.rand((1, 8, 8, 4), 36))
  target = saliency.class_softmax_sum(0)
  flow = saliency.information_flow(sm.conv_apply, sm.conv_params(), x, target,
                                   layers={"conv1": sm.CONV_LAYER, "conv2": sm.CONV_LAST})
  assert list(flow) == ["conv1", "conv2"]
  assert flow["conv1"].cam.shape == (1, 4, 4) and flow["conv2"].cam.shape == (1, 8, 8)
  with pytest.raises(ValueError, match="one layer"):
    saliency.grad_cam(sm.conv_apply, sm.conv_params(), x, target,
                      layer=sm.unet().layers("head", "bottleneck"))
