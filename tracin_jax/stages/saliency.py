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
Work is saved per image (`parts/`) and reused when the run is resumed.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax import outputs
from tracin_jax import rundir
from tracin_jax import saliency as sal
from tracin_jax.data import constants
from tracin_jax.data import slices as slices_lib
from tracin_jax.influence import layout
from tracin_jax.influence.figures import REGION_COLOURS
from tracin_jax.influence.topk import top_k
from tracin_jax.saliency import figures
from tracin_jax.saliency import instances as inst_lib
from tracin_jax.settings import setting
from tracin_jax.stages import base
from tracin_jax.training import train as train_lib

METHODS = ("vanilla_gradient", "guided_backprop", "integrated_gradients",
           "guided_integrated_gradients", "smoothgrad", "grad_cam", "guided_grad_cam",
           "grad_cam_plus_plus")
LABELS = {"vanilla_gradient": "Gradient", "guided_backprop": "Guided backprop",
          "integrated_gradients": "Integrated gradients",
          "guided_integrated_gradients": "Guided IG", "smoothgrad": "SmoothGrad",
          "grad_cam": "Grad-CAM", "guided_grad_cam": "Guided Grad-CAM",
          "grad_cam_plus_plus": "Grad-CAM++", "random": "random (chance)"}
NO_CHANNELS = ("grad_cam", "grad_cam_plus_plus")  # maps at the layer, not per input channel
PATH_METHODS = ("integrated_gradients", "guided_integrated_gradients")  # sum to F(x) - F(b)
CLASSES = constants.TUMOUR_CLASSES  # (1, 2, 3)
CLASS_NAMES = constants.TUMOUR_CLASS_NAMES
CHANNELS = constants.MODALITY_NAMES
BESIDE_TRACIN = ("smoothgrad", "integrated_gradients", "grad_cam_plus_plus")
INSTANCES_FILE, CONTEXT_FILE = rundir.INSTANCES_NAME, rundir.CONTEXT_FILE
# The settings each kind of saved work depends on (the rest only shape the figures).
MAPS_SETTINGS = ("methods", "layer", "ig_steps", "guided_ig_steps", "smoothgrad_samples",
                 "seed")
CURVE_SETTINGS = ("deletion_patch", "deletion_steps")
INSTANCE_SETTINGS = ("instance_samples", "instance_noise_level", "instance_aggregation",
                     "min_instance_size", "layer", "seed")
RANDOMISATION_SETTINGS = ("randomisation_methods", "layer", "ig_steps", "guided_ig_steps",
                          "smoothgrad_samples", "seed")
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


@dataclasses.dataclass
class SaliencyOutputs:
  """The saliency stage's result.

  Attributes:
    images: the explained validation slices, as (case, slice).
    instances: one row per instance (the entries of `instances.json`).
    faithfulness: one row per method and class (the entries of `faithfulness.json`).
    manifest: what the stage wrote.
  """

  images: list[tuple[str, int]]
  instances: list[dict[str, Any]]
  faithfulness: list[dict[str, Any]]
  manifest: base.Manifest


tag = rundir.slice_tag


@functools.lru_cache(maxsize=4)
def _probabilities_fn(apply_fn):
  return jax.jit(lambda p, x: jax.nn.softmax(apply_fn(p, x), axis=-1))


