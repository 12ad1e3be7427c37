"""Training of a segmentation model: Adam then SGD, Orbax checkpoints, resume, metrics.

`train(config, train_set, val_set, workdir)` is the one entry point. It writes under
`workdir`:
  - `train_config.json`: the settings and the train/validation cases of the run;
  - `checkpoints/<epoch>/`: an Orbax checkpoint at every epoch end (see `checkpoints.py`);
  - `metrics.json`: hard Dice per class and region on train and validation, after training;
  - `training_curves.png`: loss and validation Dice per epoch.
An interrupted run resumes from its latest checkpoint; a finished run is reused, never
overwritten; a workdir that holds a different run is refused with an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tracin_jax import batching
from tracin_jax import errors
from tracin_jax import models
from tracin_jax import outputs
from tracin_jax import rundir
from tracin_jax.data import constants
from tracin_jax.data import pipeline
from tracin_jax.data.slices import SliceSet
from tracin_jax.data.volumes import VolumeSet
from tracin_jax.progress import ProgressBar
from tracin_jax.settings import setting
from tracin_jax.training import losses
from tracin_jax.training import optim
from tracin_jax.data import slices as slices_lib
from tracin_jax.training.checkpoints import CheckpointError
from tracin_jax.training.checkpoints import CheckpointStore
from tracin_jax.types import Checkpoint

logger = logging.getLogger("tracin_jax")

CONFIG_FILE = rundir.TRAIN_CONFIG_FILE
METRICS_FILE = rundir.METRICS_FILE
CURVES_FILE = rundir.CURVES_FILE


# What a run trains on: axial slices (spatial_dims 2) or whole volumes (spatial_dims 3).
Examples = SliceSet | VolumeSet


class RunMismatchError(errors.UserError, RuntimeError):
  """The workdir already holds a run with other settings or data."""


class TrainingError(errors.UserError, RuntimeError):
  """Training cannot go on (a non-finite loss); the message names the step, epoch and cases."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which registered model, and its size."""

  name: str = setting("unet", "Registered model: unet, resunet, attention_unet or deepseg.",
                      flag="model", choices=models.list_models())
  base_width: int = setting(16, "Channels of the first level (the last hidden layer's maps).",
                            minimum=1)
  depth: int = setting(4, "Down-sampling levels.", minimum=1)
  norm: str = setting("group", "Normalisation: group, batch or none.",
                      choices=("group", "batch", "none"))
  # Initial background logit of the head (a prior, p_bg ~ 0.95 at initialisation): the Dice
  # loss of eq 2 excludes the background, and from a uniform start its gradient on the small
  # tumour classes vanishes, so training can settle on predicting tumour everywhere.
  background_bias: float = setting(
      3.0, "Initial background logit of the head (a prior against predicting tumour "
      "everywhere).")
  spatial_dims: int = setting(
      2, "Spatial rank of the examples: 2 trains on axial slices, 3 on whole volumes (the "
      "3D model; --volume_spacing and --volume_size give the volumes' grid).",
      choices=(2, 3))
  conv3d: str = setting(
      "direct", "How a 3D model computes its 3x3x3 convolutions: direct (one 3D convolution) "
      "or stacked (one 2D convolution over the three depth-shifted copies stacked as "
      "channels: the same model and parameters, several times faster on CPU; LoGra "
      "projects such kernels as plain parameters). Only with --spatial_dims=3.",
      choices=models.layers.CONV3D_MODES)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Settings of one training run (the paper: 30 epochs, batch 10, Adam 5 then SGD)."""

  model: ModelConfig = ModelConfig()
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  sgd_epochs: int = setting(25, "Epochs of plain SGD after Adam (TracIn's checkpoints).",
                            minimum=1)
  batch_size: int = setting(10, "Training batch size.", minimum=1)
  augment: bool = setting(True, "Elastic, crop and mirror augmentation in training.")
  seed: int = setting(0, "Seed of initialisation, data order and augmentation.")
  eval_batch_size: int = setting(32, "Images per compiled call when evaluating.", minimum=1)

  @property
  def num_epochs(self) -> int:
    return self.optimizer.adam_epochs + self.sgd_epochs

  def to_dict(self) -> dict[str, Any]:
    """The settings as a dict; `model.spatial_dims` only when it is 3 and `model.conv3d`
    only when it is not "direct", so that the record (and fingerprint) of a run is the one it
    had before these settings existed and finished runs are still reused."""
    d = dataclasses.asdict(self)
    if d["model"]["spatial_dims"] == 2:
      del d["model"]["spatial_dims"]
    if d["model"]["conv3d"] == "direct":
      del d["model"]["conv3d"]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
    d = dict(d)
    d["model"] = ModelConfig(**d["model"])
    d["optimizer"] = optim.OptimizerConfig(**d["optimizer"])
    return cls(**d)


@dataclasses.dataclass
class TrainResult:
  model: nnx.Module
  metrics: dict[str, Any]
  history: list[dict[str, Any]]
  resumed_from: int | None
  reused: bool


def build_model(config: ModelConfig, seed: int = 0) -> nnx.Module:
  """The registered model `config.name` (2D or 3D by `config.spatial_dims`) with fresh
  parameters from `seed`."""
  return models.get_model(
      config.name, base_width=config.base_width, depth=config.depth, norm=config.norm,
      background_bias=config.background_bias, spatial_dims=config.spatial_dims,
      conv3d=config.conv3d, rngs=nnx.Rngs(seed))


def build_model_and_optimizer(config: TrainConfig, tx) -> tuple[nnx.Module, nnx.Optimizer]:
  """The run's model (fresh parameters from `config.seed`) and its optimizer over `tx`."""
  model = build_model(config.model, config.seed)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def check_rank(config: ModelConfig, examples: Examples) -> None:
  """Raises ValueError unless the examples' spatial rank is `config.spatial_dims`."""
  rank = examples.labels.ndim - 1
  if rank != config.spatial_dims:
    given = "volumes [N, D, H, W, C]" if rank == 3 else "slices [N, H, W, C]"
    wanted = "volumes" if config.spatial_dims == 3 else "slices"
    raise ValueError(f"--spatial_dims={config.spatial_dims}: the examples are {given}; "
                     f"give {wanted}, or --spatial_dims={rank}.")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return -(-num_examples // batch_size)


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, images, labels, weights):
  """One update on a batch; returns (loss, soft Dice per tumour class [3])."""

  def loss_fn(m):
    return losses.dice_loss(m(images), labels, weights)

  (loss, dice), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, dice


