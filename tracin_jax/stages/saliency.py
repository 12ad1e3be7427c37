"""The `saliency` stage: saliency maps beside TracIn, for a few validation images.

For each chosen validation image (`--saliency_images`, or chosen: images with all three
classes, one with a false positive and one with a false negative lesion where the cohort
has them, from different cases) it writes under `<workdir>/saliency/`:
  - `grid_<image>_<class>.png`: rows the methods, columns T1, T1Gd, T2, FLAIR; each map over
    its modality with the explained region outlined, one colour scale per method. The target
    is the class logit summed over the region TracIn explains (p > threshold, the influence
    stage's regions), so both kinds of explanation answer the same question;
  - `information_flow_<image>.png`: Grad-CAM at every convolutional block, per class;
  - `tracin_<image>_<class>.png`: the region's saliency next to its top TracIn proponents
    and opponents;
  - `maps_<image>.npz`: every map (methods x classes, and the instance maps);
and, over all chosen images:
  - `instances.csv` / `instances.json`: each lesion (connected component of the predicted
    class, TP/FP/FN against the truth; false negatives through their true mask), its size,
    probability, instance SmoothGrad per modality inside it and in rings around it, each
    modality's share and the one-line answer "which modality drove it";
  - `modality_shares.png`: modality shares of TP, FP and FN instances per class;
  - `context_curves.png` / `context_curves.json`: each instance's probability as the image
    around it is revealed dilation by dilation;
  - `faithfulness.csv` / `faithfulness.json`: deletion and insertion AUC of the region's
    probability mass (normalised by its clean value; patches ranked by the summed |map|,
    replaced by each channel's minimum), the completeness error of the path methods and the
    relevance mass inside the truth, per method and class, with a random map as the chance
    level;
  - `randomisation.png` / `randomisation.json`: cascading parameter randomisation of every
    method (first image), from the head down.
On volumes (`--spatial_dims=3`) each explained image is a validation volume, named by its
case alone (`maps_<case>.npz`, `grid_<case>_<class>.png`); the maps, lesions (26-connected),
faithfulness patches (cubes) and randomisation are 3D, and each figure draws the axial slice
`figures.axial_slice` picks, recorded as `axial_slice` in the manifest. Instance SmoothGrad's
max aggregation there takes the maximum over at most `--instance_max_voxels` of each
lesion's voxels.
`compute` explains the images, saving each image's work in `parts/` (reused when the run is
resumed), and returns every map, row and curve; `write` draws and writes them (recomputing
only the information flow, which no file keeps); `load` reads them back from those files.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import time
import warnings
from typing import Any, Sequence

import jax
import numpy as np

from tracin_jax import outputs
from tracin_jax import rundir
from tracin_jax import saliency as sal
from tracin_jax.data import constants
from tracin_jax.data import slices as slices_lib
from tracin_jax.data import volumes as volumes_lib
from tracin_jax.influence import layout
from tracin_jax.influence.figures import REGION_COLOURS
from tracin_jax.influence.topk import top_k
from tracin_jax.saliency import figures
from tracin_jax.saliency import instances as inst_lib
from tracin_jax.settings import setting
from tracin_jax.stages import base
from tracin_jax.training import train as train_lib

METHODS, LABELS, NO_CHANNELS = (sal.methods.METHODS, sal.methods.LABELS,
                                sal.methods.NO_CHANNELS)
PATH_METHODS = ("integrated_gradients", "guided_integrated_gradients")  # sum to F(x) - F(b)
CLASSES = constants.TUMOUR_CLASSES  # (1, 2, 3)
CLASS_NAMES = constants.TUMOUR_CLASS_NAMES
CHANNELS = constants.MODALITY_NAMES
BESIDE_TRACIN = ("smoothgrad", "integrated_gradients", "grad_cam_plus_plus")
INSTANCES_FILE, CONTEXT_FILE = rundir.INSTANCES_NAME, rundir.CONTEXT_FILE
# The settings each kind of saved work depends on (the rest only shape the figures).
MAPS_SETTINGS = ("methods", "layer", "preset", "ig_steps", "guided_ig_steps",
                 "smoothgrad_samples", "seed")
CURVE_SETTINGS = ("deletion_patch", "deletion_steps")
INSTANCE_SETTINGS = ("instance_samples", "instance_noise_level", "instance_aggregation",
                     "min_instance_size", "layer", "preset", "seed")
VOLUME_INSTANCE_SETTINGS = ("instance_max_voxels",)  # keyed on volumes only
RANDOMISATION_SETTINGS = ("randomisation_methods", "layer", "preset", "ig_steps",
                          "guided_ig_steps", "smoothgrad_samples", "seed")
# The settings a reference preset replaces by its own (they apply to "default" only).
PRESET_SETTINGS = ("ig_steps", "guided_ig_steps", "smoothgrad_samples")
FAITHFULNESS_FILE, RANDOMISATION_FILE = (rundir.FAITHFULNESS_NAME,
                                         rundir.SALIENCY_RANDOMISATION_FILE)


@dataclasses.dataclass(frozen=True)
class SaliencyConfig:
  """Settings of the saliency stage."""

  images: tuple[str, ...] | None = setting(
      None, "Validation slices to explain, as case:slice (unset: chosen by the stage).",
      flag="saliency_images")
  num_images: int = setting(3, "Validation slices chosen when --saliency_images is unset.",
                            flag="saliency_num_images", minimum=1)
  methods: tuple[str, ...] = setting(METHODS, "Saliency methods of the grids.",
                                     flag="saliency_methods", choices=METHODS)
  layer: str = setting("last_hidden", "Layer of the Grad-CAM family.",
                       flag="saliency_layer")
  preset: str = setting(
      "default", "Settings of every method: default (this project's), neuroxai or ies (the "
      "reference systems' own, tabulated in tracin_jax/saliency/presets.py; they replace "
      "the step and sample counts below).", flag="saliency_preset",
      choices=tuple(sal.PRESETS))
  ig_steps: int = setting(50, "Integrated-gradients steps (baseline: each channel's "
                          "minimum).", minimum=1)
  guided_ig_steps: int = setting(200, "Guided integrated-gradients steps.", minimum=1)
  smoothgrad_samples: int = setting(25, "SmoothGrad samples (sigma 15% of the range, mean of "
                                    "squares).", minimum=1)
  instance_samples: int = setting(50, "Instance SmoothGrad samples (the instance-level "
                                  "preset: 50).", minimum=1)
  instance_noise_level: float = setting(
      inst_lib.IES_NOISE_LEVEL, "Instance SmoothGrad sigma as a share of the intensity "
      "range (the preset: 0.05).", minimum=0.0)
  instance_aggregation: str = setting(
      "max", "Instance SmoothGrad aggregation: max (per voxel, the preset; one backward "
      "pass per voxel and sample) or mean.", choices=("max", "mean"))
  instance_max_voxels: int = setting(
      64, "Volumes only: instance SmoothGrad's max aggregation takes the maximum over at "
      "most this many of the lesion's voxels (a seeded subsample; every voxel costs one "
      "backward pass per sample). Slices use every pixel.", minimum=1)
  min_instance_size: int = setting(
      inst_lib.DEFAULT_MIN_SIZE, "Smallest lesion kept, in pixels (components of at most 5 "
      "are dropped by default).", minimum=1)
  rings: int = setting(3, "Rings around each instance in the quantitative table.",
                       flag="saliency_rings", minimum=0)
  context_dilations: int = setting(34, "Dilations of the perilesional context curve.",
                                   minimum=0)
  context_background: str = setting(
      "min", "What replaces the image outside the context: min (each channel's minimum, "
      "the background of a normalised scan) or zero.", choices=("min", "zero"))
  deletion_patch: int = setting(4, "Patch side of the deletion and insertion curves.",
                                minimum=1)
  deletion_steps: int = setting(20, "Steps of the deletion and insertion curves.", minimum=2)
  randomisation_methods: tuple[str, ...] = setting(
      tuple(m for m in METHODS if m not in PATH_METHODS),
      "Methods of the cascading randomisation check (one map per layer group each; the "
      "path methods cost 50-200 maps each).", choices=METHODS)
  tracin_top: int = setting(3, "Proponents and opponents beside the saliency maps.",
                            minimum=1)
  seed: int = setting(0, "Seed of the noise and of the random parameters.",
                      flag="saliency_seed", minimum=0)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SaliencyConfig)}


@dataclasses.dataclass
class ImageMaps:
  """The maps of one explained image (the arrays of its `maps_<image>.npz`).

  Attributes:
    maps: [M, K, *spatial, C] float32, per method and class (the Grad-CAM family broadcast
      over the channels); spatial is H, W for a slice, D, H, W for a volume.
    instance_maps: [n, *spatial, C] float32 instance SmoothGrad, one per instance.
    instance_masks: [n, *spatial] bool, the instances.
  """

  maps: np.ndarray
  instance_maps: np.ndarray
  instance_masks: np.ndarray


@dataclasses.dataclass
class SaliencyOutputs:
  """The saliency stage's result.

  Attributes:
    images: the explained validation images, as (case, slice); slice NO_SLICE (-1) for a
      volume.
    maps: each explained image's maps, in the order of `images`.
    instances: one row per instance (the entries of `instances.json`).
    curves: one perilesional context curve per instance (the entries of
      `context_curves.json`).
    faithfulness: one row per method and class (the entries of `faithfulness.json`).
    randomisation: the cascading randomisation check (`randomisation.json`: the image and,
      per method, its layers, Spearman and SSIM), or None when no chosen image has a region.
    manifest: what the stage wrote.
  """

  images: list[tuple[str, int]]
  maps: list[ImageMaps]
  instances: list[dict[str, Any]]
  curves: list[dict[str, Any]]
  faithfulness: list[dict[str, Any]]
  randomisation: dict[str, Any] | None
  manifest: base.Manifest


tag = rundir.image_tag  # <case>_z<slice>; a volume's (slice NO_SLICE): <case>


def image_name(case: str, z: int) -> str:
  """An explained image as `--saliency_images` names it: case:slice, or the case alone for a
  volume."""
  return str(case) if int(z) == volumes_lib.NO_SLICE else f"{case}:{z}"


def _where(z: int) -> str:
  """The text after a slice's case, " slice <z>"; nothing for a volume."""
  return "" if int(z) == volumes_lib.NO_SLICE else f" slice {z}"


