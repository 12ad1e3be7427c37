"""Retraining the SGD phase of a run without chosen training examples (eq 3, measured).

TracIn approximates the change in a test loss when a training example is removed and the
network retrained. `Retrainer` measures that change directly: it restores a run's checkpoint
at the end of its Adam phase (model and optimizer state) and replays the run's remaining
epochs with the same seed and order. Each replayed epoch is the run's own sequence of
examples (the same permutation and the same augmentation draw for every example) with the
removed examples deleted, cut into batches of the run's size; the last batch of an epoch may
be short (padded with zero-weight copies, as in training). With nothing removed the replay
feeds exactly the run's batches to the same compiled step, so it reproduces the run's final
parameters bit for bit.

Why re-batch rather than give removed examples weight 0 in their batch: the loss is a soft
Dice over the whole batch (eq 2), so dropping an example from a batch of 10 makes the batch
smaller and every remaining example's gradient larger, a change of step size that no
removal set would escape. Re-batching keeps the batch size, so a removal changes which
examples the model sees and little else (where n - k is not a multiple of the batch size,
each epoch ends with one smaller batch, as training itself does). The SGD learning rate is
constant, so the few updates an epoch loses do not shift any schedule.

The batches of the replayed epochs are prepared once and kept in memory when they fit in
`cache_bytes`, so a series of retrainings pays the augmentation only once.

Another data order (`order_seed`): the noise ceiling of the LDS compares two retrainings of
the same subset that differ only in the order of the examples. With `order_seed` given, each
replayed epoch holds the same examples with the same augmentation draw each had in the run
(the run's augmented image and label of that example in that epoch), in another order: the
run's sequence of the epoch permuted by a permutation drawn from `(order_seed, epoch)`, then
cut into batches as above. The default, `order_seed=None`, is the run's own order.
"""

from __future__ import annotations

import os
import pathlib
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from tracin_jax.data import pipeline
from tracin_jax.data.slices import SliceSet
from tracin_jax.progress import ProgressBar
from tracin_jax.training import optim
from tracin_jax.training import train as train_lib
from tracin_jax.training.checkpoints import CheckpointStore

DEFAULT_CACHE_BYTES = 2 << 30


