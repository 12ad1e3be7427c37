"""LoGra: rows formed inside the model equal the Kronecker projection of the formed gradient
(every layer kind, both ways of forming them), the store built with them is unbiased for
exact TracIn over seeds, and round-trips, resumes and refuses like any store."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax import models
from tracin_jax.influence import logra
from tracin_jax.influence import segmentation
from tracin_jax.influence import store as store_lib
from tracin_jax.influence.projection import Projection
import store_worker as worker
import tiny_models as tm

# ----------------------------------------------------------------------------- models


def strided_apply(params, images):
  """images [N, 2, 9, 9] (NCHW) -> [N, 3, 4, 4]: a stride-2, dilation-2 convolution with
  asymmetric padding and an OIHW kernel, then a transposed convolution (lhs-dilated)."""
  h = jax.lax.conv_general_dilated(images, params["k1"], (2, 2), ((1, 0), (2, 1)),
                                   rhs_dilation=(2, 1), dimension_numbers=("NCHW", "OIHW",
                                                                           "NCHW"))
  h = jnp.tanh(h)
  return jax.lax.conv_transpose(h, params["k2"], (2, 2), "VALID",
                                dimension_numbers=("NCHW", "HWIO", "NCHW"))


def strided_params(seed, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  return {"k1": jnp.asarray(rng.normal(size=(5, 2, 3, 2)) * 0.5, dtype),
          "k2": jnp.asarray(rng.normal(size=(2, 2, 5, 3)) * 0.5, dtype)}


def strided_loss(params, example):
  out = strided_apply(params, example["image"][None])[0]
  return jnp.mean(out ** 2, axis=(1, 2)) - example["y"]


def strided_data(seed, n):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, 2, 9, 9)), "y": rng.normal(size=(n, 3))}


def weight_first_loss(params, example):
  """A product whose weight is the first operand, as the UNet's up-convolution writes it."""
  y = jnp.einsum("cabo,hwc->abhwo", params["w"], example["x"]) + params["b"]
  return jnp.sum(jnp.tanh(y), axis=(0, 1, 2, 3))


def weight_first_params(seed, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(3, 2, 2, 4)), dtype), "b": jnp.zeros(4, dtype)}


def weight_first_data(seed, n):
  return {"x": np.random.default_rng(seed).normal(size=(n, 3, 3, 3))}


def tied_loss(params, example):
  """The second convolution's kernel is used twice: it cannot be captured (rest)."""
  dn = ("NHWC", "HWIO", "NHWC")
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
  h = jnp.tanh(conv(example["image"][None], params["c1"]) + params["b1"])
  out = conv(jnp.tanh(conv(h, params["c2"])), params["c2"])[0]
  return (jnp.mean(out, axis=(0, 1))[1:] - example["y"]) ** 2


_UNET = {}


def unet():
  """A tiny UNet (base 2, depth 1, GroupNorm, transposed-convolution up-sampling), float64."""
  if not _UNET:
    model = models.get_model("unet", base_width=2, depth=1, num_classes=4, norm_groups=2)
    apply_fn, params, state = models.functional(model)
    _UNET["loss"] = segmentation.make_region_losses(apply_fn)
    _UNET["params"] = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    _UNET["state"] = state
  return _UNET["loss"], _UNET["params"], _UNET["state"]


def unet_data(seed, n, size=8):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, size, size, 4)),
          "target": rng.integers(0, 4, size=(n, size, size)).astype(np.int32),
          "region": rng.random((n, size, size, 3)) > 0.5}


CASES = {
    "conv": lambda: (tm.conv_loss, tm.conv_params(0, jnp.float64), None,
                     tm.conv_data(0, 2, dtype=np.float64)),
    "strided_and_transposed_conv": lambda: (strided_loss, strided_params(0), None,
                                            strided_data(1, 2)),
    "dense": lambda: (tm.mlp_loss, tm.mlp_params(0, jnp.float64), None,
                      tm.mlp_data(0, 2, np.float64)),
    "weight_first_dense": lambda: (weight_first_loss, weight_first_params(0), None,
                                   weight_first_data(2, 2)),
    "unet": lambda: (*unet(), unet_data(3, 2)),
}

# ----------------------------------------------------------------------------- reference


def _example(data, b):
  return jax.tree.map(lambda x: x[b], data)


def _spec(data):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), data)


_JACOBIANS = {}


