"""The reference presets: NeuroXAI's and IES's settings reproduced, ours unchanged."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax import saliency
from tracin_jax.saliency import gradients
from tracin_jax.saliency import instances
from tracin_jax.saliency import presets
import saliency_models as sm

NX, IES = presets.NEUROXAI, presets.IES


def _image(seed, shape=(1, 5, 5, 4), dtype=np.float32):
  """An input whose FLAIR channel (3) spans a third of the others' range."""
  x = sm.rand(shape, seed, 1.0, dtype)
  x[..., 3] *= 0.3
  return jnp.asarray(x)


# ----------------------------------------------------------------------------- quadrature
def test_pair_quadrature_is_linspace_with_weights_one_over_n():
  for n in (1, 2, 5, 25):
    nodes, weights = saliency.quadrature(n, "pair")
    np.testing.assert_array_equal(nodes, np.linspace(0.0, 1.0, n))
    np.testing.assert_array_equal(weights, np.full(n, 1.0 / n))
  # Both end points at weight 1/n: int_0^1 a^2 da = 1/3 comes out as (2n - 1) / (6 (n - 1)).
  nodes, weights = saliency.quadrature(25, "pair")
  np.testing.assert_allclose(np.sum(weights * nodes**2), 49 / 144, rtol=1e-12)
  assert NX.options("integrated_gradients")["rule"] == "pair"
  assert NX.options("integrated_gradients")["steps"] == 25


# ----------------------------------------------------------------------------- NeuroXAI IG
def test_neuroxai_ig_is_gradient_times_input_and_path_ig_is_not(x64):
  params = sm.smooth_params(c=4, dtype=np.float64)
  x = _image(40, dtype=np.float64)
  target = saliency.class_softmax_sum(1)
  grad = np.asarray(saliency.vanilla_gradient(sm.smooth_apply, params, x, target))
  got = saliency.integrated_gradients(sm.smooth_apply, params, x, target,
                                      **NX.options("integrated_gradients"))
  np.testing.assert_allclose(got.attributions, grad * np.asarray(x), rtol=1e-12, atol=1e-14)
  by_name = saliency.method_map("integrated_gradients", sm.smooth_apply, params, x, target,
                                preset="neuroxai")  # baseline 0, not the default minimum
  np.testing.assert_allclose(by_name, grad * np.asarray(x), rtol=1e-12, atol=1e-14)
  # Path IG with PAIR's rule: the plain sum over the 25 nodes of the gradient at a x.
  path = saliency.integrated_gradients(sm.smooth_apply, params, x, target, steps=25,
                                       rule="pair")
  grad_at = jax.jit(lambda z: jax.grad(lambda v: jnp.sum(target(sm.smooth_apply(params, v))))(z))
  loop = sum(np.asarray(grad_at(a * x)) for a in np.linspace(0, 1, 25)) / 25 * np.asarray(x)
  np.testing.assert_allclose(path.attributions, loop, rtol=1e-10, atol=1e-13)
  assert np.abs(np.asarray(path.attributions) - grad * np.asarray(x)).max() > 1e-3
  with pytest.raises(ValueError, match="gradient_at"):
    saliency.integrated_gradients(sm.smooth_apply, params, x, target, gradient_at="x")


# ----------------------------------------------------------------------------- guided IG
def test_neuroxai_guided_ig_settings_reach_the_computation():
  params = sm.smooth_params(c=4)
  x = _image(41)
  target = saliency.class_softmax_sum(2)
  assert NX.options("guided_integrated_gradients") == dict(steps=5, fraction=0.5,
                                                           max_dist=1.0, baseline=0.0)

  def gig(**kw):
    return np.asarray(saliency.guided_integrated_gradients(sm.smooth_apply, params, x, target,
                                                           **kw).attributions)

  got = saliency.method_map("guided_integrated_gradients", sm.smooth_apply, params, x, target,
                            preset="neuroxai")
  np.testing.assert_allclose(got, gig(steps=5, fraction=0.5, max_dist=1.0), rtol=1e-6)
  for other in (dict(steps=4, fraction=0.5, max_dist=1.0),
                dict(steps=5, fraction=0.25, max_dist=1.0),
                dict(steps=5, fraction=0.5, max_dist=0.02)):
    assert np.abs(np.asarray(got) - gig(**other)).max() > 1e-5, other