def _spatial_axes(a: np.ndarray) -> tuple[int, ...]:
  """The axes after the first of a [K, *spatial] array."""
  return tuple(range(1, np.ndim(a)))


@functools.lru_cache(maxsize=4)
def _probabilities_fn(apply_fn):
  return jax.jit(lambda p, x: jax.nn.softmax(apply_fn(p, x), axis=-1))


def predict(apply_fn, params, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
  """Softmax probabilities [N, *spatial, K] in batches."""
  fn = _probabilities_fn(apply_fn)
  return np.concatenate([np.asarray(fn(params, images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def choose_images(val_ids: Sequence[tuple[str, int]], presence: np.ndarray,
                  counts: Sequence[dict[str, int]], region_sizes: np.ndarray,
                  num: int) -> list[int]:
  """Validation images to explain: all three classes present, one with a false positive and
  one with a false negative where there are such, then the largest regions; one per case
  while other cases remain.

  Args:
    val_ids: (case, slice) per validation image.
    presence: [n, K] bool TracIn regions present.
    counts: per image {"FP": ..., "FN": ...} instance counts.
    region_sizes: [n] total region pixels.
    num: how many.
  """
  n = len(val_ids)
  full = [a for a in range(n) if presence[a].all()]
  pool = full or [a for a in range(n) if presence[a].any()] or list(range(n))
  pool.sort(key=lambda a: (-region_sizes[a], a))
  cases = [c for c, _ in val_ids]
  chosen: list[int] = []
  for kind in ("FP", "FN"):  # one image with each, where there is one
    if len(chosen) < num:
      chosen = slices_lib.spread_over_cases([a for a in pool if counts[a][kind] > 0], cases,
                                            len(chosen) + 1, chosen)
  return slices_lib.spread_over_cases(pool, cases, num, chosen)


def _resolve_images(config: SaliencyConfig, val_ids) -> list[int] | None:
  if config.images is None:
    return None
  index = {image_name(c, z): a for a, (c, z) in enumerate(val_ids)}
  missing = [s for s in config.images if s not in index]
  if missing:
    examples = ", ".join(list(index)[:4])
    what = ("volumes (case" if val_ids and val_ids[0][1] == volumes_lib.NO_SLICE
            else "slices (case:slice")
    raise base.StageError(f"--saliency_images: {', '.join(missing)} not among the validation "
                          f"{what}, e.g. {examples}).")
  return [index[s] for s in config.images]


def preset_counts(config: SaliencyConfig) -> dict[str, int | None]:
  """`method_map`'s step and sample counts: the settings' under the default preset, None
  (the preset's own) under a reference preset.

  Raises:
    StageError: a reference preset with any of those counts changed from its default.
  """
  if config.preset == "default":
    return {f: getattr(config, f) for f in PRESET_SETTINGS}
  changed = [f for f in PRESET_SETTINGS if getattr(config, f) != _DEFAULTS[f]]
  if changed:
    raise base.StageError(
        f"--saliency_preset={config.preset} sets its own step and sample counts; "
        f"{', '.join(f'--{f}={getattr(config, f)}' for f in changed)} would be ignored.")
  return dict.fromkeys(PRESET_SETTINGS)


class _Explainer:
  """The methods on one model, compiled once and shared by every image."""

  def __init__(self, model, config: SaliencyConfig, memory_budget_bytes: int):
    self.m = sal.NnxModel(model)
    self.config = config
    self.budget = memory_budget_bytes
    names = self.m.conv_blocks()
    if config.layer not in names:
      raise base.StageError(f"--saliency_layer={config.layer}: the model has no such block; "
                            f"its blocks: {', '.join(names)}.")
    self.layer = self.m.layer(config.layer)
    self.layers = self.m.layers()
    self.preset = sal.get_preset(config.preset)
    self.counts = preset_counts(config)

  def method(self, name: str, x, target, params=None):
    """[N, H, W, C] map of one method (the Grad-CAM family broadcast over C)."""
    c = self.config
    return sal.method_map(name, self.m.apply_fn, self.m.params if params is None else params,
                          x, target, layer=self.layer, preset=self.preset, seed=c.seed,
                          memory_budget_bytes=self.budget, **self.counts)

  def maps(self, x, target) -> np.ndarray:
    """[M, N, H, W, C] for the configured methods."""
    return np.stack([np.asarray(self.method(name, x, target), np.float32)
                     for name in self.config.methods])

  def flow(self, x, target) -> dict[str, np.ndarray]:
    """Layer name -> [N, H, W] Grad-CAM in [0, 1] (each layer normalised)."""
    out = sal.information_flow(self.m.apply_fn, self.m.params, x, target, layers=self.layers)
    return {name: np.asarray(r.display) for name, r in out.items()}


def _faithfulness(ex: _Explainer, x, target, maps: np.ndarray, truth: np.ndarray,
                  present: np.ndarray, config: SaliencyConfig, seed: int) -> list[dict]:
  """Rows (method, class) for one image: deletion/insertion AUC normalised by the clean
  score, relative completeness error, relevance mass inside the truth."""
  f, p = ex.m.apply_fn, ex.m.params
  names = list(config.methods) + ["random"]
  # Curves follow the region's probability mass (bounded, positive: AUCs comparable across
  # regions); completeness is the maps' own target, for the path methods that claim it.
  mass_target = sal.masked_class_sums(CLASSES, target.mask, on="probabilities")
  random_map = np.asarray(sal.random_saliency(seed, x.shape[:-1]))
  options = dict(patch_size=config.deletion_patch, num_steps=config.deletion_steps,
                 baseline="min", channel_reduce="abs_sum")
  rows = []
  for k, name in enumerate(names):
    m = random_map if name == "random" else maps[k]
    deletion = sal.deletion_curve(f, p, x, mass_target, m, **options)
    insertion = sal.insertion_curve(f, p, x, mass_target, m, **options)
    d_scores, i_scores = np.asarray(deletion.scores), np.asarray(insertion.scores)
    with np.errstate(divide="ignore", invalid="ignore"):  # absent classes: NaN, not shown
      d_auc = np.asarray(deletion.auc) / np.abs(d_scores[:, 0])
      i_auc = np.asarray(insertion.auc) / np.abs(i_scores[:, -1])
    complete = np.full(len(x), np.nan)
    if name in PATH_METHODS:
      b = ex.preset.options(name)["baseline"]  # the map's own baseline
      err = np.asarray(sal.completeness_error(f, p, x, target, m, baseline=b))
      change = np.asarray(target(f(p, x)) - target(f(p, sal.make_baseline(x, b))))
      complete = np.abs(err) / np.maximum(np.abs(change), 1e-12)
    mass = np.asarray(sal.relevance_mass_accuracy(
        m, truth, channel_reduce="abs_sum"))
    for n, c in enumerate(CLASSES):
      if not present[n]:
        continue
      rows.append({"method": name, "class": CLASS_NAMES[n], "deletion_auc": d_auc[n],
                   "insertion_auc": i_auc[n], "completeness_error": complete[n],
                   "relevance_mass": mass[n] if truth[n].any() else np.nan})
  return rows


def _table_rows(found, maps, cams, ids, config, probs_of) -> list[dict[str, Any]]:
  rows = []
  case, z = ids
  for inst, smap, cam in zip(found, maps, cams):
    q = inst_lib.quantify(smap, inst.mask, radius=config.rings)
    cam_inside = float(np.asarray(cam)[inst.mask].mean())
    row = {"case": case, "slice": int(z), "instance": inst.index,
           "class": constants.CLASS_NAMES[inst.class_index], "status": inst.status,
           "size": inst.size, "probability": probs_of(inst),
           "centroid": [round(v, 1) for v in inst.centroid],
           "share": q["share"], "driver": inst_lib.driver(q["share"], CHANNELS),
           "grad_cam_plus_plus_inside": cam_inside}
    regions = ["inside"] + [f"ring{r}" for r in range(1, config.rings + 1)]
    row["measures"] = {CHANNELS[k]: {reg: {m: q[m][r, k] for m in inst_lib.MEASURES}
                                     for r, reg in enumerate(regions)}
                       for k in range(len(CHANNELS))}
    rows.append(row)
  return rows


def strict(value: Any) -> Any:
  """Plain JSON with NaN and inf as null (arrays as lists), as browsers' JSON reads it."""
  if isinstance(value, dict):
    return {str(k): strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  if isinstance(value, (np.ndarray, np.generic, float)) and not isinstance(value, bool):
    a = np.asarray(value)
    return outputs.json_ready(a) if a.dtype.kind == "f" else a.tolist()
  return outputs.plain(value)


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
  writer.writeheader()
  for r in rows:
    writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
  return buf.getvalue()


def _or_nan(value: Any) -> Any:
  """`strict`'s null for NaN read back as NaN (the tables' CSV writes it `nan`)."""
  return float("nan") if value is None else value


def _instance_csv(rows: list[dict[str, Any]], rings: int) -> str:
  """The instance table, one line per lesion, from its rows (as `strict` gives them)."""
  flat, columns = [], ["case", "slice", "instance", "class", "status", "size", "probability",
                       "driver", "grad_cam_plus_plus_inside"]
  regions = ["inside"] + [f"ring{r}" for r in range(1, rings + 1)]
  columns += [f"share_{ch}" for ch in CHANNELS]
  columns += [f"{reg}_{m}_{ch}" for reg in regions for m in inst_lib.MEASURES
              for ch in CHANNELS]
  for r in rows:
    d = {k: _or_nan(r[k]) for k in columns if k in r}
    d.update({f"share_{ch}": float(_or_nan(r["share"][k])) for k, ch in enumerate(CHANNELS)})
    d.update({f"{reg}_{m}_{ch}": float(_or_nan(r["measures"][ch][reg][m])) for reg in regions
              for m in inst_lib.MEASURES for ch in CHANNELS})
    flat.append(d)
  return _csv(flat, columns)


def summarise_faithfulness(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean per method over images and classes, ranked by deletion AUC (lower is better)."""
  out = []
  for name in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == name]
    mean = {}
    for k in ("deletion_auc", "insertion_auc", "completeness_error", "relevance_mass"):
      values = np.array([np.nan if r[k] is None else r[k] for r in mine], float)
      mean[k] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    out.append({"method": name, "regions": len(mine), **mean})
  out.sort(key=lambda r: r["deletion_auc"])
  return out

def _findings(rows: list[dict[str, Any]],
              faith_rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(the headline numbers, the faithfulness summary) of the instance and faithfulness rows
  (as `strict` gives them)."""
  summary = summarise_faithfulness(faith_rows)
  drivers = {}
  for cname in CLASS_NAMES:
    tp = [r for r in rows if r["class"] == cname and r["status"] == "TP"]
    if tp:
      share = np.nanmean([np.asarray(r["share"], float) for r in tp], 0)
      drivers[cname] = inst_lib.driver(share, CHANNELS)
  headline = {
      "instances": {s: sum(r["status"] == s for r in rows) for s in ("TP", "FP", "FN")},
      "modality_shares_of_true_positives": drivers,
      "faithfulness_by_deletion_auc": [
          {"method": r["method"], "deletion_auc": round(r["deletion_auc"], 4),
           "insertion_auc": round(r["insertion_auc"], 4)} for r in summary]}
  return headline, summary


def _log_findings(context: base.Context, rows: list[dict[str, Any]],
                  faith_rows: list[dict[str, Any]]) -> None:
  headline, summary = _findings(rows, faith_rows)
  drivers = headline["modality_shares_of_true_positives"]
  context.log("Lesions: " + ", ".join(f"{s} {n}" for s, n in headline["instances"].items())
              + "; modality shares of true positives: "
              + "; ".join(f"{c}: {d}" for c, d in drivers.items()) + ".")
  context.log("Faithfulness (deletion AUC, lower is better): " + ", ".join(
      f"{r['method']} {r['deletion_auc']:.3f}" for r in summary) + ".")


def _image_fields(case: str, z: int, class_name: str | None = None) -> dict[str, Any]:
  """The template fields of one image's (and class's) outputs: `image` and `class_file` as
  `rundir.saliency_file` puts them in file names, `case`, `z` and `cname` for the text."""
  volume = int(z) == volumes_lib.NO_SLICE
  fields = {"image": tag(case, z), "case": case, "z": z, "where": _where(z),
            "dims": "D, H, W" if volume else "H, W"}
  if class_name is not None:
    fields.update(cname=class_name, class_file=rundir.class_file(class_name))
  return fields


# What the stage writes, each declared once; the names per image and class are those of
# `rundir.saliency_file` (filled by `_image_fields`).
_FLOW = base.Output(
    "information_flow_{image}.png", "Grad-CAM at every convolutional block of the UNet for "
    "each class of {case}{where}, each layer scaled to its own maximum (information "
    "flow).", figure=True)
_GRID = base.Output(
    "grid_{image}_{class_file}.png", "Saliency of the {cname} region of {case}{where}: "
    "rows the methods, columns the modalities, the region outlined and the ground truth "
    "dashed; one colour scale per method.", figure=True)
_TRACIN = base.Output(
    "tracin_{image}_{class_file}.png", "The {cname} region of {case}{where} explained "
    "twice: its saliency maps (summed |map| over modalities) and its top {top} TracIn "
    "proponents and opponents (global explainers marked GE).", figure=True)
_MAPS = base.Output(
    "maps_{image}.npz", "maps of {case}{where}: maps [M, K, {dims}, C] (methods x "
    "classes), instance_maps [n, {dims}, C] and instance_masks")
_INSTANCES_JSON = base.Output(
    f"{INSTANCES_FILE}.json", "each lesion: class, TP/FP/FN, size, probability, the modality "
    "that drove it, and instance SmoothGrad per modality (sum, mean, signed peak, |peak|) "
    "inside it and in each ring")
_INSTANCES_CSV = base.Output(f"{INSTANCES_FILE}.csv", "the same table, one row per lesion")
_SHARES_FIGURE = base.Output(
    rundir.MODALITY_SHARES_FIGURE, "Each modality's share of instance saliency inside the "
    "lesion, true positives against false positives and false negatives, per class.",
    figure=True)
_CONTEXT_JSON = base.Output(
    CONTEXT_FILE, "perilesional context: each instance's mean probability and detection as "
    "the image is kept inside its k-th dilation")
_CONTEXT_FIGURE = base.Output(
    rundir.CONTEXT_FIGURE, "How much surrounding tissue each lesion needs: its class "
    "probability with the image kept only inside the lesion dilated k times.", figure=True)
_FAITHFULNESS_JSON = base.Output(
    f"{FAITHFULNESS_FILE}.json", "deletion and insertion AUC (normalised by the clean "
    "score), relative completeness error and relevance mass per method and class; the "
    "summary ranks methods by deletion AUC")
_FAITHFULNESS_CSV = base.Output(f"{FAITHFULNESS_FILE}.csv",
                                "the same, one row per image, method and class")
_RANDOMISATION_JSON = base.Output(
    RANDOMISATION_FILE, "cascading parameter randomisation per method: Spearman (|map|) and "
    "SSIM with the trained map as layers are re-drawn")
_RANDOMISATION_FIGURE = base.Output(
    rundir.SALIENCY_RANDOMISATION_FIGURE, "Model-parameter randomisation: each method's "
    "similarity to its trained map as layers are re-drawn from the head down (a faithful "
    "method's maps change).", figure=True)


def _label(case: str, z: int) -> str:
  """An explained image in the log: `<case> z<slice>`, or the case of a volume."""
  return str(case) if int(z) == volumes_lib.NO_SLICE else f"{case} z{z}"


def _subsampled(inst: inst_lib.Instance, max_voxels: int, seed: int) -> inst_lib.Instance:
  """The instance with its mask cut to at most `max_voxels` of its voxels (a seeded
  uniform subsample), for instance SmoothGrad's max aggregation on volumes."""
  where = np.flatnonzero(inst.mask)
  if len(where) <= max_voxels:
    return inst
  keep = np.random.default_rng([seed, inst.index]).choice(where, max_voxels, replace=False)
  mask = np.zeros(inst.mask.size, bool)
  mask[keep] = True
  return dataclasses.replace(inst, mask=mask.reshape(inst.mask.shape))


def _find_all_instances(ex: _Explainer, val: slices_lib.SliceSet | volumes_lib.VolumeSet,
                        min_size: int) -> list[list[inst_lib.Instance]]:
  """Every validation image's lesions under the model (TP, FP and FN against the truth)."""
  probs = predict(ex.m.apply_fn, ex.m.params, val.images,
                  batch_size=16 if val.images.ndim == 4 else 2)
  pred = probs.argmax(-1)
  return [inst_lib.find_instances(pred[a], val.labels[a], CLASSES, probabilities=probs[a],
                                  min_size=min_size)
          for a in range(len(val))]


def _read_maps(path) -> ImageMaps:
  with np.load(path) as f:
    return ImageMaps(f["maps"], f["instance_maps"], f["instance_masks"])


@base.register_stage
class SaliencyStage(base.StageBase):
  """Saliency maps of a few validation images beside their TracIn explanations."""

  name, config_cls, needs = "saliency", SaliencyConfig, ("influence",)
  supports_volumes = True

  writes = (_FLOW, _GRID, _TRACIN, _MAPS, _INSTANCES_JSON, _INSTANCES_CSV, _SHARES_FIGURE,
            _CONTEXT_JSON, _CONTEXT_FIGURE, _FAITHFULNESS_JSON, _FAITHFULNESS_CSV,
            _RANDOMISATION_JSON, _RANDOMISATION_FIGURE)

  def fingerprint_settings(self, context: base.Context) -> dict:
    """Every setting, but a run on slices leaves out those of volumes only, so finished 2D
    runs keep their fingerprint."""
    settings = super().fingerprint_settings(context)
    if context.val_set.images.ndim != 5:
      for f in VOLUME_INSTANCE_SETTINGS:
        settings.pop(f)
    return settings

  # ---------------------------------------------------------------------------- compute

  def compute(self, context: base.Context) -> SaliencyOutputs:
    """Explains the chosen images one by one (each image's work saved in `parts/` as it
    finishes), then checks the methods by cascading randomisation on the first image with a
    region to explain."""
    inputs = context.need("influence")
    ex = self._explainer(context)
    found_all = _find_all_instances(ex, context.val_set, self.config.min_instance_size)
    chosen = self._choose(context, inputs, found_all)
    volume = context.val_set.images.ndim == 5
    parts = {kind: self._parts(context, inputs, kind, fields) for kind, fields in (
        ("maps", MAPS_SETTINGS), ("faithfulness", MAPS_SETTINGS + CURVE_SETTINGS),
        ("instances", INSTANCE_SETTINGS + (VOLUME_INSTANCE_SETTINGS if volume else ())),
        ("randomisation", RANDOMISATION_SETTINGS))}
    ids = [context.val_set.ids[a] for a in chosen]
    maps, rows, curves, faith = [], [], [], []
    for step, a in enumerate(chosen):
      t0 = time.perf_counter()
      image_maps, image_rows, image_curves, image_faith = self._explain_image(
          context, ex, inputs, parts, a, found_all[a])
      maps.append(image_maps)
      rows += image_rows
      curves += image_curves
      faith += image_faith
      context.log(f"saliency: image {step + 1}/{len(chosen)} ({_label(*ids[step])}) done "
                  f"in {time.perf_counter() - t0:.0f} s.")
    rows, faith = strict(rows), strict(faith)
    _log_findings(context, rows, faith)
    randomisation = self._randomisation_check(context, ex, inputs, parts["randomisation"],
                                              chosen)
    return SaliencyOutputs(ids, maps, rows, strict(curves), faith, randomisation,
                           self.manifest())

  def _explainer(self, context: base.Context) -> _Explainer:
    """The methods on the run's final model."""
    model, _ = train_lib.load_model(context.workdir)
    return _Explainer(model, self.config, context.memory_budget_bytes)

  def _choose(self, context: base.Context, inputs, found_all) -> list[int]:
    """The validation images to explain: those named, else `choose_images`'s."""
    config, val = self.config, context.val_set
    chosen = _resolve_images(config, val.ids)
    if chosen is None:
      counts = [{s: sum(i.status == s for i in found) for s in ("FP", "FN")}
                for found in found_all]
      chosen = choose_images(val.ids, inputs.presence_test, counts,
                             inputs.val_regions.reshape(len(val), -1).sum(1),
                             config.num_images)
    what = "slices" if val.ids[0][1] != volumes_lib.NO_SLICE else "volumes"
    context.log(f"Saliency for {len(chosen)} validation {what}: "
                + ", ".join(_label(*val.ids[a]) for a in chosen)
                + f"; methods {', '.join(config.methods)}.")
    return chosen

  def _parts(self, context, inputs, kind: str, fields: Sequence[str]) -> base.Parts:
    """Saved work of one kind, keyed by the explained model and the settings it uses."""
    # The default preset is left out of the key, so runs saved before presets existed are
    # still reused.
    keyed = [f for f in fields if not (f == "preset" and self.config.preset == "default")]
    return base.Parts(context.workdir / self.name / "parts" / kind,
                      {"influence": inputs.fingerprint,
                       **{f: outputs.plain(getattr(self.config, f)) for f in keyed}},
                      what=f"saliency {kind}")

  def _explain_image(self, context: base.Context, ex: _Explainer, inputs,
                     parts: dict[str, base.Parts], a: int, found: list[inst_lib.Instance]):
    """Validation image `a`: (its maps, its instances' rows, their context curves, its
    faithfulness rows), the maps, the faithfulness and the instance maps through `parts`."""
    config, val = self.config, context.val_set
    case, z = val.ids[a]
    name, image = tag(case, z), val.images[a]
    regions = np.moveaxis(inputs.val_regions[a], -1, 0)  # [K, *spatial]
    present = regions.any(axis=_spatial_axes(regions))
    x = np.broadcast_to(image[None], (len(CLASSES),) + image.shape)
    target = sal.masked_class_sums(CLASSES, regions)
    label = _label(case, z)
    maps = parts["maps"].get(f"{name}_maps", lambda: ex.maps(x, target),
                             label=f"{label}: {len(config.methods)} methods x "
                             f"{len(CLASSES)} classes")
    truth = np.stack([val.labels[a] == c for c in CLASSES])
    faith = parts["faithfulness"].get(f"{name}_faithfulness", lambda: {"rows": strict(
        _faithfulness(ex, x, target, maps, truth, present, config, config.seed))},
                                      label=f"{label}: faithfulness")["rows"]
    for r in faith:
      r.update(case=case, slice=int(z))
    inst_maps = parts["instances"].get(f"{name}_instances", lambda: self._instance_maps(
        ex, image, found), label=f"{label}: {len(found)} instances")
    rows = _table_rows(found, inst_maps, self._instance_cams(ex, image, found), (case, z),
                       config, lambda i: i.probability)
    curves = [self._context_curve(ex, image, inst, (case, z)) for inst in found]
    masks = np.asarray([i.mask for i in found], bool).reshape(
        (len(found),) + image.shape[:-1])
    return ImageMaps(maps, inst_maps, masks), rows, curves, faith

  def _instance_maps(self, ex: _Explainer, image, found) -> np.ndarray:
    c = self.config
    if not found:
      return np.zeros((0,) + image.shape, np.float32)
    if image.ndim == 4 and c.instance_aggregation == "max":  # a volume: the voxels capped
      found = [_subsampled(inst, c.instance_max_voxels, c.seed) for inst in found]
    return np.concatenate([np.asarray(inst_lib.instance_smoothgrad(
        ex.m.apply_fn, ex.m.params, image, [inst], key=c.seed, num_samples=c.instance_samples,
        noise_level=c.instance_noise_level, aggregation=c.instance_aggregation,
        noise_channel=ex.preset.options("instance_smoothgrad")["noise_channel"],
        memory_budget_bytes=ex.budget), np.float32) for inst in found])

  def _instance_cams(self, ex: _Explainer, image, found) -> list[np.ndarray]:
    variant = ex.preset.options("instance_grad_cam_plus_plus")["variant"]
    return [np.asarray(inst_lib.instance_grad_cam_plus_plus(
        ex.m.apply_fn, ex.m.params, image, [inst], layer=ex.layer,
        variant=variant).upsampled[0])
            for inst in found]

  def _context_curve(self, ex: _Explainer, image, inst: inst_lib.Instance,
                     ids: tuple[str, int]) -> dict[str, Any]:
    """One instance's perilesional context curve, as `context_curves.json` lists it."""
    config, (case, z) = self.config, ids
    background = 0.0 if config.context_background == "zero" else "min"
    cv = inst_lib.context_curve(ex.m.apply_fn, ex.m.params, image, inst,
                                max_dilations=config.context_dilations, background=background,
                                min_size=config.min_instance_size)
    return {"case": case, "slice": int(z), "instance": inst.index,
            "class": constants.CLASS_NAMES[inst.class_index], "status": inst.status,
            "label": inst.describe(constants.CLASS_NAMES), **cv}

  def _randomisation_check(self, context: base.Context, ex: _Explainer, inputs,
                           parts: base.Parts, chosen: list[int]) -> dict[str, Any] | None:
    """The cascading randomisation of the first chosen image with a region, as
    `randomisation.json` holds it; None when no chosen image has one."""
    val = context.val_set
    with_region = [a for a in chosen if inputs.val_regions[a].any()]
    if not with_region:
      context.log("No chosen image has a region to explain: no randomisation check.")
      return None
    first = with_region[0]
    rand = parts.get(tag(*val.ids[first]), lambda: self._randomisation(
        ex, val.images[first], np.moveaxis(inputs.val_regions[first], -1, 0)),
                     label="cascading randomisation")
    return strict({"image": list(val.ids[first]), **rand})

  def _randomisation(self, ex: _Explainer, image, regions) -> dict[str, Any]:
    x = np.broadcast_to(image[None], (len(CLASSES),) + image.shape)
    target = sal.masked_class_sums(CLASSES, regions)
    present = regions.any(axis=_spatial_axes(regions))
    spatial = {} if image.ndim == 3 else {"spatial_ndim": image.ndim - 1}
    order = ex.m.param_groups_in_call_order(x)
    methods = {}
    for name in self.config.randomisation_methods:
      res = sal.parameter_randomisation(lambda prm, name=name: ex.method(name, x, target, prm),
                                        ex.m.params, self.config.seed, layer_order=order,
                                        channel_reduce="abs_sum", **spatial)
      with warnings.catch_warnings():  # a constant map has no rank correlation: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        methods[name] = {"layers": list(res.layers),
                         "spearman": np.nanmean(res.spearman_abs[:, present], 1).tolist(),
                         "ssim": np.nanmean(res.ssim[:, present], 1).tolist()}
    return {"methods": methods}

  # ---------------------------------------------------------------------------- write

  def write(self, context: base.Context, result: SaliencyOutputs) -> base.Manifest:
    """Each image's figures and maps, the tables with their figures, the randomisation
    check, and the headline numbers."""
    manifest = self.manifest()
    ex = self._explainer(context)  # the information flow is drawn, not kept
    inputs = context.need("influence")
    for ids, maps in zip(result.images, result.maps):
      self._write_image(context, manifest, ex, inputs, ids, maps)
    self._write_instances(context, manifest, result.instances)
    self._write_context(context, manifest, result.curves)
    self._write_faithfulness(context, manifest, result.faithfulness)
    manifest.headline.update(_findings(result.instances, result.faithfulness)[0])
    if result.randomisation is not None:
      self._write_randomisation(context, manifest, result.randomisation)
    return manifest

  def _write_image(self, context: base.Context, manifest: base.Manifest, ex: _Explainer,
                   inputs, ids: tuple[str, int], maps: ImageMaps) -> None:
    """One image's figures (its information flow; per class present, its grid and its
    saliency beside TracIn) and its maps."""
    (case, z), val = ids, context.val_set
    a = val.ids.index((case, z))
    regions = np.moveaxis(inputs.val_regions[a], -1, 0)  # [K, *spatial]
    present = regions.any(axis=_spatial_axes(regions))
    self._write_flow(context, manifest, ex, val.images[a], regions, ids)
    truth = np.stack([val.labels[a] == c for c in CLASSES])
    for n in range(len(CLASSES)):
      if present[n]:
        self._write_class(context, manifest, inputs, a, n, regions[n], maps.maps, truth[n])
    outputs.save_npz(self.list_output(context, manifest, _MAPS, **_image_fields(case, z)),
                     maps=maps.maps, methods=np.asarray(self.config.methods),
                     classes=np.asarray(CLASS_NAMES), instance_maps=maps.instance_maps,
                     instance_masks=maps.instance_masks,
                     synthetic=np.asarray(context.synthetic))

  def _write_flow(self, context: base.Context, manifest: base.Manifest, ex: _Explainer,
                  image: np.ndarray, regions: np.ndarray, ids: tuple[str, int]) -> None:
    """Grad-CAM at every convolutional block for each class present (drawn, not kept)."""
    present = regions.any(axis=_spatial_axes(regions))
    if not present.any():
      return
    case, z = ids
    x = np.broadcast_to(image[None], (len(CLASSES),) + image.shape)
    layer_maps = ex.flow(x, sal.masked_class_sums(CLASSES, regions))
    flows = {CLASS_NAMES[n]: {ln: v[n] for ln, v in layer_maps.items()}
             for n in range(len(CLASSES)) if present[n]}
    options, about = {}, {}
    if image.ndim == 4:  # a volume: the axial slice of the regions' union, recorded
      first = next(iter(next(iter(flows.values())).values()))
      options["slice_index"] = figures.axial_slice(regions.any(0), [first])
      about = {"about": {"case": str(case), "axial_slice": options["slice_index"]}}
    figures.plot_information_flow(
        image, flows, {CLASS_NAMES[n]: regions[n] for n in range(len(CLASSES))},
        self.list_output(context, manifest, _FLOW, **about, **_image_fields(case, z)),
        title=f"Information flow: Grad-CAM at every block, {case}{_where(z)}{context.suffix}",
        **options)

  def _write_class(self, context: base.Context, manifest: base.Manifest, inputs, a: int,
                   n: int, region: np.ndarray, maps: np.ndarray, truth: np.ndarray) -> None:
    """The grid of image `a`'s region of class `n` and its saliency beside TracIn."""
    config, val = self.config, context.val_set
    (case, z), image = val.ids[a], val.images[a]
    cname, colour = CLASS_NAMES[n], REGION_COLOURS[n]
    fields = _image_fields(case, z, cname)
    grid = {LABELS[m]: (maps[k, n, ..., 0] if m in NO_CHANNELS else maps[k, n])
            for k, m in enumerate(config.methods)}
    about = {"kind": rundir.SALIENCY_GRID, "case": str(case), "slice": int(z), "class": cname}
    options, tracin_about = {}, {}
    if image.ndim == 4:  # a volume: the region's largest axial slice, recorded
      options["slice_index"] = figures.axial_slice(region, list(grid.values()))
      about["axial_slice"] = options["slice_index"]
      tracin_about = {"about": {"case": str(case), "class": cname,
                                "axial_slice": options["slice_index"]}}
    figures.plot_method_grid(
        image, grid, region, CHANNELS,
        self.list_output(context, manifest, _GRID, about=about, **fields), truth=truth,
        colour=colour,
        title=f"{cname} region of {case}{_where(z)}: saliency per modality{context.suffix}"
        "\noutlined: the explained region (p > threshold); dashed white: ground truth",
        **options)
    self._beside_tracin(inputs, a, n, image, region, maps, context.train_set,
                        self.list_output(context, manifest, _TRACIN, top=config.tracin_top,
                                         **tracin_about, **fields),
                        title=f"{cname} region of {case}{_where(z)}: saliency and TracIn"
                        f"{context.suffix}", colour=colour, **options)

  def _beside_tracin(self, inputs, a, n, image, region, maps, train, path, *, title, colour,
                     **options):
    config = self.config
    n_train = len(train)
    scores = inputs.test_blocks[n, a]
    ge = {g["column"] for g in inputs.global_explainers}
    pi, ps, oi, os_ = top_k(scores[None], config.tracin_top)
    neighbours = []
    for kind, idx, val in (("proponent", pi[0], ps[0]), ("opponent", oi[0], os_[0])):
      for col, score in zip(idx, val):
        if col < 0:
          continue
        j, b = layout.split_column(int(col), n_train)
        only = np.zeros_like(inputs.train_regions[b])
        only[..., j] = inputs.train_regions[b][..., j]
        tc, tz = train.ids[b]
        mark = " GE" if int(col) in ge else ""
        neighbour = {"image": train.images[b], "regions": only, "kind": kind}
        where = _label(tc, tz)
        if int(tz) == volumes_lib.NO_SLICE:  # a volume: drawn and named at its region's
          neighbour["slice"] = figures.axial_slice(only[..., j])  # largest axial slice
          where = f"{tc}, slice {neighbour['slice']}"
        neighbours.append({**neighbour,
                           "label": f"{CLASS_NAMES[j]}{mark}\n{where}\n{score:.3g}"})
    shown = {LABELS[m]: np.abs(maps[config.methods.index(m), n]).sum(-1)
             for m in BESIDE_TRACIN if m in config.methods}
    figures.plot_tracin_beside_saliency(image, region, shown, neighbours, path, title=title,
                                        colour=colour, **options)

  def _write_instances(self, context: base.Context, manifest: base.Manifest,
                       rows: list[dict[str, Any]]) -> None:
    """The instance table (JSON and CSV) and the modality shares of its lesions."""
    config = self.config
    outputs.write_json(self.list_output(context, manifest, _INSTANCES_JSON), {
        "dataset": context.data_name, "synthetic": context.synthetic,
        "channels": list(CHANNELS), "rings": config.rings,
        "aggregation": config.instance_aggregation, "samples": config.instance_samples,
        "noise_level": config.instance_noise_level, "instances": strict(rows)})
    outputs.write_text(self.list_output(context, manifest, _INSTANCES_CSV),
                       _instance_csv(rows, config.rings))
    figures.plot_modality_shares(
        [{"class": r["class"], "status": r["status"], "share": np.asarray(r["share"], float)}
         for r in rows], CHANNELS, CLASS_NAMES,
        self.list_output(context, manifest, _SHARES_FIGURE),
        title="Which modality drove each lesion: instance SmoothGrad "
        f"({config.instance_aggregation}){context.suffix}")

  def _write_context(self, context: base.Context, manifest: base.Manifest,
                     curves: list[dict[str, Any]]) -> None:
    """The perilesional context curves and their figure."""
    outputs.write_json(self.list_output(context, manifest, _CONTEXT_JSON), strict(
        {"background": self.config.context_background, "curves": curves}))
    figures.plot_context_curves(curves, CLASS_NAMES,
                                self.list_output(context, manifest, _CONTEXT_FIGURE),
                                title=f"Perilesional context{context.suffix}")

  def _write_faithfulness(self, context: base.Context, manifest: base.Manifest,
                          rows: list[dict[str, Any]]) -> None:
    """The faithfulness table with its summary (JSON) and its rows (CSV)."""
    config = self.config
    outputs.write_json(self.list_output(context, manifest, _FAITHFULNESS_JSON), {
        "patch": config.deletion_patch, "steps": config.deletion_steps, "baseline": "min",
        "summary": strict(summarise_faithfulness(rows)), "rows": strict(rows)})
    outputs.write_text(self.list_output(context, manifest, _FAITHFULNESS_CSV), _csv(
        rows, ["case", "slice", "method", "class", "deletion_auc", "insertion_auc",
               "completeness_error", "relevance_mass"]))

  def _write_randomisation(self, context: base.Context, manifest: base.Manifest,
                           randomisation: dict[str, Any]) -> None:
    """The cascading randomisation check and its figure."""
    outputs.write_json(self.list_output(context, manifest, _RANDOMISATION_JSON), randomisation)
    case, z = randomisation["image"]
    figures.plot_randomisation(
        {LABELS[k]: v for k, v in randomisation["methods"].items()},
        self.list_output(context, manifest, _RANDOMISATION_FIGURE),
        title=f"Cascading randomisation of the model, {case}{_where(z)}{context.suffix}")

  # ---------------------------------------------------------------------------- load

  def load(self, context: base.Context) -> SaliencyOutputs:
    """The result read back from the written files: the images in the order their maps
    are listed in the manifest."""
    out = context.workdir / self.name
    manifest = base.Manifest.from_record(base.read_manifest(context.workdir, self.name))
    named = {self.rel(_MAPS.path(**_image_fields(c, z))): (c, z) for c, z in context.val_set.ids}
    images = [named[p] for p in manifest.paths() if p in named]
    maps = [_read_maps(context.workdir / self.rel(_MAPS.path(**_image_fields(c, z))))
            for c, z in images]
    rows = json.loads((out / _INSTANCES_JSON.name).read_text())["instances"]
    curves = json.loads((out / _CONTEXT_JSON.name).read_text())["curves"]
    faith = json.loads((out / _FAITHFULNESS_JSON.name).read_text())["rows"]
    randomisation = (json.loads((out / RANDOMISATION_FILE).read_text())
                     if self.rel(RANDOMISATION_FILE) in manifest.paths() else None)
    return SaliencyOutputs(images, maps, rows, curves, faith, randomisation, manifest)
