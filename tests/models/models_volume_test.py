"""Tests for the models in 3D (`spatial_dims=3`): the same blocks and variants by spatial
rank, checked against the 2D ones they generalise. Tiny shapes: volumes [N, 4, 8, 8, 4]
(D x H x W), base width 2, depth 1 and 2; one compiled 3D value-and-gradient for several
tests."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tracin_jax import models
from tracin_jax.models import layers

VARIANTS = ("unet", "resunet", "attention_unet", "deepseg")
N, D, SIZE, WIDTH, DEPTH, CLASSES = 2, 4, 8, 2, 1, 4


def _normal(*shape, seed=0):
  # numpy's generator: jax.random's threefry takes seconds to compile on XLA:CPU.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def embed_2d(params3d, params2d):
  """The 3D parameters that compute the 2D model on every slice of a volume whose slices
  are all one image: each 3x3 kernel [3, 3, Ci, Co] in the centre depth plane of the 3x3x3
  one (the other planes zero, so they add nothing), each 1x1 kernel as the 1x1x1 one, each
  up-convolution kernel [Ci, 2, 2, Co] in both depth planes of [Ci, 2, 2, 2, Co]; norms and
  biases as they are."""

  def embed(path, a3, a2):
    a2 = np.asarray(a2)
    if a3.shape == a2.shape:
      out = a2
    elif a3.shape == (3, *a2.shape):  # 3x3x3 convolution kernel
      out = np.zeros(a3.shape, a2.dtype)
      out[1] = a2
    elif a3.shape == (1, *a2.shape):  # 1x1x1 convolution kernel
      out = a2[None]
    elif a3.shape == (a2.shape[0], 2, *a2.shape[1:]):  # transposed 2x2x2 kernel: depth axis 1
      out = np.repeat(a2[:, None], 2, axis=1)
    else:
      raise AssertionError(f"{jax.tree_util.keystr(path)}: no 2D counterpart for {a3.shape} "
                         f"in {a2.shape}")
    return jax.device_put(out)  # a copy on the device: no compiled op per shape

  return jax.tree_util.tree_map_with_path(embed, params3d, params2d)


# --------------------------------------------------------------------------------------------
# Blocks on a volume of depth 1 against the 2D blocks.


@pytest.fixture(scope="module")
def streams():
  return nnx.Rngs(jax.random.key(0, impl="rbg"))


def _pair(make):
  """A jitted f(params_3d, *images) -> (2D block on images, 3D block on them as volumes of
  depth 1), the 2D parameters fixed; and the 3D parameters: the 2D ones embedded
  (`embed_2d`) and the 3D block's own draws."""
  two, three = make(2), make(3)
  graph_3d, own, rest = nnx.split(three, nnx.Param, ...)

  @jax.jit
  def apply(params_3d, *images):
    return (two(*images),
            nnx.merge(graph_3d, params_3d, rest)(*(x[:, None] for x in images)))

  return apply, embed_2d(own, nnx.state(two, nnx.Param)), own


def test_conv_block_on_one_slice_is_the_2d_block(streams):
  # Residual, GroupNorm, widths 3 -> 2: both 3x3x3 convolutions, the norms and the 1x1x1
  # projection on the shortcut.
  apply, embedded, own = _pair(lambda k: layers.ConvBlock(
      3, 2, norm="group", residual=True, norm_groups=2, spatial_dims=k, rngs=streams))
  assert own["conv1"]["kernel"].shape == (3, 3, 3, 3, 2)
  assert own["shortcut"]["kernel"].shape == (1, 1, 1, 3, 2)
  image = _normal(N, SIZE, SIZE, 3)
  want, got = apply(embedded, image)
  assert got.shape == (N, 1, SIZE, SIZE, 2)
  np.testing.assert_allclose(got[:, 0], want, rtol=1e-5, atol=1e-6)
  # With depth planes of its own the 3D block is another function.
  assert not np.allclose(apply(own, image)[1][:, 0], want, atol=1e-3)


