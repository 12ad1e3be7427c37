"""Explain one new image against a finished run's gradient store, in seconds.

    explanation = explain.explain_image("runs/demo", image)     # image [H, W, 4] in [-1, 1]
    explanation.proponents   # per predicted region: top-k training regions, with scores
    explain.write_explanation(explanation, "out/", train_set)   # JSON and the local panel

The influence stage writes `<workdir>/influence/store`: the training regions' gradient rows
at every TracIn checkpoint. Explaining an image then costs its own regions' gradients at
those checkpoints and one product with the stored rows; nothing of the training set is
recomputed. The image's regions are the final model's prediction (p > the stage's
threshold), and its region losses use that prediction as target, as for any unlabelled
image (eq 6). The command line is `python -m experiments.explain`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any

import numpy as np

from tracin_jax import outputs
from tracin_jax import rundir
from tracin_jax.data import constants
from tracin_jax.data import slices as slices_lib
from tracin_jax.influence import layout
from tracin_jax.influence import rankings
from tracin_jax.influence import segmentation
from tracin_jax.influence import store as store_lib

STORE_PATH = pathlib.Path(rundir.INFLUENCE) / rundir.STORE_DIR


@dataclasses.dataclass
class Explanation:
  """TracIn of one image's predicted regions against the stored training regions.

  Attributes:
    name: what the image is called in files and titles.
    image: [H, W, 4] the explained image.
    regions: [H, W, K] bool, its predicted regions.
    blocks: [K, 1, K * n_train] scores (region i of the image, then train class j's block),
      NaN where a region is absent.
    proponents: `influence.rankings.explain`'s entries (one per present region).
    train_ids: (case, slice) of every training slice.
    train_regions_present: [n_train, K] bool.
    global_columns: score columns of the run's global explainers (influence stage).
    seconds: {"load", "query", "total"}: wall time of `explain_image`.
    store_bytes: size of the store on disk.
    truth: [H, W] the ground truth the region losses scored, or None (the prediction).
    method: how the store scores: {"renormalised": bool, "projection": its description or
      None (exact), "checkpoints": the checkpoint names (epochs)}.
  """

  name: str
  image: np.ndarray
  regions: np.ndarray
  blocks: np.ndarray
  proponents: list[dict[str, Any]]
  train_ids: list[tuple[str, int]]
  train_regions_present: np.ndarray
  global_columns: list[int]
  seconds: dict[str, float]
  store_bytes: int
  truth: np.ndarray | None = None
  method: dict[str, Any] = dataclasses.field(default_factory=dict)


class _Run:
  """A finished run's store, checkpoints and final model, loaded once per workdir."""

  def __init__(self, workdir: pathlib.Path):
    from tracin_jax import models  # pylint: disable=g-import-not-at-top
    from tracin_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top

    self.store = store_lib.open_store(workdir / STORE_PATH)
    record = rundir.read_manifest(workdir, rundir.INFLUENCE)
    if record is None:
      raise FileNotFoundError(f"{rundir.manifest_path(workdir, rundir.INFLUENCE)}: the "
                              "influence stage has not finished in this run; run it first.")
    settings = record["settings"]
    self.threshold = float(settings["threshold"])
    epochs = [int(c["name"]) for c in self.store.meta["checkpoints"]]
    self.apply_fn, self.checkpoints, _ = train_lib.tracin_checkpoints(
        workdir, epochs, allow_adam=bool(settings.get("allow_adam_checkpoints")))
    model, _ = train_lib.load_model(workdir)
    self.final_apply, self.params, self.state = models.functional(model)
    self.loss_fn = segmentation.make_region_losses(self.apply_fn)
    with np.load(workdir / rundir.INFLUENCE / rundir.INFLUENCE_TRAIN_FILE) as f:
      self.presence_train = f["presence"]
      self.train_ids = list(zip(f["train_case_ids"].tolist(),
                                [int(z) for z in f["train_slice_indices"]]))
    explainers = json.loads((workdir / rundir.INFLUENCE / rundir.GLOBAL_FILE).read_text())
    self.global_columns = [int(g["column"]) for g in explainers["global_explainers"]]
    if [f"{c}:{z}" for c, z in self.train_ids] != self.store.meta["example_ids"]:
      raise store_lib.StoreMismatch(f"{workdir / STORE_PATH} holds other training slices "
                                    "than the influence stage's outputs: rerun the stage.")
    self.store.check_checkpoints(self.checkpoints)


_RUNS: dict[tuple[str, float], _Run] = {}


def has_store(workdir: str | os.PathLike) -> bool:
  """Whether the run in `workdir` has a complete gradient store."""
  path = pathlib.Path(workdir) / STORE_PATH
  try:
    return store_lib.open_store(path).is_complete()
  except (FileNotFoundError, ValueError):
    return False


def load_run(workdir: str | os.PathLike) -> _Run:
  """A finished run's store, TracIn checkpoints and final model, loaded once per workdir
  (and again when its store changes).

  Raises:
    FileNotFoundError: the run has no store.
  """
  workdir = pathlib.Path(workdir)
  store_file = workdir / STORE_PATH / store_lib.STORE_FILE
  if not store_file.is_file():
    raise FileNotFoundError(
        f"{workdir / STORE_PATH}: no gradient store; run the influence stage with the store "
        "on (the default, --store) first.")
  key = (str(workdir.resolve()), store_file.stat().st_mtime)
  if key not in _RUNS:
    _RUNS[key] = _Run(workdir)
  return _RUNS[key]


def explain_image(workdir: str | os.PathLike, image: np.ndarray, *, name: str = "image",
                  k: int = 10, labels: np.ndarray | None = None) -> Explanation:
  """TracIn of one image's predicted regions against a finished run's gradient store.

  Args:
    workdir: the run's directory (its influence stage written with the store).
    image: [H, W, 4] float32, preprocessed like the run's slices (channels T1, T1Gd, T2,
      FLAIR, in [-1, 1]; `tracin_jax.data.brats` does it for NIfTI cases).
    name: the image's name in files and titles.
    k: proponents and opponents kept per region.
    labels: [H, W] int ground truth (0 background, 1..K the classes), if the image has
      one: the region losses then score it, as the influence stage does for validation
      images; default the model's own prediction, as for any unlabelled image.

  Returns:
    The explanation (scores, top-k lists, timings).

  Raises:
    FileNotFoundError: the run has no store.
    StoreMismatch: the store was built for other checkpoints than the run's.
    ValueError: the image's shape differs from the run's slices.
  """
  start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  run = load_run(workdir)
  loaded = time.perf_counter()
  image = np.asarray(image, np.float32)
  expected = tuple(run.store.meta["example_shapes"]["['image']"])
  if image.shape != expected:
    raise ValueError(f"image must be {list(expected)} like the run's slices (H, W, channels "
                     f"T1, T1Gd, T2, FLAIR), got {list(image.shape)}.")
  regions, predicted = segmentation.predict_regions_and_labels(
      run.final_apply, run.params, image[None], run.threshold, state=run.state)
  truth = labels
  if labels is None:
    labels = predicted[0]
  elif np.shape(labels) != image.shape[:2]:
    raise ValueError(f"labels must be {list(image.shape[:2])} like the image, got "
                     f"{list(np.shape(labels))}.")
  example = {"image": image[None], "target": np.asarray(labels, np.int32)[None],
             "region": regions}
  # One image: the batch-1 loop, compiled once (no measuring of the vectorised path).
  scores = run.store.influence(run.loss_fn, run.checkpoints, example, vectorize="loop")
  presence = segmentation.region_presence(regions)
  blocks = layout.to_class_blocks(segmentation.mask_absent(scores, presence,
                                                           run.presence_train))
  proponents = rankings.explain(blocks, [(name, 0)], run.train_ids,
                                constants.TUMOUR_CLASS_NAMES, k=k,
                                global_columns=run.global_columns)
  done = time.perf_counter()
  meta = run.store.meta
  method = {"renormalised": bool(meta["normalize"]), "projection": meta["projection"],
            "checkpoints": [c["name"] for c in meta["checkpoints"]]}
  return Explanation(name, image, regions[0], blocks, proponents, run.train_ids,
                     run.presence_train, run.global_columns,
                     {"load": loaded - start, "query": done - loaded, "total": done - start},
                     run.store.nbytes(), truth, method)


def write_explanation(explanation: Explanation, out_dir: str | os.PathLike,
                      train_set: slices_lib.SliceSet | None = None, *,
                      train_regions: np.ndarray | None = None, k: int = 10,
                      case: str | None = None, slice_index: int = 0) -> list[pathlib.Path]:
  """Writes `<name>.json` (scores of the top-k, timings) and, given the training slices and
  their regions, the local explanation panel `<name>.png` (titled with `case` and
  `slice_index`, default the name and 0).

  Returns:
    The paths written.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = [out_dir / f"{explanation.name}.json"]
  outputs.write_json(written[0], {
      "image": explanation.name, "explanations": explanation.proponents,
      "regions_present": [constants.TUMOUR_CLASS_NAMES[i] for i in
                          range(explanation.regions.shape[-1])
                          if explanation.regions[..., i].any()],
      "seconds": {key: round(v, 3) for key, v in explanation.seconds.items()},
      "store_bytes": explanation.store_bytes, "method": explanation.method})
  if train_set is not None and train_regions is not None:
    from tracin_jax.influence import figures  # pylint: disable=g-import-not-at-top

    truth = (np.zeros(explanation.regions.shape[:2], np.int32) if explanation.truth is None
             else np.asarray(explanation.truth, np.int32))  # zeros: no outline drawn
    one = slices_lib.SliceSet(explanation.image[None], truth[None],
                              np.asarray([case or explanation.name]),
                              np.asarray([slice_index], np.int32))
    path = out_dir / f"{explanation.name}.png"
    figures.plot_local_explanation(0, explanation.blocks, one, explanation.regions[None],
                                   train_set, train_regions, constants.TUMOUR_CLASS_NAMES,
                                   path, k=k, global_columns=explanation.global_columns,
                                   title_suffix=" (renormalised TracIn, from the gradient "
                                   "store)" if explanation.method.get("renormalised") else
                                   " (from the gradient store)")
    written.append(path)
  return written


__all__ = ["Explanation", "explain_image", "has_store", "load_run", "write_explanation"]
