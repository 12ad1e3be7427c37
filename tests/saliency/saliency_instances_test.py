"""Instances, their targets, quantitative saliency and context curves (saliency.instances)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax import saliency
from tracin_jax.saliency import instances

import saliency_models as sm


def _canvas(shape=(12, 12)):
  return np.zeros(shape, np.int32)


def test_components_touching_diagonals_and_the_size_filter():
  m = _canvas().astype(bool)
  m[1:4, 1:4] = True          # 9 px
  m[4:6, 4:6] = True          # 4 px touching the first only at a corner
  m[9, 0:5] = True            # a 5-pixel line: dropped by default
  m[9:11, 8:11] = True        # 6 px: kept
  eight = instances.components(m)
  assert [int(c.sum()) for c in eight] == [13, 6]  # the diagonal pair is one component
  four = instances.components(m, connectivity=1)
  assert [int(c.sum()) for c in four] == [9, 6]    # the 4-pixel square alone is dropped
  assert [int(c.sum()) for c in instances.components(m, min_size=1)] == [13, 6, 5]


def test_connectivity_in_3d_is_26_by_default_and_18_on_request():
  m = np.zeros((5, 5, 5), bool)
  m[0, 0, 0:3] = True
  m[1, 1, 0:3] = True   # shares edges with the first row (diagonal in one plane): joined
  m[3, 3, 3] = True
  m[4, 4, 4] = True     # touches m[3, 3, 3] only at a corner: joined with 26-connectivity only
  got = instances.components(m, min_size=1)
  assert sorted(int(c.sum()) for c in got) == [2, 6]
  assert sorted(int(c.sum()) for c in instances.components(m, min_size=1, connectivity=2)) \
      == [1, 1, 6]


def test_tp_fp_fn_on_hand_drawn_masks():
  pred, truth = _canvas(), _canvas()
  pred[1:4, 1:4] = 3          # overlaps the true ET blob: TP
  truth[2:5, 2:5] = 3
  pred[8:11, 8:11] = 3        # no true ET there: FP
  truth[8:11, 0:3] = 3        # a true ET blob that no prediction overlaps: FN
  pred[0, 6:11] = 3           # 5 px predicted: dropped, and so no detection of ...
  truth[0:2, 6:11] = 3        # ... this true blob, which is a FN
  pred[6:8, 0:3] = 1          # NCR/NET predicted where the truth says ET: FP for class 1
  probs = np.zeros((12, 12, 4), np.float32)
  probs[..., 3] = 0.75
  probs[..., 1] = 0.5
  found = instances.find_instances(pred, truth, probabilities=probs)
  summary = [(i.class_index, i.status, i.size) for i in found]
  assert summary == [(1, "FP", 6), (3, "TP", 9), (3, "FP", 9), (3, "FN", 10), (3, "FN", 9)]
  assert [i.index for i in found] == list(range(5))
  assert found[1].probability == pytest.approx(0.75)
  assert found[0].probability == pytest.approx(0.5)
  fn = found[3]
  np.testing.assert_array_equal(fn.mask, (truth == 3) & (np.arange(12)[:, None] < 2))
  unlabelled = instances.find_instances(pred, None, classes=(3,))
  assert [i.status for i in unlabelled] == ["predicted", "predicted"]
  assert np.isnan(unlabelled[0].probability)
  assert "ET" in found[1].describe(["bg", "NCR/NET", "ED", "ET"])


def test_instance_target_is_the_masked_class_logit_sum():
  params = sm.smooth_params(c=2, k=4)
  x = jnp.asarray(sm.rand((1, 6, 6, 2), 5))
  pred = _canvas((6, 6))
  pred[1:4, 1:3] = 2
  (inst,) = instances.find_instances(pred, None, classes=(2,))
  out = sm.smooth_apply(params, x)
  target = instances.instance_target(inst)
  np.testing.assert_allclose(target(out), [float((out[0, ..., 2] * (pred == 2)).sum())],
                             rtol=1e-6)
  # The instance map is the gradient of that sum: the vanilla gradient of the masked target.
  g = saliency.vanilla_gradient(sm.smooth_apply, params, x, target)
  g_ref = jax.grad(lambda z: (sm.smooth_apply(params, z)[0, ..., 2] * (pred == 2)).sum())(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def test_instance_smoothgrad_batched_equals_one_at_a_time_and_mean_without_noise():
  params = sm.smooth_params(c=2, k=4)
  image = jnp.asarray(sm.rand((6, 6, 2), 6))
  pred = _canvas((6, 6))
  pred[0:2, 0:4] = 1
  pred[4:6, 2:6] = 1
  found = instances.find_instances(pred, None, classes=(1,))
  assert len(found) == 2
  both = instances.instance_smoothgrad(sm.smooth_apply, params, image, found, key=3,
                                       num_samples=3, voxel_chunk_size=4)
  for n, inst in enumerate(found):
    one = instances.instance_smoothgrad(sm.smooth_apply, params, image, [inst], key=3,
                                        num_samples=3, voxel_chunk_size=4)
    np.testing.assert_allclose(both[n], one[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(both[0], both[1])
  plain = saliency.vanilla_gradient(sm.smooth_apply, params, image[None],
                                    instances.instance_target(found[0]))
  mean = instances.instance_smoothgrad(sm.smooth_apply, params, image, found[:1],
                                       num_samples=2, noise_level=0.0, aggregation="mean")
  np.testing.assert_allclose(mean, plain, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="one class"):
    instances.batch_target([found[0], instances.Instance(2, "FP", found[0].mask, 8, 0.0)])


def test_ring_measures_on_a_hand_made_map():
  mask = _canvas((7, 7)).astype(bool)
  mask[3, 3] = True
  smap = np.zeros((7, 7, 2))
  smap[3, 3] = [2.0, -1.0]          # inside
  smap[2, 2] = [0.0, -4.0]          # ring 1 (8-neighbour corner)
  smap[3, 4] = [1.0, 1.0]           # ring 1
  smap[1, 3] = [-3.0, 0.5]          # ring 2
  q = instances.quantify(smap, mask, radius=2)
  assert q["sum"].shape == (3, 2)
  np.testing.assert_allclose(q["sum"][0], [2.0, -1.0])
  np.testing.assert_allclose(q["sum"][1], [1.0, -3.0])
  np.testing.assert_allclose(q["mean"][1], [1.0 / 8, -3.0 / 8])   # ring 1 has 8 pixels
  np.testing.assert_allclose(q["peak"][1], [1.0, -4.0])
  np.testing.assert_allclose(q["abs_peak"][1], [1.0, 4.0])
  np.testing.assert_allclose(q["mean"][2], [-3.0 / 16, 0.5 / 16])  # ring 2 has 16 pixels
  np.testing.assert_allclose(q["peak"][2], [-3.0, 0.5])
  np.testing.assert_allclose(q["share"], [2 / 3, 1 / 3])
  assert instances.driver(q["share"], ["T1", "T2"]) == "T1 67%, T2 33%"
  rings = instances.rings(mask, 2, connectivity=1)
  assert [int(r.sum()) for r in rings] == [1, 4, 8]
  edge = _canvas((3, 3)).astype(bool)
  edge[:] = True
  assert np.isnan(instances.quantify(np.ones((3, 3, 2)), edge, radius=1)["sum"][1]).all()


def test_context_curve_ends_at_the_plain_prediction():
  params = sm.smooth_params(c=2, k=4)
  image = sm.rand((8, 8, 2), 7)
  logits = np.asarray(sm.smooth_apply(params, jnp.asarray(image[None])))[0]
  probs = np.asarray(jax.nn.softmax(logits, -1))
  pred = logits.argmax(-1)
  c = int(np.bincount(pred.ravel(), minlength=4)[1:].argmax()) + 1
  inst = instances.find_instances(pred, None, classes=(c,), min_size=1)[0]
  curve = instances.context_curve(sm.smooth_apply, params, image, inst, max_dilations=20,
                                  min_size=1, batch_size=6)
  assert curve["probability"].shape == (21,)
  plain = probs[..., c][inst.mask].mean()
  np.testing.assert_allclose(curve["probability"][-1], plain, rtol=1e-5)
  assert curve["detected"][-1] and curve["detected_pixels"][-1] == inst.size
  # k = 0: only the instance is seen; the rest is each channel's minimum.
  x0 = instances.context_inputs(image, inst.mask, [0])[0]
  np.testing.assert_array_equal(x0[~inst.mask], np.broadcast_to(
      image.reshape(-1, 2).min(0), x0[~inst.mask].shape))
  p0 = np.asarray(jax.nn.softmax(sm.smooth_apply(params, jnp.asarray(x0[None])), -1))[0]
  np.testing.assert_allclose(curve["probability"][0], p0[..., c][inst.mask].mean(), rtol=1e-5)
  zero = instances.context_inputs(image, inst.mask, [0], background=0.0)[0]
  assert (zero[~inst.mask] == 0).all()
