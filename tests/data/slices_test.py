"""spread_over_cases: one example per case first, then the rest in order."""

from tracin_jax.data.slices import spread_over_cases


def test_one_per_case_while_other_cases_remain_then_the_rest_in_order():
  cases = ["a", "a", "b", "b", "c"]
  assert spread_over_cases([0, 1, 2, 3, 4], cases, 3) == [0, 2, 4]
  assert spread_over_cases([0, 1, 2, 3, 4], cases, 5) == [0, 2, 4, 1, 3]
  assert spread_over_cases([1, 0, 3], cases, 2, chosen=[4]) == [4, 1]
  assert spread_over_cases([0, 1], cases, 9) == [0, 1]
  assert spread_over_cases([0, 1], cases, 0) == []
