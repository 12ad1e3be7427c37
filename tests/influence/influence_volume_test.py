"""TracIn on volumes [N, D, H, W, C]: the region losses, the segmentation adapter, the
per-example gradient paths, the store (exact, CountSketch, LoGra) and the figures' slice.

The model is a tiny pure-JAX 3-D conv net ('NDHWC'). On a volume of depth 1 with "SAME"
padding only the centre plane of its 3x3x3 kernels meets data (the other planes meet the
zero padding), so it is the 2-D net whose kernels are those centre planes, whatever the
other planes hold: they are random here, so a leak of the padding would show.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.influence import figures
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import layout
from tracin_jax.influence import logra
from tracin_jax.influence import rankings
from tracin_jax.influence import projection as projection_lib
from tracin_jax.influence import segmentation
from tracin_jax.influence import store as store_lib
from tracin_jax.influence.projection import Projection
from logra_test import _with_mode, kronecker_rows
import tiny_models as tm

DN3 = ("NDHWC", "DHWIO", "NDHWC")
THRESHOLD = 0.3


def net3_apply(params, images):
  """images [N, D, H, W, 2] -> logits [N, D, H, W, 4]: two 3x3x3 convolutions (the 3-D
  form of `tiny_models.conv_apply`)."""
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1, 1), "SAME",
                                                   dimension_numbers=DN3)
  return conv(jnp.tanh(conv(images, params["c1"]) + params["b1"]), params["c2"])


def lift(params2d, seed):
  """The 3-D net's parameters: the 2-D kernels as the centre plane, random outer planes."""
  rng = np.random.default_rng(100 + seed)

  def kernel(k):
    k = np.asarray(k)
    outer = [rng.normal(size=k.shape) * 0.5 for _ in range(2)]
    return jnp.asarray(np.stack([outer[0], k, outer[1]]), k.dtype)

  return {"c1": kernel(params2d["c1"]), "b1": params2d["b1"], "c2": kernel(params2d["c2"])}


def _checkpoints2d():
  return [(tm.conv_params(1, jnp.float64), 0.1), (tm.conv_params(2, jnp.float64), 0.05)]


def _checkpoints3d():
  return [(lift(p, t), lr) for t, (p, lr) in enumerate(_checkpoints2d())]


def _spec(data):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), data)


