"""Saliency on volumes [N, D, H, W, C]: the same code paths as on slices, by spatial rank.

A tiny pure-JAX 3-D ReLU conv net (`lax.conv_general_dilated` with NDHWC/DHWIO dimension
numbers) whose kernels are zero outside their centre plane equals the 2-D conv net of
`saliency_models` on a volume of depth 1, so every method's map, target, instance and curve
must equal the 2-D computation there; on deeper volumes Grad-CAM, instances and deletion
curves are checked against plain numpy/scipy computations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from tracin_jax import saliency
from tracin_jax.saliency import figures
from tracin_jax.saliency import instances
import saliency_models as sm

DN3 = ("NDHWC", "DHWIO", "NDHWC")
CLASS = 3


# ------------------------------------------------------------- the tiny 3-D net
def conv3_features(params, x):
  """relu(3x3x3 conv, stride 2): [N, D, H, W, C] -> A [N, ceil(D/2), H/2, W/2, F]."""
  z = jax.lax.conv_general_dilated(x, params["w1"], (2, 2, 2), "SAME", dimension_numbers=DN3)
  return jax.nn.relu(z + params["b1"])


def _up(a, depth):
  a = jnp.repeat(jnp.repeat(jnp.repeat(a, 2, axis=1), 2, axis=2), 2, axis=3)
  return a[:, :depth]


def conv3_hidden_of(params, a, depth):
  return jnp.maximum(jax.lax.conv_general_dilated(_up(a, depth), params["w2"], (1, 1, 1),
                                                  "SAME", dimension_numbers=DN3), 0.0)


def conv3_last(params, h):
  return jnp.einsum("...c,ck->...k", h, params["w3"]) + params["b3"]


def conv3_head_of(params, a, depth):
  """Nearest 2x upsampling (cropped to `depth`), ReLU'd 3x3x3 conv, 1x1x1 conv -> logits."""
  return conv3_last(params, conv3_hidden_of(params, a, depth))


# One function object per input depth, so that jitted methods compile once per depth.
HEADS = {d: functools.partial(conv3_head_of, depth=d) for d in (1, 4)}
HIDDEN = {d: functools.partial(conv3_hidden_of, depth=d) for d in (1, 4)}


def conv3_apply(params, x):
  return HEADS[x.shape[1]](params, conv3_features(params, x))


def features_to_hidden(depth):
  return lambda p, x: HIDDEN[depth](p, conv3_features(p, x))


FEATURES_TO_HIDDEN = {d: features_to_hidden(d) for d in (1, 4)}


def layers3(depth):
  """Grad-CAM splits of the 3-D net: at the stride-2 features and at the last hidden layer."""
  return {"features": (conv3_features, HEADS[depth]),
          "hidden": (FEATURES_TO_HIDDEN[depth], conv3_last)}


def hidden2(p, x):
  return sm.conv_hidden(p, x)


LAYERS2 = {"features": (sm.conv_features, sm.conv_head), "hidden": (hidden2, sm.conv_last)}


def lift(params2):
  """The 3-D net's params: every 3x3 kernel placed in the centre plane of a 3x3x3 kernel."""
  out = dict(params2)
  for name in ("w1", "w2"):
    w = np.asarray(params2[name])
    w3 = np.zeros((3,) + w.shape, w.dtype)
    w3[1] = w
    out[name] = jnp.asarray(w3)
  return out


APPLY2 = jax.jit(sm.conv_apply)
APPLY3 = jax.jit(conv3_apply)


@pytest.fixture(scope="module")
def nets():
  p2 = sm.conv_params()
  p3 = lift(p2)
  x2 = jnp.asarray(sm.rand((2, 8, 8, 4), 70))
  out2 = APPLY2(p2, x2)
  # The explained region: the clean prediction's ET, held fixed; the same target structure
  # as an instance's, so the instance methods below reuse the compiled kernels.
  mask2 = saliency.predicted_region("ET")(out2)
  volume = jnp.asarray(sm.rand((2, 4, 8, 8, 4), 71))
  return {"p2": p2, "p3": p3, "x2": x2, "x3": x2[:, None], "out2": out2,
          "out3": APPLY3(p3, x2[:, None]), "mask2": mask2,
          "t2": saliency.masked_class_sum(CLASS, mask2),
          "t3": saliency.masked_class_sum(CLASS, mask2[:, None]),
          "rule": saliency.masked_class_sum(CLASS, saliency.predicted_region("ET")),
          "volume": volume, "volume_out": APPLY3(p3, volume)}


