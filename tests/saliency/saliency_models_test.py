"""Every method through the same calls on the tiny UNet and on a pure-JAX conv model."""

import numpy as np
import pytest

from tracin_jax import saliency
import saliency_models as sm


def _setup(name):
  if name == "unet":
    m = sm.unet()
    return m.apply_fn, m.params, sm.images(1), m.layer("last_hidden"), m.layers()
  layers = {"conv1": sm.CONV_LAYER, "conv2": sm.CONV_LAST}
  return sm.conv_apply, sm.conv_params(), sm.images(1, size=8), sm.CONV_LAYER, layers


def _check_map(maps, shape):
  maps = np.asarray(maps)
  assert maps.shape == shape
  assert np.all(np.isfinite(maps)) and np.abs(maps).max() > 0


@pytest.mark.parametrize("model", ["unet", "pure_jax_conv"])
def test_every_method_runs_through_the_same_calls(model):
  apply_fn, params, x, layer, layers = _setup(model)
  target = saliency.class_softmax_sum(1)
  shape = x.shape
  _check_map(saliency.vanilla_gradient(apply_fn, params, x, target), shape)
  _check_map(saliency.guided_backprop(apply_fn, params, x, target), shape)
  # Explicit chunk sizes skip the memory estimate (a trace of the model) to save test time.
  ig = saliency.integrated_gradients(apply_fn, params, x, target, steps=4, chunk_size=4)
  _check_map(ig.attributions, shape)
  assert ig.completeness_error.shape == (1,)
  gig = saliency.guided_integrated_gradients(apply_fn, params, x, target, steps=4)
  _check_map(gig.attributions, shape)
  _check_map(saliency.smoothgrad(apply_fn, params, x, target, key=0, num_samples=2,
                                 chunk_size=2), shape)
  cam = saliency.grad_cam(apply_fn, params, x, target, layer=layer)
  _check_map(cam.upsampled, shape[:-1])
  campp = saliency.grad_cam_plus_plus(apply_fn, params, x, target, layer=layer)
  _check_map(campp.upsampled, shape[:-1])
  _check_map(saliency.guided_grad_cam(apply_fn, params, x, target, layer=layer), shape)
  flow = saliency.information_flow(apply_fn, params, x, target, layers=layers)
  assert len(flow) >= 2
  for result in flow.values():
    assert result.upsampled.shape == shape[:-1]
  curve = saliency.deletion_curve(apply_fn, params, x, target, cam.upsampled, num_steps=4,
                                  chunk_size=5)
  assert curve.scores.shape == (1, 5) and np.isfinite(curve.auc).all()
  np.testing.assert_allclose(curve.scores[:, 0], target(apply_fn(params, x)), rtol=1e-5)
