"""The experiment's `influence` stage: TracIn explanations of a training run.

`run_influence_stage(workdir, train_set, val_set, config)` reads the run's checkpoints and
writes under `<workdir>/influence/`:
  - `train_influence.npz`: `scores` [3, n_train, 3 * n_train] (test class i, then train class
    j's block), `presence` [n_train, 3], example ids, checkpoint epochs and learning rates;
  - `test_influence.npz`: the same for validation against training
    (`scores` [3, n_val, 3 * n_train], `presence_test`, `presence_train`);
  - `proponents.json`: per validation example and predicted class, the top-k proponents and
    opponents (case, slice, class, score, global_explainer);
  - `global_explainers.json`: train regions in the top `global_top` of more than
    `global_fraction` of the validation regions;
  - figures: `train_influence.png` (Fig. 4), `proponent_classes.png` (Fig. 5),
    `self_influence.png`, `local_<case>_<slice>.png` (local explanation panels).
Per-checkpoint partial sums are saved as they finish, so an interrupted stage resumes, and a
rerun with the same inputs reuses finished work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any, Callable

import numpy as np

from tracin_jax import models
from tracin_jax import outputs
from tracin_jax.data import constants
from tracin_jax.data.slices import SliceSet
from tracin_jax.influence import core
from tracin_jax.influence import figures
from tracin_jax.influence import report
from tracin_jax.influence import segmentation
from tracin_jax.training import train as train_lib

OUT_DIR = "influence"
CLASS_NAMES = tuple(constants.CLASS_NAMES[c] for c in constants.TUMOUR_CLASSES)


@dataclasses.dataclass(frozen=True)
class InfluenceConfig:
  """Settings of the influence stage (DESIGN 3)."""

  threshold: float = 0.8
  checkpoint_epochs: tuple[int, ...] | None = None  # default: the first `max_checkpoints` SGD
  max_checkpoints: int = 5
  top_k: int = 10
  global_top: int = 20
  global_fraction: float = 0.5
  num_local_panels: int = 2
  memory_budget_bytes: int = core.DEFAULT_MEMORY_BUDGET_BYTES
  batch_size: int | None = None


def _fingerprint(workdir: pathlib.Path, epochs, config: InfluenceConfig, *sets: SliceSet) -> str:
  h = hashlib.sha256()
  h.update((workdir / train_lib.CONFIG_FILE).read_bytes())
  h.update(json.dumps([list(epochs), config.threshold]).encode())
  for s in sets:
    h.update(np.ascontiguousarray(s.images).tobytes())
    h.update(np.ascontiguousarray(s.labels).tobytes())
    h.update("|".join(f"{c}:{z}" for c, z in s.ids).encode())
  return h.hexdigest()[:16]


def _examples(slices: SliceSet, regions: np.ndarray) -> dict[str, np.ndarray]:
  return {"image": slices.images, "target": slices.labels.astype(np.int32),
          "region": regions}


def accumulate_checkpoints(name: str, partial_dir: pathlib.Path, epochs, checkpoints,
                           compute: Callable[[Any], np.ndarray], log, *,
                           label: str = "checkpoint of epoch") -> np.ndarray:
  """Sums `compute(checkpoint)` over the checkpoints, saving each part as it finishes.

  Parts already saved under `partial_dir` (as `<name>_epoch<epoch>.npy`) are reused, so an
  interrupted computation resumes. `label` names a checkpoint in the log lines.
  """
  total = None
  for t, (epoch, ckpt) in enumerate(zip(epochs, checkpoints)):
    path = partial_dir / f"{name}_epoch{epoch}.npy"
    if path.exists():
      part = np.load(path, allow_pickle=False)
      log(f"{name}: {label} {epoch} reused ({t + 1}/{len(epochs)}).")
    else:
      t0 = time.perf_counter()
      part = compute(ckpt)
      tmp = path.with_suffix(".tmp.npy")
      np.save(tmp, part)
      os.replace(tmp, path)
      log(f"{name}: {label} {epoch} done ({t + 1}/{len(epochs)}) in "
          f"{time.perf_counter() - t0:.1f} s.")
    total = part if total is None else total + part
  return total


def run_influence_stage(workdir: str | os.PathLike, train_set: SliceSet, val_set: SliceSet,
                        config: InfluenceConfig = InfluenceConfig(), *, dataset: str = "",
                        progress: bool = True, log=print) -> dict[str, Any]:
  """Computes and writes the TracIn explanations of the run in `workdir` (see module doc).

  Returns:
    A dict with the score blocks, presence masks, global explainers and output paths.
  """
  workdir = pathlib.Path(workdir)
  out = workdir / OUT_DIR
  out.mkdir(parents=True, exist_ok=True)
  epochs = config.checkpoint_epochs
  apply_fn, checkpoints, epochs = train_lib.tracin_checkpoints(
      workdir, epochs, config.max_checkpoints)
  rates = [lr for _, lr in checkpoints]
  log(f"TracIn checkpoints: epochs {epochs}, learning rates {rates}.")

  # Regions of the explained model (the final checkpoint), held fixed over checkpoints.
  # (with the final model's own apply_fn: it carries that model's non-parameter state, e.g.
  # BatchNorm statistics, which `apply_fn` takes from the first TracIn checkpoint)
  final_model, _ = train_lib.load_model(workdir)
  final_apply, final_params = models.functional(final_model)
  train_regions = segmentation.predict_regions(final_apply, final_params, train_set.images,
                                               config.threshold)
  val_regions = segmentation.predict_regions(final_apply, final_params, val_set.images,
                                             config.threshold)
  presence_train = segmentation.region_presence(train_regions)
  presence_val = segmentation.region_presence(val_regions)
  log(f"Regions (p > {config.threshold}) present in train: "
      + ", ".join(f"{n} {int(c)}" for n, c in zip(CLASS_NAMES, presence_train.sum(0)))
      + "; validation: "
      + ", ".join(f"{n} {int(c)}" for n, c in zip(CLASS_NAMES, presence_val.sum(0))) + ".")

  key = _fingerprint(workdir, epochs, config, train_set, val_set)
  partial_dir = out / "partial" / key
  partial_dir.mkdir(parents=True, exist_ok=True)
  loss_fn = segmentation.make_region_losses(apply_fn)
  train_ex = _examples(train_set, train_regions)
  val_ex = _examples(val_set, val_regions)
  kw = dict(memory_budget_bytes=config.memory_budget_bytes, batch_size=config.batch_size,
            progress=progress)

  # One train-influence of train + validation per checkpoint: each example's gradients are
  # computed once (when they fit in the budget) and serve both the train-train and the
  # validation-train blocks; the validation-validation block is cheap and dropped.
  n = len(train_set)
  both = {key: np.concatenate([train_ex[key], val_ex[key]]) for key in train_ex}
  all_scores = accumulate_checkpoints(
      "influence", partial_dir, epochs, checkpoints,
      lambda ckpt: core.influence(loss_fn, [ckpt], both, **kw), log)
  train_scores = all_scores[:n, :, :n, :]
  test_scores = all_scores[n:, :, :n, :]
  train_scores = segmentation.mask_absent(train_scores, presence_train, presence_train)
  test_scores = segmentation.mask_absent(test_scores, presence_val, presence_train)
  train_blocks = report.to_class_blocks(train_scores)
  test_blocks = report.to_class_blocks(test_scores)

  ids = dict(train_case_ids=np.asarray(train_set.case_ids, str),
             train_slice_indices=np.asarray(train_set.slice_indices, np.int32))
  common = dict(epochs=np.asarray(epochs), learning_rates=np.asarray(rates),
                threshold=np.asarray(config.threshold), class_names=np.asarray(CLASS_NAMES))
  outputs.save_npz(out / "train_influence.npz", scores=train_blocks, presence=presence_train,
            **ids, **common)
  outputs.save_npz(out / "test_influence.npz", scores=test_blocks, presence_test=presence_val,
            presence_train=presence_train,
            test_case_ids=np.asarray(val_set.case_ids, str),
            test_slice_indices=np.asarray(val_set.slice_indices, np.int32), **ids, **common)

  globals_ = report.global_explainers(test_blocks, top=config.global_top,
                                      min_fraction=config.global_fraction)
  for g in globals_:
    g["case"], g["slice"] = train_set.ids[g["train_index"]]
    g["class"] = CLASS_NAMES[g["train_class"]]
  outputs.write_json(out / "global_explainers.json", {
      "dataset": dataset, "top": config.global_top, "min_fraction": config.global_fraction,
      "num_test_regions": int(presence_val.sum()), "global_explainers": globals_})
  explanations = report.explain(
      test_blocks, val_set.ids, train_set.ids, CLASS_NAMES, k=config.top_k,
      global_columns=[g["column"] for g in globals_])
  outputs.write_json(out / "proponents.json", {
      "dataset": dataset, "k": config.top_k, "checkpoint_epochs": list(epochs),
      "threshold": config.threshold, "explanations": explanations})

  suffix = f" ({dataset})" if dataset else ""
  figures.plot_influence_matrices(train_blocks, CLASS_NAMES, out / "train_influence.png",
                                  title="Train-influence" + suffix)
  dist = report.proponent_class_distribution(train_blocks, k=config.top_k, exclude_self=True)
  figures.plot_class_distribution(dist, CLASS_NAMES, out / "proponent_classes.png",
                                  k=config.top_k, title_suffix=suffix)
  self_inf = np.stack([train_scores[np.arange(len(train_set)), i, np.arange(len(train_set)), i]
                       for i in range(len(CLASS_NAMES))], axis=1)
  figures.plot_self_influence(self_inf, train_set, train_regions, CLASS_NAMES,
                              out / "self_influence.png", title_suffix=suffix)
  panels = []
  for a in _local_choices(val_regions, config.num_local_panels):
    case, z = val_set.ids[a]
    path = out / f"local_{case}_{z}.png"
    figures.plot_local_explanation(
        a, test_blocks, val_set, val_regions, train_set, train_regions, CLASS_NAMES, path,
        k=5, title_suffix=suffix)
    panels.append(str(path))
  log(f"Wrote {out}: train_influence.npz, test_influence.npz, proponents.json, "
      f"global_explainers.json ({len(globals_)} global explainers) and figures.")
  return {"train_blocks": train_blocks, "test_blocks": test_blocks,
          "presence_train": presence_train, "presence_test": presence_val,
          "global_explainers": globals_, "epochs": epochs, "panels": panels,
          "self_influence": self_inf}


OUTPUT_FILES = ("train_influence.npz", "test_influence.npz", "global_explainers.json")


def output_paths(workdir: str | os.PathLike, *, needed_by: str) -> list[pathlib.Path]:
  """The influence stage's data files in `workdir`, checked to exist.

  Raises:
    FileNotFoundError: one is missing (the message names the stage `needed_by`).
  """
  src = pathlib.Path(workdir) / OUT_DIR
  paths = [src / name for name in OUTPUT_FILES]
  missing = [p.name for p in paths if not p.exists()]
  if missing:
    raise FileNotFoundError(f"{src} lacks {', '.join(missing)}: run the influence stage "
                            f"first (--stages=...,influence,{needed_by}).")
  return paths


@dataclasses.dataclass
class Outputs:
  """The influence stage's results, with the regions of the model they explain.

  Attributes:
    train_blocks: [K, n_train, K * n_train] train-influence (NaN for absent regions).
    test_blocks: [K, n_val, K * n_train] validation-train influence.
    presence_train, presence_test: [n, K] bool.
    threshold: the region threshold used.
    class_names: the K class names.
    epochs, learning_rates: the TracIn checkpoints.
    global_explainers: the entries of `global_explainers.json`.
    apply_fn, params: the final model (`models.functional`).
    train_regions, val_regions: [n, H, W, K] bool regions of the final model.
  """

  train_blocks: np.ndarray
  test_blocks: np.ndarray
  presence_train: np.ndarray
  presence_test: np.ndarray
  threshold: float
  class_names: tuple[str, ...]
  epochs: list[int]
  learning_rates: list[float]
  global_explainers: list[dict[str, Any]]
  apply_fn: Callable
  params: Any
  train_regions: np.ndarray
  val_regions: np.ndarray


def _check_ids(f, prefix: str, slices: SliceSet, which: str) -> None:
  ids = list(zip(f[f"{prefix}_case_ids"].tolist(), f[f"{prefix}_slice_indices"].tolist()))
  if ids != [(str(c), int(z)) for c, z in slices.ids]:
    raise ValueError(f"The influence stage's {which} examples differ from the given {which} "
                     "set: it was run on other data; rerun the influence stage.")


def load_outputs(workdir: str | os.PathLike, train_set: SliceSet, val_set: SliceSet, *,
                 needed_by: str) -> Outputs:
  """Reads the influence stage's results and recomputes the final model's regions.

  Raises:
    FileNotFoundError: the influence stage has not been run in `workdir`.
    ValueError: it was run on other data, or the final model changed since.
  """
  train_npz, test_npz, explainers_json = output_paths(workdir, needed_by=needed_by)
  with np.load(test_npz) as f:
    test_blocks = f["scores"]
    presence_test, presence_train = f["presence_test"], f["presence_train"]
    threshold = float(f["threshold"])
    class_names = tuple(str(c) for c in f["class_names"])
    epochs = [int(e) for e in f["epochs"]]
    rates = [float(r) for r in f["learning_rates"]]
    _check_ids(f, "test", val_set, "validation")
    _check_ids(f, "train", train_set, "training")
  with np.load(train_npz) as f:
    train_blocks = f["scores"]
  explainers = json.loads(explainers_json.read_text())["global_explainers"]
  model, _ = train_lib.load_model(workdir)
  apply_fn, params = models.functional(model)
  train_regions = segmentation.predict_regions(apply_fn, params, train_set.images, threshold)
  val_regions = segmentation.predict_regions(apply_fn, params, val_set.images, threshold)
  if (not np.array_equal(segmentation.region_presence(train_regions), presence_train) or
      not np.array_equal(segmentation.region_presence(val_regions), presence_test)):
    raise ValueError("The final model's regions differ from the influence stage's: the "
                     "model changed since; rerun the influence stage.")
  return Outputs(train_blocks, test_blocks, presence_train, presence_test, threshold,
                 class_names, epochs, rates, explainers, apply_fn, params, train_regions,
                 val_regions)


def _local_choices(regions: np.ndarray, num: int) -> list[int]:
  """Validation examples with the most predicted classes, then the largest regions."""
  present = regions.any(axis=(1, 2)).sum(axis=1)
  size = regions.sum(axis=(1, 2, 3))
  order = np.lexsort((-size, -present))
  return [int(a) for a in order[:num] if present[a] > 0]