@pytest.fixture(scope="module")
def volumes():
  """Four training volumes [4, 3, 5, 5, 2] (the second blank: no region), their targets,
  regions and presence, the checkpoints, and the plain loop's per-example gradients."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    images = rng.normal(size=(4, 3, 5, 5, 2))
    images[1] = 0.0  # flat logits: p = 0.25 everywhere, no region passes the threshold
    targets = rng.integers(0, 4, size=(4, 3, 5, 5)).astype(np.int32)
    regions_params = lift(tm.conv_params(0, jnp.float64), 9)
    regions = segmentation.predict_regions(net3_apply, regions_params, images, THRESHOLD)
    checkpoints = _checkpoints3d()
    loss_fn = segmentation.make_region_losses(net3_apply)
    examples = {"image": images, "target": targets, "region": regions}
    grads = [tm.loop_grads(loss_fn, params, examples) for params, _ in checkpoints]
    yield types.SimpleNamespace(
        images=images, targets=targets, regions_params=regions_params, regions=regions,
        presence=segmentation.region_presence(regions), checkpoints=checkpoints,
        loss_fn=loss_fn, examples=examples, grads=grads)


# ----------------------------------------------------------------------------- depth 1


def test_a_volume_of_depth_one_scores_as_its_slice(x64):
  ckpts2, ckpts3 = _checkpoints2d(), _checkpoints3d()
  regions2, regions3 = tm.conv_params(0, jnp.float64), lift(tm.conv_params(0, jnp.float64), 9)
  train = tm.conv_data(3, 4, dtype=np.float64)["image"]
  test = tm.conv_data(4, 2, dtype=np.float64)["image"]
  train[1] = 0.0  # no region
  targets = np.random.default_rng(0).integers(0, 4, size=(4, 6, 6))
  kwargs = dict(threshold=THRESHOLD, vectorize="loop", region_batch_size=2)  # one shape
  scores2, train2, test2 = segmentation.segmentation_influence(
      tm.conv_apply, ckpts2, train, targets, test, regions_params=regions2, **kwargs)
  scores3, train3, test3 = segmentation.segmentation_influence(
      net3_apply, ckpts3, train[:, None], targets[:, None], test[:, None],
      regions_params=regions3, **kwargs)
  # Same regions (presence), NaN in the same places, the same scores.
  np.testing.assert_array_equal(train3, train2)
  np.testing.assert_array_equal(test3, test2)
  assert train2.any() and not train2[1].any() and test2.any()
  np.testing.assert_array_equal(np.isnan(scores3), np.isnan(scores2))
  finite = np.isfinite(scores2)
  assert np.abs(scores2[finite]).max() > 1e-6
  np.testing.assert_allclose(scores3[finite], scores2[finite], rtol=1e-12, atol=1e-16)

  # The region losses themselves, on one example with a ground-truth target.
  region = segmentation.predict_regions(tm.conv_apply, regions2, train[:1], THRESHOLD)[0]
  example2 = {"image": train[0], "target": targets[0].astype(np.int32), "region": region}
  example3 = jax.tree.map(lambda x: x[None], example2)  # depth 1 in front of H, W
  losses2, losses3 = jax.jit(lambda: (  # one compile, not one per operation
      segmentation.make_region_losses(tm.conv_apply)(ckpts2[0][0], example2),
      segmentation.make_region_losses(net3_apply)(ckpts3[0][0], example3)))()
  assert np.ptp(np.asarray(losses2)) > 0
  np.testing.assert_allclose(losses3, losses2, rtol=1e-13)


def test_region_losses_of_a_volume_are_its_restricted_soft_dice(x64, volumes):
  ex = jax.tree.map(lambda x: x[0], volumes.examples)
  params = volumes.checkpoints[0][0]
  losses, logits = jax.jit(lambda p, e: (volumes.loss_fn(p, e), net3_apply(p, e["image"][None])))(
      params, ex)
  probs = np.asarray(jax.nn.softmax(logits, -1))[0]  # [D, H, W, 4]
  expect = []
  for j in range(1, 4):  # sums over every voxel of the 3-D region
    r, p, y = ex["region"][..., j - 1], probs[..., j], ex["target"] == j
    expect.append(1 - 2 * np.sum(r * p * y) / (np.sum(r * p) + np.sum(r * y) + 1e-6))
  assert ex["region"].any(axis=(1, 2, 3)).sum() >= 2  # regions on more than one slice
  np.testing.assert_allclose(losses, expect, rtol=1e-12)
  with pytest.raises(ValueError, match="target has shape"):
    jax.eval_shape(volumes.loss_fn, params, dict(ex, target=ex["target"][0]))
  with pytest.raises(ValueError, match="region has shape"):
    jax.eval_shape(volumes.loss_fn, params, dict(ex, region=ex["region"][:2]))
  with pytest.raises(ValueError, match="regions must be"):
    segmentation.region_presence(np.zeros((3, 2), bool))


# ----------------------------------------------------------------------------- 3-D TracIn


def _loop_train_influence(volumes):
  """sum_t eta_t <g_b,j, g_a,i> from the plain loop's gradients [n, K, P]."""
  return sum(lr * np.einsum("aip,bjp->aibj", g, g)
             for g, (_, lr) in zip(volumes.grads, volumes.checkpoints))