def test_the_lifted_net_on_depth_one_is_the_2d_net(nets):
  assert nets["out3"].shape == (2, 1, 8, 8, 4)
  np.testing.assert_allclose(nets["out3"][:, 0], nets["out2"], rtol=1e-5, atol=1e-6)
  # The explained region is not empty (else every map would be 0 and equal by accident).
  assert 0 < float(nets["mask2"].mean()) < 1


# ------------------------------------------------------------- targets on depth 1
@jax.jit
def _value_and_terms(target, output):
  """The target bound at `output`, its value [N] and its terms [N, V] there."""
  return saliency.bind_target(target, output)(output), target.terms(output)


def test_targets_on_depth_one_equal_2d(nets):
  out2 = nets["out2"]
  out3 = out2[:, None]
  labels2 = jnp.argmax(out2, -1)
  masks2 = saliency.region_mask(labels2, "TC")
  targets2 = [saliency.class_softmax_sum(CLASS), nets["rule"],
              saliency.masked_class_sum(1, masks2, on="probabilities"),
              saliency.masked_class_sums([1, 3], masks2)]
  targets3 = [saliency.class_softmax_sum(CLASS), nets["rule"],
              saliency.masked_class_sum(1, masks2[:, None], on="probabilities"),
              saliency.masked_class_sums([1, 3], masks2[:, None])]
  np.testing.assert_array_equal(saliency.region_mask(labels2[:, None], "TC")[:, 0], masks2)
  for t2, t3 in zip(targets2, targets3):
    value2, terms2 = _value_and_terms(t2, out2)
    value3, terms3 = _value_and_terms(t3, out3)
    np.testing.assert_allclose(value3, value2, rtol=1e-6)
    np.testing.assert_allclose(terms3, terms2, rtol=1e-6)
    assert float(jnp.abs(value2).min()) > 0


# ------------------------------------------------------------- every method on depth 1
METHOD_CALLS = {
    "vanilla_gradient": lambda f, p, x, t, layers: saliency.vanilla_gradient(f, p, x, t),
    "guided_backprop": lambda f, p, x, t, layers: saliency.guided_backprop(f, p, x, t),
    "integrated_gradients": lambda f, p, x, t, layers: saliency.integrated_gradients(
        f, p, x, t, steps=4, baseline="min", chunk_size=4).attributions,
    "guided_integrated_gradients": lambda f, p, x, t, layers:
        saliency.guided_integrated_gradients(f, p, x, t, steps=4, fraction=0.5,
                                             max_dist=1.0).attributions,
    "smoothgrad": lambda f, p, x, t, layers: saliency.smoothgrad(
        f, p, x, t, key=3, num_samples=3, chunk_size=3),
    "grad_cam": lambda f, p, x, t, layers: saliency.grad_cam(
        f, p, x, t, layer=layers["features"]),
    "grad_cam_plus_plus": lambda f, p, x, t, layers: saliency.grad_cam_plus_plus(
        f, p, x, t, layer=layers["features"]),
    "grad_cam_plus_plus_monai": lambda f, p, x, t, layers: saliency.grad_cam_plus_plus(
        f, p, x, t, layer=layers["features"], variant="monai"),
    "guided_grad_cam": lambda f, p, x, t, layers: saliency.guided_grad_cam(
        f, p, x, t, layer=layers["features"]),
    "information_flow": lambda f, p, x, t, layers: saliency.information_flow(
        f, p, x, t, layers=layers),
}


def _maps(result):
  """The arrays of a method's result, by name: the input map, or a CAM's raw and upsampled
  maps (per layer for information flow)."""
  if isinstance(result, dict):
    return {f"{k}.{a}": v for k, r in result.items() for a, v in _maps(r).items()}
  if isinstance(result, saliency.GradCamResult):
    return {"cam": result.cam, "upsampled": result.upsampled, "display": result.display}
  return {"map": result}


# The two with the longest compiles (guided IG's while loop, SmoothGrad's noise) run in the
# slow tier.
SLOW_METHODS = ("guided_integrated_gradients", "smoothgrad")


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.slow) if m in SLOW_METHODS else m
    for m in sorted(METHOD_CALLS)])