def _jacobian(loss_fn, params, example, state):
  """The formed per-output gradients, leaves [K, *shape] (one jitted jacrev per loss)."""
  if loss_fn not in _JACOBIANS:
    def jacobian(params, example, state):
      def f(p):
        out = loss_fn(p, example) if state is None else loss_fn(p, example, state)
        return jnp.reshape(out, (-1,))
      return jax.jacrev(f)(params)
    _JACOBIANS[loss_fn] = jax.jit(jacobian)
  return jax.tree.leaves(_JACOBIANS[loss_fn](params, example, state))


def kronecker_rows(plan, seed, loss_fn, params, example, state):
  """[K, width]: each layer's formed gradient (jax.jacrev) times kron(A, B), the rest's
  formed gradient (projected by the plan's CountSketch when not exact)."""
  jac = _jacobian(loss_fn, params, example, state)
  factors = logra.factors(plan, seed, np.float64)
  rows = []
  for j in range(plan.num_outputs):
    parts = [np.asarray(layer.gradient_matrix(jac[layer.leaf][j])).reshape(-1)
             @ np.kron(np.asarray(a), np.asarray(b))
             for layer, (a, b) in zip(plan.layers, factors)]
    rest = np.concatenate([np.asarray(jac[i][j]).reshape(-1) for i in plan.rest] or
                          [np.zeros(0)])
    if not plan.rest_exact:
      rest = np.asarray(logra.rest_projection(plan, seed)(rest[None]))[0]
    rows.append(np.concatenate([*parts, rest]))
  return np.stack(rows)


def _with_mode(plan, mode):
  """The plan with every layer that can be formed that way formed that way (a new plan
  object: a new compile), and how many layers that is."""
  layers = tuple(
      dataclasses.replace(layer, mode=mode)
      if np.isfinite(layer.costs(plan.num_outputs, layer.in_dim, layer.out_dim)[mode])
      else layer for layer in plan.layers)
  return dataclasses.replace(plan, layers=layers), sum(l.mode == mode for l in layers)


# ----------------------------------------------------------------------------- rows


def _cases(names):
  """The cases, the UNet's marked slow (its first compile takes about 20 s)."""
  return [pytest.param(n, marks=pytest.mark.slow) if n == "unet" else n for n in names]


@pytest.mark.parametrize("case", _cases(sorted(CASES)))
def test_rows_are_the_kronecker_projection_of_the_formed_gradient(x64, case):
  loss_fn, params, state, data = CASES[case]()
  projection = Projection(40, "logra", seed=5)
  plan = logra.plan(loss_fn, params, _spec(data), projection, state)
  rows, finite = logra.block_rows(loss_fn, plan.num_outputs, params, data, projection, state)
  assert rows.shape == (2 * plan.num_outputs, plan.width) and bool(np.all(finite))
  assert plan.width <= 40
  expect = np.concatenate([kronecker_rows(plan, 5, loss_fn, params, _example(data, b), state)
                           for b in range(2)])
  np.testing.assert_allclose(rows, expect, rtol=1e-10, atol=1e-12 * np.abs(expect).max())
  # The factors are random where the width is below the side, the identity where equal.
  for layer, (a, _) in zip(plan.layers, logra.factors(plan, 5)):
    assert (layer.in_dim < layer.in_features) != np.allclose(a, np.eye(*a.shape))


@pytest.mark.parametrize("case", _cases(["conv", "strided_and_transposed_conv",
                                          "weight_first_dense", "unet"]))
@pytest.mark.parametrize("mode", ["both", "inputs", "patches"])
def test_every_way_of_forming_the_rows_agrees(x64, case, mode):
  loss_fn, params, state, data = CASES[case]()
  plan, forced = _with_mode(
      logra.plan(loss_fn, params, _spec(data), Projection(40, "logra"), state), mode)
  assert forced >= 1
  rows = jax.jit(logra.example_rows, static_argnums=0)
  layer_rows, _ = rows(plan, jax.tree.leaves(params), logra.factors(plan, 0, np.float64),
                       _example(data, 1), state)
  expect = kronecker_rows(plan, 0, loss_fn, params, _example(data, 1), state)
  np.testing.assert_allclose(layer_rows, expect[:, :layer_rows.shape[1]], rtol=1e-10,
                             atol=1e-12 * np.abs(expect).max())


