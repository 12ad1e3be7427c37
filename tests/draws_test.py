"""tracin_jax.draws: the vector-then-reshape draws equal JAX's and Flax's, bit for bit."""

import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tracin_jax import draws
from tracin_jax import models
from tracin_jax.models import layers

KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


@pytest.mark.parametrize("impl", KEY_IMPLS)
def test_normal_equals_jax_random_normal(impl):
  key = jax.random.key(7, impl=impl)
  for shape in [(5,), (2, 6, 6, 4)]:
    np.testing.assert_array_equal(draws.normal(key, shape), jax.random.normal(key, shape))
  keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(3))  # as the saliency
  np.testing.assert_array_equal(jax.vmap(lambda k: draws.normal(k, (6, 6, 4)))(keys),
                                jax.vmap(lambda k: jax.random.normal(k, (6, 6, 4)))(keys))


def test_fan_in_is_the_variance_scaling_count():
  assert draws.fan_in((3, 3, 4, 8)) == 36
  assert draws.fan_in((1, 1, 16, 4)) == 16
  assert draws.fan_in((8, 2, 2, 4), in_axis=0, out_axis=(1, 2, 3)) == 8
  assert draws.fan_in((6, 5)) == 6


@pytest.mark.parametrize("impl", KEY_IMPLS)
def test_lecun_normal_equals_flax(impl):
  key = jax.random.key(3, impl=impl)
  for shape, axes in [((3, 3, 4, 8), {}), ((6, 5), {}),
                      ((8, 2, 2, 4), {"in_axis": 0, "out_axis": (1, 2, 3)})]:
    ours = draws.lecun_normal(**axes)(key, shape)
    theirs = nnx.initializers.lecun_normal(**axes)(key, shape)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


def test_a_unet_is_initialised_as_with_flax_own_initializer(monkeypatch):
  """Every model's convolutions go through `layers.conv` (default axes) and the UNet's
  up-convolution uses the transposed axes: the UNet has both."""
  # RBG keys: Flax's own draws of 4-D kernels then compile in a fifth of the time (the
  # equality holds for every key implementation, above).
  def build():
    rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
    return nnx.state(models.get_model("unet", base_width=4, depth=2, rngs=rngs), nnx.Param)

  ours = build()
  monkeypatch.setattr(draws, "lecun_normal", nnx.initializers.lecun_normal)
  theirs = build()
  leaves, tree = jax.tree.flatten(ours)
  assert tree == jax.tree.structure(theirs) and len(leaves) > 10
  for a, b in zip(leaves, jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)
  assert any(float(jnp.std(leaf)) > 0 for leaf in leaves)  # drawn, not all zeros


def test_the_models_build_every_convolution_through_layers_conv():
  """So that every model's parameters are drawn the fast way (and equal to Flax's)."""
  package = pathlib.Path(models.__file__).parent
  constructors = ("nnx.Conv(", "nnx.ConvTranspose(", "DepthStackedConv(")
  for path in package.glob("*.py"):
    text = path.read_text().replace("class DepthStackedConv(", "")
    assert sum(text.count(c) for c in constructors) == 0, path.name  # only layers.conv builds
    # layers.conv: one construction of nnx.Conv or its DepthStackedConv, drawn the fast way.
    assert text.count("kernel_init=draws.lecun_normal()") == (path.name == "layers.py"), path.name
  assert layers.DepthStackedConv.__mro__[1] is nnx.Conv


# --------------------------------------------------------------------------------------------
# Drawn together: recorded, drawn in one call, replayed.

# The shapes above (their eager draws are compiled already), with their axes.
LAYOUTS = [((3, 3, 4, 8), {}), ((6, 5), {}), ((8, 2, 2, 4), {"in_axis": 0, "out_axis": (1, 2, 3)})]


@pytest.mark.parametrize("impl", KEY_IMPLS)
def test_the_bits_of_n_elements_are_the_first_n_of_more(impl):
  """What drawing a group at its largest size and cutting each row back rests on."""
  key = jax.random.key(11, impl=impl)
  more = np.asarray(jax.random.bits(key, (1000,)))
  for n in (7, 999):
    np.testing.assert_array_equal(jax.random.bits(key, (n,)), more[:n])
  assert draws.drawn_together(key)


def test_older_threefry_keys_and_traced_keys_are_not_drawn_together():
  key = jax.random.key(11)
  with jax.threefry_partitionable(False):
    # Its bits for n elements are not the first n of more: it must not be drawn together.
    assert not np.array_equal(jax.random.bits(key, (7,)), jax.random.bits(key, (8,))[:7])
    assert not draws.drawn_together(key)
  assert draws.drawn_together(key)
  assert not draws.drawn_together(jax.random.split(key, 2))  # a batch of keys
  assert not draws.drawn_together(jax.random.key_data(key))  # raw uint32 data
  traced = []
  jax.eval_shape(lambda k: traced.append(draws.drawn_together(k)), key)
  assert traced == [False]
  with draws.recording() as record:
    draws.lecun_normal()(jax.random.split(key, 2), (3, 4))
  assert not record.together


