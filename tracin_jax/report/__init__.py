"""An HTML report of a run, from its stages' manifests: `<workdir>/report/index.html`.

    from tracin_jax import report
    path = report.build_report("runs/demo")                      # the index alone
    path = report.build_report("runs/demo", train_set=train, val_set=val)  # with image pages

The index shows the run's data, stage timings, Dice, the checks against retraining and
randomisation, the saliency tables and every figure a manifest lists with its caption; a page
per explained validation image shows it in four modalities with its predicted regions and, per
class, its top TracIn proponents and opponents as thumbnails (global explainers marked) beside
its saliency grids, and an interactive viewer of the whole case (`viewer`: NiiVue, bundled;
its volumes embedded in the page). Pages open offline from the file system: styles are inline,
images are files beside them (figures are linked where their stage wrote them), the viewer's
scripts are in `report/static/`, once. A page of a case the export stage wrote links
its NIfTI files and shows its check figure; its viewer shows those files on the scan. On
volumes (a run with `--spatial_dims=3`) a page is a validation volume's, its figures drawn at
the axial slice of its regions' largest cross-section (`representative_slice`), named "axial
slice z of D", each proponent's and opponent's thumbnail at its own region's. Templates are
Jinja2 with autoescaping, so case names and every other string from the data are escaped
(and reach the viewer's scripts as JSON data only).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import shutil
from typing import Any, Callable, Mapping, Sequence

import jinja2
import numpy as np

from tracin_jax import explain
from tracin_jax import outputs
from tracin_jax import rundir
from tracin_jax import runs
from tracin_jax.data import constants
from tracin_jax.data.slices import SliceSet
from tracin_jax.data.slices import spread_over_cases
from tracin_jax.influence import layout
from tracin_jax.influence.figures import REGION_COLOURS
from tracin_jax.influence.figures import new_figure
from tracin_jax.influence.figures import overlay
from tracin_jax.influence.figures import representative_slice
from tracin_jax.influence.topk import top_k
from tracin_jax.report import viewer

# What `build_report` takes for the pages' viewers: by (case, slice), the volumes of a page's
# viewer (or a `viewer.Viewer`, which also says where it opens); None or a missing key: the
# default (the case's slices); an empty sequence: no viewer on that page.
PageVolumes = Sequence[viewer.ViewerVolume] | viewer.Viewer | None
ViewerVolumes = (Mapping[tuple[str, int], PageVolumes]
                 | Callable[[str, int], PageVolumes])

REPORT_DIR = rundir.REPORT
INDEX = rundir.REPORT_INDEX
PAGES = rundir.REPORT_PAGES
CHANNELS = constants.MODALITY_NAMES
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(pathlib.Path(__file__).parent / "templates")),
    autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
    trim_blocks=True, lstrip_blocks=True)


def fmt(value: Any, digits: int = 3) -> str:
  """A number for a table: `digits` significant decimals, "n/a" for None or NaN."""
  if value is None:
    return "n/a"
  if isinstance(value, (bool, np.bool_)):
    return "yes" if value else "no"
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
  return str(value)


def _flat_settings(settings: Any, prefix: str = "") -> list[tuple[str, str]]:
  if isinstance(settings, dict):
    rows = []
    for k, v in settings.items():
      rows += _flat_settings(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}")
    return rows
  return [(prefix.rstrip("."), json.dumps(settings))]


def _stage_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  rows = []
  for r in records:
    rows.append({
        "stage": r["stage"], "seconds": fmt(r.get("seconds"), 1),
        "finished": r.get("finished", ""), "fingerprint": r.get("fingerprint", "")[:12],
        "settings": _flat_settings(r.get("settings", {})),
        "files": [dict(f, href=f"../{f['path']}") for f in r.get("files", [])],
        "figures": [dict(f, src=f"../{f['path']}") for f in r.get("figures", [])]})
  return rows


def _dice(train: dict[str, Any] | None) -> dict[str, Any] | None:
  if not train:
    return None
  head = train.get("headline", {})
  splits = [("train", head.get("train_dice")), ("validation", head.get("validation_dice"))]
  splits = [(n, d) for n, d in splits if d]
  if not splits:
    return None
  columns = list(splits[0][1])
  return {"columns": columns,
          "rows": [{"name": n, "values": [fmt(d.get(c)) for c in columns]} for n, d in splits]}


def _validate(record: dict[str, Any] | None) -> dict[str, Any] | None:
  if not record:
    return None
  head = record.get("headline", {})
  change = head.get("dice_change", {})
  retraining = [{"name": name, "mean": fmt(v.get("mean"), 4), "low": fmt(v.get("low"), 4),
                 "high": fmt(v.get("high"), 4), "n": v.get("n")}
                for name, v in change.items() if isinstance(v, dict)]
  other = []
  for key, value in head.items():
    if key in ("dice_change", "num_removed", "baseline_reproduces_run"):
      continue
    if isinstance(value, dict):
      value = ", ".join(f"{k} {fmt(v, 4)}" for k, v in value.items()
                        if not isinstance(v, (dict, list)))
    other.append((key.replace("_", " "), fmt(value, 4)))
  return {"retraining": retraining, "num_removed": head.get("num_removed"),
          "reproduces": head.get("baseline_reproduces_run"), "other": other}


def _saliency(workdir: pathlib.Path, record: dict[str, Any] | None) -> dict[str, Any] | None:
  if not record:
    return None
  out = workdir / rundir.SALIENCY
  faithfulness = json.loads((out / f"{rundir.FAITHFULNESS_NAME}.json").read_text())
  faith = faithfulness["summary"]
  rows = json.loads((out / f"{rundir.INSTANCES_NAME}.json").read_text())["instances"]
  return {
      "faithfulness": [{"method": r["method"], "regions": r["regions"],
                        **{k: fmt(r[k]) for k in ("deletion_auc", "insertion_auc",
                                                  "completeness_error", "relevance_mass")}}
                       for r in faith],
      "instances": [dict(r, probability=fmt(r.get("probability"), 2)) for r in rows],
      "images": sorted({(r["case"], int(r["slice"])) for r in rows}
                       | {(r["case"], int(r["slice"])) for r in faithfulness["rows"]}),
      "grids": rundir.saliency_grids(record)}


# ----------------------------------------------------------------------------- images


def _save_rgb(path: pathlib.Path, rgb: np.ndarray) -> None:
  from matplotlib import image as mpimg  # pylint: disable=g-import-not-at-top

  with outputs.atomic_path(path) as tmp:
    mpimg.imsave(tmp, np.clip(rgb, 0, 1), origin="lower", format="png")


def _thumbnail(path: pathlib.Path, image: np.ndarray, regions: np.ndarray, j: int) -> None:
  """FLAIR with region j of `regions` [H, W, K] filled in its colour."""
  only = np.zeros_like(regions)
  only[..., j] = regions[..., j]
  _save_rgb(path, overlay(image, only))


def _modalities(path: pathlib.Path, image: np.ndarray, regions: np.ndarray,
                truth: np.ndarray, title: str) -> None:
  """Four modalities with predicted regions outlined [H, W, K] and truth labels dashed."""
  fig = new_figure(figsize=(11, 3.1))
  axes = fig.subplots(1, image.shape[-1])
  for k, ax in enumerate(axes):
    ax.imshow(np.swapaxes((np.clip(image[..., k], -1, 1) + 1) / 2, 0, 1), cmap="gray",
              origin="lower", vmin=0, vmax=1)
    for j in range(regions.shape[-1]):
      for mask, style, width in ((regions[..., j], "solid", 1.2),
                                 (truth == j + 1, "dashed", 0.8)):
        if mask.any() and not mask.all():
          ax.contour(np.swapaxes(mask.astype(float), 0, 1), levels=[0.5],
                     colors=[REGION_COLOURS[j]], linestyles=style, linewidths=width,
                     origin="lower")
    ax.set_title(CHANNELS[k] if k < len(CHANNELS) else f"channel {k}", fontsize=10)
    ax.axis("off")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=90)


def choose_pages(val_ids: Sequence[tuple[str, int]], val_regions: np.ndarray,
                 first: Sequence[tuple[str, int]], num: int) -> list[int]:
  """Validation images that get a page: `first` (e.g. the saliency stage's), then the
  images with the largest predicted regions, one per case while other cases remain."""
  index = {(str(c), int(z)): a for a, (c, z) in enumerate(val_ids)}
  chosen = [index[(str(c), int(z))] for c, z in first if (str(c), int(z)) in index][:num]
  order = sorted(range(len(val_ids)), key=lambda a: (-int(val_regions[a].sum()), a))
  return spread_over_cases(order, [c for c, _ in val_ids], num, chosen)


def _page(report_dir: pathlib.Path, a: int, influence, train_set: SliceSet,
          val_set: SliceSet, saliency: dict[str, Any] | None, top: int,
          made: set[tuple[int, int]], blocks: np.ndarray,
          exported: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
  """Writes the images of validation image a's page; returns its template values.

  `blocks` [K, 1, K * n_train] are the image's scores (a query of the gradient store, or
  the influence stage's own row); the page also says how many of each region's top
  proponents the influence stage's exact scores share. A volume's images are its axial
  slice of its regions' largest cross-section, a training region's thumbnail its own
  region's (`representative_slice`). `exported`: the export stage's files of each case
  (`_exported`)."""
  case, z = val_set.ids[a]
  name = f"val{a:04d}"
  folder = report_dir / PAGES / name
  folder.mkdir(parents=True, exist_ok=True)
  regions = influence.val_regions[a]
  volume = np.ndim(regions) == 4  # [D, H, W, K]
  image, truth, shown = val_set.images[a], val_set.labels[a], regions
  where = f"slice {z}"
  heading = f"{case} {where}"
  if volume:
    d = representative_slice(regions.any(-1))
    where = f"axial slice {d} of {regions.shape[0]}"
    heading = f"{case}, {where}"
    image, truth, shown = image[d], truth[d], regions[d]
  _modalities(folder / "modalities.png", image, shown, truth, heading)
  _save_rgb(folder / "thumb.png", overlay(image, shown))
  n_train = len(train_set)
  ge = {int(g["column"]) for g in influence.global_explainers}
  classes = []
  for i, cname in enumerate(influence.class_names):
    entry = {"name": cname, "size": int(regions[..., i].sum()),
             "present": bool(influence.presence_test[a, i]), "proponents": [],
             "opponents": [], "saliency": []}
    if entry["present"]:
      pi, ps, oi, os_ = top_k(blocks[i, 0][None], top)
      exact = top_k(influence.test_blocks[i, a][None], top)[0][0]
      entry["shared"] = len(set(pi[0].tolist()) & set(exact.tolist()))
      for kind, idx, val in (("proponents", pi[0], ps[0]), ("opponents", oi[0], os_[0])):
        for col, score in zip(idx, val):
          if col < 0:
            continue
          j, b = layout.split_column(int(col), n_train)
          thumb = report_dir / PAGES / "train" / f"train{b:05d}_{j}.png"
          tc, tz = train_set.ids[b]
          train_image, train_regions = train_set.images[b], influence.train_regions[b]
          if volume:  # the training region's own largest axial slice
            tz = representative_slice(train_regions[..., j])
            train_image, train_regions = train_image[tz], train_regions[tz]
          if (b, j) not in made:
            thumb.parent.mkdir(parents=True, exist_ok=True)
            _thumbnail(thumb, train_image, train_regions, j)
            made.add((b, j))
          named = f"{tc}, axial slice {tz}" if volume else f"{tc} z{tz}"
          entry[kind].append({"src": f"train/{thumb.name}", "case": tc, "slice": int(tz),
                              "where": named, "alt": named if volume else f"{tc} slice {tz}",
                              "class": influence.class_names[j], "score": fmt(score, 4),
                              "ge": int(col) in ge})
      grid = saliency["grids"].get((str(case), int(z), cname)) if saliency else None
      if grid is not None:
        entry["saliency"].append({"src": f"../../{grid['path']}", "caption": grid["caption"]})
    classes.append(entry)
  return {"name": name, "case": case, "slice": int(z), "index": a, "classes": classes,
          "heading": heading, "where": where, "unit": "voxels" if volume else "px",
          "exported": (exported or {}).get(str(case)),
          "modalities": f"{name}/modalities.png", "thumb": f"{PAGES}/{name}/thumb.png",
          "href": f"{PAGES}/{name}.html",
          "saliency": any(c["saliency"] for c in classes)}


def _exported(record: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
  """The export stage's outputs by case, as a page links them (from its manifest):
  {"files": [{"href", "name", "description"}], "figures": [{"src", "caption"}]}."""
  if not record:
    return {}
  out = {}
  for case in record.get("headline", {}).get("cases", []):
    prefix = f"{rundir.EXPORT}/{rundir.safe_name(case)}/"
    files = [{"href": f"../../{f['path']}", "name": f["path"][len(prefix):],
              "description": f["description"]}
             for f in record.get("files", []) if f["path"].startswith(prefix)]
    figures = [{"src": f"../../{f['path']}", "caption": f["caption"]}
               for f in record.get("figures", []) if f["path"].startswith(prefix)]
    out[str(case)] = {"files": files, "figures": figures}
  return out


def _saliency_overlays(workdir: pathlib.Path, case: str, z: int, classes: Sequence[str],
                       present: Sequence[bool]) -> dict[str, np.ndarray]:
  """The saliency stage's maps of one image, if it wrote them: name -> [H, W] the summed
  |map| over the modalities, per method and predicted class."""
  path = workdir / rundir.SALIENCY / rundir.saliency_file("maps", case, z, suffix=".npz")
  if not path.exists():
    return {}
  with np.load(path) as f:
    maps, methods, names = f["maps"], [str(m) for m in f["methods"]], list(map(str, f["classes"]))
  shown = {c for c, p in zip(classes, present) if p}
  return {f"{method.replace('_', ' ')}: {cname}": np.abs(maps[m, k]).sum(-1)
          for k, cname in enumerate(names) if cname in shown
          for m, method in enumerate(methods)}


def case_viewer(workdir: str | os.PathLike, a: int, influence, val_set: SliceSet
                ) -> viewer.Viewer:
  """The default viewer of validation image a's page: every slice of its case in val_set,
  in slice order, as volumes (the four modalities, the predicted regions, the truth and the
  saliency stage's maps of the image where it wrote them), opening at the image's slice, at
  the centre of its predicted regions.

  Predicted regions may overlap (each is its class's p > threshold): a pixel takes the last
  class whose region holds it (ET over ED over NCR/NET). A volume's: its axial slices,
  opening at the slice of its regions' largest cross-section."""
  case, z = val_set.ids[a]
  if np.ndim(influence.val_regions[a]) == 4:
    return _volume_viewer(workdir, a, influence, val_set)
  order = sorted((i for i, (c, _) in enumerate(val_set.ids) if c == case),
                 key=lambda i: val_set.ids[i][1])
  here = order.index(a)
  regions = np.asarray(influence.val_regions)[order]  # [N, H, W, K]
  predicted = np.zeros(regions.shape[:3], np.uint8)
  for j in range(regions.shape[-1]):
    predicted[regions[..., j]] = j + 1
  present = [bool(regions[here, ..., j].any()) for j in range(regions.shape[-1])]
  heats = {}
  for name, heat in _saliency_overlays(pathlib.Path(workdir), case, z,
                                       list(influence.class_names), present).items():
    heats[name] = np.zeros(regions.shape[:3], np.float32)
    heats[name][here] = heat
  slices = [val_set.ids[i][1] for i in order]
  volumes = viewer.slice_volumes(val_set.images[order], predicted=predicted,
                                 truth=val_set.labels[order], overlays=heats,
                                 slice_indices=slices)
  found = np.argwhere(regions[here].any(-1))
  centre = found.mean(0) if len(found) else (np.array(regions.shape[1:3]) - 1) / 2
  return viewer.Viewer(volumes, focus=[float(centre[0]), float(centre[1]), float(here)],
                       slice_names=[f"{case} slice {s}" for s in slices], orientation=False)


def _volume_viewer(workdir: str | os.PathLike, a: int, influence, val_set) -> viewer.Viewer:
  """`case_viewer` of validation volume a: its axial slices as the stack of a case's."""
  case, z = val_set.ids[a]
  regions = np.asarray(influence.val_regions[a])  # [D, H, W, K]
  predicted = np.zeros(regions.shape[:3], np.uint8)
  for j in range(regions.shape[-1]):
    predicted[regions[..., j]] = j + 1
  present = [bool(regions[..., j].any()) for j in range(regions.shape[-1])]
  heats = _saliency_overlays(pathlib.Path(workdir), case, z, list(influence.class_names),
                             present)  # [D, H, W] each
  depth = regions.shape[0]
  volumes = viewer.slice_volumes(val_set.images[a], predicted=predicted,
                                 truth=val_set.labels[a], overlays=heats,
                                 slice_indices=list(range(depth)))
  here = representative_slice(regions.any(-1))
  found = np.argwhere(regions[here].any(-1))
  centre = found.mean(0) if len(found) else (np.array(regions.shape[1:3]) - 1) / 2
  return viewer.Viewer(volumes, focus=[float(centre[0]), float(centre[1]), float(here)],
                       slice_names=[f"{case}, axial slice {s} of {depth}"
                                    for s in range(depth)], orientation=False)


def export_viewer(workdir: str | os.PathLike, case: str, z: int) -> viewer.Viewer | None:
  """The viewer of a case the export stage wrote: its NIfTI outputs read back, on the
  patient's scan (`tracin_jax.patient.case_viewer`), opening at slice z (a volume's, z -1:
  at its largest predicted tumour); None where the stage did not export the case or its
  scan cannot be read."""
  from tracin_jax import patient  # pylint: disable=g-import-not-at-top

  folder = pathlib.Path(workdir) / rundir.EXPORT / rundir.safe_name(case)
  if not (folder / rundir.EXPORT_GRID_FILE).exists():
    return None
  grid, explained = patient.read_grid(folder / rundir.EXPORT_GRID_FILE)
  if int(z) not in [int(grid.slice_indices[a]) for a in explained]:
    return None
  return patient.case_viewer(folder, grid, explained, z=z)


def _page_viewer(workdir: pathlib.Path, a: int, influence, val_set: SliceSet,
                 given: ViewerVolumes | None) -> dict[str, Any] | None:
  """The viewer block of validation image a's page (None: no viewer)."""
  case, z = val_set.ids[a]
  chosen = None
  if callable(given):
    chosen = given(case, z)
  elif given is not None:
    chosen = given.get((case, z))
  name = f"{case} slice {z}" if int(z) != -1 else str(case)  # -1: a volume
  title = f"{name}: the case in 3D" if int(z) != -1 else f"{name}: the volume"
  if chosen is None:
    chosen = export_viewer(workdir, case, z)
    if chosen is not None:
      title = (f"{name}: the NIfTI outputs on the patient's scan (in the scan's "
               "own orientation, as ITK-SNAP or 3D Slicer shows it)")
  if chosen is None:
    chosen = case_viewer(workdir, a, influence, val_set)
  if not isinstance(chosen, viewer.Viewer):
    chosen = viewer.Viewer(list(chosen))
  if not chosen.volumes:
    return None
  return viewer.viewer_block(chosen.volumes, title=title,
                             static=f"../{viewer.STATIC_DIR}", focus=chosen.focus,
                             slice_names=chosen.slice_names,
                             orientation=chosen.orientation)


def _page_scores(workdir: pathlib.Path, influence, val_set: SliceSet,
                 chosen: Sequence[int], top: int) -> dict[str, Any]:
  """The pages' scores: queries of the run's gradient store where it has one (each image
  explained as a new one would be), else the influence stage's own rows; a volume's: the
  influence stage's rows (exact, where a query would compile the volumes' gradients again)."""
  volumes = val_set.images.ndim == 5
  if chosen and explain.has_store(workdir) and not volumes:
    blocks, seconds = [], []
    for a in chosen:
      result = explain.explain_image(workdir, val_set.images[a], name=f"val{a}", k=top,
                                     labels=val_set.labels[a])
      blocks.append(result.blocks)
      seconds.append(result.seconds["query"])
    spec = result.method["projection"]
    kind = ("exact gradients" if spec is None
            else f"{spec['kind']} projection to d = {spec['dim']}")
    text = (f"Scores queried from the run's gradient store ({kind}), as a new image would "
            f"be explained (python -m experiments.explain); {fmt(float(np.median(seconds)), 2)} "
            "s per image (median).")
    return {"blocks": blocks, "text": text}
  text = ("Scores from the influence stage (the run has no gradient store: "
          "--nostore).")
  if volumes:
    text = ("Scores from the influence stage (exact TracIn of the validation volume, its "
            "row of the stage's scores).")
  return {"blocks": [influence.test_blocks[:, a:a + 1] for a in chosen], "text": text}


def build_report(workdir: str | os.PathLike, *, train_set: SliceSet | None = None,
                 val_set: SliceSet | None = None, influence: Any = None,
                 max_pages: int = 6, top: int = 5,
                 stage_names: Sequence[str] | None = None,
                 viewer_volumes: ViewerVolumes | None = None) -> pathlib.Path:
  """Writes `<workdir>/report/index.html` (and a page per explained image).

  Args:
    workdir: the run's directory; stages that did not run there are absent, not errors.
    train_set, val_set: the run's slices, or volumes (for the per-image pages' images).
    influence: the influence stage's result (`runs.InfluenceResults`), for the per-image
      pages; None: read from the workdir where the stage ran there and the slices are
      given (else the index only).
    max_pages: validation images with a page (the saliency stage's first).
    top: proponents and opponents shown per region.
    stage_names: the stages to look for, in order (default: `rundir.STAGES`).
    viewer_volumes: the pages' viewers, by (case, slice): a mapping, or a function of case
      and slice, to a page's volumes (`viewer.ViewerVolume`, any grid and affine, e.g.
      patient-space volumes read from NIfTI files) or a `viewer.Viewer`. None, or None for
      a page: the case's preprocessed slices (`case_viewer`); an empty sequence: no viewer.

  Returns:
    The index's path.
  """
  workdir = pathlib.Path(workdir)
  names = [n for n in (stage_names or rundir.STAGES) if n != REPORT_DIR]
  records = rundir.read_manifests(workdir, names)
  by_name = {r["stage"]: r for r in records}
  report_dir = workdir / REPORT_DIR
  shutil.rmtree(report_dir / PAGES, ignore_errors=True)  # pages of an earlier report
  report_dir.mkdir(parents=True, exist_ok=True)
  saliency = _saliency(workdir, by_name.get("saliency"))
  synthetic = any(r.get("synthetic") for r in records)
  data = next((r.get("data") for r in records if r.get("data")), "unknown data")
  first = records[0] if records else {}
  common = {"synthetic": synthetic, "data": data, "workdir": str(workdir)}

  pages = []
  if influence is None and train_set is not None and val_set is not None and (
      rundir.INFLUENCE in by_name):
    influence = runs.read_influence(workdir, train_set, val_set)
  if influence is not None and train_set is not None and val_set is not None:
    chosen = choose_pages(val_set.ids, influence.val_regions,
                          saliency["images"] if saliency else [], max_pages)
    made: set[tuple[int, int]] = set()
    source = _page_scores(workdir, influence, val_set, chosen, top)
    exported = _exported(by_name.get(rundir.EXPORT))
    pages = [_page(report_dir, a, influence, train_set, val_set, saliency, top, made, blocks,
                   exported) for a, blocks in zip(chosen, source["blocks"])]
    template = _ENV.get_template("image.html")
    copied = False
    for k, (p, a) in enumerate(zip(pages, chosen)):
      block = _page_viewer(workdir, a, influence, val_set, viewer_volumes)
      if block and not copied:
        viewer.copy_static(report_dir)  # once, for every page
        copied = True
      html = template.render(
          viewer=block,
          title=p["heading"], threshold=fmt(influence.threshold, 2),
          prev=f"{pages[k - 1]['name']}.html" if k else None,
          next=f"{pages[k + 1]['name']}.html" if k + 1 < len(pages) else None,
          **{key: p[key] for key in ("case", "slice", "index", "classes", "modalities",
                                     "heading", "unit", "exported")},
          source=source["text"], top=top, **common)
      outputs.write_text(report_dir / PAGES / f"{p['name']}.html", html)

  title = f"Run report: {workdir.name}" + (" (synthetic cohort)" if synthetic else "")
  html = _ENV.get_template("index.html").render(
      title=title, written=datetime.datetime.now().isoformat(timespec="seconds"),
      versions=first.get("versions", {}), machine=first.get("machine", {}),
      stages=_stage_rows(records), missing=[n for n in names if n not in by_name],
      dice=_dice(by_name.get("train")), validate=_validate(by_name.get("validate")),
      saliency=saliency, pages=pages, **common)
  index = report_dir / INDEX
  outputs.write_text(index, html)
  return index
