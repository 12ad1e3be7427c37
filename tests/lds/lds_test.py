"""The linear datamodeling score on a problem whose subset effects are known exactly, and its
bookkeeping: the seeded subsets and the cache of finished retrainings."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.checks import lds

N_TRAIN, N_TEST, DIM, STEPS, LR = 40, 12, 6, 3, 0.1


def _toy():
  """A linear model w . x and a loss linear in w, -y w . x: a few full-subset SGD steps move
  w by a sum over the kept examples, so every subset's outputs follow exactly from training,
  and the exact attribution of test output y_t w . x_t to training example b is
  STEPS * LR * y_t y_b x_t . x_b."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N_TRAIN, DIM)).astype(np.float32)
  y = rng.choice([-1.0, 1.0], N_TRAIN).astype(np.float32)
  x_test = rng.normal(size=(N_TEST, DIM)).astype(np.float32)
  y_test = rng.choice([-1.0, 1.0], N_TEST).astype(np.float32)
  w0 = rng.normal(size=DIM).astype(np.float32)

  def loss(w, xb, yb):
    return -yb * jnp.dot(w, xb)

  grad = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))

  def train_and_measure(removed):
    keep = np.setdiff1d(np.arange(N_TRAIN), removed)
    w = jnp.asarray(w0)
    for _ in range(STEPS):  # plain SGD on the kept examples' summed loss
      w = w - LR * grad(w, x[keep], y[keep]).sum(axis=0)
    return np.asarray(y_test * (x_test @ np.asarray(w)))  # [N_TEST] outputs, higher better

  exact = STEPS * LR * (y_test[:, None] * y[None, :]) * (x_test @ x.T)  # [N_TEST, N_TRAIN]
  return train_and_measure, exact


class _Store:
  """An in-memory store that counts what it is asked to save."""

  def __init__(self):
    self.saved = {}

  def load(self, name):
    return self.saved.get(name)

  def save(self, name, value):
    self.saved[name] = np.asarray(value)


def test_lds_ranks_exact_above_noisy_and_random_near_zero():
  train_and_measure, exact = _toy()
  masks = lds.sample_subsets(N_TRAIN, 60, 0.5, seed=1)
  measured = lds.measure_subsets(masks, train_and_measure, _Store(), log=lambda _: None).T
  rng = np.random.default_rng(2)
  noisy = exact + rng.normal(scale=exact.std(), size=exact.shape)
  random = rng.normal(size=exact.shape)
  score = {name: lds.lds(lds.predicted_outputs(s, masks), measured, num_bootstrap=200)
           for name, s in (("exact", exact), ("noisy", noisy), ("random", random))}
  assert score["exact"]["mean"] == pytest.approx(1.0, abs=1e-4)  # subset effects are additive
  assert 0.2 < score["noisy"]["mean"] < 0.9
  assert score["noisy"]["high"] < score["exact"]["low"]
  assert abs(score["random"]["mean"]) < 0.1
  assert score["random"]["low"] < 0 < score["random"]["high"]
  assert score["exact"]["n_outputs"] == N_TEST and score["exact"]["n_subsets"] == 60
  # The paired difference says the exact attribution is clearly better than the noisy one.
  diff = lds.lds_difference(lds.predicted_outputs(exact, masks),
                            lds.predicted_outputs(noisy, masks), measured, num_bootstrap=200)
  assert diff["low"] > 0 and diff["mean"] == pytest.approx(
      score["exact"]["mean"] - score["noisy"]["mean"])


def test_lds_of_a_sign_flipped_attribution_is_minus_one():
  train_and_measure, exact = _toy()
  masks = lds.sample_subsets(N_TRAIN, 20, 0.5, seed=0)
  measured = lds.measure_subsets(masks, train_and_measure, _Store(), log=lambda _: None).T
  assert lds.lds(lds.predicted_outputs(-exact, masks), measured,
                 num_bootstrap=0)["mean"] == pytest.approx(-1.0, abs=1e-4)


