"""An interactive volume viewer for the report's pages: NiiVue on volumes embedded in the page.

    from tracin_jax.report import viewer
    volumes = [viewer.ViewerVolume("FLAIR", flair, affine, "image"),
               viewer.ViewerVolume("prediction", classes, affine, "labels"),
               viewer.ViewerVolume("saliency", heat, affine, "overlay")]
    viewer.write_viewer_page("out/case.html", volumes, title="A case")   # a page on its own
    block = viewer.viewer_block(volumes, title="A case", static="../static")  # for a template

Reports are opened from the file system, where a page can neither fetch a file nor load a
module script, so each volume travels inside the page: a gzip-compressed NIfTI-1 file,
base64-encoded, in a `<script type="application/json">` data block, with every string that
describes it (names, titles) as JSON data there, never as code. The block's JSON has `<`, `>`
and `&` escaped, so no string can close the block early. `static/viewer.js` reads the block,
loads the volumes into NiiVue (`static/niivue.umd.js`, vendored; `static/README.md`) from
memory and draws the controls: the background modality, the label maps and heat maps over
it, their opacity, the slice and the view, and the values under the cursor. Without WebGL2
it says so in one line in place of the canvas, and the rest of the page is unaffected.

Volumes are kept small: images are quantised to uint8 over their range (the NIfTI scaling,
`scl_slope` and `scl_inter`, restores the values within 1/255 of the range, so the values
under the cursor are the image's own), labels are uint8 class indices and heat maps are
quantised as images are. A case of 10 slices of 96 x 96 pixels in four modalities with its
predicted and true regions and three saliency maps takes 0.27 MB of page (a case of the
synthetic cohort; 0.61 MB for pure noise, which does not compress).
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import os
import pathlib
import re
import shutil
from typing import Any, Mapping, Sequence

import jinja2
import markupsafe
import nibabel as nib
import numpy as np

from tracin_jax import outputs
from tracin_jax.data import constants
from tracin_jax.influence.figures import REGION_COLOURS

KINDS = ("image", "labels", "overlay")
STATIC = pathlib.Path(__file__).parent / "static"
STATIC_DIR = "static"  # the folder of a report (or a page) that holds the scripts
SCRIPTS = ("niivue.umd.js", "viewer.js")  # in loading order
STATIC_FILES = SCRIPTS + ("NIIVUE-LICENSE",)
# The colours of the label maps, by class index: those of the report's figures.
LABELS = tuple((c, name, tuple(int(round(255 * v)) for v in REGION_COLOURS[c - 1]))
               for c, name in zip(constants.TUMOUR_CLASSES, constants.TUMOUR_CLASS_NAMES))
DEFAULT_COLORMAP = {"image": "gray", "overlay": "hot"}
DEFAULT_OPACITY = {"image": 1.0, "labels": 0.5, "overlay": 0.7}
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(pathlib.Path(__file__).parent / "templates")),
    autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
    trim_blocks=True, lstrip_blocks=True)


@dataclasses.dataclass
class ViewerVolume:
  """One volume of a viewer.

  Attributes:
    name: what the controls and the readout call it (any text).
    data: [X, Y, Z] the voxels, in the volume's own grid.
    affine: [4, 4] voxel to world (mm), as in NIfTI; volumes of one viewer share a world
      space, not necessarily a grid.
    kind: "image" (a background the viewer can choose, in grey), "labels" (class indices
      0-3, 0 transparent, 1-3 NCR/NET, ED and ET in the report's colours;
      `constants.remap_labels` maps BraTS label 4 to 3) or "overlay" (a heat map over the
      background; values below the display range are transparent).
    colormap: a NiiVue colormap name (default: gray for images, hot for overlays; labels
      always take the class colours).
    visible: shown when the page opens (the first visible image is the first background; of
      the overlays only the first visible one is shown, they are chosen one at a time).
    opacity: 0-1 (default: 1 for images, 0.5 for labels, 0.7 for overlays).
    display_range: the values mapped to the colormap's ends (default: the 0.5th and 99.5th
      percentiles of an image; from a tenth of the 99th percentile of an overlay's positive
      values to that percentile).
  """

  name: str
  data: np.ndarray
  affine: np.ndarray
  kind: str
  colormap: str | None = None
  visible: bool = True
  opacity: float | None = None
  display_range: tuple[float, float] | None = None

  def __post_init__(self):
    self.data = np.asarray(self.data)
    self.affine = np.asarray(self.affine, np.float64)
    if self.kind not in KINDS:
      raise ValueError(f"ViewerVolume {self.name!r}: kind {self.kind!r} is not one of {KINDS}.")
    if self.data.ndim != 3 or 0 in self.data.shape:
      raise ValueError(f"ViewerVolume {self.name!r}: data must be [X, Y, Z], got shape "
                       f"{self.data.shape}.")
    if self.affine.shape != (4, 4) or not np.isfinite(self.affine).all():
      raise ValueError(f"ViewerVolume {self.name!r}: affine must be a finite 4 x 4 matrix.")
    if self.opacity is not None and not 0 <= self.opacity <= 1:
      raise ValueError(f"ViewerVolume {self.name!r}: opacity {self.opacity} is not in [0, 1].")


@dataclasses.dataclass
class Viewer:
  """A viewer's volumes with where it opens (what a report page's viewer is made of).

  Attributes:
    volumes: as `viewer_block`'s.
    focus: the voxel of the first image the viewer opens at (None: the centre).
    slice_names: a name per slice of the first image (None: numbers only).
    orientation: whether the views are labelled with the patient's directions (off for a
      grid whose affine is not the patient's, like the preprocessed slices').
  """

  volumes: Sequence[ViewerVolume]
  focus: Sequence[float] | None = None
  slice_names: Sequence[str] | None = None
  orientation: bool = True


def grid_affine(spacing: Sequence[float] = (1.0, 1.0, 1.0),
                origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
  """The affine of an axis-aligned grid: voxel (i, j, k) at origin + spacing * (i, j, k) mm."""
  affine = np.diag([*map(float, spacing), 1.0])
  affine[:3, 3] = origin
  return affine


def _finite_range(data: np.ndarray) -> tuple[float, float]:
  finite = data[np.isfinite(data)]
  if not finite.size:
    return 0.0, 0.0
  return float(finite.min()), float(finite.max())


def _display_range(volume: ViewerVolume, data_range: tuple[float, float]) -> tuple[float, float]:
  if volume.display_range is not None:
    lo, hi = map(float, volume.display_range)
    return lo, hi
  values = volume.data[np.isfinite(volume.data)].astype(np.float64)
  if volume.kind == "labels":
    return 0.0, float(len(LABELS))
  if volume.kind == "overlay":
    positive = values[values > 0]
    hi = float(np.percentile(positive, 99)) if positive.size else 1.0
    return 0.1 * hi, hi
  if not values.size:
    return data_range
  lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
  return (lo, hi) if hi > lo else data_range


def _quantised(volume: ViewerVolume) -> tuple[np.ndarray, float, float, tuple[float, float]]:
  """The volume as uint8 with the slope and intercept that restore it, and its range."""
  data = volume.data.astype(np.uint8) if volume.data.dtype == bool else volume.data
  if volume.kind == "labels":
    if not np.issubdtype(data.dtype, np.integer) and not np.array_equal(data, np.round(data)):
      raise ValueError(f"ViewerVolume {volume.name!r}: labels must be whole numbers.")
    if data.min() < 0 or data.max() > 255:
      raise ValueError(f"ViewerVolume {volume.name!r}: labels must lie in 0-255.")
    return data.astype(np.uint8), 1.0, 0.0, (float(data.min()), float(data.max()))
  lo, hi = _finite_range(data)
  clean = np.nan_to_num(data.astype(np.float64), nan=lo, posinf=hi, neginf=lo)
  if hi <= lo:
    return np.zeros(data.shape, np.uint8), 1.0, lo, (lo, hi)
  slope = (hi - lo) / 255.0
  q = np.clip(np.round((clean - lo) / slope), 0, 255).astype(np.uint8)
  return q, slope, lo, (lo, hi)


def nifti_bytes(volume: ViewerVolume) -> tuple[bytes, dict[str, Any]]:
  """The volume as a gzip-compressed NIfTI-1 file (uint8 with its scaling and display
  range in the header), and what the viewer needs to know of it."""
  q, slope, inter, data_range = _quantised(volume)
  display = _display_range(volume, data_range)
  image = nib.Nifti1Image(q, volume.affine)
  image.set_qform(volume.affine, code=1)
  image.set_sform(volume.affine, code=1)
  header = image.header
  header.set_data_dtype(np.uint8)
  header.set_slope_inter(slope, inter)
  header.set_xyzt_units("mm")
  header["cal_min"], header["cal_max"] = display
  packed = gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
  return packed, {"range": list(data_range), "display": list(display)}


def _entry(volume: ViewerVolume) -> dict[str, Any]:
  packed, about = nifti_bytes(volume)
  return {"name": str(volume.name), "kind": volume.kind,
          "colormap": volume.colormap or DEFAULT_COLORMAP.get(volume.kind),
          "visible": bool(volume.visible),
          "opacity": float(DEFAULT_OPACITY[volume.kind] if volume.opacity is None
                           else volume.opacity),
          "shape": [int(s) for s in volume.data.shape], **about,
          # world (mm) to the file's voxels, for the readout and the slice control (NiiVue's
          # own voxels are those of the volume turned to RAS order)
          "affine": volume.affine.tolist(), "inverse": np.linalg.inv(volume.affine).tolist(),
          "nifti": base64.b64encode(packed).decode("ascii")}


def script_json(value: Any) -> str:
  """`value` as JSON that is safe inside a `<script>` element: `<`, `>` and `&` escaped (as
  JSON's \\u escapes, which parse back to the same characters), so that no string can end
  the element or open a comment."""
  text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
  return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def viewer_block(volumes: Sequence[ViewerVolume], *, title: str, element_id: str = "viewer",
                 static: str = STATIC_DIR, focus: Sequence[float] | None = None,
                 slice_names: Sequence[str] | None = None,
                 orientation: bool = True) -> dict[str, Any]:
  """What `templates/viewer.html` renders for one viewer.

  Args:
    volumes: at least one "image"; labels and overlays in the order their controls list
      them.
    title: the viewer's heading (any text).
    element_id: the id of its section in the page (letters, digits, "-" and "_"; the data
      block's id is `<element_id>-data`).
    static: the URL of the folder that holds the scripts, relative to the page
      (`copy_static` puts them there).
    focus: the voxel of the first image the viewer opens at (default: the centre).
    slice_names: a name per slice (third axis) of the first image, shown beside the slice
      number (e.g. the slice's index in its scan). The readout and the slice control count
      the voxels of the background shown along its third axis, as its file stores them.
    orientation: whether the views are labelled with the patient's directions (from the
      affines: off where they are not the patient's).

  Returns:
    {"id", "title", "data" (the data block's content, markup-safe), "scripts" (their
    URLs), "bytes" (the data block's size)}.
  """
  if not _ID.fullmatch(element_id):
    raise ValueError(f"element_id {element_id!r}: letters, digits, '-' and '_' only, a letter "
                     "first.")
  if not any(v.kind == "image" for v in volumes):
    raise ValueError("A viewer needs at least one volume of kind 'image'.")
  first = next(v for v in volumes if v.kind == "image")
  if slice_names is not None and len(slice_names) != first.data.shape[2]:
    raise ValueError(f"{len(slice_names)} slice names for {first.data.shape[2]} slices.")
  data = {"title": str(title),
          "volumes": [_entry(v) for v in volumes],
          "labels": [{"index": c, "name": n, "rgb": list(rgb)} for c, n, rgb in LABELS],
          "focusMM": None if focus is None else (first.affine @ [*map(float, focus), 1.0])[:3]
          .tolist(),
          "sliceNames": None if slice_names is None else [str(s) for s in slice_names],
          "orientation": bool(orientation)}
  text = script_json(data)
  return {"id": element_id, "title": str(title), "data": markupsafe.Markup(text),
          "scripts": [f"{static.rstrip('/')}/{s}" for s in SCRIPTS], "bytes": len(text)}


def copy_static(folder: str | os.PathLike) -> pathlib.Path:
  """Copies the viewer's scripts (and NiiVue's license) into `<folder>/static/`, once for
  all the pages under `folder`; returns that directory."""
  target = pathlib.Path(folder) / STATIC_DIR
  target.mkdir(parents=True, exist_ok=True)
  for name in STATIC_FILES:
    with outputs.atomic_path(target / name) as tmp:
      shutil.copyfile(STATIC / name, tmp)
  return target


def write_viewer_page(path: str | os.PathLike, volumes: Sequence[ViewerVolume], *,
                      title: str, **block: Any) -> pathlib.Path:
  """Writes a page with one viewer of `volumes` (and the scripts beside it, in `static/`).

  Args:
    path: the page's file.
    volumes, title: as `viewer_block`'s.
    **block: the rest of `viewer_block`'s arguments (not `static`).

  Returns:
    The page's path.
  """
  path = pathlib.Path(path)
  copy_static(path.parent)
  content = viewer_block(volumes, title=title, **block)
  outputs.write_text(path, _ENV.get_template("viewer_page.html").render(
      title=title, viewer=content))
  return path


def slice_volumes(images: np.ndarray, *, predicted: np.ndarray | None = None,
                  truth: np.ndarray | None = None,
                  overlays: Mapping[str, np.ndarray] | None = None,
                  slice_indices: Sequence[int] | None = None,
                  channel_names: Sequence[str] = constants.MODALITY_NAMES,
                  background: int = constants.MODALITY_NAMES.index("FLAIR")
                  ) -> list[ViewerVolume]:
  """The viewer volumes of a stack of preprocessed slices (one case's, in slice order).

  Slices [N, H, W] become volumes [H, W, N] (H the x axis, W the y axis, as the report's
  figures draw them) on a 1 mm grid; where `slice_indices` are evenly spaced, z is in their
  unit (z mm = the slice's index in its scan). The grid keeps the files' storage order, so
  its axes are not the patient's directions (show it with `orientation=False`).

  Args:
    images: [N, H, W, C] the slices, one image volume per channel.
    predicted: [N, H, W] class indices of the prediction (0 none).
    truth: [N, H, W] class indices of the ground truth (hidden when the page opens).
    overlays: name -> [N, H, W] heat maps (the first shown when the page opens).
    slice_indices: [N] each slice's index in its scan.
    channel_names: the image volumes' names.
    background: the channel shown when the page opens (FLAIR, where the oedema shows).

  Returns:
    The images, then the prediction, the truth and the overlays.
  """
  images = np.asarray(images)
  affine = grid_affine()
  if slice_indices is not None and len(slice_indices) > 1:
    steps = np.diff(np.asarray(slice_indices, np.float64))
    if np.all(steps == steps[0]) and steps[0] > 0:
      affine = grid_affine((1.0, 1.0, steps[0]), (0.0, 0.0, float(slice_indices[0])))
  elif slice_indices is not None and len(slice_indices) == 1:
    affine = grid_affine(origin=(0.0, 0.0, float(slice_indices[0])))

  def volume(stack: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(np.asarray(stack), 0, -1))

  out = [ViewerVolume(channel_names[k] if k < len(channel_names) else f"channel {k}",
                      volume(images[..., k]), affine, "image",
                      visible=k == min(background, images.shape[-1] - 1))
         for k in range(images.shape[-1])]
  if predicted is not None:
    out.append(ViewerVolume("prediction", volume(predicted), affine, "labels"))
  if truth is not None:
    out.append(ViewerVolume("ground truth", volume(truth), affine, "labels", visible=False))
  for k, (name, heat) in enumerate((overlays or {}).items()):
    out.append(ViewerVolume(name, volume(heat), affine, "overlay", visible=k == 0))
  return out