def test_every_method_on_depth_one_equals_2d(nets, method):
  call = METHOD_CALLS[method]
  got2 = _maps(call(sm.conv_apply, nets["p2"], nets["x2"], nets["t2"], LAYERS2))
  got3 = _maps(call(conv3_apply, nets["p3"], nets["x3"], nets["t3"], layers3(1)))
  assert sorted(got2) == sorted(got3)
  for name, m2 in got2.items():
    m3 = np.asarray(got3[name])
    assert m3.shape == (m2.shape[0], 1) + m2.shape[1:], name
    scale = float(np.abs(m2).max())
    assert scale > 0, name
    np.testing.assert_allclose(m3[:, 0], m2, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


# ------------------------------------------------------------- Grad-CAM in 3-D by hand
def _trilinear(maps, shape):
  """Half-pixel-centre linear interpolation, one axis at a time (numpy)."""
  out = np.asarray(maps, np.float64)
  for axis, size in enumerate(shape, start=1):
    n_in = out.shape[axis]
    pos = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).reshape((-1,) + (1,) * (out.ndim - axis - 1))
    out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, hi, axis=axis) * frac
  return out


@jax.jit
def _features_and_gradient(p, x, mask):
  """A = the stride-2 features of a volume and g = dF/dA by plain differentiation of the
  head, F = sum of the ET logit over the mask."""
  a = conv3_features(p, x)
  return a, jax.grad(lambda z: jnp.sum(mask * HEADS[4](p, z)[..., CLASS]))(a)


def test_grad_cam_in_3d_equals_numpy_at_the_layer_and_trilinear_upsampling(nets):
  p, x = nets["p3"], nets["volume"]
  mask = saliency.predicted_region("ET")(nets["volume_out"])
  a, g = _features_and_gradient(p, x, mask)
  a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
  assert a.shape == (2, 2, 4, 4, 6)
  axes = (1, 2, 3)
  sum_a = a.sum(axes, keepdims=True)
  alpha_pp = np.where(g != 0, g**2 / (2 * g**2 + sum_a * g**3 + 1e-6), 0.0)
  denominator = 2 * g**2 + (a * g**3).sum(axes, keepdims=True)
  alpha_monai = g**2 / (np.where(denominator != 0, denominator, 1.0) + 1e-7)
  weights = {"grad_cam": g.mean(axes),
             "pytorch_grad_cam": (alpha_pp * np.maximum(g, 0)).sum(axes),
             "monai": (alpha_monai * np.maximum(g, 0)).sum(axes)}
  for variant, w in weights.items():
    if variant == "grad_cam":
      result = saliency.grad_cam(conv3_apply, p, x, nets["rule"], layer=layers3(4)["features"])
    else:
      result = saliency.grad_cam_plus_plus(conv3_apply, p, x, nets["rule"],
                                           layer=layers3(4)["features"], variant=variant)
    cam = np.maximum(np.einsum("ndhwk,nk->ndhw", a, w), 0.0)
    assert result.cam.shape == (2, 2, 4, 4) and result.upsampled.shape == (2, 4, 8, 8)
    assert cam.max() > 0
    np.testing.assert_allclose(result.weights, w, rtol=2e-4, atol=1e-6 * np.abs(w).max())
    np.testing.assert_allclose(result.cam, cam, rtol=2e-4, atol=1e-6 * cam.max())
    np.testing.assert_allclose(
        result.upsampled, jax.image.resize(result.cam, (2, 4, 8, 8), "trilinear"), rtol=1e-6)
    np.testing.assert_allclose(result.upsampled, _trilinear(result.cam, (4, 8, 8)),
                               rtol=1e-5, atol=1e-7)


def test_information_flow_in_3d_keeps_each_layers_resolution_and_scale(nets):
  flow = saliency.information_flow(conv3_apply, nets["p3"], nets["volume"], nets["rule"],
                                   layers=layers3(4))
  assert list(flow) == ["features", "hidden"]
  assert flow["features"].cam.shape == (2, 2, 4, 4)
  assert flow["hidden"].cam.shape == (2, 4, 8, 8)
  for result in flow.values():
    assert result.upsampled.shape == (2, 4, 8, 8)
    np.testing.assert_allclose(result.display.max(axis=(1, 2, 3)), 1.0, rtol=1e-6)