def test_train_influence_matrices_of_volumes_equal_the_plain_loop(x64, volumes):
  scores, presence, presence_test = segmentation.segmentation_influence(
      net3_apply, volumes.checkpoints, volumes.images, volumes.targets,
      regions_params=volumes.regions_params, threshold=THRESHOLD, batch_size=3,
      vectorize="loop")
  assert presence_test is presence and presence.shape == (4, 3)
  assert presence.any() and not presence[1].any() and not presence.all()
  np.testing.assert_array_equal(presence, volumes.presence)
  blocks = layout.to_class_blocks(scores)  # the three matrices [n, 3n] (Fig. 4)
  expect = layout.to_class_blocks(segmentation.mask_absent(
      _loop_train_influence(volumes), presence, presence))
  assert blocks.shape == (3, 4, 12)
  np.testing.assert_array_equal(np.isnan(blocks), np.isnan(expect))
  finite = np.isfinite(expect)
  assert np.abs(expect[finite]).max() > 1e-6
  np.testing.assert_allclose(blocks[finite], expect[finite], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("vectorize", ["loop", "vmap", "threads"])
def test_every_gradient_path_on_volumes_is_the_plain_loop(x64, volumes, vectorize):
  params = volumes.checkpoints[1][0]
  g = grads_lib.per_example_grads(volumes.loss_fn, params, volumes.examples, vectorize)
  assert g.shape == volumes.grads[1].shape
  np.testing.assert_allclose(g, volumes.grads[1], rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- the store


@pytest.mark.parametrize("kind", ["exact", "countsketch", "logra"])
def test_the_store_of_volumes_holds_the_rows_each_kind_promises(x64, tmp_path, volumes, kind):
  projection = {"exact": None, "countsketch": Projection(24, "countsketch", 3),
                "logra": Projection(24, "logra", 5)}[kind]
  store = store_lib.build_store(tmp_path / "s", volumes.loss_fn, volumes.checkpoints,
                                volumes.examples, projection=projection, batch_size=4,
                                vectorize="loop")
  for t, (params, _) in enumerate(volumes.checkpoints):
    formed = volumes.grads[t].reshape(12, -1)  # the plain loop's rows [n * K, P]
    if kind == "exact":
      expect = formed
    elif kind == "countsketch":
      expect = np.asarray(projection(formed))
    else:  # LoGra: each 3-D convolution's rows are the Kronecker projection of its gradient
      plan = logra.plan(volumes.loss_fn, params, _spec(volumes.examples), projection)
      assert [layer.op for layer in plan.layers] == ["conv", "conv"]
      assert all(layer.in_dim < layer.in_features for layer in plan.layers)
      expect = np.concatenate([
          kronecker_rows(plan, 5, volumes.loss_fn, params,
                         jax.tree.map(lambda x, b=b: x[b], volumes.examples), None)
          for b in range(4)])
    np.testing.assert_allclose(store.rows(t), expect, rtol=1e-10,
                               atol=1e-12 * np.abs(expect).max())
  if kind == "exact":
    np.testing.assert_allclose(store.train_influence(), _loop_train_influence(volumes),
                               rtol=1e-10, atol=1e-15)


def test_3d_conv_patches_give_the_kernel_gradient(x64):
  rng = np.random.default_rng(2)
  x, kernel = rng.normal(size=(3, 4, 5, 2)), rng.normal(size=(3, 3, 2, 2, 4))
  weights = rng.normal(size=(3, 4, 5, 4))  # the output gradient of sum(weights * conv)
  conv = lambda k: jax.lax.conv_general_dilated(x[None], k, (1, 1, 1), "SAME",
                                                dimension_numbers=DN3)[0]
  grad, patches = jax.jit(lambda k: (jax.grad(lambda k: jnp.sum(weights * conv(k)))(k),
                                     projection_lib.conv_patches(x, (3, 3, 2))))(kernel)
  assert patches.shape == (60, 36)
  np.testing.assert_allclose(patches.T @ weights.reshape(-1, 4), grad.reshape(36, 4),
                             rtol=1e-12, atol=1e-12)
  with pytest.raises(ValueError, match="spatial axes"):
    projection_lib.conv_patches(x, (3, 3))


def strided3d_apply(params, images):
  """images [N, 2, 4, 7, 7] (NCDHW) -> [N, 3, ...]: a strided, dilated convolution with an
  OIDHW kernel and asymmetric padding, then a transposed (lhs-dilated) convolution."""
  h = jax.lax.conv_general_dilated(images, params["k1"], (1, 2, 2), ((1, 0), (1, 1), (2, 1)),
                                   rhs_dilation=(1, 1, 2),
                                   dimension_numbers=("NCDHW", "OIDHW", "NCDHW"))
  return jax.lax.conv_transpose(jnp.tanh(h), params["k2"], (2, 2, 2), "VALID",
                                dimension_numbers=("NCDHW", "DHWIO", "NCDHW"))


def strided3d_loss(params, example):
  out = strided3d_apply(params, example["image"][None])[0]
  return jnp.mean(out ** 2, axis=(1, 2, 3)) - example["y"]


@pytest.mark.parametrize("mode", ["both", "inputs", "patches"])
def test_logra_rows_of_a_strided_3d_convolution_every_way(x64, mode):
  rng = np.random.default_rng(3)
  params = {"k1": jnp.asarray(rng.normal(size=(5, 2, 2, 3, 2)) * 0.5),
            "k2": jnp.asarray(rng.normal(size=(2, 2, 2, 5, 3)) * 0.5)}
  example = {"image": rng.normal(size=(2, 4, 7, 7)), "y": rng.normal(size=3)}
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), example)
  plan, forced = _with_mode(logra.plan(strided3d_loss, params, spec, Projection(40, "logra")),
                            mode)
  assert forced >= 1 and len(plan.layers) == 2
  layer_rows, _ = jax.jit(logra.example_rows, static_argnums=0)(
      plan, jax.tree.leaves(params), logra.factors(plan, 0, np.float64), example, None)
  expect = kronecker_rows(plan, 0, strided3d_loss, params, example, None)
  np.testing.assert_allclose(layer_rows, expect[:, :layer_rows.shape[1]], rtol=1e-10,
                             atol=1e-12 * np.abs(expect).max())


