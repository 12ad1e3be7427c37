"""Faithfulness: deletion/insertion, relevance mass/rank, Spearman, SSIM, randomisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from tracin_jax import saliency
import saliency_models as sm

# A model in which only 5 of the 36 pixels matter: F = sum_{h, w} W[h, w] sum_c x[h, w, c].
_W = np.zeros((6, 6), np.float32)
_W[[0, 1, 3, 4, 5], [2, 4, 0, 5, 1]] = [5.0, 4.0, 3.0, 2.0, 1.0]


def _sparse_apply(params, x):
  return jnp.einsum("nhwc,hw->n", x, params)[:, None]


def test_deletion_auc_of_the_true_ranking_beats_random_orders():
  x = jnp.asarray(np.random.default_rng(40).uniform(0.5, 1.0, (2, 6, 6, 3)), jnp.float32)
  target = saliency.class_score(0)
  truth = np.broadcast_to(_W, (2, 6, 6))
  good = saliency.deletion_curve(_sparse_apply, _W, x, target, truth, num_steps=12)
  np.testing.assert_allclose(good.scores[:, 0], np.asarray(target(_sparse_apply(_W, x))))
  np.testing.assert_allclose(good.scores[:, -1], 0.0, atol=1e-6)
  good_in = saliency.insertion_curve(_sparse_apply, _W, x, target, truth, num_steps=12)
  for seed in range(5):
    order = saliency.random_saliency(seed, (2, 6, 6))
    random = saliency.deletion_curve(_sparse_apply, _W, x, target, order, num_steps=12)
    assert np.all(good.auc < random.auc)
    random_in = saliency.insertion_curve(_sparse_apply, _W, x, target, order, num_steps=12)
    assert np.all(good_in.auc > random_in.auc)
  # Steps chunked or not, and patches: the same kind of curve.
  chunked = saliency.deletion_curve(_sparse_apply, _W, x, target, truth, num_steps=12,
                                    chunk_size=5)
  np.testing.assert_allclose(chunked.scores, good.scores, rtol=1e-6)
  patches = saliency.deletion_curve(_sparse_apply, _W, x, target, truth[..., None],
                                    num_steps=9, patch_size=2)
  np.testing.assert_allclose(patches.fractions, np.round(np.arange(10) / 9 * 9) / 9)
  assert patches.scores.shape == (2, 10)


def test_relevance_mass_and_rank_accuracy_by_hand():
  relevance = np.array([[[3.0, -1.0, 0.0], [1.0, 2.0, 0.5]]], np.float32)
  mask = np.array([[[1, 1, 0], [0, 1, 0]]])
  # Positive relevance 3 + 1 + 2 + 0.5 = 6.5, inside 3 + 2 = 5.
  np.testing.assert_allclose(saliency.relevance_mass_accuracy(relevance, mask), [5 / 6.5],
                             rtol=1e-6)
  # K = 3: the top-3 pixels are (0,0)=3, (1,1)=2, (1,0)=1; two lie inside.
  np.testing.assert_allclose(saliency.relevance_rank_accuracy(relevance, mask), [2 / 3],
                             rtol=1e-6)
  np.testing.assert_allclose(
      saliency.relevance_mass_accuracy(np.stack([relevance, -relevance], -1), mask,
                                       channel_reduce="abs_sum"),
      [(3 + 1 + 2) * 2 / 15.0], rtol=1e-6)


def test_target_masks_from_labels():
  labels = np.array([[[0, 1, 2, 3]]])
  np.testing.assert_array_equal(saliency.region_mask(labels, "WT"), [[[0, 1, 1, 1]]])
  np.testing.assert_array_equal(saliency.region_mask(labels, "TC"), [[[0, 1, 0, 1]]])
  np.testing.assert_array_equal(saliency.region_mask(labels, "ET"), [[[0, 0, 0, 1]]])
  np.testing.assert_array_equal(saliency.region_mask(labels, 2), [[[0, 0, 1, 0]]])
  with pytest.raises(ValueError):
    saliency.region_mask(labels, "XX")


def test_spearman_matches_scipy():
  a = sm.rand((3, 5, 5), 41)
  b = a + sm.rand((3, 5, 5), 42)
  b[2, 0, :] = b[2, 1, :]  # ties
  expected = [scipy.stats.spearmanr(a[i].ravel(), b[i].ravel())[0] for i in range(3)]
  np.testing.assert_allclose(saliency.spearman(a, b), expected, rtol=1e-10)
  assert np.isnan(saliency.spearman(a, np.zeros_like(a))).all()


def _ssim_loop(a, b, size=7, sigma=1.5, k1=0.01, k2=0.03, data_range=1.0):
  """SSIM with an explicit 2-D Gaussian window at every valid position (no separability)."""
  t = np.arange(size) - (size - 1) / 2
  g = np.exp(-t**2 / (2 * sigma**2))
  win = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (k1 * data_range)**2, (k2 * data_range)**2
  values = []
  for i in range(a.shape[0] - size + 1):
    for j in range(a.shape[1] - size + 1):
      pa, pb = a[i:i + size, j:j + size], b[i:i + size, j:j + size]
      ma, mb = (win * pa).sum(), (win * pb).sum()
      va, vb = (win * pa**2).sum() - ma**2, (win * pb**2).sum() - mb**2
      cov = (win * pa * pb).sum() - ma * mb
      values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) *
                                                            (va + vb + c2)))
  return np.mean(values)


def test_ssim_against_an_explicit_window_loop():
  rng = np.random.default_rng(43)
  a = rng.uniform(size=(2, 9, 7)).astype(np.float32)
  b = np.clip(a + 0.3 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
  got = saliency.ssim(a, b)  # window shrinks to 7 (the map's smaller side)
  np.testing.assert_allclose(got, [_ssim_loop(a[i], b[i]) for i in range(2)], rtol=1e-4)
  np.testing.assert_allclose(saliency.ssim(a, a), 1.0, rtol=1e-6)
  volume = np.stack([a, b], axis=1)  # [2, 2, 9, 7]: the mean over the 2 slices
  np.testing.assert_allclose(saliency.ssim(volume, volume[:, ::-1]),
                             (got + got) / 2, rtol=1e-5)


def _conv_gradient_map(params):
  x = sm.images(1, size=8, seed=44)
  return saliency.vanilla_gradient(sm.conv_apply, params, x, saliency.class_softmax_sum(1))


_ORDER = ["w1", "b1", "w2", "w3", "b3"]


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_parameter_randomisation_changes_the_maps(mode):
  params = sm.conv_params()
  result = saliency.parameter_randomisation(_conv_gradient_map, params, key=0, mode=mode,
                                            layer_order=_ORDER, channel_reduce="abs_sum")
  expected = tuple(reversed(_ORDER)) if mode == "cascading" else tuple(_ORDER)
  assert result.layers == expected
  assert result.spearman.shape == (5, 1) and result.ssim.shape == (5, 1)
  # Randomising a weight tensor changes the gradient map's ranking and structure.
  weights = [i for i, name in enumerate(result.layers) if name.startswith("w")]
  assert np.all(result.spearman[weights] < 0.9)
  assert np.all(result.ssim[weights] < 0.9)
  if mode == "cascading":  # once everything is random, nothing of the map is left
    assert abs(result.spearman[-1, 0]) < 0.5
  # The same test with an init that keeps the weights: maps identical.
  kept = saliency.parameter_randomisation(_conv_gradient_map, params, key=0, mode=mode,
                                          layer_order=_ORDER, init=lambda key, w: w)
  np.testing.assert_allclose(kept.spearman, 1.0, rtol=1e-6)
  np.testing.assert_allclose(kept.ssim, 1.0, rtol=1e-5)


def test_randomize_groups_and_param_groups():
  params = sm.conv_params()
  assert saliency.param_groups(params) == ("b1", "b3", "w1", "w2", "w3")
  new = saliency.randomize_groups(params, ["w2"], jax.random.key(3))
  for name in params:
    same = np.array_equal(new[name], params[name])
    assert same == (name != "w2")
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(new["w2"]))),
                             np.sqrt(np.mean(np.square(params["w2"]))), rtol=0.25)
  with pytest.raises(ValueError, match="unknown parameter groups"):
    saliency.parameter_randomisation(_conv_gradient_map, params, 0, layer_order=["nope"])
  nested = {"enc": [{"w": 1.0}, {"w": 2.0}], "head": {"w": 3.0, "b": 0.0}}
  assert saliency.param_groups(nested) == ("enc[0]", "enc[1]", "head")


def test_randomised_parameters_do_not_recompile_a_jitted_method():
  # Parameters restored from a checkpoint are committed to a device; re-drawn leaves must be
  # placed the same way, or every step of a cascade compiles the method anew.
  params = jax.device_put(sm.conv_params(), jax.devices()[0])
  total = jax.jit(lambda p: sum(jnp.sum(v) for v in jax.tree.leaves(p)))
  total(params)
  current = params
  for i, group in enumerate(["w3", "w2", "w1"]):
    current = saliency.randomize_groups(current, [group], i)
    total(current)
  assert total._cache_size() == 1  # pylint: disable=protected-access