# ------------------------------------------------------------- instances: 26-connected
def _scipy_components(mask, min_size):
  labels, count = ndimage.label(mask, np.ones((3, 3, 3), bool))
  sizes = np.bincount(labels.ravel())
  return sorted(tuple(np.flatnonzero(labels == i)) for i in range(1, count + 1)
                if sizes[i] > min_size - 1)


def test_3d_instances_equal_scipy_26_connected_labelling():
  mask = np.random.default_rng(5).random((6, 9, 9)) < 0.22
  mask[:, :3, :3] = mask[:, 5:, 5:] = False
  mask[0:2, 8, 8] = mask[0, 8, 7] = True              # 3 voxels: dropped (<= 5)
  mask[0, 6, 6:9] = mask[1, 6, 6:8] = True            # 5 voxels: dropped
  mask[4:6, 6, 6:9] = True                            # 6 voxels: kept
  mask[2, 1, 1] = mask[3, 2, 2] = mask[4, 1, 1] = True  # a chain joined only at corners
  mask[5, 0, 0] = mask[5, 0, 1] = mask[3, 0, 1] = True  # joined to it along edges only
  got = instances.components(mask)
  assert sorted(tuple(np.flatnonzero(c)) for c in got) == _scipy_components(mask, 6)
  assert [int(c.sum()) for c in got] == sorted((int(c.sum()) for c in got), reverse=True)
  six = np.zeros_like(mask)
  six[4:6, 6, 6:9] = True
  assert any((c == six).all() for c in got)
  assert not any(c[0, 6, 6] or c[0, 8, 8] for c in got)
  chain = next(c for c in got if c[2, 1, 1])
  assert chain[3, 2, 2] and chain[4, 1, 1] and chain[5, 0, 0]
  # 18-connectivity splits the corner chain, so the default is not 18.
  assert not any(c[2, 1, 1] and c[3, 2, 2] for c in instances.components(mask, connectivity=2))
  assert instances.DEFAULT_MIN_SIZE == 6  # IES: lesions of at most 5 voxels are dropped


def test_3d_lesion_status_and_depth_one_equal_2d():
  truth = np.zeros((4, 8, 8), np.int32)
  pred = np.zeros((4, 8, 8), np.int32)
  truth[0:2, 0:3, 0:3] = 3                        # predicted through a corner contact: TP
  pred[1, 2, 2] = 3
  pred[2:4, 3:5, 3:5] = 3
  pred[0:2, 6:8, 5:8] = 3                         # no truth there: FP (12 voxels)
  truth[3, 6:8, 0:3] = 3                          # not predicted: FN
  pred[3, 0, 5:8] = 3                             # 3 voxels: dropped
  found = saliency.find_instances(pred, truth, classes=(3,))
  assert [(i.status, i.size) for i in found] == [("FP", 12), ("TP", 9), ("FN", 6)]
  assert found[1].describe(["bg", "NCR", "ED", "ET"]) == "ET #1 (TP, 9 voxels)"
  # Depth 1: the slice's instances (8-connected: the corner contact joins).
  pred2, truth2 = np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32)
  pred2[0:3, 0:3] = pred2[3:5, 3:5] = 3
  pred2[6:8, 5:8] = 3
  truth2[0:3, 0:2] = 3
  truth2[5:8, 0:2] = 3
  found2 = saliency.find_instances(pred2, truth2, classes=(3,))
  assert [(i.status, i.size) for i in found2] == [("TP", 13), ("FP", 6), ("FN", 6)]
  found3 = saliency.find_instances(pred2[None], truth2[None], classes=(3,))
  assert [(i.status, i.size) for i in found3] == [(i.status, i.size) for i in found2]
  for i2, i3 in zip(found2, found3):
    np.testing.assert_array_equal(i3.mask[0], i2.mask)


def test_quantify_and_rings_in_3d():
  mask = np.zeros((5, 7, 7), bool)
  mask[2, 3, 3] = True
  rings = instances.rings(mask, 2)
  assert [int(r.sum()) for r in rings] == [1, 26, 98]   # 3^3 - 1, 5^3 - 3^3: a 26-neighbourhood
  m = sm.rand((5, 7, 7, 4), 73)
  numbers = saliency.quantify(m, mask, radius=2)
  inside = np.abs(m[mask]).sum(0)
  np.testing.assert_allclose(numbers["share"], inside / inside.sum(), rtol=1e-6)
  ring = ndimage.binary_dilation(mask, np.ones((3, 3, 3), bool)) & ~mask
  np.testing.assert_allclose(numbers["mean"][1], m[ring].mean(0), rtol=1e-6)


