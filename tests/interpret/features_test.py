"""Tests of tracin_jax.interpret.features: eq 7-9 and the predictive-feature rule."""

import jax
import numpy as np
import pytest

from tracin_jax.interpret import features
from tracin_jax.models import functional, get_model
from tracin_jax.training.losses import hard_dice

NAN = np.nan

# Hand example: n_test = 2, n_train = 3, K = 2 classes, C = 2 features.
# Test region (a=1, i=1) and train region (b=1, j=1) are absent.
F_TEST = np.array([
    [[2.0, 1.0], [1.0, -1.0]],
    [[1.0, 0.0], [NAN, NAN]],
])
F_TRAIN = np.array([
    [[2.0, 2.0], [4.0, 0.0]],
    [[1.0, -2.0], [NAN, NAN]],
    [[0.0, 1.0], [2.0, 1.0]],
])
# Class-block rows over the columns j * 3 + b = 0..5 (column 4, train (b=1, j=1), absent).
ROWS = {
    (0, 0): [5.0, -1.0, 3.0, 0.0, NAN, 10.0],  # order: 5, 0, 2, 3, 1
    (1, 0): [1.0, 2.0, 3.0, 4.0, NAN, 5.0],    # order: 5, 3, 2, 1, 0
    (0, 1): [0.0, 9.0, -3.0, 1.0, NAN, 2.0],   # order: 1, 5, 3, 0, 2
}
# FI[i, k, r] by hand from eq 7 (see the similarities written out in test_similarity_by_hand).
FI_HAND = np.array([
    [[0.75, 0.625, 0.0, 0.75, 0.5], [0.5, 0.25, 0.5, 0.0, -0.25]],
    [[1.0, 0.5, 0.25, 0.5, 0.0], [0.5, -1.0, 0.0, -0.5, -1.0]],
])


def hand_scores():
  scores = np.full((2, 2, 3, 2), NAN)
  for (a, i), row in ROWS.items():
    for col, value in enumerate(row):
      j, b = divmod(col, 3)
      scores[a, i, b, j] = value
  return scores


