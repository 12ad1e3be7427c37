r"""Runs the tracin_jax experiment: `python -m experiments.run --flagfile=...`.

Intentionally kept short: parse flags, build a config, call one library function per stage
(`tracin_jax.experiment`). Examples:

  python -m experiments.run --flagfile=experiments/configs/demo.flags
  python -m experiments.run --flagfile=experiments/configs/brats19_paper.flags \
      --data_dir=/data/MICCAI_BraTS_2019_Data_Training --workdir=runs/brats19
"""

import sys

from absl import app
from absl import flags
from absl import logging

from tracin_jax import experiment
from tracin_jax.data import brats
from tracin_jax.influence import stage as influence_stage
from tracin_jax.interpret import stage as interpret_stage
from tracin_jax.interpret import validate as validate_stage
from tracin_jax.training import optim
from tracin_jax.training import train as train_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (outputs, checkpoints).")
_STAGES = flags.DEFINE_list("stages", ["train"], f"Stages to run, of {experiment.STAGES}.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")

# Data.
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "BraTS 2019 root (with HGG/ and LGG/); unset: the synthetic cohort.")
_SYN_CASES = flags.DEFINE_integer("synthetic_cases", 40, "Cases in the synthetic cohort.")
_SYN_SEED = flags.DEFINE_integer("synthetic_seed", 0, "Seed of the synthetic cohort.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Cache of cohorts and slices (default $TRACIN_JAX_CACHE or "
    "~/.cache/tracin_jax).")
_GROUPS = flags.DEFINE_list("groups", ["HGG"], "BraTS groups to load (HGG, LGG).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 10, "Consecutive axial slices per case.")
_SLICE_CENTER = flags.DEFINE_enum(
    "slice_center", "brain", ["brain", "tumour"], "Centre of the slices taken per case.")
_CROP = flags.DEFINE_integer("crop_size", 192, "In-plane centre crop (pixels).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Resize after the crop (unset: no).")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 52 / 259, "Validation share of patients.")
_NUM_VAL = flags.DEFINE_integer("num_val", None, "Validation patients (overrides fraction).")
_SPLIT_SEED = flags.DEFINE_integer("split_seed", 0, "Seed of the patient split.")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_cases", False, "Skip unreadable cases, listing them.")

# Model and training.
_MODEL = flags.DEFINE_string("model", "unet", "unet, resunet, attention_unet or deepseg.")
_WIDTH = flags.DEFINE_integer("base_width", 16, "Channels of the first level.")
_DEPTH = flags.DEFINE_integer("depth", 4, "Down-sampling levels.")
_NORM = flags.DEFINE_enum("norm", "group", ["group", "batch", "none"], "Normalisation.")
_BATCH = flags.DEFINE_integer("batch_size", 10, "Training batch size.")
_ADAM_EPOCHS = flags.DEFINE_integer("adam_epochs", 5, "Epochs with Adam.")
_SGD_EPOCHS = flags.DEFINE_integer("sgd_epochs", 25, "Epochs with plain SGD after Adam.")
_ADAM_LR = flags.DEFINE_float("adam_learning_rate", 1e-4, "Adam learning rate.")
_WD = flags.DEFINE_float("weight_decay", 1e-5, "Adam weight decay (added to the gradient).")
_SGD_LR = flags.DEFINE_float("sgd_learning_rate", 1e-2, "SGD learning rate (eta_t).")
_AUGMENT = flags.DEFINE_bool("augment", True, "Elastic, crop and mirror augmentation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of initialisation and data order.")

# Influence.
_THRESHOLD = flags.DEFINE_float("threshold", 0.8, "Region threshold on p_j (strict).")
_TRACIN_EPOCHS = flags.DEFINE_list(
    "checkpoint_epochs", None, "TracIn checkpoint epochs (default: the first SGD epochs).")
_MAX_CKPTS = flags.DEFINE_integer("max_checkpoints", 5, "Default number of SGD checkpoints.")
_TOP_K = flags.DEFINE_integer("top_k", 10, "Proponents and opponents listed per region.")
_GLOBAL_TOP = flags.DEFINE_integer("global_top", 20, "Top-n used to find global explainers.")
_GLOBAL_FRACTION = flags.DEFINE_float(
    "global_fraction", 0.5, "Share of test regions above which a train region is global.")
_LOCAL_PANELS = flags.DEFINE_integer("num_local_panels", 2, "Local explanation figures.")
_BUDGET_MB = flags.DEFINE_integer(
    "memory_budget_mb", 1024, "Memory for per-example gradients held at once (MiB).")