@pytest.mark.parametrize("mode", layers.UPSAMPLE_MODES)
def test_upsample_of_one_slice_is_the_2d_upsample_on_both_slices(streams, mode):
  apply, embedded, own = _pair(
      lambda k: layers.Upsample(3, 2, mode=mode, spatial_dims=k, rngs=streams))
  if mode == "transpose":
    assert own["kernel"].shape == (3, 2, 2, 2, 2)
  image = _normal(N, 3, 4, 3, seed=1)
  want, got = apply(embedded, image)
  assert got.shape == (N, 2, 6, 8, 2)
  for d in range(2):
    np.testing.assert_allclose(got[:, d], want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(apply(own, image)[1][:, 0], want, atol=1e-3)


def test_transpose_upsample_is_a_3d_transposed_convolution(streams):
  """The matrix product and depth-to-space is `lax.conv_transpose` with a 2x2x2 kernel and
  stride 2 (the 2D form is checked in models_test.py)."""
  up = layers.Upsample(3, 2, mode="transpose", spatial_dims=3, rngs=streams)
  up.bias[...] = jnp.arange(2.0)
  x = _normal(2, 2, 3, 4, 3, seed=2)
  kernel = up.kernel[...].transpose(1, 2, 3, 0, 4)[::-1, ::-1, ::-1]  # [2, 2, 2, Ci, Co]

  @jax.jit
  def both(x, kernel, bias):
    reference = jax.lax.conv_transpose(
        x, kernel, (2, 2, 2), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return up(x), reference + bias

  got, want = both(x, kernel, up.bias[...])
  assert got.shape == (2, 4, 6, 8, 2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_attention_gate_on_one_slice_is_the_2d_gate(streams):
  apply, embedded, own = _pair(
      lambda k: layers.AttentionGate(3, 2, 2, spatial_dims=k, rngs=streams))
  assert own["psi"]["kernel"].shape == (1, 1, 1, 2, 1)
  skip, gate = _normal(N, 4, 4, 3, seed=3), _normal(N, 4, 4, 2, seed=4)
  want, got = apply(embedded, skip, gate)
  np.testing.assert_allclose(got[:, 0], want, rtol=1e-5, atol=1e-6)


def test_pooling_and_nearest_upsampling_in_3d():
  x = _normal(N, 4, 6, 2, 3, seed=5)
  image = x[:, 0]

  @jax.jit
  def both_ranks(x, image):
    pairs = jnp.stack([image, image], 1)  # a volume of two identical slices
    return (layers.max_pool2(x), layers.max_pool2(pairs), layers.max_pool2(image),
            layers.upsample_nearest2(x), layers.upsample_nearest2(image[:, None]),
            layers.upsample_nearest2(image))

  pooled, pooled_pairs, pooled_image, up, up_slice, up_image = both_ranks(x, image)
  # Against the plain loop over the 2x2x2 windows.
  want = np.zeros((N, 2, 3, 1, 3), np.float32)
  for i in range(2):
    for j in range(3):
      want[:, i, j, 0] = np.asarray(x)[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2, :2].max(
          axis=(1, 2, 3))
  np.testing.assert_array_equal(pooled, want)
  np.testing.assert_array_equal(pooled_pairs[:, 0], pooled_image)
  assert up.shape == (N, 8, 12, 4, 3)
  np.testing.assert_array_equal(up, np.asarray(x).repeat(2, 1).repeat(2, 2).repeat(2, 3))
  for d in range(2):  # a slice upsampled to two, each the 2D upsampling
    np.testing.assert_array_equal(up_slice[:, d], up_image)


def test_channel_mask_broadcasts_over_a_volume():
  hidden, masks = _normal(N, 2, 2, 2, 3, seed=6), np.asarray([[1.0, 0.0, 2.0], [0.5, 1, 1]])
  np.testing.assert_array_equal(models.apply_channel_mask(hidden, masks),
                                np.asarray(hidden) * np.asarray(masks)[:, None, None, None])
  np.testing.assert_array_equal(models.apply_channel_mask(hidden, masks[0]),
                                np.asarray(hidden) * np.asarray(masks[0]))


# --------------------------------------------------------------------------------------------
# Whole models: one compiled value-and-gradient of the 3D UNet serves the tests below.


def _loss(apply_fn):
  def loss(params, images, mask):
    logits, hidden = apply_fn(params, images, channel_mask=mask, return_hidden=True)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) * -1.0, (logits, hidden)

  return loss


@pytest.fixture(scope="module")
def unet3d():
  """(model, jitted value_and_grad of the background cross-entropy, with the logits and the
  hidden features as aux; params)."""
  model = models.get_model("unet", base_width=WIDTH, depth=DEPTH, spatial_dims=3, seed=0)
  apply_fn, params, _ = models.functional(model)
  return model, jax.jit(jax.value_and_grad(_loss(apply_fn), has_aux=True)), params


@pytest.fixture(scope="module")
def volume():
  return _normal(N, D, SIZE, SIZE, 4, seed=7)


ONES = np.ones((N, WIDTH), np.float32)  # the channel mask that masks nothing, [N, C]


def _head(model, hidden):
  """The 1x1x1 head in numpy: hidden [N, D, H, W, C] -> logits [N, D, H, W, K]."""
  kernel = np.asarray(model.head.kernel[...])
  assert kernel.shape[:3] == (1, 1, 1)
  return np.einsum("...c,ck->...k", np.asarray(hidden), kernel[0, 0, 0]) + np.asarray(
      model.head.bias[...])


def test_3d_output_shapes_and_last_hidden_layer(unet3d, volume):
  model, value_and_grad, params = unet3d
  assert model.spatial_dims == 3 and model.LAST_HIDDEN == models.LAST_HIDDEN
  assert isinstance(getattr(model, model.LAST_HIDDEN), layers.ConvBlock)
  (_, (logits, hidden)), _ = value_and_grad(params, volume, ONES)
  assert logits.shape == (N, D, SIZE, SIZE, CLASSES) and logits.dtype == jnp.float32
  assert hidden.shape == (N, D, SIZE, SIZE, model.last_hidden_channels)
  assert np.all(np.isfinite(logits)) and np.all(hidden >= 0)
  np.testing.assert_allclose(_head(model, hidden), logits, rtol=1e-5, atol=1e-5)
  # A per-example channel mask reaches the head; hidden is returned unmasked.
  masks = np.asarray([[0.0, 1.0], [1.0, 0.0]], np.float32)
  (_, (masked, hidden_out)), _ = value_and_grad(params, volume, masks)
  np.testing.assert_array_equal(hidden_out, hidden)
  np.testing.assert_allclose(
      masked, _head(model, np.asarray(hidden) * masks[:, None, None, None]),
      rtol=1e-5, atol=1e-5)
  assert not np.allclose(masked, logits, atol=1e-4)


def test_3d_gradient_step_lowers_the_loss(unet3d, volume):
  _, value_and_grad, params = unet3d
  (loss, _), grads = value_and_grad(params, volume, ONES)
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == len(jax.tree.leaves(params)) > 10
  assert all(np.all(np.isfinite(g)) for g in leaves)
  # Every 3x3x3 kernel gets a gradient in each of its depth planes: a 3D network, not a
  # stack of slices.
  kernels = [np.asarray(g) for g in leaves if g.shape[:3] == (3, 3, 3)]
  assert len(kernels) == 6
  for g in kernels:
    assert np.all(np.abs(g).reshape(3, -1).max(axis=1) > 0)
  # The step in numpy: no compiled op per parameter shape.
  stepped = jax.tree.map(lambda p, g: np.asarray(p) - 0.05 * np.asarray(g), params, grads)
  (loss_after, _), _ = value_and_grad(stepped, volume, ONES)
  assert float(loss_after) < float(loss) - 1e-4


def test_3d_unet_on_identical_slices_is_the_2d_unet_on_each(unet3d):
  """The whole network by rank: its 3x3x3 kernels holding the 2D kernels in the centre
  depth plane (and the up-convolutions in both), on a volume whose slices are one image,
  gives the 2D UNet's logits and hidden features on every slice (GroupNorm's statistics
  over D x H x W equal those over H x W there; float32 rounding aside)."""
  model, value_and_grad, params = unet3d
  flat = models.get_model("unet", base_width=WIDTH, depth=DEPTH, seed=1)
  apply_2d, params_2d, _ = models.functional(flat)
  image = _normal(N, SIZE, SIZE, 4, seed=8)
  want_logits, want_hidden = jax.jit(apply_2d, static_argnames="return_hidden")(
      params_2d, image, return_hidden=True)
  embedded = embed_2d(params, params_2d)
  replicated = np.repeat(np.asarray(image)[:, None], D, axis=1)
  (_, (logits, hidden)), _ = value_and_grad(embedded, replicated, ONES)
  for d in range(D):
    np.testing.assert_allclose(logits[:, d], want_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hidden[:, d], want_hidden, rtol=1e-4, atol=1e-5)
  # The 3D model's own parameters are another function.
  (_, (own, _)), _ = value_and_grad(params, replicated, ONES)
  assert not np.allclose(own[:, 0], want_logits, atol=1e-3)


@pytest.mark.slow  # one more compiled 3D forward pass, vmapped: 1 to 4 s
def test_3d_functional_vmaps_one_volume_at_a_time(unet3d, volume):
  """Per-example computations (TracIn's gradients) see one volume as [1, D, H, W, C]: the
  vmapped functional view equals the batched call, GroupNorm being per example."""
  model, value_and_grad, params = unet3d
  apply_fn, _, _ = models.functional(model)
  (_, (batched, _)), _ = value_and_grad(params, volume, ONES)
  one = jax.jit(jax.vmap(lambda x: apply_fn(params, x[None])[0]))(volume)
  np.testing.assert_allclose(one, batched, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a 2D and a 3D forward pass compiled per variant, depth 2: 3 to 8 s each
@pytest.mark.parametrize("name", VARIANTS)
def test_every_3d_variant_on_identical_slices_is_its_2d_variant(name):
  depth = 2
  volume_model = models.get_model(name, base_width=WIDTH, depth=depth, spatial_dims=3, seed=0)
  flat = models.get_model(name, base_width=WIDTH, depth=depth, seed=1)
  apply_3d, params_3d, _ = models.functional(volume_model)
  apply_2d, params_2d, _ = models.functional(flat)
  image = _normal(1, SIZE, SIZE, 4, seed=9)
  want = jax.jit(apply_2d)(params_2d, image)
  got = jax.jit(apply_3d)(embed_2d(params_3d, params_2d),
                          np.repeat(np.asarray(image)[:, None], D, axis=1))
  assert got.shape == (1, D, SIZE, SIZE, CLASSES)
  for d in range(D):
    np.testing.assert_allclose(got[:, d], want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Parameters by rank, construction, bad input.


def _abstract(name, spatial_dims, **kwargs):
  """The model's parameter shapes, nothing drawn or compiled."""
  return nnx.state(nnx.eval_shape(lambda: models.get_model(
      name, base_width=4, depth=2, spatial_dims=spatial_dims, **kwargs)), nnx.Param)


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_counts_by_rank(name):
  """Leaf by leaf: a 3x3x3 kernel holds 3 times the 3x3 one, a 2x2x2 up-convolution 2 times
  the 2x2, a 1x1x1 kernel, a bias or a norm as many."""
  flat, volume = _abstract(name, 2), _abstract(name, 3)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(flat)]
  assert jax.tree.structure(flat) == jax.tree.structure(volume)
  ratios = {}
  for path, a, b in zip(paths, jax.tree.leaves(flat), jax.tree.leaves(volume)):
    if a.ndim != 4:  # biases, norms' scales and offsets
      window = 1
    elif re.fullmatch(r"\['up'\]\[\d+\]\['kernel'\].*", path):  # [Ci, 2, 2, Co]
      window = a.shape[1]
    else:  # a convolution kernel [k, k, Ci, Co]
      window = a.shape[0]
    assert b.ndim == a.ndim + (a.ndim == 4), path
    assert b.size == window * a.size, (path, a.shape, b.shape)
    ratios[window] = ratios.get(window, 0) + 1
  assert ratios[3] >= 8 and ratios[1] > 0
  assert (2 in ratios) == (name != "deepseg")  # the transposed up-convolutions


def test_3d_unet_parameter_count_matches_closed_form():
  # The 2D closed form in models_test.py, 98 w^2 + 49 w + 4 (depth 1, no norm), with
  # 27-element 3x3x3 and 8-element 2x2x2 windows: (10 * 27 + 2 * 8) w^2 + (4 * 27 + 13) w + 4.
  w = 4
  model = nnx.eval_shape(lambda: models.get_model("unet", base_width=w, depth=1, norm="none",
                                                  spatial_dims=3))
  assert models.count_params(model) == 286 * w**2 + 121 * w + 4


def _streams(form, seed=0):
  return nnx.Rngs(jax.random.key(seed, impl="rbg")) if form == "seed" else nnx.Rngs(seed)


def _bits(tree):
  return [np.asarray(jax.random.key_data(x)) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
          else np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("form", [
    "seed",
    # threefry's eager draws compile one per shape, about 1 s each on a busy 2-core machine
    pytest.param("rngs", marks=pytest.mark.slow)])
def test_3d_construction_drawn_together_is_the_plain_one(form):
  # The UNet has 3x3x3, 1x1x1 (head) and transposed 2x2x2 kernels: both layouts of draw.
  kwargs = dict(base_width=WIDTH, depth=DEPTH, spatial_dims=3)
  fast_rngs, plain_rngs = _streams(form), _streams(form)
  fast = models.get_model("unet", **kwargs, rngs=fast_rngs)
  plain = models.UNet(**kwargs, rngs=plain_rngs)
  got, want = _bits(nnx.state(fast)), _bits(nnx.state(plain))
  assert len(got) == len(want) > 10
  for a, b in zip(got, want):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_bits(nnx.state(fast_rngs)), _bits(nnx.state(plain_rngs))):
    np.testing.assert_array_equal(a, b)  # the streams advanced alike
  if form == "seed":  # seed=s stands for RBG streams of s, in 3D as in 2D
    by_seed = models.get_model("unet", **kwargs, seed=0)
    for a, b in zip(_bits(nnx.state(by_seed)), want):
      np.testing.assert_array_equal(a, b)


def test_spatial_dims_other_than_2_or_3_is_refused():
  for bad in (1, 4, True, 3.0, "3"):
    with pytest.raises(ValueError, match=rf"spatial_dims must be 2 .* or 3 .*got {bad!r}"):
      models.get_model("unet", base_width=2, depth=1, spatial_dims=bad)
  assert layers.check_spatial_dims(np.int64(3)) == 3  # an integer from numpy is one
  with pytest.raises(ValueError, match="spatial_dims must be 2"):
    layers.ConvBlock(2, 2, norm="none", spatial_dims=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="spatial_dims must be 2"):
    layers.Upsample(2, 2, mode="transpose", spatial_dims=4, rngs=nnx.Rngs(0))


def test_bad_volume_shape_raises_naming_it(unet3d):
  model = unet3d[0]
  flat = nnx.eval_shape(lambda: models.get_model("unet", base_width=WIDTH, depth=DEPTH))
  with pytest.raises(ValueError, match=r"volume size \(D x H x W\) 3x8x8 of images of shape "
                     r"\(1, 3, 8, 8, 4\) is not divisible by 2\*\*depth = 2 \(depth=1\)"):
    model(np.zeros((1, 3, SIZE, SIZE, 4)))
  with pytest.raises(ValueError, match=r"volume size \(D x H x W\) 4x8x5"):
    model(np.zeros((1, 4, SIZE, 5, 4)))
  with pytest.raises(ValueError, match=r"images must be \[N, D, H, W, 4\] .*spatial_dims=3.*"
                     r"got shape \(1, 8, 8, 4\)"):
    model(np.zeros((1, SIZE, SIZE, 4)))
  with pytest.raises(ValueError, match=r"images must be \[N, D, H, W, 4\]"):
    model(np.zeros((1, D, SIZE, SIZE, 3)))
  with pytest.raises(ValueError, match=r"images must be \[N, H, W, 4\] .*need spatial_dims=3"):
    flat(np.zeros((1, D, SIZE, SIZE, 4)))


# --------------------------------------------------------------------------------------------
# conv3d="stacked": the same layers computed as 2D convolutions of depth-stacked channels.


def test_depth_stacked_conv_is_the_3d_convolution_in_float64():
  with jax.enable_x64(True):
    x = np.random.default_rng(3).standard_normal((2, 3, 5, 4, 3))  # D = 3: both borders
    make = lambda mode: layers.conv(3, 2, (3, 3, 3), use_bias=True, conv3d=mode,
                                    param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    direct, stacked = make("direct"), make("stacked")
    assert type(stacked) is layers.DepthStackedConv and type(direct) is nnx.Conv
    k = np.asarray(direct.kernel[...])
    np.testing.assert_array_equal(stacked.kernel[...], k)  # the same draws
    bias = np.asarray([0.5, -0.25])
    for layer in (direct, stacked):
      layer.bias[...] = jnp.asarray(bias)
    graph_d, params_d = nnx.split(direct)
    graph_s, _ = nnx.split(stacked)

    def outputs(params, x):  # both layers on the direct one's parameters, and a VJP of each
      out_d, vjp_d = jax.vjp(lambda p, x: nnx.merge(graph_d, p)(x), params, x)
      out_s, vjp_s = jax.vjp(lambda p, x: nnx.merge(graph_s, p)(x), params, x)
      cotangent = jnp.cos(out_d)
      return out_d, out_s, vjp_d(cotangent), vjp_s(cotangent)

    got_direct, got_stacked, grads_d, grads_s = jax.jit(outputs)(params_d, jnp.asarray(x))
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_d)):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # A plain sum over the 27 offsets, zero outside the volume.
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)])
    want = sum(np.einsum("ndhwc,co->ndhwo", padded[:, a:a + 3, b:b + 5, e:e + 4], k[a, b, e])
               for a in range(3) for b in range(3) for e in range(3)) + bias
    np.testing.assert_allclose(got_stacked, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_direct, want, rtol=1e-12, atol=1e-12)