def reference_fi(scores, f_train, f_test):
  """Plain loops over test regions and ranks, using the full S of `similarity`."""
  s = features.similarity(f_train, f_test)
  n_test, k, n_train, _ = scores.shape
  curves = {i: [] for i in range(k)}
  for i in range(k):
    for a in range(n_test):
      cols = [(scores[a, i, b, j], j * n_train + b) for j in range(k) for b in range(n_train)
              if not np.isnan(scores[a, i, b, j])]
      if not cols:
        continue
      cols.sort(key=lambda t: (-t[0], t[1]))
      curves[i].append([s[a, i, col % n_train, col // n_train] for _, col in cols])
  return np.stack([np.mean(np.array(curves[i]), axis=0).T for i in range(k)])


# ---------------------------------------------------------------------------------------------
# Region features.


def test_region_features_by_hand():
  hidden = np.zeros((1, 2, 2, 2), np.float32)
  hidden[0, :, :, 0] = [[1.0, -3.0], [2.0, 5.0]]
  hidden[0, :, :, 1] = [[-1.0, -2.0], [-4.0, 0.5]]
  regions = np.zeros((1, 2, 2, 3), bool)
  regions[0, 0, :, 0] = True  # top row
  regions[0, 1, 0, 1] = True  # one pixel; region 2 empty
  f = np.asarray(features.region_features(hidden, regions))
  np.testing.assert_array_equal(f[0, 0], [1.0, -1.0])  # max, not max |.|: -1 > -2
  np.testing.assert_array_equal(f[0, 1], [2.0, -4.0])
  assert np.isnan(f[0, 2]).all()


# ---------------------------------------------------------------------------------------------
# Similarity (eq 7) and feature importance (eq 8) on hand numbers.


def test_similarity_by_hand():
  s = features.similarity(F_TRAIN, F_TEST)
  assert s.shape == (2, 2, 3, 2, 2)
  np.testing.assert_array_equal(s[0, 0, 0, 0], [1.0, 0.5])    # [2,1] vs [2,2]
  np.testing.assert_array_equal(s[0, 0, 1, 0], [0.5, -0.5])   # [2,1] vs [1,-2]
  np.testing.assert_array_equal(s[0, 0, 2, 1], [1.0, 1.0])    # [2,1] vs [2,1]
  np.testing.assert_array_equal(s[1, 0, 0, 1], [0.25, 0.0])   # [1,0] vs [4,0]: 0/0 -> 0
  np.testing.assert_array_equal(s[0, 1, 2, 0], [0.0, -1.0])   # [1,-1] vs [0,1]
  assert np.isnan(s[1, 1]).all() and np.isnan(s[:, :, 1, 1]).all()
  np.testing.assert_array_equal(features.similarity(F_TRAIN, F_TEST, test_class=1), s[:, 1])


def test_feature_importance_by_hand():
  scores = hand_scores()
  fi = features.feature_importance(scores, F_TRAIN, F_TEST)
  assert fi.shape == (2, 2, 5)
  np.testing.assert_allclose(fi, FI_HAND, atol=1e-12)
  np.testing.assert_allclose(fi, reference_fi(scores, F_TRAIN, F_TEST), atol=1e-12)


def test_excluded_columns_are_dropped():
  scores = hand_scores()
  fi = features.feature_importance(scores, F_TRAIN, F_TEST, exclude_columns=[5])
  assert fi.shape == (2, 2, 4)
  # Class 0, feature 0 without column 5: rows (0, 0) -> cols 0, 2, 3, 1; (1, 0) -> 3, 2, 1, 0.
  np.testing.assert_allclose(fi[0, 0], [0.625, 0.0, 0.75, 0.5], atol=1e-12)
  dropped = scores.copy()
  dropped[:, :, 2, 1] = NAN  # column 5 = train (b=2, j=1)
  np.testing.assert_allclose(fi, features.feature_importance(dropped, F_TRAIN, F_TEST),
                             atol=1e-12)


def random_problem(seed, n_test=4, n_train=6, k=3, c=5):
  rng = np.random.default_rng(seed)
  f_train = rng.normal(size=(n_train, k, c))
  f_test = rng.normal(size=(n_test, k, c))
  present_train = rng.random((n_train, k)) > 0.2
  present_test = rng.random((n_test, k)) > 0.2
  present_test[0] = True
  f_train[~present_train] = NAN
  f_test[~present_test] = NAN
  scores = rng.normal(size=(n_test, k, n_train, k))
  scores[~present_test] = NAN
  scores[:, :, ~present_train] = NAN
  return scores, f_train, f_test


def test_feature_importance_matches_loop_on_random_problem():
  scores, f_train, f_test = random_problem(0)
  fi = features.feature_importance(scores, f_train, f_test)
  ref = reference_fi(scores, f_train, f_test)
  assert fi.shape == ref.shape
  np.testing.assert_allclose(fi, ref, atol=1e-12, equal_nan=True)


def test_ordering_follows_the_scores():
  scores, f_train, f_test = random_problem(1)
  fi = features.feature_importance(scores, f_train, f_test)
  # Negated scores reverse every ranking: the curves run backwards.
  np.testing.assert_allclose(features.feature_importance(-scores, f_train, f_test),
                             fi[..., ::-1], atol=1e-12)
  # Swapping two train regions' scores (features kept) moves them in the ranking.
  swapped = scores.copy()
  swapped[:, :, [0, 3]] = scores[:, :, [3, 0]]
  assert not np.allclose(features.feature_importance(swapped, f_train, f_test), fi)
  # Swapping both the scores and the features of two train examples changes nothing.
  f_swapped = f_train.copy()
  f_swapped[[0, 3]] = f_train[[3, 0]]
  np.testing.assert_allclose(features.feature_importance(swapped, f_swapped, f_test), fi,
                             atol=1e-12)


def test_unequal_counts_spread_and_truncate():
  # One test class, two test regions; row 0 ranks 5 train regions, row 1 ranks 3.
  f_train = np.arange(1.0, 6.0).reshape(5, 1, 1)        # train b has feature b + 1
  f_test = np.full((2, 1, 1), 5.0)                       # S = (b + 1) / 5
  scores = np.full((2, 1, 5, 1), NAN)
  scores[0, 0, :, 0] = [5, 4, 3, 2, 1]                   # ranks b = 0..4
  scores[1, 0, :3, 0] = [3, 2, 1]                        # ranks b = 0..2
  spread = features.feature_importance(scores, f_train, f_test)
  truncate = features.feature_importance(scores, f_train, f_test, align="truncate")
  s0_spread, s0_truncate = np.array([1, 3, 5]) / 5, np.array([1, 2, 3]) / 5
  s1 = np.array([1, 2, 3]) / 5
  np.testing.assert_allclose(spread[0, 0], (s0_spread + s1) / 2, atol=1e-12)
  np.testing.assert_allclose(truncate[0, 0], (s0_truncate + s1) / 2, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Predictive feature selection.


def test_select_predictive_on_synthetic_shapes():
  x = np.linspace(0.0, 1.0, 60)
  noise = 0.01 * np.random.default_rng(0).normal(size=x.shape)
  curves = {
      "u": 0.5 + 1.2 * (x - 0.5) ** 2,
      "negative_slope": 0.9 - 0.6 * x,
      "positive_slope": 0.7 + 0.2 * x,
      "flat": np.full_like(x, 0.8),
      "u_low": 0.2 + 1.2 * (x - 0.5) ** 2,
      "nan": np.full_like(x, NAN),
  }
  names = list(curves)
  fi = np.stack([curves[n] + noise for n in names])[None]  # [K=1, C=6, R]
  out = features.select_predictive(fi)
  assert all(v.shape == (1, len(names)) for v in out.values())
  verdict = {n: {key: bool(out[key][0, c]) for key in ("u_shape", "negative_slope",
                                                          "predictive")}
             for c, n in enumerate(names)}
  assert verdict["u"] == {"u_shape": True, "negative_slope": False, "predictive": True}
  assert verdict["negative_slope"] == {"u_shape": False, "negative_slope": True,
                                       "predictive": True}
  assert verdict["positive_slope"] == {"u_shape": False, "negative_slope": False,
                                       "predictive": False}
  assert verdict["flat"] == {"u_shape": False, "negative_slope": False, "predictive": False}
  assert verdict["u_low"] == {"u_shape": True, "negative_slope": False, "predictive": False}
  assert verdict["nan"] == {"u_shape": False, "negative_slope": False, "predictive": False}
  c_neg = names.index("negative_slope")
  np.testing.assert_allclose(out["slope"][0, c_neg], -0.6, atol=0.02)
  assert out["r2"][0, c_neg] > 0.95
  assert out["curvature"][0, names.index("u")] == pytest.approx(1.2, abs=0.05)
  assert np.isnan(out["slope"][0, names.index("nan")])
  # The threshold is applied to fi_first: raising it deselects the U curve.
  assert not features.select_predictive(fi, fi_threshold=0.9)["predictive"][0, 0]


def test_select_predictive_needs_a_clear_slope():
  x = np.linspace(0.0, 1.0, 40)
  fi = np.stack([0.9 - 0.02 * x, 0.9 - 0.2 * x])[None]  # exact lines: r2 = 1 for both
  out = features.select_predictive(fi, min_slope=0.05)
  np.testing.assert_allclose(out["r2"], 1.0, atol=1e-9)
  np.testing.assert_array_equal(out["negative_slope"], [[False, True]])
  np.testing.assert_array_equal(out["predictive"], [[False, True]])


# ---------------------------------------------------------------------------------------------
# Model-based: hidden features and feature impact (eq 9).


@pytest.fixture(scope="module")
def tiny():
  model = get_model("unet", base_width=4, depth=1, seed=0)
  apply_fn, params, _ = functional(model)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(5, 16, 16, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(5, 16, 16)).astype(np.int32)
  return apply_fn, params, images, labels


def test_hidden_features_matches_direct_reduction(tiny):
  apply_fn, params, images, _ = tiny
  rng = np.random.default_rng(1)
  regions = rng.random((5, 16, 16, 3)) > 0.7
  regions[2, :, :, 1] = False  # one empty region
  f = features.hidden_features(apply_fn, params, images, regions, batch_size=2)
  _, hidden = apply_fn(params, images, return_hidden=True)
  hidden = np.asarray(hidden)
  assert f.shape == (5, 3, hidden.shape[-1])
  for n in range(5):
    for j in range(3):
      if regions[n, :, :, j].any():
        np.testing.assert_allclose(f[n, j], hidden[n][regions[n, :, :, j]].max(axis=0),
                                   rtol=1e-5, atol=1e-6)
  assert np.isnan(f[2, 1]).all() and not np.isnan(np.delete(f.reshape(15, -1), 7, 0)).any()


def test_per_image_dice_conventions():
  # Image 0: nothing predicted, nothing labelled (1.0 for every class). Image 1: class 1
  # predicted on the left half, labelled on the top half; classes 2 and 3 labelled only.
  logits = np.zeros((2, 4, 4, 4), np.float32)
  logits[..., 0] = 1.0
  logits[1, :, :2, 1] = 2.0
  labels = np.zeros((2, 4, 4), np.int32)
  labels[1, :2] = 1
  labels[1, 3, 3] = 2
  labels[1, 2, 3] = 3
  dice = np.asarray(features._hard_dice_per_image(logits, labels))
  pred = logits.argmax(-1)
  ref = [[hard_dice(pred[n] == i, labels[n] == i) for i in (1, 2, 3)] for n in range(2)]
  np.testing.assert_allclose(dice, ref, atol=1e-7)
  np.testing.assert_array_equal(dice[0], 1.0)
  np.testing.assert_allclose(dice[1], [0.5, 0.0, 0.0])


def loop_impact(apply_fn, params, images, labels):
  """F[k, i] by a plain loop over features, images and classes with losses.hard_dice."""
  c = features.hidden_channels(apply_fn, params, images)
  k = 3

  def dice(mask):
    pred = np.asarray(apply_fn(params, images, channel_mask=mask)).argmax(-1)
    return np.array([[hard_dice(pred[n] == i + 1, labels[n] == i + 1) for i in range(k)]
                     for n in range(len(images))])

  full = dice(np.ones(c, np.float32))
  return np.stack([np.mean(full - dice(1.0 - np.eye(c, dtype=np.float32)[ch]), axis=0)
                   for ch in range(c)])


def test_feature_impact_matches_loop(tiny):
  apply_fn, params, images, labels = tiny
  impact = features.feature_impact(apply_fn, params, images, labels, batch_size=2,
                                   channel_batch=2)
  ref = loop_impact(apply_fn, params, images, labels)
  assert impact.shape == (4, 3)
  assert np.abs(ref).max() > 0  # masking does change the prediction of this model
  np.testing.assert_allclose(impact, ref, atol=1e-6)


def test_feature_impact_of_an_ignored_channel_is_zero(tiny):
  apply_fn, params, images, labels = tiny
  ignored = 1

  def zero_head_input(path, leaf):
    keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    if "head" in keys and "kernel" in keys:
      return leaf.at[:, :, ignored, :].set(0.0)
    return leaf

  cut = jax.tree_util.tree_map_with_path(zero_head_input, params)
  impact = features.feature_impact(apply_fn, cut, images, labels, batch_size=2,
                                   channel_batch=2)
  np.testing.assert_array_equal(impact[ignored], 0.0)
  assert np.abs(np.delete(impact, ignored, axis=0)).max() > 0
  # The head weights really were cut (otherwise the zero above would prove nothing).
  full = features.feature_impact(apply_fn, params, images, labels, batch_size=2,
                                 channel_batch=2)
  assert np.abs(full[ignored]).max() > 0
