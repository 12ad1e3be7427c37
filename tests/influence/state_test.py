"""Each TracIn checkpoint's gradients use its own non-parameter state (BatchNorm)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_run
from flax import nnx

import tracin_jax
from tracin_jax import models
from tracin_jax import outputs
from tracin_jax.influence import segmentation
from tracin_jax.training import train as train_lib
from tracin_jax.training.checkpoints import CheckpointStore


def _batchnorm_checkpoints():
  """Two checkpoints of a tiny BatchNorm UNet with different params and statistics."""
  model = models.get_model("unet", base_width=2, depth=1, norm="batch", rngs=nnx.Rngs(0))
  apply_fn, params, state = models.functional(model)
  assert jax.tree.leaves(state), "a BatchNorm model has running statistics"
  rng = np.random.default_rng(1)
  shift = lambda tree, scale: jax.tree.map(  # noqa: E731
      lambda x: x + scale * rng.normal(size=x.shape).astype(x.dtype), tree)
  state2 = jax.tree.map(lambda x: jnp.abs(x + 0.5 * rng.normal(size=x.shape)).astype(x.dtype),
                        state)
  return apply_fn, [tracin_jax.Checkpoint(params, 0.1, state),
                    tracin_jax.Checkpoint(shift(params, 0.05), 0.2, state2)]


def _examples(n, seed):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, 8, 8, 4)).astype(np.float32),
          "target": rng.integers(0, 4, size=(n, 8, 8)).astype(np.int32),
          "region": rng.random((n, 8, 8, 3)) < 0.5}


def _plain(loss_fn, checkpoints, train, test):
  """sum_t eta_t grad L_j(train b; theta_t, state_t) . grad L_i(test a; theta_t, state_t)."""
  jacobian = jax.jit(jax.jacrev(loss_fn))  # one example at a time, no vmap

  def grads(ckpt, data):
    rows = []
    for e in range(len(data["image"])):
      ex = jax.tree.map(lambda x: x[e], data)
      jac = jacobian(ckpt.params, ex, ckpt.state)
      rows.append(jnp.concatenate([jnp.reshape(x, (3, -1)) for x in jax.tree.leaves(jac)], 1))
    return np.stack(rows)  # [n, K, P]
  total = 0.0
  for ckpt in checkpoints:
    total = total + ckpt.learning_rate * np.einsum(
        "aip,bjp->aibj", grads(ckpt, test), grads(ckpt, train))
  return total


def test_each_checkpoint_uses_its_own_batchnorm_statistics():
  apply_fn, checkpoints = _batchnorm_checkpoints()
  loss_fn = segmentation.make_region_losses(apply_fn)
  train, test = _examples(3, 2), _examples(2, 3)
  scores = tracin_jax.influence(loss_fn, checkpoints, train, test)
  expected = _plain(loss_fn, checkpoints, train, test)
  np.testing.assert_allclose(scores, expected, rtol=2e-3, atol=1e-6)
  # Checkpoint 1's statistics for both (the old behaviour) gives other scores.
  shared = [checkpoints[0], checkpoints[1]._replace(state=checkpoints[0].state)]
  wrong = _plain(loss_fn, shared, train, test)
  assert np.abs(wrong - expected).max() > 100 * np.abs(scores - expected).max()


def test_checkpoints_without_and_with_state_must_not_be_mixed():
  apply_fn, checkpoints = _batchnorm_checkpoints()
  loss_fn = segmentation.make_region_losses(apply_fn)
  mixed = [checkpoints[0], (checkpoints[1].params, 0.2)]
  with pytest.raises(ValueError, match="checkpoint 1: state differs"):
    tracin_jax.influence(loss_fn, mixed, _examples(2, 0))


def test_tracin_checkpoints_load_each_checkpoints_own_state(tmp_path):
  config = tiny_run.CONFIG
  config = train_lib.TrainConfig(**{**config.__dict__, "model": train_lib.ModelConfig(
      "unet", base_width=2, depth=1, norm="batch")})
  outputs.write_json(tmp_path / train_lib.CONFIG_FILE,
                     train_lib.run_record(config, tiny_run.TRAIN, tiny_run.VAL))
  store = CheckpointStore(tmp_path)
  saved = []
  for epoch in (3, 4):
    model = train_lib.build_model(config.model, seed=epoch)
    for path, var in nnx.iter_graph(model):
      if isinstance(var, nnx.BatchStat):
        var.value = var.value + epoch  # distinct statistics per checkpoint
    saved.append(models.functional(model)[2])
    store.save(epoch, model, None, {"phase": "sgd", "learning_rate": 0.05, "step": epoch})
  store.close()
  _, checkpoints, epochs = train_lib.tracin_checkpoints(tmp_path)
  assert epochs == [3, 4]
  for ckpt, state in zip(checkpoints, saved):
    for a, b in zip(jax.tree.leaves(ckpt.state), jax.tree.leaves(state), strict=True):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(jax.tree.leaves(checkpoints[0].state)[0],
                            jax.tree.leaves(checkpoints[1].state)[0])
