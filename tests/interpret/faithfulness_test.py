"""Tests of the faithfulness checks' numbers: slice scores, removal sets and the
class-block measure, against hand computations on tiny arrays."""

import numpy as np
import pytest

from tracin_jax.influence import layout
from tracin_jax.interpret import faithfulness


def test_slice_scores_sum_a_slices_regions_and_skip_absent_ones():
  k, n_test, n_train = 3, 2, 4
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(n_test, k, n_train, k))
  scores[:, :, 1, 2] = np.nan  # train slice 1 has no class-3 region
  scores[1, 0] = np.nan  # test region (1, class 0) is absent
  blocks = layout.to_class_blocks(scores)
  out = faithfulness.slice_scores(blocks)
  assert out.shape == (k, n_test, n_train)
  for i in range(k):
    for a in range(n_test):
      for b in range(n_train):
        expected = sum(scores[a, i, b, j] for j in range(k) if not np.isnan(scores[a, i, b, j]))
        if a == 1 and i == 0:
          assert np.isnan(out[i, a, b])
        else:
          assert out[i, a, b] == pytest.approx(expected)


def test_choose_regions_draws_present_regions_per_class_reproducibly():
  presence = np.zeros((10, 3), bool)
  presence[:, 0] = True
  presence[[2, 5], 1] = True
  presence[[1, 3, 4, 8], 2] = True
  regions = faithfulness.choose_regions(presence, 3, seed=4)
  assert [i for _, i in regions] == [0, 0, 0, 1, 1, 2, 2, 2]  # class 1 has only 2
  assert all(presence[a, i] for a, i in regions)
  assert len(set(regions)) == len(regions)
  assert regions == faithfulness.choose_regions(presence, 3, seed=4)
  assert regions != faithfulness.choose_regions(presence, 3, seed=5)
  with pytest.raises(ValueError, match="per_class"):
    faithfulness.choose_regions(presence, 0)


def test_removal_sets_are_the_largest_and_smallest_scores():
  scores = np.array([0.5, -2.0, 3.0, 0.0, 1.0, -0.5, 2.0, -1.0])
  prop, opp = faithfulness.removal_sets(scores, 3)
  assert prop.tolist() == [2, 6, 4] and opp.tolist() == [1, 7, 5]
  # Permuting the scores permutes the sets: the ordering by score is the one used.
  perm = np.random.default_rng(1).permutation(len(scores))
  p2, o2 = faithfulness.removal_sets(scores[perm], 3)
  assert perm[p2].tolist() == prop.tolist() and perm[o2].tolist() == opp.tolist()
  with pytest.raises(ValueError, match="half"):
    faithfulness.removal_sets(scores, 5)
  with pytest.raises(ValueError, match="finite"):
    faithfulness.removal_sets(np.array([1.0, np.nan, 0.0, 2.0]), 1)


def _train_blocks(grads, lr=0.5):
  """Train-influence blocks from gradients [n, K, P] (one checkpoint): lr * G G^T."""
  n, k, _ = grads.shape
  scores = lr * np.einsum("aip,bjp->aibj", grads, grads)
  return layout.to_class_blocks(scores)


def test_normalised_influence_is_one_on_the_diagonal_and_a_cosine_elsewhere():
  grads = np.random.default_rng(2).normal(size=(5, 3, 7))
  c = faithfulness.normalised_influence(_train_blocks(grads))
  g = grads / np.linalg.norm(grads, axis=-1, keepdims=True)
  np.testing.assert_allclose(c, np.einsum("aip,bjp->aibj", g, g), rtol=1e-10)


def test_class_block_structure_separates_class_gradients_from_random_ones():
  rng = np.random.default_rng(3)
  n, k, p = 30, 3, 40
  directions = rng.normal(size=(k, p))
  structured = directions[None] + 0.5 * rng.normal(size=(n, k, p))  # class i near direction i
  s = faithfulness.class_block_structure(_train_blocks(structured))
  r = faithfulness.class_block_structure(_train_blocks(rng.normal(size=(n, k, p))))
  assert s["auc"] > 0.95 and s["contrast"] > 0.5 and s["same_class_top"] > 0.9
  assert abs(r["auc"] - 0.5) < 0.05 and abs(r["contrast"]) < 0.05
  assert s["pairs_within"] == n * (n - 1) * k and s["pairs_between"] == n * (n - 1) * k * (k - 1)
  # The AUC is the Mann-Whitney statistic of same-class against other-class pairs.
  c = faithfulness.normalised_influence(_train_blocks(structured))
  same = np.eye(k, dtype=bool)[None, :, None, :] & ~np.eye(n, dtype=bool)[:, None, :, None]
  other = ~np.eye(k, dtype=bool)[None, :, None, :] & ~np.eye(n, dtype=bool)[:, None, :, None]
  w, b = c[same], c[other]
  assert s["auc"] == pytest.approx(np.mean(w[:, None] > b[None, :]))


def test_absent_regions_are_left_out_of_the_structure():
  rng = np.random.default_rng(4)
  grads = rng.normal(size=(6, 3, 5))
  blocks = _train_blocks(grads)
  scores = layout.from_class_blocks(blocks).copy()
  scores[2, 1] = np.nan
  scores[:, :, 2, 1] = np.nan
  s = faithfulness.class_block_structure(layout.to_class_blocks(scores))
  assert s["pairs_within"] == 6 * 5 * 3 - 2 * 5  # region (2, 1) pairs with 5 other slices
  assert np.isfinite(s["auc"])


def test_ranking_similarity_of_equal_monotone_and_unrelated_matrices():
  rng = np.random.default_rng(6)
  grads = rng.normal(size=(40, 3, 12))
  blocks = _train_blocks(grads)
  same = faithfulness.ranking_similarity(blocks, blocks)
  assert same["median_rho"] == pytest.approx(1.0) and same["top_overlap"] == 1.0
  assert same["rows"] == 40 * 3 and same["top_overlap_chance"] == pytest.approx(10 / 39)
  # A monotone transform of the scores keeps every ranking.
  cubed = faithfulness.ranking_similarity(blocks, blocks ** 3)
  assert cubed["median_rho"] == pytest.approx(1.0) and cubed["top_overlap"] == 1.0
  other = faithfulness.ranking_similarity(blocks, _train_blocks(rng.normal(size=(40, 3, 12))))
  assert abs(other["median_rho"]) < 0.15 and other["top_overlap"] < 0.5
  with pytest.raises(ValueError, match="shape"):
    faithfulness.ranking_similarity(blocks, _train_blocks(grads[:10]))