def predict(apply_fn, params, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
  """Softmax probabilities [N, H, W, K] in batches."""
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
  index = {f"{c}:{z}": a for a, (c, z) in enumerate(val_ids)}
  missing = [s for s in config.images if s not in index]
  if missing:
    examples = ", ".join(list(index)[:4])
    raise base.StageError(f"--saliency_images: {', '.join(missing)} not among the validation "
                          f"slices (case:slice, e.g. {examples}).")
  return [index[s] for s in config.images]


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

  def method(self, name: str, x, target, params=None):
    """[N, H, W, C] map of one method (the Grad-CAM family broadcast over C)."""
    f, p, c = self.m.apply_fn, self.m.params if params is None else params, self.config
    if name == "vanilla_gradient":
      return sal.vanilla_gradient(f, p, x, target)
    if name == "guided_backprop":
      return sal.guided_backprop(f, p, x, target)
    if name == "integrated_gradients":
      return sal.integrated_gradients(f, p, x, target, steps=c.ig_steps, baseline="min",
                                      memory_budget_bytes=self.budget).attributions
    if name == "guided_integrated_gradients":
      return sal.guided_integrated_gradients(f, p, x, target, steps=c.guided_ig_steps,
                                             baseline="min").attributions
    if name == "smoothgrad":
      return sal.smoothgrad(f, p, x, target, key=c.seed, num_samples=c.smoothgrad_samples,
                            memory_budget_bytes=self.budget)
    if name == "guided_grad_cam":
      return sal.guided_grad_cam(f, p, x, target, layer=self.layer)
    cam_fn = sal.grad_cam if name == "grad_cam" else sal.grad_cam_plus_plus
    cam = cam_fn(f, p, x, target, layer=self.layer).upsampled
    return jnp.broadcast_to(cam[..., None], x.shape)

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
      err = np.asarray(sal.completeness_error(f, p, x, target, m, baseline="min"))
      change = np.asarray(target(f(p, x)) - target(f(p, sal.make_baseline(x, "min"))))
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


def _instance_csv(rows: list[dict[str, Any]], rings: int) -> str:
  flat, columns = [], ["case", "slice", "instance", "class", "status", "size", "probability",
                       "driver", "grad_cam_plus_plus_inside"]
  regions = ["inside"] + [f"ring{r}" for r in range(1, rings + 1)]
  columns += [f"share_{ch}" for ch in CHANNELS]
  columns += [f"{reg}_{m}_{ch}" for reg in regions for m in inst_lib.MEASURES
              for ch in CHANNELS]
  for r in rows:
    d = {k: r[k] for k in columns if k in r}
    d.update({f"share_{ch}": float(r["share"][k]) for k, ch in enumerate(CHANNELS)})
    d.update({f"{reg}_{m}_{ch}": float(r["measures"][ch][reg][m]) for reg in regions
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


@base.register_stage
class SaliencyStage(base.StageBase):
  """Saliency maps of a few validation images beside their TracIn explanations."""

  name, config_cls, needs = "saliency", SaliencyConfig, ("influence",)

  def run(self, context: base.Context) -> SaliencyOutputs:
    config, log = self.config, context.log
    inputs = context.need("influence")
    out = context.stage_dir(self.name)
    val, train = context.val_set, context.train_set
    model, _ = train_lib.load_model(context.workdir)
    ex = _Explainer(model, config, context.memory_budget_bytes)
    f, p = ex.m.apply_fn, ex.m.params

    probs = predict(f, p, val.images)
    pred = probs.argmax(-1)
    found_all = [inst_lib.find_instances(pred[a], val.labels[a], CLASSES,
                                         probabilities=probs[a],
                                         min_size=config.min_instance_size)
                 for a in range(len(val))]
    chosen = _resolve_images(config, val.ids)
    if chosen is None:
      counts = [{s: sum(i.status == s for i in found) for s in ("FP", "FN")}
                for found in found_all]
      chosen = choose_images(val.ids, inputs.presence_test, counts,
                             inputs.val_regions.sum(axis=(1, 2, 3)), config.num_images)
    ids = [val.ids[a] for a in chosen]
    log(f"Saliency for {len(chosen)} validation slices: "
        + ", ".join(f"{c} z{z}" for c, z in ids) + f"; methods {', '.join(config.methods)}.")

    maps_parts = self._parts(context, inputs, "maps", MAPS_SETTINGS)
    faith_parts = self._parts(context, inputs, "faithfulness", MAPS_SETTINGS + CURVE_SETTINGS)
    inst_parts = self._parts(context, inputs, "instances", INSTANCE_SETTINGS)
    rand_parts = self._parts(context, inputs, "randomisation", RANDOMISATION_SETTINGS)
    manifest = self.manifest()
    all_rows, all_curves, faith_rows = [], [], []
    class_colour = {n: REGION_COLOURS[i] for i, n in enumerate(CLASS_NAMES)}
    for step, a in enumerate(chosen):
      t0 = time.perf_counter()
      name = tag(*val.ids[a])
      case, z = val.ids[a]
      image, truth_labels = val.images[a], val.labels[a]
      regions = np.moveaxis(inputs.val_regions[a], -1, 0)  # [K, H, W]
      present = regions.any(axis=(1, 2))
      x = np.broadcast_to(image[None], (len(CLASSES),) + image.shape)
      target = sal.masked_class_sums(CLASSES, regions)
      maps = maps_parts.get(f"{name}_maps", lambda: ex.maps(x, target),
                       label=f"{case} z{z}: {len(config.methods)} methods x "
                       f"{len(CLASSES)} classes")
      truth = np.stack([truth_labels == c for c in CLASSES])
      faith = faith_parts.get(f"{name}_faithfulness", lambda: {"rows": strict(
          _faithfulness(ex, x, target, maps, truth, present, config, config.seed))},
                        label=f"{case} z{z}: faithfulness")["rows"]
      for r in faith:
        r.update(case=case, slice=int(z))
      faith_rows += faith

      found = found_all[a]
      inst_maps = inst_parts.get(f"{name}_instances", lambda: self._instance_maps(
          ex, image, found), label=f"{case} z{z}: {len(found)} instances")
      cams = self._instance_cams(ex, image, found)
      rows = _table_rows(found, inst_maps, cams, (case, z), config,
                         lambda i: i.probability)
      all_rows += rows
      background = 0.0 if config.context_background == "zero" else "min"
      for inst in found:
        cv = inst_lib.context_curve(f, p, image, inst, max_dilations=config.context_dilations,
                                    background=background,
                                    min_size=config.min_instance_size)
        all_curves.append({"case": case, "slice": int(z), "instance": inst.index,
                           "class": constants.CLASS_NAMES[inst.class_index],
                           "status": inst.status, "label": inst.describe(
                               constants.CLASS_NAMES), **cv})

      # Figures of this image.
      layer_maps = ex.flow(x, target)
      flows = {CLASS_NAMES[n]: {ln: v[n] for ln, v in layer_maps.items()}
               for n in range(len(CLASSES)) if present[n]}
      if flows:
        path = out / rundir.saliency_file("information_flow", case, z)
        figures.plot_information_flow(image, flows, {CLASS_NAMES[n]: regions[n]
                                                     for n in range(len(CLASSES))}, path,
                                      title=f"Information flow: Grad-CAM at every block, "
                                      f"{case} slice {z}{context.suffix}")
        manifest.figure(self.rel(path.name), f"Grad-CAM at every convolutional block of the "
                        f"UNet for each class of {case} slice {z}, each layer scaled to its "
                        "own maximum (information flow).")
      for n, cname in enumerate(CLASS_NAMES):
        if not present[n]:
          continue
        grid = {LABELS[m]: (maps[k, n, ..., 0] if m in NO_CHANNELS else maps[k, n])
                for k, m in enumerate(config.methods)}
        path = out / rundir.saliency_file("grid", case, z, cname)
        figures.plot_method_grid(
            image, grid, regions[n], CHANNELS, path, truth=truth[n],
            colour=class_colour[cname],
            title=f"{cname} region of {case} slice {z}: saliency per modality{context.suffix}"
            "\noutlined: the explained region (p > threshold); dashed white: ground truth")
        manifest.figure(self.rel(path.name), f"Saliency of the {cname} region of {case} slice "
                        f"{z}: rows the methods, columns the modalities, the region outlined "
                        "and the ground truth dashed; one colour scale per method.",
                        kind=rundir.SALIENCY_GRID, case=str(case), slice=int(z),
                        **{"class": cname})
        path = out / rundir.saliency_file("tracin", case, z, cname)
        self._beside_tracin(inputs, a, n, image, regions[n], maps, train, path,
                            title=f"{cname} region of {case} slice {z}: saliency and TracIn"
                            f"{context.suffix}", colour=class_colour[cname])
        manifest.figure(self.rel(path.name), f"The {cname} region of {case} slice {z} "
                        "explained twice: its saliency maps (summed |map| over modalities) "
                        f"and its top {config.tracin_top} TracIn proponents and opponents "
                        "(global explainers marked GE).")
      outputs.save_npz(out / f"maps_{name}.npz", maps=maps, methods=np.asarray(config.methods),
                       classes=np.asarray(CLASS_NAMES), instance_maps=inst_maps,
                       instance_masks=np.asarray([i.mask for i in found], bool).reshape(
                           (len(found),) + image.shape[:-1]),
                       synthetic=np.asarray(context.synthetic))
      manifest.file(self.rel(f"maps_{name}.npz"), f"maps of {case} slice {z}: maps [M, K, H, W, "
                    "C] (methods x classes), instance_maps [n, H, W, C] and instance_masks")
      log(f"saliency: image {step + 1}/{len(chosen)} ({case} z{z}) done in "
          f"{time.perf_counter() - t0:.0f} s.")

    self._write_tables(context, out, manifest, all_rows, all_curves, faith_rows)
    with_region = [a for a in chosen if inputs.val_regions[a].any()]
    if with_region:
      first = with_region[0]
      rand = rand_parts.get(tag(*val.ids[first]), lambda: self._randomisation(
          ex, val.images[first], np.moveaxis(inputs.val_regions[first], -1, 0)),
                            label="cascading randomisation")
      self._write_randomisation(context, out, manifest, rand, val.ids[first])
    else:
      log("No chosen image has a region to explain: no randomisation check.")
    return SaliencyOutputs(ids, strict(all_rows), strict(faith_rows), manifest)

  def _write_randomisation(self, context, out, manifest, rand, ids) -> None:
    outputs.write_json(out / RANDOMISATION_FILE, strict({"image": list(ids), **rand}))
    manifest.file(self.rel(RANDOMISATION_FILE), "cascading parameter randomisation per method: "
                  "Spearman (|map|) and SSIM with the trained map as layers are re-drawn")
    figures.plot_randomisation(
        {LABELS[k]: v for k, v in rand["methods"].items()}, out / rundir.SALIENCY_RANDOMISATION_FIGURE,
        title=f"Cascading randomisation of the model, {ids[0]} slice {ids[1]}"
        f"{context.suffix}")
    manifest.figure(self.rel(rundir.SALIENCY_RANDOMISATION_FIGURE), "Model-parameter randomisation: each "
                    "method's similarity to its trained map as layers are re-drawn from the "
                    "head down (a faithful method's maps change).")

  # ---------------------------------------------------------------------------- pieces

  def _parts(self, context, inputs, kind: str, fields: Sequence[str]) -> base.Parts:
    """Saved work of one kind, keyed by the explained model and the settings it uses."""
    return base.Parts(context.workdir / self.name / "parts" / kind,
                      {"influence": inputs.fingerprint,
                       **{f: outputs.plain(getattr(self.config, f)) for f in fields}},
                      what=f"saliency {kind}")

  def _instance_maps(self, ex: _Explainer, image, found) -> np.ndarray:
    c = self.config
    if not found:
      return np.zeros((0,) + image.shape, np.float32)
    return np.concatenate([np.asarray(inst_lib.instance_smoothgrad(
        ex.m.apply_fn, ex.m.params, image, [inst], key=c.seed, num_samples=c.instance_samples,
        noise_level=c.instance_noise_level, aggregation=c.instance_aggregation,
        memory_budget_bytes=ex.budget), np.float32) for inst in found])

  def _instance_cams(self, ex: _Explainer, image, found) -> list[np.ndarray]:
    return [np.asarray(inst_lib.instance_grad_cam_plus_plus(
        ex.m.apply_fn, ex.m.params, image, [inst], layer=ex.layer).upsampled[0])
            for inst in found]

  def _beside_tracin(self, inputs, a, n, image, region, maps, train, path, *, title, colour):
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
        neighbours.append({"image": train.images[b], "regions": only, "kind": kind,
                           "label": f"{CLASS_NAMES[j]}{mark}\n{tc} z{tz}\n{score:.3g}"})
    shown = {LABELS[m]: np.abs(maps[config.methods.index(m), n]).sum(-1)
             for m in BESIDE_TRACIN if m in config.methods}
    figures.plot_tracin_beside_saliency(image, region, shown, neighbours, path, title=title,
                                        colour=colour)

  def _randomisation(self, ex: _Explainer, image, regions) -> dict[str, Any]:
    x = np.broadcast_to(image[None], (len(CLASSES),) + image.shape)
    target = sal.masked_class_sums(CLASSES, regions)
    present = regions.any(axis=(1, 2))
    order = ex.m.param_groups_in_call_order(x)
    methods = {}
    for name in self.config.randomisation_methods:
      res = sal.parameter_randomisation(lambda prm, name=name: ex.method(name, x, target, prm),
                                        ex.m.params, self.config.seed, layer_order=order,
                                        channel_reduce="abs_sum")
      with warnings.catch_warnings():  # a constant map has no rank correlation: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        methods[name] = {"layers": list(res.layers),
                         "spearman": np.nanmean(res.spearman_abs[:, present], 1).tolist(),
                         "ssim": np.nanmean(res.ssim[:, present], 1).tolist()}
    return {"methods": methods}

  def _write_tables(self, context, out, manifest, rows, curves, faith_rows) -> None:
    config = self.config
    outputs.write_json(out / f"{INSTANCES_FILE}.json", {
        "dataset": context.data_name, "synthetic": context.synthetic,
        "channels": list(CHANNELS), "rings": config.rings,
        "aggregation": config.instance_aggregation, "samples": config.instance_samples,
        "noise_level": config.instance_noise_level, "instances": strict(rows)})
    outputs.write_text(out / f"{INSTANCES_FILE}.csv", _instance_csv(rows, config.rings))
    manifest.file(self.rel(f"{INSTANCES_FILE}.json"), "each lesion: class, TP/FP/FN, size, "
                  "probability, the modality that drove it, and instance SmoothGrad per "
                  "modality (sum, mean, signed peak, |peak|) inside it and in each ring")
    manifest.file(self.rel(f"{INSTANCES_FILE}.csv"), "the same table, one row per lesion")
    figures.plot_modality_shares(
        [{"class": r["class"], "status": r["status"], "share": np.asarray(r["share"], float)}
         for r in rows], CHANNELS, CLASS_NAMES, out / rundir.MODALITY_SHARES_FIGURE,
        title=f"Which modality drove each lesion: instance SmoothGrad ({config.instance_aggregation})"
        f"{context.suffix}")
    manifest.figure(self.rel(rundir.MODALITY_SHARES_FIGURE), "Each modality's share of instance "
                    "saliency inside the lesion, true positives against false positives and "
                    "false negatives, per class.")
    outputs.write_json(out / CONTEXT_FILE, strict({"background": config.context_background,
                                                   "curves": curves}))
    manifest.file(self.rel(CONTEXT_FILE), "perilesional context: each instance's mean "
                  "probability and detection as the image is kept inside its k-th dilation")
    figures.plot_context_curves(curves, CLASS_NAMES, out / rundir.CONTEXT_FIGURE,
                                title=f"Perilesional context{context.suffix}")
    manifest.figure(self.rel(rundir.CONTEXT_FIGURE), "How much surrounding tissue each lesion "
                    "needs: its class probability with the image kept only inside the lesion "
                    "dilated k times.")
    summary = summarise_faithfulness(faith_rows)
    outputs.write_json(out / f"{FAITHFULNESS_FILE}.json", {
        "patch": config.deletion_patch, "steps": config.deletion_steps, "baseline": "min",
        "summary": strict(summary), "rows": strict(faith_rows)})
    outputs.write_text(out / f"{FAITHFULNESS_FILE}.csv", _csv(
        faith_rows, ["case", "slice", "method", "class", "deletion_auc", "insertion_auc",
                     "completeness_error", "relevance_mass"]))
    manifest.file(self.rel(f"{FAITHFULNESS_FILE}.json"), "deletion and insertion AUC "
                  "(normalised by the clean score), relative completeness error and relevance "
                  "mass per method and class; the summary ranks methods by deletion AUC")
    manifest.file(self.rel(f"{FAITHFULNESS_FILE}.csv"), "the same, one row per image, method "
                  "and class")
    drivers = {}
    for cname in CLASS_NAMES:
      tp = [r for r in rows if r["class"] == cname and r["status"] == "TP"]
      if tp:
        share = np.nanmean([r["share"] for r in tp], 0)
        drivers[cname] = inst_lib.driver(share, CHANNELS)
    manifest.headline.update({
        "instances": {s: sum(r["status"] == s for r in rows) for s in ("TP", "FP", "FN")},
        "modality_shares_of_true_positives": drivers,
        "faithfulness_by_deletion_auc": [
            {"method": r["method"], "deletion_auc": round(r["deletion_auc"], 4),
             "insertion_auc": round(r["insertion_auc"], 4)} for r in summary]})
    context.log("Lesions: " + ", ".join(f"{s} {n}" for s, n in
                                        manifest.headline["instances"].items())
                + "; modality shares of true positives: "
                + "; ".join(f"{c}: {d}" for c, d in drivers.items()) + ".")
    context.log("Faithfulness (deletion AUC, lower is better): " + ", ".join(
        f"{r['method']} {r['deletion_auc']:.3f}" for r in summary) + ".")

  def load(self, context: base.Context) -> SaliencyOutputs:
    import json  # pylint: disable=g-import-not-at-top

    out = context.workdir / self.name
    rows = json.loads((out / f"{INSTANCES_FILE}.json").read_text())["instances"]
    faith = json.loads((out / f"{FAITHFULNESS_FILE}.json").read_text())["rows"]
    manifest = base.Manifest.from_record(base.read_manifest(context.workdir, self.name))
    images = sorted({(r["case"], r["slice"]) for r in faith})
    return SaliencyOutputs(images, rows, faith, manifest)