# ----------------------------------------------------------------------------- figures


def test_representative_slice_is_the_largest_cross_section():
  mask = np.zeros((5, 4, 4), bool)
  mask[1, :1, :3] = True  # area 3
  mask[2, :2, :3] = True  # area 6
  mask[3, :3, :2] = True  # area 6: a tie, the lower slice wins
  mask[4, 0, 0] = True
  assert figures.representative_slice(mask) == 2
  mask[3, 3, 3] = True  # area 7
  assert figures.representative_slice(mask) == 3
  assert figures.representative_slice(np.zeros((5, 4, 4), bool)) == 2  # empty: the middle
  with pytest.raises(ValueError, match=r"\[D, H, W\]"):
    figures.representative_slice(mask[0])
  image = np.arange(5 * 4 * 4 * 4, dtype=np.float32).reshape(5, 4, 4, 4)
  regions = np.stack([mask, ~mask, np.zeros_like(mask)], axis=-1)
  shown_image, shown_regions, truth, z = figures.shown_slice(image, regions, mask,
                                                             np.ones((5, 4, 4)))
  assert z == 3 and truth.shape == (4, 4)
  np.testing.assert_array_equal(shown_image, image[3])
  np.testing.assert_array_equal(shown_regions, regions[3])
  assert figures.shown_slice(image[0], regions[0])[3] is None  # a slice stays as it is


def test_volumes_are_ranked_and_drawn_at_their_regions_slices(tmp_path, monkeypatch):
  d, size = 4, 6
  train_regions = np.zeros((3, d, size, size, 3), bool)
  train_regions[0, 1, :2, :2, 0] = True  # train 0, class 0: largest at z1
  train_regions[1, 3, :3, :3, 1] = True  # train 1, class 1: z3
  train_regions[1, 0, :1, :1, 1] = True
  train_regions[2, 2, :, :, 2] = True  # train 2, class 2: z2
  test_regions = np.zeros((1, d, size, size, 3), bool)
  test_regions[0, 1, :2, :2, 0] = test_regions[0, 2, :3, :3, 0] = True  # class 0 at z2
  np.testing.assert_array_equal(segmentation.region_presence(train_regions),
                                np.eye(3, dtype=bool))
  both = np.concatenate([test_regions, train_regions])
  assert rankings.local_explanation_examples(both, 2, np.array(["a", "b", "b", "c"])) == [3, 0]

  def volume_set(n, name):
    return types.SimpleNamespace(images=np.zeros((n, d, size, size, 4), np.float32),
                                 labels=np.zeros((n, d, size, size), np.int32),
                                 ids=[(f"{name}{b}", 0) for b in range(n)])

  blocks = np.full((3, 1, 9), np.nan)
  blocks[0, 0, layout.column([0, 1, 2], [0, 1, 2], 3)] = [0.5, 2.0, -1.0]
  figures_seen = []
  monkeypatch.setattr(figures.outputs, "save_figure",
                      lambda fig, path, dpi=100: figures_seen.append(fig))
  figures.plot_local_explanation(0, blocks, volume_set(1, "val"), test_regions,
                                 volume_set(3, "train"), train_regions, ["NCR", "ED", "ET"],
                                 tmp_path / "local.png", k=2)
  titles = [ax.get_title() for ax in figures_seen[0].axes]
  assert "test val0 z2" in titles
  assert "1. ED\ntrain1 z3\n2" in titles  # the top proponent, at its ED region's slice
  assert "1. ET\ntrain2 z2\n-1" in titles  # the top opponent
  assert "2. NCR\ntrain0 z1\n0.5" in titles
