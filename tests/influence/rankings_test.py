"""Tests of the rankings of training regions: global explainers, proponents, their classes."""

import numpy as np
import pytest

from tracin_jax.influence import layout
from tracin_jax.influence import rankings

NAMES = ("NCR/NET", "ED", "ET")


def _scores(n_test, n_train, seed=0):
  return np.random.default_rng(seed).normal(size=(n_test, 3, n_train, 3))


def test_global_explainer_is_found_and_fraction_counted():
  s = _scores(6, 8)
  s[:, :, 5, 1] = 100.0  # train example 5, class ED: top proponent of every test region
  s[0, 0, :, :] = np.nan  # one absent test region
  found = rankings.global_explainers(layout.to_class_blocks(s), top=2, min_fraction=0.9)
  assert found[0]["train_index"] == 5 and found[0]["train_class"] == 1
  assert found[0]["fraction"] == 1.0 and found[0]["proponent_fraction"] == 1.0
  assert all(g["fraction"] > 0.9 for g in found)
  # With a random matrix and a small top, nothing is global.
  assert rankings.global_explainers(layout.to_class_blocks(_scores(30, 40, 1)), top=2) == []


def test_explain_lists_sorted_proponents_and_skips_absent_regions():
  s = _scores(3, 6)
  s[1, 2] = np.nan  # test example 1 has no ET region
  s[:, :, 4, 0] = np.nan  # train example 4 has no NCR/NET region
  ids_test = [("t", 0), ("t", 1), ("u", 0)]
  ids_train = [(f"c{b}", b) for b in range(6)]
  out = rankings.explain(layout.to_class_blocks(s), ids_test, ids_train, NAMES, k=4,
                         global_columns=[5])
  assert len(out) == 3 * 3 - 1
  assert not any(e["case"] == "t" and e["slice"] == 1 and e["class"] == "ET" for e in out)
  for e in out:
    a = ids_test.index((e["case"], e["slice"]))
    row = s[a, NAMES.index(e["class"])]
    props = [p["score"] for p in e["proponents"]]
    opps = [p["score"] for p in e["opponents"]]
    assert props == sorted(props, reverse=True) and opps == sorted(opps)
    assert props[0] == pytest.approx(np.nanmax(row))
    assert opps[0] == pytest.approx(np.nanmin(row))
    assert all(not (p["case"] == "c4" and p["class"] == "NCR/NET") for p in e["proponents"])
    for p in e["proponents"] + e["opponents"]:
      assert p["global_explainer"] == (p["case"] == "c5" and p["class"] == "NCR/NET")


def test_explain_excludes_self_in_train_influence():
  s = _scores(4, 4)
  for a in range(4):
    s[a, :, a, :] = 50.0
  out = rankings.explain(layout.to_class_blocks(s), [("c", a) for a in range(4)],
                         [("c", b) for b in range(4)], NAMES, k=2, exclude_self=True)
  for e in out:
    assert all(p["slice"] != e["slice"] for p in e["proponents"])


def test_proponent_class_distribution_counts_classes():
  s = np.full((2, 3, 5, 3), -1.0)
  s[:, 0, :, 2] = 5.0  # NCR/NET test regions: ET train regions are the top proponents
  s[:, 1, :, 1] = 5.0  # ED: ED
  s[:, 2, :3, 0] = 5.0  # ET: 3 NCR/NET regions, then anything
  dist = rankings.proponent_class_distribution(layout.to_class_blocks(s), k=3)
  np.testing.assert_allclose(dist[0], [0, 0, 1])
  np.testing.assert_allclose(dist[1], [0, 1, 0])
  np.testing.assert_allclose(dist[2], [1, 0, 0])
  s[:, 2] = np.nan
  assert np.all(np.isnan(rankings.proponent_class_distribution(layout.to_class_blocks(s))[2]))


def test_local_explanation_examples_most_classes_then_largest_one_per_case():
  regions = np.zeros((5, 4, 4, 3), bool)
  regions[0, :1, :1, 0] = True  # case a: one class, 1 pixel
  regions[1, :2, :2, :2] = True  # case a: two classes, 8 pixels
  regions[2, :3, :3, 0] = True  # case b: one class, 9 pixels
  regions[3, :1, :1, :2] = True  # case b: two classes, 2 pixels
  cases = np.array(["a", "a", "b", "b", "c"])  # example 4 has no region: never shown
  assert rankings.local_explanation_examples(regions, 2, cases) == [1, 3]
  # One per case while other cases remain, then the rest in order.
  assert rankings.local_explanation_examples(regions, 4, cases) == [1, 3, 2, 0]
  assert rankings.local_explanation_examples(regions, 9, cases) == [1, 3, 2, 0]
