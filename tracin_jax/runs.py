"""A finished run read back from its directory: what the influence stage wrote, as a result.

    from tracin_jax import runs
    influence = runs.read_influence("runs/demo", train_set, val_set)
    influence.test_blocks      # [K, n_val, K * n_train]: validation regions x training regions
    influence.val_regions      # [n_val, H, W, K]: the final model's regions

The influence stage returns the same type from its run and reads it back through
`read_influence`; the report and users' own code read a run the same way, without the stage
layer (the files' names are `tracin_jax.rundir`'s).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable

import numpy as np

from tracin_jax import errors
from tracin_jax import models
from tracin_jax import rundir
from tracin_jax.data.slices import SliceSet
from tracin_jax.influence import segmentation
from tracin_jax.training import train as train_lib


class RunMismatch(errors.UserError, ValueError):
  """A run's files are missing, or were written for other data or another model."""


@dataclasses.dataclass
class InfluenceResults:
  """TracIn of a run, with the regions of the model it explains.

  Attributes:
    train_blocks: [K, n_train, K * n_train] train-influence (NaN for absent regions).
    test_blocks: [K, n_val, K * n_train] validation-train influence.
    presence_train, presence_test: [n, K] bool.
    threshold: the region threshold used.
    class_names: the K class names.
    epochs, learning_rates: the TracIn checkpoints.
    global_explainers: the entries of `global_explainers.json`.
    apply_fn, params, state: the final model (`models.functional`).
    train_regions, val_regions: [n, H, W, K] bool regions of the final model.
    manifest: what the stage wrote, with its fingerprint (what later stages key their
      work by; the stage layer sets it).
    store: the gradient store's size and build, as its manifest's headline gives them
      (`bytes` on disk, `projection` spec or None for exact gradients, `seconds` its build
      took); None when the stage wrote no store.
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
  state: Any
  train_regions: np.ndarray
  val_regions: np.ndarray
  manifest: rundir.Manifest
  store: dict[str, Any] | None = None

  @property
  def fingerprint(self) -> str:
    return self.manifest.fingerprint


def _check_ids(f, prefix: str, slices: SliceSet, which: str) -> None:
  ids = list(zip(f[f"{prefix}_case_ids"].tolist(), f[f"{prefix}_slice_indices"].tolist()))
  if ids != [(str(c), int(z)) for c, z in slices.ids]:
    raise RunMismatch(f"The influence stage's {which} examples differ from the given "
                      f"{which} set: it was run on other data; rerun the influence stage.")


def read_influence(workdir: str | os.PathLike, train_set: SliceSet,
                   val_set: SliceSet) -> InfluenceResults:
  """The influence stage's results in `workdir`, with the final model's regions recomputed.

  Args:
    workdir: the run's directory.
    train_set, val_set: the slices the run was explained on.

  Raises:
    RunMismatch: the outputs are missing, were computed on other data, or the final model
      changed since.
  """
  workdir = pathlib.Path(workdir)
  out = workdir / rundir.INFLUENCE
  names = (rundir.INFLUENCE_TRAIN_FILE, rundir.INFLUENCE_TEST_FILE, rundir.GLOBAL_FILE)
  missing = [n for n in names if not (out / n).exists()]
  if missing:
    raise RunMismatch(f"{out} lacks {', '.join(missing)}: run the influence stage "
                      "again (--stages=...,influence,...).")
  record = rundir.read_manifest(workdir, rundir.INFLUENCE) or {"stage": rundir.INFLUENCE}
  with np.load(out / rundir.INFLUENCE_TEST_FILE) as f:
    test_blocks = f["scores"]
    presence_test, presence_train = f["presence_test"], f["presence_train"]
    threshold = float(f["threshold"])
    class_names = tuple(str(c) for c in f["class_names"])
    epochs = [int(e) for e in f["epochs"]]
    rates = [float(r) for r in f["learning_rates"]]
    _check_ids(f, "test", val_set, "validation")
    _check_ids(f, "train", train_set, "training")
  with np.load(out / rundir.INFLUENCE_TRAIN_FILE) as f:
    train_blocks = f["scores"]
  explainers = json.loads((out / rundir.GLOBAL_FILE).read_text())["global_explainers"]
  model, _ = train_lib.load_model(workdir)
  apply_fn, params, state = models.functional(model)
  train_regions, val_regions = (
      segmentation.predict_regions(apply_fn, params, s.images, threshold, state=state)
      for s in (train_set, val_set))
  if (not np.array_equal(segmentation.region_presence(train_regions), presence_train) or
      not np.array_equal(segmentation.region_presence(val_regions), presence_test)):
    raise RunMismatch("The final model's regions differ from the influence stage's: "
                      "the model changed since; rerun the influence stage.")
  return InfluenceResults(train_blocks, test_blocks, presence_train, presence_test,
                          threshold, class_names, epochs, rates, explainers, apply_fn, params,
                          state, train_regions, val_regions, rundir.Manifest.from_record(record),
                          store=record.get("headline", {}).get("store"))