def test_what_is_captured_and_what_is_the_rest(x64):
  loss_fn, params, state, data = CASES["unet"]()
  plan = logra.plan(loss_fn, params, _spec(data), Projection(64, "logra"), state)
  names = [layer.name for layer in plan.layers]
  # Every convolution kernel, the transposed convolution (a product with its weight
  # first) and the head are captured; GroupNorm scales and offsets and biases are the rest.
  assert all("kernel" in n for n in names) and any("['up'][0]" in n for n in names)
  assert {layer.op for layer in plan.layers} == {"conv", "dense"}
  assert plan.rest_names and all("scale" in n or "bias" in n for n in plan.rest_names)
  assert plan.describe()["width"] == plan.width
  tied = logra.plan(tied_loss, tm.conv_params(0), _spec(tm.conv_data(0, 2)),
                    Projection(40, "logra"))
  assert [layer.name for layer in tied.layers] == ["['c1']"]
  assert tied.rest_names == ("['b1']", "['c2']")


def test_a_kernel_used_twice_keeps_its_formed_gradient(x64):
  data = tm.conv_data(4, 2, dtype=np.float64)
  params = tm.conv_params(1, jnp.float64)
  projection = Projection(800, "logra", seed=2)  # the rest (148 numbers) kept exact
  plan = logra.plan(tied_loss, params, _spec(data), projection)
  assert plan.rest_exact
  rows, _ = logra.block_rows(tied_loss, 3, params, data, projection)
  expect = np.concatenate([kronecker_rows(plan, 2, tied_loss, params, _example(data, b), None)
                           for b in range(2)])
  np.testing.assert_allclose(rows, expect, rtol=1e-10, atol=1e-13)