# ----------------------------------------------------------------------------- SmoothGrad
def test_neuroxai_smoothgrad_is_the_mean_square_of_guided_ig_over_5_samples():
  params = sm.smooth_params(c=4)
  x = _image(42)
  target = saliency.class_softmax_sum(1)
  options = NX.options("smoothgrad")
  inner, seen = options.pop("over"), []

  def counting(apply_fn, p, z, t):
    seen.append(np.asarray(z))
    return inner(apply_fn, p, z, t)

  got = saliency.smoothgrad(sm.smooth_apply, params, x, target, key=3, over=counting,
                            **options)
  assert len(seen) == 5
  sigma = 0.15 * (np.asarray(x).max() - np.asarray(x).min())  # all channels
  eps = (np.stack(seen) - np.asarray(x)) / sigma
  assert 0.8 < eps.std() < 1.25 and abs(eps.mean()) < 0.25, (eps.mean(), eps.std())
  expected = np.mean([np.square(saliency.guided_integrated_gradients(
      sm.smooth_apply, params, z, target, steps=5, fraction=0.5, max_dist=1.0).attributions)
                      for z in seen], axis=0)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
  by_name = saliency.method_map("smoothgrad", sm.smooth_apply, params, x, target,
                                preset="neuroxai", seed=3)
  np.testing.assert_allclose(by_name, got, rtol=1e-6)


def test_smoothgrad_over_a_method_sees_each_given_noisy_input_once():
  params = sm.smooth_params(c=4)
  x = _image(43)
  noise = jnp.asarray(sm.rand((3,) + x.shape, 44))
  seen = []

  def counting(apply_fn, p, z, target):
    seen.append(np.asarray(z))
    return saliency.vanilla_gradient(apply_fn, p, z, target)

  target = saliency.class_softmax_sum(0)
  got = saliency.smoothgrad(sm.smooth_apply, params, x, target, noise=noise, over=counting,
                            aggregation="mean", noise_channel=3)
  flair = np.asarray(x)[..., 3]
  sigma = 0.15 * (flair.max() - flair.min())  # the default noise_level, of FLAIR's range
  assert len(seen) == 3
  for z, eps in zip(seen, np.asarray(noise)):
    np.testing.assert_allclose(z, np.asarray(x) + sigma * eps, rtol=1e-6, atol=1e-7)
  # Smoothing the gradient through `over` is SmoothGrad's own mean.
  plain = saliency.smoothgrad(sm.smooth_apply, params, x, target, noise=noise,
                              aggregation="mean", noise_channel=3)
  np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="over="):
    saliency.smoothgrad(sm.smooth_apply, params, x, target, over=counting, aggregation="max")


def test_ies_noise_sigma_comes_from_flair_alone():
  x = _image(45, shape=(2, 5, 5, 4))
  flair = np.asarray(x)[..., 3].reshape(2, -1)
  every = np.asarray(x).reshape(2, -1)
  ies = np.asarray(gradients.noise_sigma(x, 0.05, channel=presets.FLAIR_CHANNEL)).ravel()
  ours = np.asarray(gradients.noise_sigma(x, 0.05)).ravel()
  np.testing.assert_allclose(ies, 0.05 * (flair.max(1) - flair.min(1)), rtol=1e-6)
  np.testing.assert_allclose(ours, 0.05 * (every.max(1) - every.min(1)), rtol=1e-6)
  assert np.all(ours > 2 * ies)
  np.testing.assert_array_equal(gradients.noise_sigma(x, 0.05, channel=-1), ies[:, None, None,
                                                                                 None])
  assert IES.options("smoothgrad") == dict(num_samples=50, noise_level=0.05, aggregation="max",
                                           noise_channel=3)
  with pytest.raises(ValueError, match="noise_channel"):
    saliency.smoothgrad(sm.smooth_apply, sm.smooth_params(c=4), x, saliency.class_score(0),
                        noise_channel=4)


@jax.jit
def _voxel_logit_grad(params, z, i, j):
  return jax.grad(lambda v: sm.smooth_apply(params, v)[0, i, j, 1])(z)