def _as_volume(instance):
  return instances.Instance(instance.class_index, instance.status, instance.mask[None],
                            instance.size, instance.probability, instance.index)


@pytest.mark.slow
def test_instance_smoothgrad_grad_cam_plus_plus_and_context_on_depth_one_equal_2d(nets):
  image2, image3 = nets["x2"][0], nets["x3"][0]
  pred = np.asarray(jnp.argmax(nets["out2"][0], -1))
  lesion2 = saliency.find_instances(pred, None, classes=(CLASS,), min_size=1)[0]
  lesion3 = _as_volume(lesion2)
  assert lesion2.size >= 2
  sg2 = saliency.instance_smoothgrad(sm.conv_apply, nets["p2"], image2, [lesion2], key=1,
                                     num_samples=2)
  sg3 = saliency.instance_smoothgrad(conv3_apply, nets["p3"], image3, [lesion3], key=1,
                                     num_samples=2)
  assert float(np.abs(sg2).max()) > 0
  np.testing.assert_allclose(sg3[:, 0], sg2, rtol=1e-4, atol=1e-6)
  # Two copies of the lesion: the batch and target structure of the method tests above.
  pp2 = saliency.instance_grad_cam_plus_plus(sm.conv_apply, nets["p2"], image2,
                                             [lesion2, lesion2], layer=LAYERS2["features"])
  pp3 = saliency.instance_grad_cam_plus_plus(conv3_apply, nets["p3"], image3,
                                             [lesion3, lesion3], layer=layers3(1)["features"])
  assert float(pp2.upsampled.max()) > 0
  np.testing.assert_allclose(pp3.upsampled[:, 0], pp2.upsampled, rtol=1e-4, atol=1e-7)
  curve2 = saliency.context_curve(sm.conv_apply, nets["p2"], image2, lesion2, max_dilations=3,
                                  min_size=1)
  curve3 = saliency.context_curve(conv3_apply, nets["p3"], image3, lesion3, max_dilations=3,
                                  min_size=1)
  assert len(set(np.round(curve2["probability"], 6))) > 1
  for key in ("probability", "detected_pixels"):
    np.testing.assert_allclose(curve3[key], curve2[key], rtol=1e-5)


@jax.jit
def _voxel_gradient(p, x, index):
  """d logit_ET(x)[index] / dx for one voxel index (d, h, w) of the first example."""
  return jax.grad(lambda z: APPLY3(p, z)[0, index[0], index[1], index[2], CLASS])(x)


@pytest.mark.slow
def test_instance_smoothgrad_on_a_3d_lesion_against_a_loop_over_its_voxels(nets):
  """IES's per-element max over the lesion's voxels, on a lesion spanning three slices
  (noise_level 0: the clean input, whatever the noise rule)."""
  mask = np.zeros((4, 8, 8), bool)
  mask[1, 2, 2] = mask[2, 3, 3] = mask[2, 3, 4] = mask[3, 4, 5] = True
  lesion = instances.Instance(CLASS, "predicted", mask, int(mask.sum()), float("nan"))
  x = nets["volume"][:1]
  got = saliency.instance_smoothgrad(conv3_apply, nets["p3"], x[0], [lesion], key=0,
                                     num_samples=1, noise_level=0.0)
  grads = np.stack([np.asarray(_voxel_gradient(nets["p3"], x, jnp.asarray(v)))
                    for v in np.argwhere(mask)])            # [voxels, 1, D, H, W, C]
  pick = np.abs(grads).argmax(0)
  expected = np.take_along_axis(grads, pick[None], 0)[0]
  assert got.shape == (1, 4, 8, 8, 4)
  assert not np.allclose(expected, grads.mean(0))            # the max is not the mean
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


# ------------------------------------------------------------- faithfulness in 3-D
def linear_seg(w, x):
  """One output channel, logits[n, d, h, w, 0] = sum_c x[..., c] w[d, h, w, c]."""
  return jnp.sum(x * w, axis=-1, keepdims=True)


