"""top_k against a full sort, with NaN, infinities and padding."""

import numpy as np
import pytest

from tracin_jax.influence import top_k


@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_matches_full_sort(axis, k):
  scores = np.random.default_rng(k).normal(size=(5, 9, 3))
  scores = np.moveaxis(scores, 1, axis)  # the axis of length 9 is `axis`
  prop_idx, prop, opp_idx, opp = top_k(scores, k, axis=axis)
  order = np.argsort(scores, axis=axis)
  np.testing.assert_array_equal(opp_idx, np.take(order, np.arange(k), axis=axis))
  np.testing.assert_array_equal(prop_idx, np.take(np.flip(order, axis), np.arange(k), axis=axis))
  np.testing.assert_array_equal(prop, np.take_along_axis(scores, prop_idx, axis=axis))
  np.testing.assert_array_equal(opp, np.take_along_axis(scores, opp_idx, axis=axis))


def test_nan_and_inf_are_never_selected_and_padding():
  nan, inf = np.nan, np.inf
  scores = np.array([
      [3.0, nan, -1.0, 7.0, nan, 0.5],  # 4 finite
      [nan, nan, inf, -inf, 2.0, nan],  # 1 finite
      [nan] * 6,                        # none
  ])
  prop_idx, prop, opp_idx, opp = top_k(scores, 3)
  np.testing.assert_array_equal(prop_idx, [[3, 0, 5], [4, -1, -1], [-1, -1, -1]])
  np.testing.assert_array_equal(prop, [[7.0, 3.0, 0.5], [2.0, nan, nan], [nan] * 3])
  np.testing.assert_array_equal(opp_idx, [[2, 5, 0], [4, -1, -1], [-1, -1, -1]])
  np.testing.assert_array_equal(opp, [[-1.0, 0.5, 3.0], [2.0, nan, nan], [nan] * 3])


def test_rows_with_nan_match_a_sort_of_their_finite_entries():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(20, 30))
  scores[rng.random(scores.shape) < 0.3] = np.nan
  prop_idx, prop, opp_idx, opp = top_k(scores, 5)
  for row in range(20):
    finite = np.flatnonzero(np.isfinite(scores[row]))
    order = finite[np.argsort(scores[row, finite])]
    np.testing.assert_array_equal(opp_idx[row], order[:5])
    np.testing.assert_array_equal(prop_idx[row], order[::-1][:5])


def test_k_larger_than_axis_and_zero():
  prop_idx, prop, opp_idx, opp = top_k(np.array([2, 1]), 4)  # integers are fine
  np.testing.assert_array_equal(prop_idx, [0, 1, -1, -1])
  np.testing.assert_array_equal(prop, [2.0, 1.0, np.nan, np.nan])
  np.testing.assert_array_equal(opp_idx, [1, 0, -1, -1])
  out = top_k(np.ones((3, 4)), 0)
  assert [o.shape for o in out] == [(3, 0)] * 4


def test_ties_are_ordered_by_index():
  prop_idx, _, opp_idx, _ = top_k(np.array([1.0, 2.0, 2.0, 1.0, 2.0]), 5)
  np.testing.assert_array_equal(prop_idx, [1, 2, 4, 0, 3])
  np.testing.assert_array_equal(opp_idx, [0, 3, 1, 2, 4])


def test_bad_arguments():
  with pytest.raises(ValueError, match="k must be"):
    top_k(np.ones(3), -1)
  with pytest.raises(ValueError, match="k must be"):
    top_k(np.ones(3), 1.5)
  with pytest.raises(ValueError, match="at least one axis"):
    top_k(np.float64(1.0), 1)