def test_loop_padding_and_normalisation(x64):
  loss_fn, params, _, _ = CASES["conv"]()
  data = tm.conv_data(5, 3, dtype=np.float64)
  projection = Projection(30, "logra", seed=1)
  vmapped, _ = logra.block_rows(loss_fn, 3, params, data, projection)
  looped, _ = logra.block_rows(loss_fn, 3, params, data, projection, vectorize="loop")
  padded, finite = logra.block_rows(loss_fn, 3, params, data, projection, pad_to=5)
  np.testing.assert_allclose(looped, vmapped, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(padded, vmapped, rtol=1e-12, atol=1e-14)
  assert padded.shape[0] == 9 and finite.shape == (3,)
  unit, _ = logra.block_rows(loss_fn, 3, params, data, projection, normalize=True)
  np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(unit * np.linalg.norm(vmapped, axis=1, keepdims=True), vmapped,
                             rtol=1e-10)


def test_row_products_average_over_seeds_to_the_exact_inner_products(x64):
  """The quick form of the store's test below: the mean over 200 seeds of the LoGra rows'
  inner products is the exact gradients' within 4.5 standard errors per entry (the seeds'
  own spread; 78 distinct entries, so a Gaussian mean passes with probability > 0.999)."""
  loss_fn, params, _, _ = CASES["conv"]()
  data = tm.conv_data(6, 4, dtype=np.float64)
  jac = [_jacobian(loss_fn, params, _example(data, b), None) for b in range(4)]
  exact_rows = np.stack([np.concatenate([np.asarray(g[j]).reshape(-1) for g in jac[b]])
                         for b in range(4) for j in range(3)])
  exact = exact_rows @ exact_rows.T
  plan = logra.plan(loss_fn, params, _spec(data), Projection(12, "logra"))
  assert [(l.in_dim, l.out_dim) for l in plan.layers] == [(2, 2), (2, 2)]
  estimates = []
  for seed in range(200):
    rows, _ = logra.block_rows(loss_fn, 3, params, data, Projection(12, "logra", seed=seed))
    estimates.append(np.asarray(rows) @ np.asarray(rows).T)
  estimates = np.stack(estimates)
  error = estimates.std(0, ddof=1) / np.sqrt(len(estimates))
  z = np.abs(estimates.mean(0) - exact) / error
  assert z.max() < 4.5, z.max()


def test_allocation_fills_the_width_keeps_small_layers_exact():
  # Two layers seeing 64 positions, one seeing 4: the width goes by positions.
  dims, rest = logra.allocate(300, [(18, 4, 64), (36, 8, 64), (288, 64, 4)], 10)
  assert rest == 10
  assert dims[0] == (18, 4)  # 72 numbers: its share is larger, kept exact
  assert sum(a * b for a, b in dims) + rest <= 300
  assert dims[1][0] * dims[1][1] > 10 * dims[2][0] * dims[2][1]
  assert all(a <= n_in and b <= n_out for (a, b), (n_in, n_out, _) in
             zip(dims, [(18, 4, 64), (36, 8, 64), (288, 64, 4)]))
  _, rest = logra.allocate(300, [(18, 4, 64)], 1000)  # a large rest is projected
  assert rest == int(logra.REST_SHARE * 300)
  with pytest.raises(ValueError, match="too small for LoGra on 3 layers"):
    logra.allocate(3, [(18, 4, 64), (36, 8, 64), (288, 64, 4)], 10)


def test_a_loss_with_nothing_to_capture_is_refused_with_the_alternative():
  params = {"w": jnp.ones(5)}
  example = {"x": jax.ShapeDtypeStruct((5,), jnp.float32),
             "y": jax.ShapeDtypeStruct((), jnp.float32)}
  with pytest.raises(logra.NotCapturable, match="countsketch"):
    logra.plan(tm.squared_error, params, example, Projection(8, "logra"))


def test_a_logra_projection_refuses_formed_rows():
  with pytest.raises(ValueError, match="projects inside the model"):
    Projection(8, "logra")(np.ones((2, 10), np.float32))
  with pytest.raises(ValueError, match="kind must be one of"):
    Projection(8, "kronecker")


# ----------------------------------------------------------------------------- the store


def _conv_setting():
  ckpts = [(tm.conv_params(0, jnp.float64), 0.1), (tm.conv_params(1, jnp.float64), 0.05)]
  return ckpts, tm.conv_data(20, 5, dtype=np.float64), tm.conv_data(21, 3, dtype=np.float64)


def test_store_round_trip_and_queries(x64, tmp_path):
  ckpts, train, test = _conv_setting()
  projection = Projection(30, "logra", seed=3)
  store_lib.build_store(tmp_path / "s", tm.conv_loss, ckpts, train, projection=projection,
                        batch_size=2)
  plan = logra.plan(tm.conv_loss, ckpts[0][0], _spec(train), projection)
  reopened = store_lib.open_store(tmp_path / "s")
  assert reopened.projection == projection and reopened.width == plan.width
  assert reopened.meta["logra"] == plan.describe()
  rows = {}
  for t, (params, _) in enumerate(ckpts):
    for name, data in (("train", train), ("test", test)):
      rows[t, name] = np.concatenate([kronecker_rows(plan, 3, tm.conv_loss, params,
                                                     _example(data, b), None)
                                      for b in range(jax.tree.leaves(data)[0].shape[0])])
    np.testing.assert_allclose(reopened.rows(t), rows[t, "train"], rtol=1e-10, atol=1e-13)
  expect_test = sum(lr * rows[t, "test"] @ rows[t, "train"].T
                    for t, (_, lr) in enumerate(ckpts)).reshape(3, 3, 5, 3)
  expect_train = sum(lr * rows[t, "train"] @ rows[t, "train"].T
                     for t, (_, lr) in enumerate(ckpts)).reshape(5, 3, 5, 3)
  np.testing.assert_allclose(reopened.influence(tm.conv_loss, ckpts, test), expect_test,
                             rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(reopened.train_influence(), expect_train, rtol=1e-10, atol=1e-13)
  again = store_lib.build_store(tmp_path / "s", tm.conv_loss, ckpts, train,
                                projection=projection, batch_size=2)
  assert again.last_build.blocks_built == 0 and again.last_build.blocks_reused == 6


def test_a_store_refuses_other_projections_and_other_captures(x64, tmp_path):
  ckpts, train, test = _conv_setting()
  store_lib.build_store(tmp_path / "s", tm.conv_loss, ckpts, train,
                        projection=Projection(30, "logra", seed=3))
  for other in (Projection(30, "countsketch", seed=3), Projection(30, "logra", seed=4),
                Projection(31, "logra", seed=3)):
    with pytest.raises(store_lib.StoreMismatch, match="projection"):
      store_lib.build_store(tmp_path / "s", tm.conv_loss, ckpts, train, projection=other)
  # A loss whose layers are captured otherwise would project the test side otherwise.
  store = store_lib.open_store(tmp_path / "s")
  with pytest.raises(store_lib.StoreMismatch, match="LoGra"):
    store.influence(tied_loss, ckpts, test)


def test_the_memory_budget_counts_a_blocks_activations(x64, tmp_path):
  ckpts, train, _ = _conv_setting()
  projection = Projection(30, "logra")
  plan = logra.plan(tm.conv_loss, ckpts[0][0], _spec(train), projection)
  budget = 2 * plan.bytes_per_example + 1
  vmapped = store_lib.build_store(tmp_path / "s", tm.conv_loss, ckpts, train,
                                  projection=projection, memory_budget_bytes=budget,
                                  vectorize="vmap")
  assert vmapped.block_size == 2
  # One example at a time: the budget bounds one example's intermediates, not the block's.
  looped = store_lib.build_store(tmp_path / "l", tm.conv_loss, ckpts, train,
                                 projection=projection, memory_budget_bytes=budget,
                                 vectorize="loop")
  assert looped.block_size == 5
  np.testing.assert_allclose(looped.rows(1), vmapped.rows(1), rtol=1e-12, atol=1e-14)
  with pytest.raises(ValueError, match="cannot hold one example"):
    store_lib.build_store(tmp_path / "t", tm.conv_loss, ckpts, train, projection=projection,
                          memory_budget_bytes=plan.bytes_per_example - 1)


@pytest.mark.slow  # 120 stores
def test_store_scores_average_over_seeds_to_exact_tracin(x64, tmp_path):
  """Over S seeds, the mean of the LoGra store's train-influence is exact TracIn within
  4.5 standard errors per entry (the errors estimated from the seeds' own spread: with 78
  distinct entries, a Gaussian mean exceeds that bound with probability about 5e-4).
  Width 12 on the conv net: both layers get random A and B (2 x 2 each) and the bias its
  CountSketch; a missing 1/sqrt(d) scale, a wrong pairing of rows with factors or a rest
  left out moves the mean by many standard errors. The mean of S seeds is also closer to
  exact than every single seed."""
  ckpts, train, _ = _conv_setting()
  train = jax.tree.map(lambda x: x[:4], train)
  exact = tm.loop_influence(tm.conv_loss, ckpts, train).reshape(12, 12)
  plan = logra.plan(tm.conv_loss, ckpts[0][0], _spec(train), Projection(12, "logra"))
  assert [(l.in_dim, l.out_dim) for l in plan.layers] == [(2, 2), (2, 2)]
  assert not plan.rest_exact
  seeds = 120
  estimates = np.stack([
      store_lib.build_store(tmp_path / f"s{s}", tm.conv_loss, ckpts, train,
                            projection=Projection(12, "logra", seed=s)).train_influence()
      .reshape(12, 12) for s in range(seeds)])
  mean = estimates.mean(0)
  error = estimates.std(0, ddof=1) / np.sqrt(seeds)
  z = np.abs(mean - exact) / np.maximum(error, 1e-12 * np.abs(exact).max())
  assert z.max() < 4.5, z.max()
  single = np.linalg.norm(estimates - exact, axis=(1, 2))
  assert np.linalg.norm(mean - exact) < single.min()


def _worker(tmp_path, name, *args, devices=1):
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]),
             JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  out = tmp_path / f"{name}.npz"
  proc = subprocess.run([sys.executable, worker.__file__, str(tmp_path / name), str(out),
                         "--logra", *args], env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return np.load(out)


@pytest.mark.slow  # a worker process
def test_four_devices_give_the_logra_scores_of_one(tmp_path):
  # One device is this process's own (a second process start would cost seconds of JAX's
  # import); four need a process of their own.
  assert jax.local_device_count() == 1
  worker.main(["store_worker.py", str(tmp_path / "one"), str(tmp_path / "one.npz"), "--logra"])
  one = np.load(tmp_path / "one.npz")
  four = _worker(tmp_path, "four", "--mesh", devices=4)
  assert int(four["devices"]) == 4 and int(one["devices"]) == 1
  for key in ("test", "train", "self"):
    np.testing.assert_allclose(four[key], one[key], rtol=2e-5, atol=1e-6)


def test_a_layer_selection_captures_only_the_kept_layers(x64, tmp_path):
  ckpts, train, test = _conv_setting()
  projection = Projection(30, "logra", seed=1)
  store = store_lib.build_store(tmp_path / "s", tm.conv_loss, ckpts, train,
                                projection=projection, params_filter="c2")
  # The loss of the kept parameters takes them as a list: its layers are named by index.
  assert [name for name, _, _ in store.meta["logra"]["layers"]] == ["[0]"]
  assert store.meta["logra"]["rest_size"] == 0
  # The kept kernel alone, its rows the Kronecker projection of its formed gradient.
  kept = lambda params, example, frozen: tm.conv_loss({**frozen, "c2": params[0]}, example)
  for t, (params, _) in enumerate(ckpts):
    frozen = {key: value for key, value in params.items() if key != "c2"}
    plan = logra.plan(kept, [params["c2"]], _spec(train), projection, frozen)
    expect = np.concatenate([kronecker_rows(plan, 1, kept, [params["c2"]],
                                            _example(train, b), frozen) for b in range(5)])
    np.testing.assert_allclose(store.rows(t), expect, rtol=1e-10, atol=1e-13)
  assert store.influence(tm.conv_loss, ckpts, test).shape == (3, 3, 5, 3)