def total_logit(output):
  return output.reshape(output.shape[0], -1).sum(-1)


@pytest.mark.parametrize("patch_size", [2, (1, 2, 3)])
def test_3d_deletion_curve_removes_the_stated_patches(patch_size):
  shape = (1, 3, 6, 6, 2)                          # depth 3: the last patch row is partial
  x = sm.rand(shape, 75)
  w = sm.rand(shape[1:], 76)
  s = np.random.default_rng(77).random(shape[1:-1])[None]
  curve = saliency.deletion_curve(linear_seg, jnp.asarray(w), jnp.asarray(x), total_logit,
                                  jnp.asarray(s), patch_size=patch_size, num_steps=4)
  patch = (patch_size,) * 3 if np.ndim(patch_size) == 0 else patch_size
  grid = [int(np.ceil(n / p)) for n, p in zip(shape[1:4], patch)]
  cells = [(i, j, k) for i in range(grid[0]) for j in range(grid[1]) for k in range(grid[2])]
  region = lambda c: tuple(slice(a * p, (a + 1) * p) for a, p in zip(c, patch))
  means = [s[0][region(c)].mean() for c in cells]
  order = [cells[i] for i in np.argsort(-np.asarray(means), kind="stable")]
  expected = []
  for step in range(5):
    kept = np.ones(shape[1:4], bool)
    for c in order[:int(round(step / 4 * len(cells)))]:
      kept[region(c)] = False
    expected.append(float((x[0] * w)[kept].sum()))
  np.testing.assert_allclose(curve.scores[0], expected, rtol=1e-5, atol=1e-5)
  assert curve.scores[0, -1] == pytest.approx(0.0, abs=1e-6)


def test_completeness_and_relevance_in_3d(nets):
  x, p, t = nets["volume"], nets["p3"], nets["rule"]
  attr = np.asarray(sm.rand(x.shape, 78))
  out = nets["volume_out"]
  bound = saliency.bind_target(t, out)
  delta = bound(out) - bound(APPLY3(p, jnp.zeros_like(x)))
  np.testing.assert_allclose(saliency.completeness_error(APPLY3, p, x, t, attr),
                             attr.reshape(2, -1).sum(-1) - delta, rtol=1e-5, atol=1e-4)
  s = attr.sum(-1)
  mask = np.zeros(s.shape, bool)
  mask[:, 1:3, 2:6, 2:6] = True
  positive = np.maximum(s, 0)
  np.testing.assert_allclose(saliency.relevance_mass_accuracy(attr, mask),
                             (positive * mask).sum((1, 2, 3)) / positive.sum((1, 2, 3)),
                             rtol=1e-5)
  k = mask[0].sum()
  top = [np.argsort(-s[n].ravel(), kind="stable")[:k] for n in range(2)]
  np.testing.assert_allclose(saliency.relevance_rank_accuracy(attr, mask),
                             [mask[n].ravel()[top[n]].mean() for n in range(2)], rtol=1e-6)


def test_ssim_of_volumes_is_the_mean_over_axial_slices():
  a = np.abs(sm.rand((2, 3, 12, 12), 79))
  b = a + 0.3 * np.abs(sm.rand((2, 3, 12, 12), 80))
  per_slice = np.stack([saliency.ssim(a[:, d], b[:, d]) for d in range(3)], axis=1)
  np.testing.assert_allclose(saliency.ssim(a, b), per_slice.mean(1), rtol=1e-6)
  assert np.all(per_slice < 0.999)


def test_parameter_randomisation_of_3d_maps(nets):
  x, t = nets["volume"], nets["rule"]
  result = saliency.parameter_randomisation(
      lambda q: saliency.vanilla_gradient(conv3_apply, q, x, t), nets["p3"], key=0,
      layer_order=("w1", "b1", "w2", "w3", "b3"), spatial_ndim=3, keep_maps=True)
  assert result.layers == ("b3", "w3", "w2", "b1", "w1")
  assert result.ssim.shape == (5, 2) and result.maps[0].shape == (2, 4, 8, 8)
  reference = saliency.vanilla_gradient(conv3_apply, nets["p3"], x, t).sum(-1)
  for row, heat in zip(result.ssim, result.maps):
    np.testing.assert_allclose(row, saliency.ssim(saliency.display(reference, absolute=True),
                                                  saliency.display(heat, absolute=True)),
                               rtol=1e-5)
  assert np.all(result.ssim < 0.99) and np.all(result.spearman[-1] < 0.9)  # the maps change