@pytest.mark.parametrize("impl", KEY_IMPLS)
def test_lecun_normal_together_equals_the_draws_one_by_one(impl):
  base = jax.random.key(5, impl=impl)
  keys = [jax.random.fold_in(base, i) for i in range(2 * len(LAYOUTS))]
  layouts = LAYOUTS + LAYOUTS[::-1]  # each shape twice, with other keys
  with draws.recording() as record:
    zeros = [draws.lecun_normal(**axes)(k, shape) for k, (shape, axes) in zip(keys, layouts)]
  assert record.together and len(record.requests) == len(layouts)
  assert all(isinstance(z, np.ndarray) and not z.any() for z in zeros)
  assert [r.fan_in for r in record.requests[:3]] == [36, 6, 8]
  # One group padded to the largest size, and one group per size (a kernel costs nothing).
  for numbers_per_kernel in (1 << 22, 0):
    together = draws.lecun_normal_together(record.requests, numbers_per_kernel)
    for value, k, (shape, axes) in zip(together, keys, layouts):
      want = nnx.initializers.lecun_normal(**axes)(k, shape)
      assert value.shape == want.shape and value.dtype == want.dtype
      np.testing.assert_array_equal(value, want)
      np.testing.assert_array_equal(value, draws.lecun_normal(**axes)(k, shape))


def _cost(groups, sizes, numbers_per_kernel):
  return sum(numbers_per_kernel + len(g) * max(sizes[i] for i in g) for g in groups)


def test_size_groups_are_the_cheapest_runs_of_sorted_sizes():
  rng = np.random.default_rng(0)
  for _ in range(20):
    sizes = [int(s) for s in rng.integers(1, 200, size=rng.integers(1, 8))]
    per_kernel = int(rng.integers(0, 400))
    groups = draws.size_groups(sizes, per_kernel)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    assert [i for g in groups for i in g] == order  # runs of the sorted sizes
    # Against every split of the sorted sizes into runs (the plain search).
    best = min(
        _cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], sizes, per_kernel)
        for r in range(len(order))
        for cuts in itertools.combinations(range(1, len(order)), r))
    assert _cost(groups, sizes, per_kernel) == best
  assert draws.size_groups([5, 1, 3], 10**9) == [[1, 2, 0]]
  assert draws.size_groups([5, 1, 3], 0) == [[1], [2], [0]]
  assert draws.size_groups([], 1) == []


def test_replaying_refuses_other_draws():
  key = jax.random.key(0)
  with draws.recording() as record:
    draws.lecun_normal()(key, (3, 4))
  values = draws.lecun_normal_together(record.requests)
  with draws.replaying(record.requests, values):
    np.testing.assert_array_equal(draws.lecun_normal()(key, (3, 4)), values[0])
  with pytest.raises(RuntimeError, match=r"draw 0 of the replayed construction is \(4, 3\)"):
    with draws.replaying(record.requests, values):
      draws.lecun_normal()(key, (4, 3))
  with pytest.raises(RuntimeError, match="draw 1 of the replayed"):
    with draws.replaying(record.requests, values):
      draws.lecun_normal()(key, (3, 4))
      draws.lecun_normal()(key, (3, 4))
  with pytest.raises(RuntimeError, match="drew 0 of the 1 recorded draws"):
    with draws.replaying(record.requests, values):
      pass
  with pytest.raises(ValueError, match="1 requests and 0 values"):
    with draws.replaying(record.requests, []):
      pass
  # Outside the blocks, draws are made as ever.
  np.testing.assert_array_equal(draws.lecun_normal()(key, (3, 4)),
                                nnx.initializers.lecun_normal()(key, (3, 4)))


@pytest.mark.parametrize("impl", KEY_IMPLS + ("threefry, not partitionable",))
def test_build_is_the_plain_construction(impl):
  """`models.build` on layers of both kernel layouts (of `LAYOUTS`' shapes: their eager
  draws are compiled once) and a norm: the same parameters and the same streams after,
  drawn together or (older threefry) as they are."""
  old = impl.endswith("not partitionable")

  def construct(rngs):
    return nnx.List([layers.conv(4, 8, (3, 3), rngs=rngs),
                     layers.make_norm("group", 8, norm_groups=4, rngs=rngs),
                     layers.Upsample(8, 4, mode="transpose", rngs=rngs)])

  with jax.threefry_partitionable(not old):
    streams = [nnx.Rngs(jax.random.key(2, impl="threefry2x32" if old else impl)) for _ in "ab"]
    with draws.recording() as record:
      construct(nnx.clone(streams[0]))
    assert record.together != old and len(record.requests) == (0 if old else 2)
    fast, plain = models.build(construct, streams[0]), construct(streams[1])
  for got, want in [(nnx.state(fast), nnx.state(plain)),
                    (nnx.state(streams[0]), nnx.state(streams[1]))]:
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want) >= 2  # the blocks' parameters; a stream's key and count
    for a, b in zip(got, want):
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      np.testing.assert_array_equal(a, b)
