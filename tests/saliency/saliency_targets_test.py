"""Targets (binding, terms, stop-gradient masks) and NNX layer probing by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tracin_jax import saliency
from tracin_jax.saliency import layers as layers_lib
from tracin_jax.saliency import targets as targets_lib
import saliency_models as sm


def test_targets_values_terms_and_fixed_masks():
  out = jnp.asarray(sm.rand((2, 3, 3, 4), 50))
  probs = np.asarray(jax.nn.softmax(out, -1))
  np.testing.assert_allclose(saliency.class_softmax_sum(2)(out), probs[..., 2].sum((1, 2)),
                             rtol=1e-6)
  predicted = np.asarray(jnp.argmax(out, -1))
  rule = saliency.masked_class_sum(1, saliency.predicted_region("TC"))
  bound = rule.bind(out)
  mask = np.isin(predicted, [1, 3]).astype(np.float32)
  np.testing.assert_array_equal(bound.mask, mask)
  np.testing.assert_allclose(bound(out), (mask * np.asarray(out)[..., 1]).sum((1, 2)),
                             rtol=1e-6)
  np.testing.assert_allclose(bound.terms(out).sum(-1), bound(out), rtol=1e-6)
  # The bound mask is held fixed: the gradient is the mask on channel 1, even for an output
  # where the prediction (and so an unbound rule's mask) differs.
  other = out + 5.0 * jax.nn.one_hot(0, 4)
  grad = jax.grad(lambda o: bound(o).sum())(other)
  np.testing.assert_array_equal(grad[..., 1], mask)
  assert float(rule(other).sum()) == 0.0  # unbound: everything predicted background
  grad_rule = jax.grad(lambda o: rule(o).sum())(out)  # the rule itself has no gradient
  np.testing.assert_array_equal(grad_rule[..., 1], mask)
  on_probs = saliency.masked_class_sum(3, mask, on="probabilities")
  np.testing.assert_allclose(on_probs(out), (mask * probs[..., 3]).sum((1, 2)), rtol=1e-6)
  logits = jnp.asarray(sm.rand((2, 5), 51))
  np.testing.assert_array_equal(saliency.class_score(4)(logits), logits[:, 4])
  assert isinstance(bound, saliency.Target)
  with pytest.raises(ValueError):
    saliency.masked_class_sum(1, mask, on="softmax")


def test_targets_pass_through_jit_without_recompiling():
  calls = []

  @jax.jit
  def f(target, out):
    calls.append(1)
    return target(out)

  out = jnp.asarray(sm.rand((1, 2, 2, 4), 52))
  for value in (0.0, 1.0):
    f(saliency.masked_class_sum(1, jnp.full((1, 2, 2), value)), out)
  assert len(calls) == 1
  plain = targets_lib.as_jit_arg(lambda o: o[:, 0, 0, 0])
  np.testing.assert_allclose(f(plain, out), out[:, 0, 0, 0])


def test_layer_names_and_conv_blocks_of_the_unet():
  assert layers_lib.parse_name("encoder[0].conv1") == ("encoder", 0, "conv1")
  assert layers_lib.parse_name("encoder.0") == ("encoder", 0)
  assert layers_lib.format_name(("decoder", 1, "norm2")) == "decoder[1].norm2"
  m = sm.unet()
  assert set(m.conv_blocks()) == {"encoder[0]", "encoder[1]", "bottleneck", "up[0]",
                                  "up[1]", "decoder[0]", "last_hidden", "head"}
  assert m.layer("bottleneck") is m.layer("bottleneck")
  with pytest.raises(ValueError, match="no submodule"):
    m.layer("encoder[5]")
  x = jax.ShapeDtypeStruct((1, 16, 16, 4), jnp.float32)
  assert m.param_groups_in_call_order(x) == (
      "encoder[0]", "encoder[1]", "bottleneck", "up[0]", "decoder[0]", "up[1]",
      "last_hidden", "head")
  # A nested name: the second conv of the bottleneck, [1, 4, 4, 16].
  (act,) = jax.eval_shape(lambda p, z: m.layer("bottleneck.conv2").forward(p, z, None)[1],
                          m.params, x)
  assert act.shape == (1, 4, 4, 16)


class _Shared(nnx.Module):

  def __init__(self):
    self.dense = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.dense(self.dense(x))


def test_a_layer_called_twice_is_refused():
  m = saliency.NnxModel(_Shared())
  x = jnp.ones((1, 2))
  np.testing.assert_allclose(m.apply_fn(m.params, x), _Shared()(x), rtol=1e-6)
  with pytest.raises(ValueError, match="more than once"):
    m.layer("dense").forward(m.params, x, None)


def test_a_class_per_example_equals_one_masked_class_sum_each():
  out = jnp.asarray(sm.rand((3, 4, 4, 4), 52))
  masks = np.random.default_rng(53).random((3, 4, 4)) > 0.5
  for on in ("logits", "probabilities"):
    several = saliency.masked_class_sums([1, 3, 2], masks, on=on)
    expected = [saliency.masked_class_sum(c, masks[n:n + 1], on=on)(out[n:n + 1])[0]
                for n, c in enumerate([1, 3, 2])]
    np.testing.assert_allclose(several(out), expected, rtol=1e-6)
  grad = jax.grad(lambda o: saliency.masked_class_sums([1, 3, 2], masks)(o).sum())(out)
  np.testing.assert_array_equal(grad[1, ..., 3], masks[1])
  assert float(jnp.abs(grad[1, ..., 1]).sum()) == 0.0
  with pytest.raises(ValueError, match="2 classes for 3 masks"):
    saliency.masked_class_sums([1, 2], masks)
