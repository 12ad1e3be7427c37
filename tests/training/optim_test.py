"""Tests of the Adam-then-SGD chain: the switch step and the exact SGD update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tracin_jax.training import optim

CONFIG = optim.OptimizerConfig(
    adam_epochs=2, adam_learning_rate=1e-3, weight_decay=1e-2, sgd_learning_rate=0.05)
STEPS_PER_EPOCH = 3


def _run(num_updates):
  tx, schedule = optim.make_optimizer(CONFIG, STEPS_PER_EPOCH)
  params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
  state = tx.init(params)
  rng = np.random.default_rng(0)
  records = []
  for step in range(num_updates):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, state = tx.update(grads, state, params)
    records.append((step, params, grads, updates))
    params = optax.apply_updates(params, updates)
  return records, schedule


def test_switch_happens_after_adam_epochs_and_sgd_update_is_exact():
  records, schedule = _run(9)
  switch = CONFIG.adam_epochs * STEPS_PER_EPOCH
  for step, params, grads, updates in records:
    sgd = jax.tree.map(lambda g: -CONFIG.sgd_learning_rate * g, grads)
    if step < switch:
      assert optim.phase_at(CONFIG, STEPS_PER_EPOCH, step) == "adam"
      # Adam: the update is not the SGD update.
      assert not np.allclose(updates["w"], sgd["w"])
    else:
      assert optim.phase_at(CONFIG, STEPS_PER_EPOCH, step) == "sgd"
      for u, s in zip(jax.tree.leaves(updates), jax.tree.leaves(sgd)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(s))
  assert float(schedule(switch - 1)) == np.float32(CONFIG.adam_learning_rate)
  assert float(schedule(switch)) == np.float32(CONFIG.sgd_learning_rate)


def test_first_adam_update_matches_torch_style_weight_decay():
  # Adam's first step is -lr * sign-like g/|g| of (g + wd * p) (bias-corrected moments).
  records, _ = _run(1)
  _, params, grads, updates = records[0]
  g = grads["w"] + CONFIG.weight_decay * params["w"]
  expected = -CONFIG.adam_learning_rate * g / (jnp.abs(g) + 1e-8)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)