# Interpretation.
_FI_THRESHOLD = flags.DEFINE_float(
    "fi_threshold", 0.65, "FI at the first proponents a predictive feature must exceed.")
_SCATTER = flags.DEFINE_integer(
    "num_scatter_features", 1, "Ranked scatter figures per class for the most and the least "
    "predictive features.")

# Validation (retraining and randomisation checks).
_REGIONS_PER_CLASS = flags.DEFINE_integer(
    "regions_per_class", 7, "Validation regions per class checked by retraining.")
_NUM_REMOVED = flags.DEFINE_integer(
    "num_removed", 20, "k: training slices removed per retraining (proponents, opponents or "
    "random).")
_NUM_RANDOM = flags.DEFINE_integer(
    "num_random", 5, "Random removal sets (shared by all checked regions).")
_VALIDATE_SEED = flags.DEFINE_integer(
    "validate_seed", 0, "Seed of the checked regions, random sets and randomisation subset.")
_RETRAIN_FROM = flags.DEFINE_integer(
    "retrain_from_epoch", None, "Checkpoint retraining starts from (default: the last Adam "
    "epoch).")
_RANDOMISATION_EXAMPLES = flags.DEFINE_integer(
    "randomisation_examples", 160, "Training slices in the randomisation check (0: all).")

flags.mark_flag_as_required("workdir")


def build_config() -> experiment.ExperimentConfig:
  data = experiment.DataConfig(
      data_dir=_DATA_DIR.value, synthetic_cases=_SYN_CASES.value,
      synthetic_seed=_SYN_SEED.value, cache_dir=_CACHE_DIR.value,
      preprocess=brats.PreprocessConfig(
          num_slices=_NUM_SLICES.value, slice_center=_SLICE_CENTER.value,
          crop_size=_CROP.value, image_size=_IMAGE_SIZE.value, groups=tuple(_GROUPS.value)),
      val_fraction=_VAL_FRACTION.value, num_val=_NUM_VAL.value,
      split_seed=_SPLIT_SEED.value, skip_bad_cases=_SKIP_BAD.value)
  training = train_lib.TrainConfig(
      model=train_lib.ModelConfig(_MODEL.value, _WIDTH.value, _DEPTH.value, _NORM.value),
      optimizer=optim.OptimizerConfig(
          adam_epochs=_ADAM_EPOCHS.value, adam_learning_rate=_ADAM_LR.value,
          weight_decay=_WD.value, sgd_learning_rate=_SGD_LR.value),
      sgd_epochs=_SGD_EPOCHS.value, batch_size=_BATCH.value, augment=_AUGMENT.value,
      seed=_SEED.value)
  influence = influence_stage.InfluenceConfig(
      threshold=_THRESHOLD.value,
      checkpoint_epochs=(tuple(int(e) for e in _TRACIN_EPOCHS.value)
                         if _TRACIN_EPOCHS.value else None),
      max_checkpoints=_MAX_CKPTS.value, top_k=_TOP_K.value, global_top=_GLOBAL_TOP.value,
      global_fraction=_GLOBAL_FRACTION.value, num_local_panels=_LOCAL_PANELS.value,
      memory_budget_bytes=_BUDGET_MB.value * 2**20)
  interpret = interpret_stage.InterpretConfig(
      fi_threshold=_FI_THRESHOLD.value, num_scatter_features=_SCATTER.value)
  validate = validate_stage.ValidateConfig(
      regions_per_class=_REGIONS_PER_CLASS.value, num_removed=_NUM_REMOVED.value,
      num_random=_NUM_RANDOM.value, seed=_VALIDATE_SEED.value,
      from_epoch=_RETRAIN_FROM.value,
      randomisation_examples=_RANDOMISATION_EXAMPLES.value or None,
      memory_budget_bytes=_BUDGET_MB.value * 2**20)
  return experiment.ExperimentConfig(
      workdir=_WORKDIR.value, data=data, train=training, influence=influence,
      interpret=interpret, validate=validate)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = [s for s in _STAGES.value if s not in experiment.STAGES]
  if unknown:
    raise app.UsageError(
        f"--stages: unknown {unknown}; choose from {', '.join(experiment.STAGES)}.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  try:
    experiment.run(build_config(), _STAGES.value, progress=_PROGRESS.value)
  except (brats.BratsDataError, train_lib.RunMismatchError, FileNotFoundError,
          validate_stage.SettingsError) as e:
    # Bad input or a workdir in the way: the message says what and where; no traceback.
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