# ------------------------------------------------------------- figures: the axial slice
def test_the_figure_slice_is_the_lesions_largest():
  region = np.zeros((5, 6, 6), bool)
  region[1, 2:4, 2:4] = True
  region[3, 1:5, 1:4] = True
  region[4, 0:6, 0] = True
  assert figures.axial_slice(region) == 3
  maps = np.zeros((5, 6, 6, 2))
  maps[4, 0, 0] = -4.0
  assert figures.axial_slice(np.zeros_like(region), [maps]) == 4   # no region: the map's peak
  assert figures.axial_slice(np.zeros_like(region)) == 2           # nothing: the middle
  image, region3 = np.zeros((5, 6, 6, 2)), region
  got = figures.as_slices(3, image, {"m": maps}, region3)
  assert got[0].shape == (6, 6, 2) and got[1]["m"].shape == (6, 6, 2)
  np.testing.assert_array_equal(got[2], region[3])
  with pytest.raises(ValueError, match="slice_index 5"):
    figures.as_slices(5, image, {}, region3)
  with pytest.raises(ValueError, match="region or a map"):
    figures.axial_slice(None)


@pytest.mark.slow
def test_a_volumes_grid_and_flow_figures_are_those_of_its_largest_slice(tmp_path):
  rng = np.random.default_rng(81)
  image = rng.uniform(-1, 1, (4, 6, 6, 2))
  maps = {"gradient": rng.standard_normal((4, 6, 6, 2)), "cam": rng.random((4, 6, 6))}
  region = np.zeros((4, 6, 6), bool)
  region[1, 1:3, 1:3] = region[2, 1:5, 1:5] = True
  truth = np.roll(region, 1, axis=2)
  names = ["T1", "FLAIR"]
  figures.plot_method_grid(image, maps, region, names, tmp_path / "3d.png", title="t",
                           truth=truth)
  figures.plot_method_grid(image[2], {k: m[2] for k, m in maps.items()}, region[2], names,
                           tmp_path / "2d.png", title="t (axial slice 2)", truth=truth[2])
  assert (tmp_path / "3d.png").read_bytes() == (tmp_path / "2d.png").read_bytes()
  flows = {"ET": {"a": maps["cam"], "b": maps["cam"] ** 2}}
  figures.plot_information_flow(image, flows, {"ET": region}, tmp_path / "f3.png", title="f",
                                channel=1)
  figures.plot_information_flow(image[2], {"ET": {k: m[2] for k, m in flows["ET"].items()}},
                                {"ET": region[2]}, tmp_path / "f2.png",
                                title="f (axial slice 2)", channel=1)
  assert (tmp_path / "f3.png").read_bytes() == (tmp_path / "f2.png").read_bytes()
  figures.plot_method_grid(image, maps, region, names, tmp_path / "s1.png", title="t",
                           truth=truth, slice_index=1)
  assert (tmp_path / "s1.png").read_bytes() != (tmp_path / "3d.png").read_bytes()
  regions = np.zeros((4, 6, 6, 3), bool)
  regions[3, 2:4, 2:4, 2] = True                       # the neighbour's largest slice: 3
  volume = rng.uniform(-1, 1, (4, 6, 6, 4))           # T1, T1Gd, T2, FLAIR
  neighbours = [{"image": volume, "regions": regions, "kind": "proponent", "label": "p"},
                {"image": volume, "regions": regions, "kind": "opponent", "label": "o",
                 "slice": 0}]
  figures.plot_tracin_beside_saliency(image, region, {"cam": maps["cam"]}, neighbours,
                                      tmp_path / "n3.png", title="n", channel=1)
  flat = [{**neighbours[0], "image": volume[3], "regions": regions[3]},
          {**neighbours[1], "image": volume[0], "regions": regions[0]}]
  figures.plot_tracin_beside_saliency(image[2], region[2], {"cam": maps["cam"][2]}, flat,
                                      tmp_path / "n2.png", title="n (axial slice 2)",
                                      channel=1)
  assert (tmp_path / "n3.png").read_bytes() == (tmp_path / "n2.png").read_bytes()