def test_stacked_3d_unet_has_the_direct_parameters_and_outputs(unet3d, volume):
  model, value_and_grad, params = unet3d
  stacked = models.get_model("unet", base_width=WIDTH, depth=DEPTH, spatial_dims=3,
                             conv3d="stacked", seed=0)
  kinds = {type(m).__name__ for _, m in nnx.iter_graph(stacked) if isinstance(m, nnx.Conv)}
  assert kinds == {"DepthStackedConv", "Conv"}  # the 1x1x1 head stays direct
  apply_fn, params_s, _ = models.functional(stacked)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_s)):
    np.testing.assert_array_equal(a, b)
  (_, (logits_d, _)), _ = value_and_grad(params, volume, ONES)
  np.testing.assert_allclose(jax.jit(apply_fn)(params, volume), logits_d, rtol=1e-5,
                             atol=1e-5)


def test_conv3d_is_checked():
  with pytest.raises(ValueError, match=r"conv3d='stacked' .* needs spatial_dims=3 \(volumes\), "
                     r"got spatial_dims=2"):
    models.get_model("unet", base_width=2, depth=1, conv3d="stacked")
  with pytest.raises(ValueError, match=r"conv3d must be one of \('direct', 'stacked'\), got "
                     r"'fast'"):
    models.get_model("unet", base_width=2, depth=1, spatial_dims=3, conv3d="fast")
  with pytest.raises(ValueError, match="stride-1 'SAME' convolutions only"):
    layers.conv(2, 2, (3, 3, 3), strides=2, conv3d="stacked", rngs=nnx.Rngs(0))
