"""A patient's scans explained with a finished run, the results written on the scans' grid.

    from tracin_jax import patient
    from tracin_jax.data import brats
    case = brats.case_files("/data/BraTS2021_00621")     # any BraTS layout; seg optional
    result = patient.explain_case("runs/demo", case, preprocess, train_set, slices="all")
    result.paths        # NIfTI volumes under runs/demo/explain/<case>/, on the input's grid

The case is read and preprocessed as the run's slices were (its own ground truth is not
needed: every region is the model's prediction, p > the run's threshold, and its region
losses use that prediction as target, as for any unlabelled image), each slice with a
predicted region is explained against the run's gradient store (`tracin_jax.explain`), the
chosen saliency methods map the slices with the largest predicted tumour, and
`write_case_outputs` puts everything back on the patient's scan
(`tracin_jax.data.patient_space`):

  - `prediction.nii.gz`: the predicted segmentation in the layout's own labels (BraTS
    2019 to 2021: 1 NCR/NET, 2 ED, 4 ET; 2023: 3 ET), on every explained slice;
  - `influence_<class>.nii.gz`: per voxel of the predicted region of a class, how strongly
    the region's top TracIn proponents support it there: the score-weighted share of the
    top-k proponents (positive scores) whose own training region covers that voxel, in
    [0, 1] (`influence_support`);
  - `saliency_<method>_<class>.nii.gz`: each saliency map of the class's predicted region
    (summed |map| over the four modalities; the Grad-CAM family as it is), on the mapped
    slices, 0 elsewhere;
  - `explanation.json`: the top proponents and opponents of every region of every slice,
    the files and what each holds;
  - `grid.npz`: where the slices lie on the scan (their preprocessing record);
  - `viewer.html`: the scan and every output above in an interactive viewer (NiiVue,
    offline; `case_viewer`).

The run's validation cases get the same files from the `export` stage; on volumes
(`--spatial_dims=3`) each is its validation volume put back on its scan
(`write_case_outputs` of its `volume_grid`, through `tracin_jax.data.volumes`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from tracin_jax import outputs
from tracin_jax import rundir
from tracin_jax.data import constants
from tracin_jax.data import layouts
from tracin_jax.data import patient_space
from tracin_jax.data.slices import SliceSet

PREDICTION_FILE = "prediction.nii.gz"
EXPLANATION_FILE = "explanation.json"
GRID_FILE = rundir.EXPORT_GRID_FILE
VIEWER_FILE = "viewer.html"
CLASS_NAMES = constants.TUMOUR_CLASS_NAMES
# The saliency methods mapped by default: one of the Grad-CAM family and one gradient
# method, cheap enough for every slice of a volume on a CPU.
DEFAULT_SALIENCY = ("grad_cam", "vanilla_gradient")


def in_brain(images: np.ndarray) -> np.ndarray:
  """[n, H, W] bool: the pixels of preprocessed images inside the brain (background is
  exactly -1 in every modality). Predictions are kept inside it: a 2D model trained on the
  central slices predicts tumour on empty slices it never saw."""
  return (np.asarray(images) > -1.0).any(axis=-1)


def influence_file(class_name: str) -> str:
  return f"influence_{rundir.class_file(class_name)}.nii.gz"


def saliency_file(method: str, class_name: str) -> str:
  return f"saliency_{method}_{rundir.class_file(class_name)}.nii.gz"


def influence_support(entries: Sequence[Mapping[str, Any]], regions: np.ndarray,
                      train_ids: Sequence[tuple[str, int]],
                      train_regions: np.ndarray) -> np.ndarray:
  """Per pixel of each predicted region, how strongly its top proponents support it there.

  For the region of class i with top-k proponents (j, b) of positive score s (training
  slice b's region of class j), the support at pixel v is
  sum s [v in region_j(b)] / sum s, inside the region; 0 outside it and for a region with
  no positive proponent.

  Args:
    entries: `tracin_jax.influence.rankings.explain`'s entries of one image (each with
      "class" and "proponents": [{case, slice, class, score}, ...]).
    regions: [H, W, K] bool, the image's predicted regions; a volume's [D, H, W, K].
    train_ids: (case, slice) of every training slice, in the store's order (a volume's
      slice: -1, `volumes.NO_SLICE`).
    train_regions: [n_train, H, W, K] bool, the training slices' regions (volumes':
      [n_train, D, H, W, K]).

  Returns:
    [H, W, K] float32 in [0, 1] (a volume's [D, H, W, K]).
  """
  index = {(str(c), int(z)): b for b, (c, z) in enumerate(train_ids)}
  support = np.zeros(regions.shape, np.float32)
  for entry in entries:
    i = CLASS_NAMES.index(entry["class"])
    total, cover = 0.0, np.zeros(regions.shape[:-1], np.float64)
    for p in entry["proponents"]:
      if not p["score"] > 0:
        continue
      b, j = index[(str(p["case"]), int(p["slice"]))], CLASS_NAMES.index(p["class"])
      cover += p["score"] * train_regions[b, ..., j]
      total += p["score"]
    if total > 0:
      support[..., i] = (cover / total * regions[..., i]).astype(np.float32)
  return support


def plane(method: str, maps: np.ndarray) -> np.ndarray:
  """[..., C] maps of a method as one value per pixel: the Grad-CAM family's own value, the
  summed magnitude over the modalities for the others."""
  from tracin_jax.saliency import methods  # pylint: disable=g-import-not-at-top

  maps = np.asarray(maps, np.float32)
  return maps[..., 0] if method in methods.NO_CHANNELS else np.abs(maps).sum(-1)


def is_volume(case) -> bool:
  """Whether a case's grid (or sample set) is a volume's: its record a
  `volumes.VolumeRecord` (see `volume_grid`)."""
  from tracin_jax.data import volumes  # pylint: disable=g-import-not-at-top

  return isinstance(getattr(case, "record", None), volumes.VolumeRecord)


def volume_grid(sample) -> patient_space.SliceGrid:
  """The grid of one preprocessed volume (a `volumes.VolumeSet` of one case), as the slices'
  `SliceGrid`: its `VolumeRecord`, one "slice" index -1 (`volumes.NO_SLICE`: the volume
  stands for its case) and its shape (D, H, W)."""
  from tracin_jax.data import volumes  # pylint: disable=g-import-not-at-top

  if len(sample) != 1:
    raise patient_space.PatientSpaceError(
        f"{len(sample)} volumes given; give one case's (VolumeSet.select_cases).")
  return patient_space.SliceGrid(sample.record, np.full(1, volumes.NO_SLICE, np.int32),
                                 tuple(int(d) for d in sample.images.shape[1:4]))


def scan_slice(grid: patient_space.SliceGrid, d: int) -> int:
  """The scan's axial index of a volume's axial slice d (the source slice holding its
  centre, `volumes.VolumeRecord`'s geometry), clipped to the scan."""
  record = grid.record
  z = np.floor(record.origin[0][2] + (d + 0.5) * record.step[0][2])
  return int(np.clip(z, 0, int(record.volume_shape[0][2]) - 1))


def write_case_outputs(case, out_dir: str | pathlib.Path, *,
                       predicted: np.ndarray | None = None,
                       influence: np.ndarray | None = None,
                       saliency: Mapping[str, np.ndarray] | None = None) -> list[dict[str, str]]:
  """Writes one case's outputs on its scan's grid (see the module docstring).

  Args:
    case: the case's slices (a SliceSet with its preprocessing record) or their
      `patient_space.SliceGrid`; or one case's volume (a `volumes.VolumeSet` of one sample,
      or its `volume_grid`). Every array below has one entry per slice (a volume: one).
    out_dir: the case's directory of outputs (made; never the inputs' directory).
    predicted: [n, H, W] int predicted classes (0 background, 1..3), or None; a volume's
      [1, D, H, W].
    influence: [n, H, W, K] `influence_support`, or None; a volume's [1, D, H, W, K].
    saliency: method -> [n, H, W, K, C] maps per slice and class (or [n, H, W, K], already
      one value per pixel); slices a method did not map hold zeros. A volume's
      [1, D, H, W, K, C] (or [1, D, H, W, K]).

  Returns:
    {"path", "description"} of each file written.
  """
  out_dir = pathlib.Path(out_dir)
  layout = str(case.record.layout[0])
  if is_volume(case):
    from tracin_jax.data import volumes  # pylint: disable=g-import-not-at-top

    record, rank = case.record, 3
    if not isinstance(case, patient_space.SliceGrid):
      case = volume_grid(case)
    for name, array in (("predicted", predicted), ("influence", influence),
                        *((f"saliency[{m!r}]", v) for m, v in (saliency or {}).items())):
      if array is not None and np.shape(array)[:4] != (1, *case.shape):
        raise patient_space.PatientSpaceError(
            f"write_case_outputs: {name} has shape {list(np.shape(array))}; expected "
            f"[1, {', '.join(map(str, case.shape))}, ...] (the case's one volume, "
            "[1, D, H, W]).")
    where = "the whole volume (the model's box on the scan)"
    to_volume = lambda maps, kind="map": volumes.to_volume(maps[0], record, kind=kind)
    write_nifti = lambda volume, path, kind, description: volumes.write_nifti(
        volume, record, path, kind=kind, description=description)
  else:
    rank = 2
    zs = [int(z) for z in case.slice_indices]
    where = f"axial slices {zs[0]}..{zs[-1]}" if len(zs) > 1 else f"axial slice {zs[0]}"
    to_volume = lambda maps, kind="map": patient_space.to_volume(maps, case, kind=kind)
    write_nifti = lambda volume, path, kind, description: patient_space.write_nifti(
        volume, case, path, kind=kind, description=description)
  written = []

  def write(name, volume, kind, description):
    path = write_nifti(volume, out_dir / name, kind, description)
    written.append({"path": str(path), "description": description})

  if predicted is not None:
    labels = to_volume(np.asarray(predicted, np.int16), kind="labels")
    write(PREDICTION_FILE, layouts.to_layout_labels(labels, layout), "labels",
          f"predicted segmentation ({layouts.label_description(layout)}), {where}")
  if influence is not None:
    for i, name in enumerate(CLASS_NAMES):
      write(influence_file(name), to_volume(influence[..., i]), "map",
            f"{name}: support of the top TracIn proponents per voxel, {where}")
  for method, maps in (saliency or {}).items():
    for i, name in enumerate(CLASS_NAMES):
      with_channels = np.ndim(maps) == rank + 3  # [n, *spatial, K, C]
      plane_i = plane(method, maps[..., i, :]) if with_channels else maps[..., i]
      write(saliency_file(method, name), to_volume(plane_i), "map",
            f"{name}: {method} saliency of the predicted region, {where}")
  return written


def plot_check(out_dir: str | pathlib.Path, grid, z: int, path: str | pathlib.Path, *,
               title: str = "", where: str | None = None) -> None:
  """The scan's axial slice z with the prediction and the ET influence, both read back from
  the NIfTI files in `out_dir`: what a viewer shows when it opens them on the scan.

  The scan is the case's FLAIR where its folder can be read (else its T1, else nothing).
  `where` names the slice on a line of the title of its own (default: "axial slice z" after
  the title, on its line).
  """
  import nibabel  # pylint: disable=g-import-not-at-top
  from tracin_jax.influence import figures  # pylint: disable=g-import-not-at-top

  out_dir = pathlib.Path(out_dir)
  scan = _scan_plane(grid, z)
  predicted = np.asarray(nibabel.load(out_dir / PREDICTION_FILE).dataobj)[:, :, z]
  classes = layouts.to_classes(predicted, str(grid.record.layout[0]))
  et = out_dir / influence_file(CLASS_NAMES[-1])
  support = np.asarray(nibabel.load(et).dataobj)[:, :, z] if et.exists() else None
  if scan is None:
    grey = np.zeros(classes.shape, np.float32)
  else:
    lo, hi = np.percentile(scan, (0.5, 99.5))
    grey = np.clip((scan - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  coloured = rgb.copy()
  for c in constants.TUMOUR_CLASSES:
    m = classes == c
    coloured[m] = 0.55 * coloured[m] + 0.45 * np.asarray(figures.REGION_COLOURS[c - 1])
  fig = figures.new_figure(figsize=(10.5, 3.9))
  *axes, bar = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 0.05]})
  axes[0].imshow(rgb.transpose(1, 0, 2))
  axes[0].set_title("the input scan", fontsize=9)
  axes[1].imshow(coloured.transpose(1, 0, 2))
  axes[1].set_title("prediction (read back from its NIfTI)", fontsize=9)
  axes[2].imshow(rgb.transpose(1, 0, 2))
  shown = np.ma.masked_where(support.T <= 0, support.T) if support is not None else \
      np.ma.masked_all(rgb.shape[1::-1])
  fig.colorbar(axes[2].imshow(shown, cmap="magma", vmin=0, vmax=1), cax=bar)
  axes[2].set_title(f"{CLASS_NAMES[-1]}: top proponents' support (read back)", fontsize=9)
  for ax in axes:
    ax.axis("off")
  where = f", axial slice {z}: " if where is None else f"\n{where}\n"
  fig.suptitle(f"{title}{where}the NIfTI outputs on the input scan (storage "
               "order, as the run's other figures)", fontsize=10)
  fig.tight_layout()
  outputs.save_figure(fig, path)


def _scan_plane(grid, z: int) -> np.ndarray | None:
  """The case's FLAIR (else T1) at axial slice z, or None where no file can be read."""
  import nibabel  # pylint: disable=g-import-not-at-top
  from tracin_jax.data import brats  # pylint: disable=g-import-not-at-top

  source = pathlib.Path(str(grid.record.source[0]))
  candidates = [source]
  try:
    files = brats.case_files(source.parent).files
    candidates.insert(0, files.get("flair", source))
  except (brats.BratsDataError, OSError):
    pass
  for path in candidates:
    try:
      return np.asarray(nibabel.load(path).dataobj[:, :, z], np.float32)
    except (OSError, ValueError, IndexError, nibabel.filebasedimages.ImageFileError):
      continue
  return None


@dataclasses.dataclass
class CaseExplanation:
  """A patient's case explained (see `explain_case`).

  Attributes:
    case_id: the case's name.
    slices: the preprocessed slices explained (with their record; labels -1 where the case
      has no ground truth).
    predicted: [n, H, W] int32 predicted classes.
    regions: [n, H, W, K] bool predicted regions.
    explanations: per slice, `rankings.explain`'s entries of its present regions.
    saliency_slices: the slices (indices into `slices`) mapped by the saliency methods.
    files: {"path", "description"} of every file written.
    seconds: {"load", "explain", "saliency", "write", "total"}.
  """

  case_id: str
  slices: SliceSet
  predicted: np.ndarray
  regions: np.ndarray
  explanations: list[list[dict[str, Any]]]
  saliency_slices: list[int]
  files: list[dict[str, str]]
  seconds: dict[str, float]

  @property
  def paths(self) -> list[pathlib.Path]:
    return [pathlib.Path(f["path"]) for f in self.files]


def _saliency_maps(workdir: pathlib.Path, images: np.ndarray, regions: np.ndarray,
                   methods: Sequence[str], layer: str) -> dict[str, np.ndarray]:
  """method -> [n, H, W, K, C] maps of each slice's predicted regions (zeros where absent)."""
  from tracin_jax import saliency as sal  # pylint: disable=g-import-not-at-top
  from tracin_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top

  model, _ = train_lib.load_model(workdir)
  m = sal.NnxModel(model)
  out = {name: np.zeros(regions.shape + images.shape[-1:], np.float32) for name in methods}
  classes = constants.TUMOUR_CLASSES
  for a in range(len(images)):
    if not regions[a].any():
      continue
    x = np.broadcast_to(images[a][None], (len(classes),) + images.shape[1:])
    target = sal.masked_class_sums(classes, np.moveaxis(regions[a], -1, 0))
    for name in methods:
      maps = np.asarray(sal.method_map(name, m.apply_fn, m.params, x, target,
                                       layer=m.layer(layer)), np.float32)  # [K, H, W, C]
      out[name][a] = np.moveaxis(maps, 0, 2)
  return out


def explain_case(workdir: str | pathlib.Path, case, preprocess, train_set: SliceSet, *,
                 slices: str | Sequence[int] | None = None, out_dir=None, k: int = 10,
                 saliency_methods: Sequence[str] = DEFAULT_SALIENCY,
                 saliency_slices: int | Sequence[int] = 1, saliency_layer: str = "last_hidden",
                 progress: Callable[[str], None] | None = None) -> CaseExplanation:
  """Explains a patient's case (ground truth not needed) and writes its NIfTI outputs.

  Args:
    workdir: the run (its influence stage written with the gradient store).
    case: `brats.CaseFiles` (any layout, `brats.case_files(dir)` or
      `brats.case_from_files(...)`), or a case directory.
    preprocess: the run's `brats.PreprocessConfig` (crop, resize, slices).
    train_set: the run's training slices (their regions are what proponents show).
    slices: None (the run's `num_slices` around the centre), "all" (every axial slice) or
      axial indices.
    out_dir: where the outputs go (default `<workdir>/explain/<case>`).
    k: proponents and opponents per region.
    saliency_methods: methods mapped (`tracin_jax.saliency.METHODS`); () for none.
    saliency_slices: how many slices the methods map (those with the largest predicted
      tumour), or their axial indices.
    saliency_layer: the Grad-CAM family's block.
    progress: called with a line per step (e.g. print), or None.

  Returns:
    The explanation, its files written.
  """
  from tracin_jax import explain  # pylint: disable=g-import-not-at-top
  from tracin_jax.data import brats  # pylint: disable=g-import-not-at-top
  from tracin_jax.influence import segmentation  # pylint: disable=g-import-not-at-top

  say = progress or (lambda _: None)
  t0 = time.perf_counter()
  workdir = pathlib.Path(workdir)
  if not isinstance(case, brats.CaseFiles):
    case = brats.case_files(case)
  loaded = brats.load_case(case, preprocess, slices=slices, require_labels=False)
  run = explain.load_run(workdir)
  regions, predicted = segmentation.predict_regions_and_labels(
      run.final_apply, run.params, loaded.images, run.threshold, state=run.state)
  brain = in_brain(loaded.images)
  regions, predicted = regions & brain[..., None], np.where(brain, predicted, 0)
  train_regions = segmentation.predict_regions(run.final_apply, run.params, train_set.images,
                                               run.threshold, state=run.state)
  t1 = time.perf_counter()
  say(f"{case.case_id}: {len(loaded)} slices read; {int(regions.any(axis=(1, 2, 3)).sum())} "
      "with a predicted region")
  entries, support = [], np.zeros(regions.shape, np.float32)
  for a in range(len(loaded)):
    if not regions[a].any():
      entries.append([])
      continue
    z = int(loaded.slice_indices[a])
    result = explain.explain_image(workdir, loaded.images[a], name=f"{case.case_id}_z{z}", k=k)
    entries.append(result.proponents)
    support[a] = influence_support(result.proponents, regions[a], run.train_ids,
                                   train_regions)
  t2 = time.perf_counter()
  mapped = _chosen_slices(loaded, regions, saliency_slices) if saliency_methods else []
  maps = {}
  if mapped:
    say(f"{case.case_id}: {', '.join(saliency_methods)} on axial slices "
        f"{', '.join(str(int(loaded.slice_indices[a])) for a in mapped)}")
    maps = _saliency_maps(workdir, loaded.images[mapped], regions[mapped], saliency_methods,
                          saliency_layer)
  t3 = time.perf_counter()
  out_dir = (pathlib.Path(out_dir) if out_dir else
             workdir / "explain" / rundir.safe_name(case.case_id))
  files = write_case_outputs(loaded, out_dir, predicted=predicted, influence=support)
  if maps:  # on the mapped slices' grid, so that the files say which slices they cover
    files += write_case_outputs(loaded.subset(np.asarray(mapped)), out_dir, saliency=maps)
  outputs.write_json(out_dir / EXPLANATION_FILE, {
      "case": case.case_id, "layout": str(loaded.record.layout[0]),
      "slices": [int(z) for z in loaded.slice_indices],
      "ground_truth": bool((loaded.labels >= 0).all()),
      "saliency_slices": [int(loaded.slice_indices[a]) for a in mapped],
      "explanations": [e for per_slice in entries for e in per_slice],
      "files": [{"path": pathlib.Path(f["path"]).name, "description": f["description"]}
                for f in files]})
  files.append({"path": str(out_dir / EXPLANATION_FILE),
                "description": "top proponents and opponents of every predicted region"})
  grid = patient_space.SliceGrid.of(loaded)
  explained = [a for a in range(len(loaded)) if regions[a].any()] or list(range(len(loaded)))
  outputs.save_npz(out_dir / GRID_FILE, **grid_arrays(grid, np.asarray(explained)))
  files.append({"path": str(out_dir / GRID_FILE),
                "description": "the slices' preprocessing record (where they lie on the scan)"})
  shown = case_viewer(out_dir, grid, explained, margin=0 if slices == "all" else 8)
  if shown is not None:
    from tracin_jax.report import viewer  # pylint: disable=g-import-not-at-top

    viewer.write_viewer_page(out_dir / VIEWER_FILE, shown.volumes,
                             title=f"{case.case_id}: the explanation on the scan",
                             focus=shown.focus, slice_names=shown.slice_names)
    files.append({"path": str(out_dir / VIEWER_FILE), "description": "the scan and every "
                  "output in an interactive viewer (open in a browser, no server needed)"})
  t4 = time.perf_counter()
  seconds = {"load": t1 - t0, "explain": t2 - t1, "saliency": t3 - t2, "write": t4 - t3,
             "total": t4 - t0}
  return CaseExplanation(case.case_id, loaded, np.asarray(predicted, np.int32), regions,
                         entries, mapped, files, seconds)


def _chosen_slices(loaded: SliceSet, regions: np.ndarray,
                   chosen: int | Sequence[int]) -> list[int]:
  """Indices into `loaded` of the slices to map: the given axial indices, or the `chosen`
  slices with the largest predicted tumour."""
  if isinstance(chosen, (int, np.integer)):
    sizes = regions.sum(axis=(1, 2, 3))
    order = [int(a) for a in np.argsort(-sizes, kind="stable") if sizes[a] > 0]
    return sorted(order[:int(chosen)])
  where = {int(z): a for a, z in enumerate(loaded.slice_indices)}
  missing = [int(z) for z in chosen if int(z) not in where]
  if missing:
    raise ValueError(f"saliency slices {missing} are not among the explained slices "
                     f"{int(loaded.slice_indices[0])}..{int(loaded.slice_indices[-1])}.")
  return sorted(where[int(z)] for z in chosen)


def read_grid(path: str | pathlib.Path) -> tuple[patient_space.SliceGrid, np.ndarray]:
  """A case's `grid.npz` (the export stage's, `explain_case`'s): (its slice grid, the
  indices into it of the explained slices); a volume's: (its `volume_grid`, [0])."""
  from tracin_jax.data.slices import PreprocessRecord  # pylint: disable=g-import-not-at-top
  from tracin_jax.data.volumes import VolumeRecord  # pylint: disable=g-import-not-at-top

  with np.load(path, allow_pickle=False) as f:
    kind = VolumeRecord if "record_origin" in f else PreprocessRecord
    grid = patient_space.SliceGrid(kind.from_arrays(f), f["slice_indices"],
                                   tuple(int(d) for d in f["shape"]))
    return grid, np.asarray(f["explained"])


def grid_arrays(grid: patient_space.SliceGrid, explained: np.ndarray) -> dict[str, np.ndarray]:
  """What `read_grid` reads back, as arrays for an .npz."""
  return {"slice_indices": grid.slice_indices, "shape": np.asarray(grid.shape),
          "explained": np.asarray(explained), **grid.record.arrays()}


def _window(grid: patient_space.SliceGrid, explained: Sequence[int], margin: int
            ) -> tuple[tuple[slice, slice, slice], np.ndarray]:
  """Where a case's viewer reads its scan: (the (x, y, z) slices of the scan's voxels it
  shows, at the model's resolution (every step-th voxel), its affine (voxel to world)).

  Slices: the crop box in-plane, the explained slices with `margin` slices either side.
  A volume: the model's box (clipped to the scan), every step-th voxel on each axis."""
  record = grid.record
  shape = [int(n) for n in record.volume_shape[0]]
  if is_volume(grid):
    from tracin_jax.data import volumes  # pylint: disable=g-import-not-at-top

    counts = {a: grid.shape[k] for k, a in enumerate(volumes.SAMPLE_AXES)}
    window = []
    for a in range(3):
      origin, step = float(record.origin[0][a]), float(record.step[0][a])
      start = int(np.clip(origin, 0, shape[a] - 1))
      stop = int(np.clip(origin + counts[a] * step, start + 1, shape[a]))
      window.append(slice(start, stop, max(1, int(round(step)))))
  else:
    box = [int(v) for v in record.crop_box[0]]
    step = max(1, round((box[2] - box[0]) / grid.shape[0]))
    shown = [int(grid.slice_indices[a]) for a in explained]
    window = [slice(box[0], box[2], step), slice(box[1], box[3], step),
              slice(max(0, min(shown) - margin), min(shape[2], max(shown) + margin + 1))]
  affine = np.asarray(record.affine[0]) @ np.array(
      [[window[0].step, 0, 0, window[0].start], [0, window[1].step, 0, window[1].start],
       [0, 0, window[2].step or 1, window[2].start], [0, 0, 0, 1.0]])
  return tuple(window), affine


def _crop(volume: np.ndarray, window: tuple[slice, slice, slice]) -> np.ndarray:
  return np.ascontiguousarray(volume[window])


def case_viewer(out_dir: str | pathlib.Path, grid: patient_space.SliceGrid,
                explained: Sequence[int], *, z: int | None = None, margin: int = 8):
  """A viewer (`tracin_jax.report.viewer.Viewer`) of a case's NIfTI outputs read back from
  `out_dir`, on the patient's scan: its four modalities (read from the case's folder), the
  prediction, the ground truth where the folder has one (hidden), the influence support and
  every saliency map, inside the crop box and the explained slices (with `margin` slices
  either side), at the model's in-plane resolution (every step-th voxel), with the scan's
  own affine; None where the scan cannot be read. A volume's (`volume_grid`): inside the
  model's box, at the model's resolution on every axis.

  Args:
    out_dir: the case's outputs (`write_case_outputs`).
    grid: the slice grid the outputs were written from (its record names the scan).
    explained: indices into the grid of the explained slices.
    z: the axial slice the viewer opens at (default the explained slice with the most
      predicted tumour; a volume's: its axial slice with the most).
    margin: slices shown beyond the explained ones.
  """
  from tracin_jax.report import viewer  # pylint: disable=g-import-not-at-top

  found = _case_volumes(str(pathlib.Path(out_dir).resolve()), grid,
                        tuple(int(a) for a in explained), margin)
  if found is None:
    return None
  volumes, window, predicted = found
  zs = range(window[2].start, window[2].stop, window[2].step or 1)
  sizes = (predicted > 0).sum(axis=(0, 1))  # per shown axial slice
  if is_volume(grid) or z is None:
    shown = (range(len(zs)) if is_volume(grid) else
             [zs.index(int(grid.slice_indices[a])) for a in explained])
    here = max(shown, key=lambda k: sizes[k])  # the first of the largest
  else:
    here = zs.index(int(z))
  found = np.argwhere(predicted[..., here] > 0)
  centre = found.mean(0) if len(found) else (np.array(predicted.shape[:2]) - 1) / 2
  return viewer.Viewer(volumes, focus=[float(centre[0]), float(centre[1]), float(here)],
                       slice_names=[f"axial slice {s}" for s in zs])


def _case_volumes(out_dir: str, grid: patient_space.SliceGrid, explained: tuple[int, ...],
                  margin: int):
  """(the viewer's volumes, its window on the scan (`_window`), the prediction on it) of
  `case_viewer`, read once per case and kept for the report's other pages of the case
  (`_VOLUMES`)."""
  key = (out_dir, tuple(str(s) for s in grid.record.source[:1]), explained, margin,
         (pathlib.Path(out_dir) / PREDICTION_FILE).stat().st_mtime_ns
         if (pathlib.Path(out_dir) / PREDICTION_FILE).exists() else 0)
  if key not in _VOLUMES:
    while len(_VOLUMES) >= 3:  # a few cases at a time: a case's volumes are megabytes
      _VOLUMES.pop(next(iter(_VOLUMES)))
    _VOLUMES[key] = _read_case_volumes(pathlib.Path(out_dir), grid, explained, margin)
  return _VOLUMES[key]


_VOLUMES: dict[tuple, Any] = {}


def _read_case_volumes(out_dir: pathlib.Path, grid: patient_space.SliceGrid,
                       explained: Sequence[int], margin: int):
  import nibabel  # pylint: disable=g-import-not-at-top
  from tracin_jax.data import brats  # pylint: disable=g-import-not-at-top
  from tracin_jax.report import viewer  # pylint: disable=g-import-not-at-top

  record, layout = grid.record, str(grid.record.layout[0])
  try:
    case = brats.case_files(pathlib.Path(str(record.source[0])).parent)
    scans = {kind: nibabel.load(case.path(kind)) for kind in constants.MODALITIES}
  except (brats.BratsDataError, OSError, nibabel.filebasedimages.ImageFileError):
    return None
  window, affine = _window(grid, explained, margin)

  def read(path):
    return _crop(np.asarray(nibabel.load(path).dataobj), window)

  volumes = [viewer.ViewerVolume(name, _crop(np.asarray(scans[kind].dataobj, np.float32),
                                             window), affine, "image",
                                 visible=kind == "flair")
             for kind, name in zip(constants.MODALITIES, constants.MODALITY_NAMES)]
  volumes.insert(0, volumes.pop(3))  # FLAIR first: the background the viewer opens with
  predicted = layouts.to_classes(read(out_dir / PREDICTION_FILE), layout)
  volumes.append(viewer.ViewerVolume("prediction", predicted, affine, "labels"))
  if case.has_seg:
    truth = layouts.to_classes(read(case.path(constants.SEG_SUFFIX)), layout)
    volumes.append(viewer.ViewerVolume("ground truth", truth, affine, "labels",
                                       visible=False))
  overlays = [(influence_file(c), f"TracIn support: {c}") for c in CLASS_NAMES]
  from tracin_jax.saliency import methods  # pylint: disable=g-import-not-at-top

  overlays += [(saliency_file(m, c), f"{methods.LABELS[m]}: {c}") for m in methods.METHODS
               for c in CLASS_NAMES]
  for name, title in overlays:
    if (out_dir / name).exists():
      data = read(out_dir / name)
      if data.any():
        volumes.append(viewer.ViewerVolume(title, data, affine, "overlay",
                                           visible=not any(v.kind == "overlay"
                                                           for v in volumes)))
  return volumes, window, predicted
