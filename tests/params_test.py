"""Tests of parameter groups, replacement and selection by path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tracin_jax import models
from tracin_jax import params as params_lib


def _unet_params(seed):
  model = models.get_model("unet", base_width=2, depth=1, rngs=nnx.Rngs(seed))
  return models.functional(model)[1]


def test_groups_of_a_unet_and_of_a_dict_with_a_list():
  groups = params_lib.group_names(_unet_params(0))
  assert {"encoder[0]", "bottleneck", "last_hidden", "head"} <= set(groups)
  tree = {"layers": [jnp.ones(2), jnp.ones(3)], "out": jnp.ones(1)}
  assert params_lib.group_names(tree) == ("layers[0]", "layers[1]", "out")
  assert params_lib.group_names(jnp.ones(2)) == ("",)


def test_replace_groups_takes_exactly_the_named_groups_from_the_other():
  a, b = _unet_params(0), _unet_params(1)
  mixed = params_lib.replace_groups(a, b, ["head", "last_hidden"])
  flat = jax.tree_util.tree_flatten_with_path(mixed)[0]
  for (path, leaf), x, y in zip(flat, jax.tree.leaves(a), jax.tree.leaves(b)):
    expected = y if params_lib.group_of(path) in ("head", "last_hidden") else x
    np.testing.assert_array_equal(leaf, expected)
  with pytest.raises(ValueError, match="no group"):
    params_lib.replace_groups(a, b, ["decoder[7]"])


def test_selection_by_prefix_and_predicate_and_the_round_trip():
  p = _unet_params(0)
  paths = [params_lib.path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(p)[0]]
  mask = params_lib.selection(p, "head")
  assert [path for path, m in zip(paths, mask) if m] == [x for x in paths
                                                         if x.startswith("head/")]
  assert params_lib.selection(p, lambda path: not path.startswith("head")) == tuple(
      not m for m in mask)
  kept, others = params_lib.split(p, mask)
  back = params_lib.merge(jax.tree.structure(p), mask, kept, others)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="selects no parameter"):
    params_lib.selection(p, "nothing")