class Retrainer:
  """Replays the end of a training run with some training examples removed.

  Attributes:
    config: the run's TrainConfig.
    from_epoch: the checkpoint the replay starts from (default: the last Adam epoch).
    epochs: the replayed epochs, `from_epoch + 1 ... config.num_epochs`.
    num_steps: the number of updates replayed.
    order_seed: None (the run's order) or the seed of the replayed epochs' other order.
  """

  def __init__(self, workdir: str | os.PathLike, train_set: SliceSet, *,
               from_epoch: int | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
               order_seed: int | None = None):
    """Loads the run in `workdir` and checks that `train_set` is its training set.

    Args:
      workdir: a finished or partial training run (see `train.train`).
      train_set: the run's training slices, in the run's order.
      from_epoch: the checkpoint to start from; default the last Adam epoch
        (`config.optimizer.adam_epochs`), i.e. the whole SGD phase is replayed.
      cache_bytes: keep the replayed batches in memory when they take at most this many
        bytes; otherwise they are prepared again for every retraining.
      order_seed: None replays the run's order; an int replays each epoch's examples (with
        their augmentation draws) in another order, a permutation drawn from
        `(order_seed, epoch)`.

    Raises:
      FileNotFoundError: no run or no checkpoint of `from_epoch` in `workdir`.
      ValueError: `train_set` is not the run's training set, `from_epoch` is out of range,
        or `order_seed` is not None or a non-negative int.
    """
    if order_seed is not None and (isinstance(order_seed, bool)
                                   or not isinstance(order_seed, (int, np.integer))
                                   or order_seed < 0):
      raise ValueError(f"order_seed must be None (the run's order) or a non-negative int, "
                       f"got {order_seed!r}.")
    self.order_seed = None if order_seed is None else int(order_seed)
    self.workdir = pathlib.Path(workdir)
    record = train_lib.load_record(self.workdir)
    self.config = train_lib.TrainConfig.from_dict(record["config"])
    if (list(record["train_cases"]) != train_set.cases
        or record["num_train_slices"] != len(train_set)
        or list(record["image_shape"]) != list(train_set.images.shape[1:])):
      raise ValueError(
          f"train_set ({len(train_set.cases)} cases, {len(train_set)} slices of "
          f"{list(train_set.images.shape[1:])}) is not the training set of the run in "
          f"{self.workdir} ({len(record['train_cases'])} cases, "
          f"{record['num_train_slices']} slices of {record['image_shape']}).")
    self.train_set = train_set
    num_epochs = self.config.num_epochs
    self.from_epoch = self.config.optimizer.adam_epochs if from_epoch is None else from_epoch
    if not 0 < self.from_epoch < num_epochs:
      raise ValueError(f"from_epoch={self.from_epoch}: must be between 1 and "
                       f"{num_epochs - 1} (the run has {num_epochs} epochs).")
    self.epochs = list(range(self.from_epoch + 1, num_epochs + 1))
    self.steps_per_epoch = train_lib.steps_per_epoch(len(train_set), self.config.batch_size)
    self.num_steps = len(self.epochs) * self.steps_per_epoch

    store = CheckpointStore(self.workdir, create=False)
    if self.from_epoch not in store.epochs():
      store.close()
      raise FileNotFoundError(f"{self.workdir} has no checkpoint of epoch {self.from_epoch} "
                              f"to retrain from; it has {store.epochs()}.")
    tx, _ = optim.make_optimizer(self.config.optimizer, self.steps_per_epoch)
    # Abstract model and optimizer: restoring fills them, no initialiser is run.
    model, optimizer = nnx.eval_shape(
        lambda: train_lib.build_model_and_optimizer(self.config, tx))
    store.restore(self.from_epoch, model, optimizer)
    store.close()
    self._graphdef, self._start = nnx.split((model, optimizer))

    example_bytes = train_set.images[0].nbytes + train_set.labels[0].nbytes
    total = len(self.epochs) * len(train_set) * example_bytes
    self._cache = ({epoch: list(self._run_batches(epoch)) for epoch in self.epochs}
                   if total <= cache_bytes else None)

  def _run_batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The run's batches of `epoch`: (images [b, H, W, 4], labels [b, H, W], index [b]);
    with `order_seed`, the same examples and draws in batches of the permuted order."""
    c = self.config
    parts = ((np.asarray(batch["image"]), np.asarray(batch["label"]),
              np.asarray(batch["index"], np.int64))
             for batch in pipeline.train_batches(self.train_set, c.batch_size, seed=c.seed,
                                                 epoch=epoch, augment=c.augment))
    if self.order_seed is None:
      yield from parts
      return
    images, labels, index = (np.concatenate(a) for a in zip(*parts))
    order = np.random.default_rng([self.order_seed, epoch]).permutation(len(index))
    images, labels, index = images[order], labels[order], index[order]
    for start in range(0, len(index), c.batch_size):
      end = start + c.batch_size
      yield images[start:end], labels[start:end], index[start:end]

  def start(self) -> tuple[nnx.Module, nnx.Optimizer]:
    """A fresh copy of the model and optimizer at `from_epoch`, where every replay starts
    (training mode; changing them leaves the retrainer's start as it is)."""
    return nnx.merge(self._graphdef, self._start, copy=True)

  def _check_removed(self, removed: Sequence[int]) -> np.ndarray:
    removed = np.unique(np.asarray(list(removed), np.int64))
    if removed.size and (removed[0] < 0 or removed[-1] >= len(self.train_set)):
      bad = removed[0] if removed[0] < 0 else removed[-1]
      raise ValueError(f"removed: index {bad} is not in [0, {len(self.train_set)}).")
    if removed.size == len(self.train_set):
      raise ValueError("removed: every training example; nothing would be left to train on.")
    adam_epochs = self.config.optimizer.adam_epochs
    if removed.size and self.from_epoch < adam_epochs:
      # The switch to SGD is counted in steps (adam_epochs x the run's steps per epoch):
      # with fewer examples an epoch has fewer steps, and the switch would move.
      raise ValueError(
          f"removed: retraining from epoch {self.from_epoch}, inside the Adam phase (epochs "
          f"1-{adam_epochs}), with examples removed would move the step-counted switch to "
          f"SGD; start from epoch {adam_epochs} or later (from_epoch).")
    return removed

  def batches(self, removed: Sequence[int] = ()) -> Iterator[dict[str, np.ndarray]]:
    """The replay's batches without `removed`, in order.

    Yields:
      {"image": [B, H, W, 4], "label": [B, H, W], "index": [B] int, "epoch": int}: each
      epoch's examples in the run's order (or `order_seed`'s) with `removed` deleted, in
      batches of the run's
      size B; an epoch's last batch may be shorter (training pads it with zero-weight
      copies, `train.pad_batch`).
    """
    removed = self._check_removed(removed)
    size = self.config.batch_size
    for epoch in self.epochs:
      parts = self._cache[epoch] if self._cache is not None else self._run_batches(epoch)
      held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
      count = 0
      for images, labels, index in parts:
        keep = ~np.isin(index, removed)
        if keep.all():
          held.append((images, labels, index))
        elif keep.any():
          held.append((images[keep], labels[keep], index[keep]))
        count += int(keep.sum())
        while count >= size:
          batch, held = _take(held, size)
          count -= size
          yield dict(batch, epoch=epoch)
      if count:
        batch, _ = _take(held, count)
        yield dict(batch, epoch=epoch)

  def __call__(self, removed: Sequence[int] = (), *, progress: bool = False,
               desc: str = "retrain") -> nnx.Module:
    """Replays the epochs after `from_epoch` without the `removed` training examples.

    Args:
      removed: indices into `train_set` of the examples to leave out (duplicates ignored).
      progress: show a progress bar over the replayed steps.
      desc: the progress bar's label.

    Returns:
      The retrained model at the end of the run's last epoch (training mode, as `train`
      leaves it).

    Raises:
      ValueError: an index out of range, or every example removed.
    """
    removed = self._check_removed(removed)
    # A copy: sharing the start state's Variables, training would move the start of the next
    # retraining.
    model, optimizer = self.start()
    size = self.config.batch_size
    per_epoch = train_lib.steps_per_epoch(len(self.train_set) - len(removed), size)
    bar = ProgressBar(len(self.epochs) * per_epoch, desc, enabled=progress)
    for batch in self.batches(removed):
      train_lib.train_step(model, optimizer, *train_lib.pad_batch(batch, size))
      bar.update(1)
    jax.block_until_ready(nnx.state(model))
    bar.close()
    return model


def _take(held, size: int):
  """The first `size` examples of the held (images, labels, index) parts, and the rest."""
  out, rest, need = [], [], size
  for part in held:
    if need == 0:
      rest.append(part)
    elif len(part[2]) <= need:
      out.append(part)
      need -= len(part[2])
    else:
      out.append(tuple(a[:need] for a in part))
      rest.append(tuple(a[need:] for a in part))
      need = 0
  if len(out) == 1:
    images, labels, index = out[0]
  else:
    images, labels, index = (np.concatenate([p[i] for p in out]) for i in range(3))
  return {"image": images, "label": labels, "index": index}, rest
