"""Tests for tracin_jax.data.synthetic.anatomy."""

from tracin_jax.data import synthetic


def test_lgg_fraction_grades():
  params = [synthetic.draw_case_params(synthetic.case_rng(0, i), lgg_fraction=0.5)
            for i in range(40)]
  groups = {p.group for p in params}
  assert groups == {"HGG", "LGG"}
  hgg = [p for p in params if p.group == "HGG"]
  assert any(p.has_enhancing for p in hgg) and not all(p.has_enhancing for p in hgg)