@nnx.jit
def _predict(model: nnx.Module, images):
  return jnp.argmax(model(images), axis=-1).astype(jnp.int32)


def eval_view(model: nnx.Module) -> nnx.Module:
  """`model` in evaluation mode (BatchNorm running averages, no dropout), sharing state."""
  return nnx.view(model, use_running_average=True, deterministic=True,
                  raise_if_not_found=False)


def predict_classes(model: nnx.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """Argmax classes [N, H, W] int32 of `images` [N, H, W, 4] (volumes: [N, D, H, W] of
  [N, D, H, W, 4]), in evaluation mode."""
  view = eval_view(model)
  out = []
  for index, valid in batching.padded_batches(len(images), batch_size):  # one compiled shape
    out.append(np.asarray(_predict(view, jnp.asarray(images[index])))[:valid])
  return np.concatenate(out) if out else np.zeros(images.shape[:-1], np.int32)


def evaluate(model: nnx.Module, slices: Examples, batch_size: int = 32) -> dict[str, float]:
  """Hard Dice per class and region, per patient then averaged (see losses.per_case_dice);
  a volume is its patient's one example."""
  pred = predict_classes(model, slices.images, batch_size)
  return losses.per_case_dice(pred, slices.labels, slices.case_ids)


def run_record(config: TrainConfig, train_set: Examples, val_set: Examples) -> dict[str, Any]:
  """What identifies a training run: its settings, cases, number of slices (or volumes)
  and image shape."""
  return {
      "config": config.to_dict(),
      "train_cases": train_set.cases,
      "val_cases": val_set.cases,
      "num_train_slices": len(train_set),
      "image_shape": list(train_set.images.shape[1:]),
  }


def data_record(train_set: Examples, val_set: Examples) -> dict[str, Any]:
  """`run_record`'s facts plus a content hash of the slices a run trains and validates on."""
  return {"data": data_fingerprint(train_set, val_set)}


def data_fingerprint(train_set: Examples, val_set: Examples) -> str:
  """A hash of the training and validation slices (or volumes): images, labels and ids."""
  return slices_lib.fingerprint(train_set, val_set)


def _differences(saved: dict[str, Any], record: dict[str, Any]) -> list[str]:
  """The keys (and, under "config", the settings) whose values differ."""
  out = []
  for k in sorted(set(saved) | set(record)):
    if k == "data" and k not in saved:
      continue  # a run recorded before data hashes: its cases and shapes are compared
    if k == "config" and isinstance(saved.get(k), dict) and isinstance(record.get(k), dict):
      out += [f"--{name}" for name in _config_differences(saved[k], record[k])]
    elif json.dumps(saved.get(k)) != json.dumps(record.get(k)):
      out.append(_RECORD_KEYS.get(k, k))
  return list(dict.fromkeys(out))


# What a difference in a run record's entry means, in the flags' terms.
_RECORD_KEYS = {
    "train_cases": "cases (another --split_seed, --num_val, --val_fraction or data)",
    "val_cases": "cases (another --split_seed, --num_val, --val_fraction or data)",
    "num_train_slices": "slices (another --num_slices or data)",
    "image_shape": "image shape (another --crop_size or --image_size)",
    "data": "data (the slices' contents differ: another cohort, --data_dir, "
            "--synthetic_seed or preprocessing)",
}


def record_differences(saved: dict[str, Any], record: dict[str, Any]) -> list[str]:
  """What differs between two run records, in words that name the flags."""
  return _differences(saved, json.loads(json.dumps(record)))


def _config_differences(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
  out = []
  for k in sorted(set(saved) | set(given)):
    a, b = saved.get(k), given.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _config_differences(a, b)
    elif json.dumps(a) != json.dumps(b):
      out.append({"name": "model"}.get(k, k) + f" ({a} there, {b} here)")
  return out


def read_record(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The run record in `workdir`, or None if there is none.

  Raises:
    RunMismatchError: the record is damaged (its checksum, or not readable JSON).
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    record = outputs.read_json(path)
  except outputs.DamagedFile as e:
    raise RunMismatchError(f"{path} is damaged: {e.problem}; the run's settings and data "
                           "cannot be checked. Use another --workdir.") from None
  if not isinstance(record, dict) or "config" not in record:
    raise RunMismatchError(f"{path} is not a run record (no config); use another --workdir.")
  return record


def check_run(workdir: pathlib.Path, record: dict[str, Any], *, has_checkpoints: bool) -> bool:
  """Whether `workdir` already records this run.

  A record without a checkpoint claims nothing (the run before failed before its first
  epoch ended); it is replaced when this run saves its first checkpoint.

  Raises:
    RunMismatchError: the workdir holds checkpoints of another run (settings or data), or
      checkpoints without a record.
  """
  saved = read_record(workdir)
  if saved is None:
    if has_checkpoints:
      raise RunMismatchError(
          f"{workdir / 'checkpoints'} holds checkpoints but {workdir} has no run record "
          f"({CONFIG_FILE}): what they were trained on cannot be checked. Use another "
          "--workdir.")
    return False
  if not has_checkpoints:
    return False
  diff = _differences(saved, json.loads(json.dumps(record)))
  if diff:
    raise RunMismatchError(
        f"{workdir} already holds a training run with different {', '.join(diff)}; its "
        "checkpoints would be overwritten or mixed with this run's. Use that run's settings "
        "and data, another --workdir, or delete that directory yourself if you no longer "
        "need it.")
  return True


def train(config: TrainConfig, train_set: Examples, val_set: Examples,
          workdir: str | os.PathLike, *, progress: bool = True,
          stop_after_epoch: int | None = None, dataset: str = "",
          log=logger.info) -> TrainResult:
  """Trains (or resumes, or reuses) the run in `workdir`.

  Args:
    config: the run's settings.
    train_set: training slices, or volumes (a `VolumeSet`) with `config.model.spatial_dims`
      = 3.
    val_set: validation slices or volumes (evaluated at each epoch end).
    workdir: the run's directory.
    progress: show a progress bar per epoch.
    stop_after_epoch: stop after this epoch (as an interruption would); for tests.
    dataset: a name for the data, written into metrics.json and figure titles
      (e.g. "synthetic cohort").
    log: where one-line messages go.

  Returns:
    TrainResult with the trained model, the final metrics (empty if stopped early) and the
    per-epoch history.

  Raises:
    RunMismatchError: `workdir` holds a run with other settings or data.
  """
  workdir = pathlib.Path(workdir)
  if len(train_set) == 0:
    raise ValueError("train_set is empty: nothing to train on.")
  check_rank(config.model, train_set)
  identity = dict(run_record(config, train_set, val_set), **data_record(train_set, val_set))
  store = CheckpointStore(workdir)
  try:
    recorded = check_run(workdir, identity, has_checkpoints=bool(store.epochs()))

    n_steps = steps_per_epoch(len(train_set), config.batch_size)
    tx, schedule = optim.make_optimizer(config.optimizer, n_steps)
    model, optimizer = build_model_and_optimizer(config, tx)

    start_epoch, history, resumed_from = 1, [], None
    latest = store.latest_epoch()
    if latest is not None:
      meta = store.restore(latest, model, optimizer)
      history = list(meta.get("history", []))
      start_epoch, resumed_from = latest + 1, latest
      if latest < config.num_epochs:
        log(f"Resuming {workdir} from the checkpoint of epoch {latest}/{config.num_epochs}.")

    metrics_path = workdir / METRICS_FILE
    finished = _finished_metrics(metrics_path) if latest == config.num_epochs else None
    if finished is not None:
      log(f"{workdir} holds a finished run ({config.num_epochs} epochs); reusing it.")
      if not (workdir / CURVES_FILE).exists():  # finished by a version that drew it last
        _plot_curves(history, workdir, dataset, config)
      store.close()
      return TrainResult(model, finished, history, latest, True)

    for epoch in range(start_epoch, config.num_epochs + 1):
      if stop_after_epoch is not None and epoch > stop_after_epoch:
        store.close()
        return TrainResult(model, {}, history, resumed_from, False)
      first_step = (epoch - 1) * n_steps
      phase = optim.phase_at(config.optimizer, n_steps, first_step)
      bar = ProgressBar(n_steps, f"epoch {epoch}/{config.num_epochs} ({phase})",
                        enabled=progress)
      t0 = time.perf_counter()
      losses_sum, dice_sum, count = 0.0, np.zeros(3), 0
      for batch in pipeline.train_batches(
          train_set, config.batch_size, seed=config.seed, epoch=epoch, augment=config.augment):
        images, labels, weights = pad_batch(batch, config.batch_size)
        loss, dice = train_step(model, optimizer, images, labels, weights)
        loss, dice = float(loss), np.asarray(dice)
        if not np.isfinite(loss):
          store.close()
          cases = sorted({str(c) for c in train_set.case_ids[np.asarray(batch["index"])]})
          raise TrainingError(
              f"the training loss is {loss} at step {first_step + count + 1} (epoch {epoch}, "
              f"batch {count + 1} of {n_steps}; cases {', '.join(cases)}); no checkpoint of "
              f"epoch {epoch} was written. Lower the learning rate (--{phase}_learning_rate="
              f"{getattr(config.optimizer, phase + '_learning_rate'):g}) or check those cases.")
        losses_sum += loss
        dice_sum += dice
        count += 1
        bar.update(1, loss=losses_sum / count, dice=float(dice_sum.mean() / count))
      bar.close()
      val = evaluate(model, val_set, config.eval_batch_size) if len(val_set) else {}
      step = epoch * n_steps
      record = {
          "epoch": epoch, "loss": losses_sum / max(count, 1),
          "train_soft_dice": (dice_sum / max(count, 1)).tolist(),
          "val_dice": val, "seconds": time.perf_counter() - t0,
      }
      history.append(record)
      metadata = {
          "epoch": epoch, "step": step, "phase": phase,
          "learning_rate": float(schedule(step)),
          "next_phase": optim.phase_at(config.optimizer, n_steps, step),
          "history": history,
      }
      if not recorded:  # recorded once there is a checkpoint to describe, never before
        outputs.write_json(workdir / CONFIG_FILE, identity, checksum=True)
        recorded = True
      store.save(epoch, model, optimizer, metadata)
      val_s = " ".join(f"{k}={v:.3f}" for k, v in val.items())
      log(f"epoch {epoch}: loss {record['loss']:.4f}; validation Dice {val_s}")

    store.close()
    metrics = {
        "dataset": dataset,
        "train": evaluate(model, train_set, config.eval_batch_size),
        "validation": history[-1]["val_dice"],  # the last epoch's, of this same model
        "num_train_cases": len(train_set.cases), "num_val_cases": len(val_set.cases),
        "epochs": config.num_epochs,
        "convention": "hard Dice per patient over its slices, averaged over patients; an "
                      "empty prediction of an empty truth counts 1.0",
    }
    # The figure first: metrics.json marks the run finished, so a run killed between the two
    # draws the figure again when resumed instead of reusing a run without it.
    _plot_curves(history, workdir, dataset, config)
    outputs.write_json(metrics_path, metrics, checksum=True)
    return TrainResult(model, metrics, history, resumed_from, False)
  except BaseException:
    store.close()  # idempotent: Orbax's threads end with the error
    raise


def _finished_metrics(path: pathlib.Path) -> dict[str, Any] | None:
  """The metrics of a finished run, or None if there are none, or they are damaged (then
  that is said, and they are computed again from the final checkpoint)."""
  if not path.exists():
    return None
  try:
    return outputs.read_json(path)
  except outputs.DamagedFile as e:
    logger.warning(f"{e.path}: {e.problem}; computing the final metrics again.")
    outputs.remove(path)
    return None


def _plot_curves(history, workdir: pathlib.Path, dataset: str,
                 config: TrainConfig) -> None:
  plot_training_curves(history, workdir / CURVES_FILE,
                       title_suffix=f" ({dataset})" if dataset else "",
                       switch_epoch=config.optimizer.adam_epochs)


def pad_batch(batch: dict[str, np.ndarray], batch_size: int):
  """Pads a short last batch to `batch_size` with zero-weight copies (one compiled shape)."""
  images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
  n = len(images)
  weights = np.ones(batch_size, np.float32)
  if n < batch_size:
    pad = batch_size - n
    images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    labels = np.concatenate([labels, np.repeat(labels[-1:], pad, axis=0)])
    weights[n:] = 0.0
  return jnp.asarray(images), jnp.asarray(labels), jnp.asarray(weights)


def plot_training_curves(history: list[dict[str, Any]], path: str | os.PathLike,
                         title_suffix: str = "", switch_epoch: int | None = None) -> None:
  """Loss and validation hard Dice per epoch, in one PNG; a dashed line marks the last
  Adam epoch (`switch_epoch`) when given."""
  from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it is

  epochs = [h["epoch"] for h in history]
  fig = Figure(figsize=(10, 3.8))
  axes = fig.subplots(1, 2)
  axes[0].plot(epochs, [h["loss"] for h in history], marker="o", ms=3)
  axes[0].set(xlabel="epoch", ylabel="training loss (1 - mean soft Dice)",
              title="Training loss" + title_suffix)
  for name in constants.DICE_NAMES:
    vals = [h["val_dice"].get(name, np.nan) for h in history]
    axes[1].plot(epochs, vals, marker="o", ms=3, label=name)
  axes[1].set(xlabel="epoch", ylabel="hard Dice", ylim=(0, 1),
              title="Validation Dice" + title_suffix)
  axes[1].legend(fontsize=8, ncol=2)
  for ax in axes:
    ax.grid(alpha=0.3)
    if switch_epoch:
      ax.axvline(switch_epoch + 0.5, color="grey", ls="--", lw=1)
      ax.text(switch_epoch + 0.6, 0.02, "SGD", transform=ax.get_xaxis_transform(),
              color="grey", fontsize=8)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=110)


def load_record(workdir: str | os.PathLike) -> dict[str, Any]:
  """The record of the run in `workdir` (`train_config.json`): its settings under "config",
  its train and validation cases, number of training slices, image shape and data hash.

  Raises:
    FileNotFoundError: no record.
    RunMismatchError: a damaged record.
  """
  record = read_record(workdir)
  if record is None:
    raise FileNotFoundError(f"{pathlib.Path(workdir) / CONFIG_FILE} not found: {workdir} "
                            "holds no training run.")
  return record


def load_config(workdir: str | os.PathLike) -> TrainConfig:
  """The TrainConfig of the run in `workdir`."""
  return TrainConfig.from_dict(load_record(workdir)["config"])


def load_model(workdir: str | os.PathLike, epoch: int | None = None) -> tuple[nnx.Module, dict]:
  """The model of `workdir` at `epoch` (default: the latest), and that checkpoint's metadata."""
  config = load_config(workdir)
  # An abstract model (shapes only): restoring fills it, so no initialiser is compiled or run.
  model = nnx.eval_shape(lambda: build_model(config.model, config.seed))
  store = CheckpointStore(workdir, create=False)
  try:
    epoch = store.latest_epoch() if epoch is None else epoch
    if epoch is None:
      raise CheckpointError(f"{workdir} has no checkpoint yet: run the train stage.")
    if epoch not in store.epochs():
      raise CheckpointError(f"{workdir} has no checkpoint of epoch {epoch}; it has "
                            f"{store.epochs()}.")
    meta = store.restore(epoch, model)
  finally:
    store.close()
  return model, meta


def sgd_epochs_of(workdir: str | os.PathLike) -> list[int]:
  """Epochs whose checkpoint was written after an SGD epoch, ascending."""
  return [e for e, phase in phases_of(workdir).items() if phase == "sgd"]


def phases_of(workdir: str | os.PathLike) -> dict[int, str]:
  """The phase ('adam' or 'sgd') of each checkpoint's epoch, by epoch, ascending."""
  store = CheckpointStore(workdir, create=False)
  try:
    return {e: store.metadata(e)["phase"] for e in store.epochs()}
  finally:
    store.close()


def tracin_checkpoints(workdir: str | os.PathLike, epochs: Sequence[int] | None = None,
                       max_checkpoints: int = 5, *, allow_adam: bool = False):
  """Loads TracIn checkpoints `(params, learning_rate)` from a training run.

  Args:
    workdir: the run's directory.
    epochs: the epochs to use; default the first `max_checkpoints` epochs trained with SGD
      (the paper: the first 5 epochs after the switch), i.e. the checkpoints written at the
      end of those epochs.
    max_checkpoints: how many SGD epochs by default.
    allow_adam: accept checkpoints of Adam epochs in `epochs` (TracIn assumes SGD).

  Returns:
    (apply_fn, checkpoints, epochs): `apply_fn(params, images, state) -> logits` of the
    run's model, `checkpoints` a list of `tracin_jax.Checkpoint(params, learning_rate,
    state)` (each with its own non-parameter state, e.g. BatchNorm statistics) and the
    epochs they come from.

  Raises:
    CheckpointError: a missing, unreadable or Adam checkpoint (unless `allow_adam`).
  """
  phases = phases_of(workdir)
  if epochs is None:
    epochs = [e for e, phase in phases.items() if phase == "sgd"][:max_checkpoints]
    if not epochs:
      raise CheckpointError(f"{workdir} has no checkpoint of an SGD epoch; TracIn assumes "
                            "SGD (train with --sgd_epochs >= 1).")
  for epoch in epochs:
    if epoch not in phases:
      raise CheckpointError(f"{workdir} has no checkpoint of epoch {epoch} "
                            f"(--checkpoint_epochs); it has epochs {sorted(phases)}.")
    if phases[epoch] != "sgd" and not allow_adam:
      raise CheckpointError(
          f"the checkpoint of epoch {epoch} (--checkpoint_epochs) ends an Adam epoch; TracIn "
          "assumes plain SGD. Choose SGD epochs "
          f"{[e for e, p in phases.items() if p == 'sgd']}, or pass --allow_adam_checkpoints.")
  checkpoints = []
  apply_fn = None
  for epoch in epochs:
    model, meta = load_model(workdir, epoch)
    fn, params, state = models.functional(model)
    apply_fn = apply_fn or fn
    checkpoints.append(Checkpoint(params, float(meta["learning_rate"]), state))
  return apply_fn, checkpoints, list(epochs)