def test_predicted_outputs_sum_the_kept_scores_nan_as_zero():
  scores = np.array([[1.0, 2.0, np.nan, 4.0], [0.5, -1.0, 3.0, 0.0]])
  masks = np.array([[True, False, True, True], [False, True, False, False]])
  np.testing.assert_allclose(lds.predicted_outputs(scores, masks),
                             [[5.0, 2.0], [3.5, -1.0]])


def test_subsets_are_seeded_and_keep_the_stated_fraction():
  masks = lds.sample_subsets(101, 30, 0.3, seed=4)
  assert masks.shape == (30, 101) and masks.dtype == bool
  assert np.all(masks.sum(axis=1) == round(0.3 * 101))
  np.testing.assert_array_equal(masks, lds.sample_subsets(101, 30, 0.3, seed=4))
  assert not np.array_equal(masks, lds.sample_subsets(101, 30, 0.3, seed=5))
  assert len({row.tobytes() for row in masks}) == 30  # distinct subsets
  # Raising M keeps the earlier subsets (so their retrainings are reused).
  np.testing.assert_array_equal(lds.sample_subsets(101, 40, 0.3, seed=4)[:30], masks)
  # Every example is kept about `fraction` of the time.
  many = lds.sample_subsets(50, 400, 0.5, seed=0)
  assert np.all(np.abs(many.mean(axis=0) - 0.5) < 0.12)
  for bad in (0.0, 1.0, 1.5):
    with pytest.raises(ValueError, match="fraction"):
      lds.sample_subsets(10, 3, bad)


def test_the_cache_reuses_finished_subsets():
  calls = []

  def retrain(removed):
    calls.append(tuple(removed))
    return np.array([len(removed), removed.sum()], np.float64)

  store = _Store()
  masks = lds.sample_subsets(20, 6, 0.5, seed=0)
  first = lds.measure_subsets(masks[:4], retrain, store, log=lambda _: None)
  assert len(calls) == 4 and len(store.saved) == 4
  for mask, row in zip(masks[:4], first):
    np.testing.assert_array_equal(row, [10, np.flatnonzero(~mask).sum()])
  # A rerun retrains nothing; a larger M retrains only the new subsets.
  again = lds.measure_subsets(masks[:4], retrain, store, log=lambda _: None)
  assert len(calls) == 4
  np.testing.assert_array_equal(again, first)
  more = lds.measure_subsets(masks, retrain, store, log=lambda _: None)
  assert len(calls) == 6 and calls[4:] == [tuple(np.flatnonzero(~m)) for m in masks[4:]]
  np.testing.assert_array_equal(more[:4], first)
  # A subset's saved result is found by its members, not by its position.
  assert lds.subset_name(masks[0]) != lds.subset_name(masks[1])
  assert lds.subset_name(masks[0]) == lds.subset_name(masks[0].copy())


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_saved_subset_is_named_and_retrained(tmp_path, caplog, damage):
  from tracin_jax.stages import base  # pylint: disable=g-import-not-at-top

  calls = []

  def retrain(removed):
    calls.append(tuple(removed))
    return np.array([len(removed), removed.sum()], np.float64)

  masks = lds.sample_subsets(20, 3, 0.5, seed=0)
  first = lds.measure_subsets(masks, retrain, base.Parts(tmp_path, {"run": "x"}),
                              log=lambda _: None)
  parts = base.Parts(tmp_path, {"run": "x"}, what="lds retraining")
  path = parts.dir / f"{lds.subset_name(masks[1])}.npy"
  data = bytearray(path.read_bytes())
  if damage == "flip":
    data[-1] ^= 0x01  # the last float's lowest byte: a slightly other number
  else:
    data = data[:-8]
  path.write_bytes(bytes(data))
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    again = lds.measure_subsets(masks, retrain, parts, log=lambda _: None)
  assert calls[3:] == [tuple(np.flatnonzero(~masks[1]))]  # only that subset again
  np.testing.assert_array_equal(again, first)
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and warned[0].startswith(f"lds retraining: {path}: ")
