"""Tests of retraining without chosen examples: exact removal, bit-for-bit baseline."""

import jax
import numpy as np
import pytest
import tiny_run
from flax import nnx

from tracin_jax.data import pipeline
from tracin_jax.training import optim
from tracin_jax.training import train as train_lib
from tracin_jax.training.checkpoints import CheckpointStore
from tracin_jax.training.retrain import Retrainer

CONFIG, TRAIN = tiny_run.CONFIG, tiny_run.TRAIN
B = CONFIG.batch_size


@pytest.fixture(scope="module")
def retrainer(full_run):
  workdir, _ = full_run
  return Retrainer(workdir, TRAIN)


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def _reference(workdir, removed):
  """The plain computation: restore the last Adam checkpoint, then for each SGD epoch take
  the run's examples one by one, drop the removed ones, batch and pad, and step."""
  steps = train_lib.steps_per_epoch(len(TRAIN), B)
  tx, _ = optim.make_optimizer(CONFIG.optimizer, steps)
  model = train_lib.build_model(CONFIG.model, seed=5)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  store = CheckpointStore(workdir, create=False)
  store.restore(CONFIG.optimizer.adam_epochs, model, optimizer)
  store.close()
  for epoch in range(CONFIG.optimizer.adam_epochs + 1, CONFIG.num_epochs + 1):
    ds = pipeline.train_dataset(TRAIN, seed=CONFIG.seed, epoch=epoch, augment=CONFIG.augment)
    kept = [ds[i] for i in range(len(ds)) if int(ds[i]["index"]) not in removed]
    for start in range(0, len(kept), B):
      chunk = kept[start:start + B]
      batch = {key: np.stack([e[key] for e in chunk]) for key in ("image", "label")}
      train_lib.train_step(model, optimizer, *train_lib.pad_batch(batch, B))
  return model


def test_nothing_removed_reproduces_the_run_bit_for_bit(full_run, retrainer):
  _, result = full_run
  assert retrainer.from_epoch == CONFIG.optimizer.adam_epochs
  assert retrainer.epochs == [3, 4]
  for a, b in zip(_params(retrainer()), _params(result.model), strict=True):
    np.testing.assert_array_equal(a, b)


def test_batches_leave_out_exactly_the_removed_examples_in_the_run_order(retrainer):
  removed = [1, 5, 6]
  full = list(retrainer.batches())
  cut = list(retrainer.batches(removed))
  for epoch in retrainer.epochs:
    order = np.concatenate([b["index"] for b in full if b["epoch"] == epoch])
    assert sorted(order.tolist()) == list(range(len(TRAIN)))  # the run: each example once
    kept = np.concatenate([b["index"] for b in cut if b["epoch"] == epoch])
    np.testing.assert_array_equal(kept, [i for i in order if i not in removed])
    sizes = [len(b["index"]) for b in cut if b["epoch"] == epoch]
    assert sizes == [B, B, len(TRAIN) - len(removed) - 2 * B]  # the run's batch size
  # Each kept example arrives with the image and label the run gave it in that epoch.
  first = {int(i): img for b in full if b["epoch"] == 3 for i, img in zip(b["index"], b["image"])}
  for b in cut:
    if b["epoch"] == 3:
      for i, img in zip(b["index"], b["image"]):
        np.testing.assert_array_equal(img, first[int(i)])


def test_retraining_without_examples_matches_the_plain_loop(full_run, retrainer):
  workdir, result = full_run
  removed = [0, 7, 11]
  model = retrainer(removed)
  expected = _reference(workdir, set(removed))
  for a, b in zip(_params(model), _params(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # ... and the removal mattered.
  assert any(not np.array_equal(a, b) for a, b in zip(_params(model), _params(result.model)))


def test_batches_prepared_again_when_not_cached_are_the_same(full_run, retrainer):
  workdir, _ = full_run
  uncached = Retrainer(workdir, TRAIN, cache_bytes=0)
  for a, b in zip(uncached.batches([2]), retrainer.batches([2]), strict=True):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(a[key], b[key])


def test_bad_arguments_are_refused(full_run, retrainer):
  workdir, _ = full_run
  with pytest.raises(ValueError, match="index 12 is not in"):
    retrainer([3, 12])
  with pytest.raises(ValueError, match="every training example"):
    retrainer(range(len(TRAIN)))
  with pytest.raises(ValueError, match="from_epoch=4"):
    Retrainer(workdir, TRAIN, from_epoch=4)
  with pytest.raises(ValueError, match="not the training set"):
    Retrainer(workdir, TRAIN.subset(np.arange(10)))


def test_each_retraining_starts_from_the_same_checkpoint(full_run, retrainer):
  _, result = full_run
  retrainer([4])
  for a, b in zip(_params(retrainer()), _params(result.model), strict=True):
    np.testing.assert_array_equal(a, b)


def test_retraining_from_an_adam_epoch_replays_but_refuses_removals(full_run):
  _, result = full_run
  early = Retrainer(full_run[0], TRAIN, from_epoch=1)  # epoch 2 is still Adam
  # With nothing removed the step-counted switch stays where the run had it: exact replay.
  for a, b in zip(_params(early()), _params(result.model), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="inside the Adam phase"):
    early([3])


def _epochs(batches):
  """{epoch: (index [n], images [n, ...]) in the order the batches give them}."""
  out = {}
  for b in batches:
    index, images = out.get(b["epoch"], (np.zeros(0, np.int64), None))
    out[b["epoch"]] = (np.concatenate([index, b["index"]]),
                       b["image"] if images is None else np.concatenate([images, b["image"]]))
  return out


def test_another_order_replays_the_same_examples_and_draws_in_another_order(full_run,
                                                                          retrainer):
  workdir, result = full_run
  other = Retrainer(workdir, TRAIN, order_seed=1)
  assert other.order_seed == 1 and retrainer.order_seed is None
  run, reordered = _epochs(retrainer.batches()), _epochs(other.batches())
  for epoch in retrainer.epochs:
    (index, images), (index2, images2) = run[epoch], reordered[epoch]
    assert not np.array_equal(index, index2)  # another order ...
    assert sorted(index2.tolist()) == list(range(len(TRAIN)))  # ... of the same examples
    by_example = {int(i): img for i, img in zip(index, images)}
    for i, img in zip(index2, images2):  # each with the run's augmentation draw
      np.testing.assert_array_equal(img, by_example[int(i)])
  # Another seed, another order; the batches keep the run's size; removal still works.
  assert not np.array_equal(_epochs(Retrainer(workdir, TRAIN, order_seed=2).batches())[3][0],
                            reordered[3][0])
  assert [len(b["index"]) for b in other.batches([4])] == [B, B, 3] * 2
  assert any(not np.array_equal(a, b)
             for a, b in zip(_params(other()), _params(result.model)))


def test_order_seed_none_is_the_runs_batches_bit_for_bit(full_run, retrainer):
  workdir, _ = full_run
  default = Retrainer(workdir, TRAIN, order_seed=None, cache_bytes=0)
  for epoch in default.epochs:
    mine = [b for b in default.batches() if b["epoch"] == epoch]
    run = list(pipeline.train_batches(TRAIN, B, seed=CONFIG.seed, epoch=epoch,
                                      augment=CONFIG.augment))
    assert len(mine) == len(run)
    for a, b in zip(mine, run):
      for key in ("image", "label", "index"):
        np.testing.assert_array_equal(a[key], b[key])
  with pytest.raises(ValueError, match="order_seed must be None"):
    Retrainer(workdir, TRAIN, order_seed=-1)
