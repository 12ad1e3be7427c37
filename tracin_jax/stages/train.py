"""The `train` stage: trains (or resumes, or reuses) the run's segmentation model.

Writes `train_config.json`, `checkpoints/<epoch>/`, `metrics.json` and
`training_curves.png` at the top of the workdir (see `tracin_jax.training.train`), and
`train/manifest.json`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tracin_jax import outputs
from tracin_jax.stages import base
from tracin_jax.training import train as train_lib
from tracin_jax.training.checkpoints import CHECKPOINT_DIR


@dataclasses.dataclass
class TrainOutputs:
  """The train stage's result.

  Attributes:
    metrics: the contents of `metrics.json` (hard Dice per class and region, train and
      validation, per patient then averaged).
    history: per-epoch records (loss, validation Dice, seconds).
    manifest: what the stage wrote.
  """

  metrics: dict[str, Any]
  history: list[dict[str, Any]]
  manifest: base.Manifest


@base.register_stage
class TrainStage(base.StageBase):
  """Adam then plain SGD, an Orbax checkpoint per epoch; resumes an interrupted run."""

  name, config_cls, needs = "train", train_lib.TrainConfig, ()
  supports_volumes = True

  def fingerprint(self, context: base.Context) -> str:
    record = train_lib.run_record(self.config, context.train_set, context.val_set)
    return base.inputs_key({"record": record, "data": context.data_fingerprint()})

  def check(self, context: base.Context) -> None:
    """Refuses a workdir holding another run's checkpoints, before anything is touched."""
    identity = dict(train_lib.run_record(self.config, context.train_set, context.val_set),
                    data=context.data_fingerprint())
    directory = context.workdir / CHECKPOINT_DIR
    has = directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())
    train_lib.check_run(context.workdir, identity, has_checkpoints=has)

  writes = (
      base.Output(train_lib.CONFIG_FILE, "the run's settings, its training and validation cases",
                  in_workdir=True),
      base.Output(train_lib.METRICS_FILE,
                  "hard Dice per class (NCR/NET, ED, ET) and region (WT, TC) on train and "
                  "validation, per patient then averaged; an empty prediction of an empty "
                  "truth counts 1.0", in_workdir=True),
      base.Output(CHECKPOINT_DIR,
                  "Orbax checkpoints per epoch: model, optimiser, metadata (epoch, step, "
                  "phase, learning_rate eta_t)", in_workdir=True),
      base.Output(train_lib.CURVES_FILE,
                  "Training loss and validation hard Dice per epoch; the dashed line marks "
                  "the switch from Adam to plain SGD.", figure=True, in_workdir=True),
  )

  def compute(self, context: base.Context) -> TrainOutputs:
    """Trains (the training library writes its checkpoints, metrics and curves as it goes,
    so that an interrupted run resumes)."""
    result = train_lib.train(self.config, context.train_set, context.val_set,
                             context.workdir, progress=context.progress,
                             dataset=context.data_name)
    val = result.metrics.get("validation", {})
    context.log(f"Validation hard Dice ({context.data_name}): "
                + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
    return TrainOutputs(result.metrics, result.history, self.manifest())

  def write(self, context: base.Context, result: TrainOutputs) -> base.Manifest:
    manifest = self.manifest()
    for output in self.writes:
      self.list_output(context, manifest, output)
    manifest.headline["validation_dice"] = result.metrics.get("validation", {})
    manifest.headline["train_dice"] = result.metrics.get("train", {})
    manifest.headline["epochs"] = result.metrics.get("epochs")
    return manifest

  def load(self, context: base.Context) -> TrainOutputs:
    """The finished run's metrics and history.

    Raises:
      StageError: the run was trained on other data (cases, slices or image shape) than
        the context's.
    """
    saved = train_lib.load_record(context.workdir)
    given = dict(train_lib.run_record(self.config, context.train_set, context.val_set),
                 data=context.data_fingerprint())
    differ = train_lib.record_differences(saved, given)
    if differ:
      raise base.StageError(
          f"the training run in {context.workdir} differs from this one in "
          f"{'; '.join(differ)}. Use that run's settings and data (its flagfile), or another "
          "--workdir.")
    metrics = outputs.read_json(context.workdir / train_lib.METRICS_FILE,
                                hint="run the train stage again")
    _, meta = train_lib.load_model(context.workdir)
    return TrainOutputs(metrics, list(meta.get("history", [])), base.Manifest.from_record(
        base.read_manifest(context.workdir, self.name)))