def test_ies_instance_smoothgrad_draws_noise_from_flairs_range():
  """IES's instance SmoothGrad by a plain loop: per sample, per lesion voxel, the gradient of
  that voxel's logit; per element the signed value of largest magnitude; their mean."""
  params = sm.smooth_params(c=4)
  image = _image(46)[0]
  mask = np.zeros((5, 5), bool)
  mask[1:3, 2] = True
  mask[2, 3] = True
  lesion = instances.Instance(1, "TP", mask, int(mask.sum()), float("nan"))
  options = IES.options("instance_smoothgrad")
  assert options["noise_channel"] == 3 and options["aggregation"] == "max"
  options["num_samples"] = 2
  got = np.asarray(saliency.instance_smoothgrad(sm.smooth_apply, params, image, [lesion],
                                                key=5, voxel_chunk_size=4, **options))
  # The method's own draws (sample s from fold_in(key, s), shared by the image's lesions):
  # reused rather than drawn again, which would compile another sampler.
  noise = np.asarray(instances._shared_noise(5, 2, (1,) + image.shape))[:, 0]
  flair = np.asarray(image)[..., 3]
  sigma = 0.05 * (flair.max() - flair.min())
  expected = np.zeros((1,) + image.shape)
  for eps in noise:
    z = np.asarray(image)[None] + sigma * eps
    best = np.zeros_like(expected)
    for i, j in zip(*np.nonzero(mask)):
      g = np.asarray(_voxel_logit_grad(params, z, i, j))
      best = np.where(np.abs(g) > np.abs(best), g, best)
    expected += best / 2
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  assert presets.DEFAULT.options("instance_smoothgrad")["noise_channel"] is None  # ours


# ----------------------------------------------------------------------------- Grad-CAM
_M = np.array([[1.0, 0.0, 2.0, 0.5], [0.0, 1.5, -1.0, 0.0], [1.0, 1.0, 0.0, 3.0],
               [0.2, 0.0, 0.7, -0.4]], np.float32)
_V = sm.rand((6, 3), 47)


def _head(params, a):
  return jnp.einsum("nijf,ij,fk->nk", a, _M, _V * 0.1)


_LAYER = saliency.split_layer(sm.conv_features, _head, name="conv1")
_CAM_X = jnp.asarray(sm.rand((2, 8, 8, 4), 48))


def _apply(params, x):
  return _head(params, sm.conv_features(params, x))


def test_neuroxai_grad_cam_divides_by_the_mean_square_by_hand():
  params, x, c = sm.conv_params(), _CAM_X, 2
  a = np.asarray(sm.conv_features(params, x), np.float64)
  g = np.broadcast_to(_M[None, :, :, None] * _V[None, None, None, :, c] * 0.1, a.shape)
  norm = g / (np.mean(g**2, axis=(1, 2, 3), keepdims=True) + 1e-5)
  weights = norm.mean(axis=(1, 2))
  cam = np.maximum(np.einsum("nijf,nf->nij", a, weights), 0)
  got = saliency.grad_cam(_apply, params, x, saliency.class_score(c), layer=_LAYER,
                          **NX.options("grad_cam"))
  np.testing.assert_allclose(got.weights, weights, rtol=1e-5)
  np.testing.assert_allclose(got.cam, cam, rtol=1e-5, atol=1e-6)
  by_name = saliency.method_map("grad_cam", _apply, params, x, saliency.class_score(c),
                                layer=_LAYER, preset="neuroxai")
  np.testing.assert_allclose(by_name[..., 0], got.upsampled, rtol=1e-6)
  rms = saliency.grad_cam(_apply, params, x, saliency.class_score(c), layer=_LAYER,
                          gradient_normalisation="rms")
  assert not np.allclose(rms.weights, got.weights, rtol=1e-2)  # mean(g^2) far from 1 here


def test_ies_grad_cam_plus_plus_is_monais_and_presets_by_name():
  params, x = sm.conv_params(), _CAM_X  # shared with the test above: one compilation
  target = saliency.class_score(2)
  got = saliency.method_map("grad_cam_plus_plus", _apply, params, x, target, layer=_LAYER,
                            preset="ies")
  monai = saliency.grad_cam_plus_plus(_apply, params, x, target, layer=_LAYER, variant="monai")
  ours = saliency.method_map("grad_cam_plus_plus", _apply, params, x, target, layer=_LAYER)
  np.testing.assert_allclose(got[..., 0], monai.upsampled, rtol=1e-6)
  assert not np.allclose(got, ours, rtol=1e-3)
  assert saliency.get_preset("ies") is IES and saliency.get_preset(NX) is NX
  with pytest.raises(ValueError, match="preset"):
    saliency.get_preset("captum")
  with pytest.raises(ValueError, match="unknown saliency method"):
    NX.options("lime")
  opts = NX.options("smoothgrad")
  opts["num_samples"] = 1
  assert NX.options("smoothgrad")["num_samples"] == 5  # a fresh dict each call
  assert isinstance(opts["over"], functools.partial)
  # Methods a preset does not set keep ours.
  assert NX.options("grad_cam_plus_plus") == presets.DEFAULT.options("grad_cam_plus_plus")
  assert IES.options("integrated_gradients") == dict(steps=50, rule="midpoint",
                                                     gradient_at="path", baseline="min")
