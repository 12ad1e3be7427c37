"""The `export` stage: the explained validation cases as NIfTI volumes on their own scans.

For the cases of the report's pages (the first `--export_cases`: the saliency stage's images
first, then the largest regions of other patients), it writes under
`<workdir>/export/<case>/` (`tracin_jax.patient.write_case_outputs`), each volume on the
input's grid with its T1 file's affine and header, the crop and resize undone:
  - `prediction.nii.gz`: the final model's segmentation in the layout's own labels, inside
    the brain, on the run's slices of the case, or on every axial slice of the scan with
    `--export_full_volume` (which reads the case's files again);
  - `influence_<class>.nii.gz`: per voxel of each predicted region of the run's slices, the
    score-weighted share of its top TracIn proponents whose own region covers it;
  - `saliency_<method>_<class>.nii.gz`: the saliency stage's maps (`--export_methods`) on its
    explained slice;
  - `grid.npz`: the arrays on the model's grid and the preprocessing record they were put
    back with (what `load` reads);
  - `check_<case>.png`: the scan's slice with the largest predicted tumour, the prediction
    and the influence read back from the written files, drawn on it.
Open the input scan and these files together in ITK-SNAP, 3D Slicer or NiiVue: they line up.
The report's image pages show them in their viewer.

On volumes (`--spatial_dims=3`) each exported case is its validation volume, put back on
the scan through its `volumes.VolumeRecord` (`volumes.to_volume` and `write_nifti`: the box
and the resampling undone, labels by nearest neighbour, maps trilinear, 0 outside the box):
the prediction and the influence support cover the whole volume, the saliency maps are the
saliency stage's 3D maps, and the check figure draws the scan's axial slice through the
volume's slice with the most predicted tumour. `--export_full_volume` does not apply (the
volume is the model's whole box).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from tracin_jax import outputs
from tracin_jax import patient
from tracin_jax import rundir
from tracin_jax.data import constants
from tracin_jax.data import patient_space
from tracin_jax.data.slices import SliceSet
from tracin_jax.influence import rankings
from tracin_jax.influence import segmentation
from tracin_jax.settings import setting
from tracin_jax.stages import base

CLASS_NAMES = constants.TUMOUR_CLASS_NAMES
GRID_FILE = rundir.EXPORT_GRID_FILE


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """Settings of the export stage."""

  cases: int = setting(6, "Validation cases written as NIfTI volumes: those of the report's "
                       "pages (the saliency stage's images first, then the largest regions "
                       "of other patients).", flag="export_cases", minimum=0)
  methods: tuple[str, ...] = setting(
      ("smoothgrad", "integrated_gradients", "grad_cam_plus_plus"),
      "Saliency methods written as volumes (those the saliency stage ran).",
      flag="export_methods")
  full_volume: bool = setting(False, "Predict every axial slice of each exported case's scan "
                              "(reads its files again; a model trained on the central slices "
                              "sees the others for the first time); off: the run's slices.",
                              flag="export_full_volume")
  batch_size: int = setting(16, "Slices per compiled call of the export stage's prediction.",
                            flag="export_batch_size", minimum=1)


@dataclasses.dataclass
class CaseExport:
  """One exported case: its arrays on the model's grid and where they lie on the scan.

  Attributes:
    case_id: the case.
    grid: where the predicted slices lie on the scan (`patient_space.SliceGrid`; a
      volume's `patient.volume_grid`).
    predicted: [n, H, W] int8 predicted classes on the grid's slices (a volume's
      [1, D, H, W]).
    explained: [m] indices into the grid's slices that influence and saliency cover (a
      volume's [0]).
    influence: [m, H, W, K] float32 support of the top proponents (`influence_support`; a
      volume's [1, D, H, W, K]).
    saliency: method -> [m, H, W, K] float32 (summed |map| over the modalities; a volume's
      [1, D, H, W, K]).
    files: {"path", "description"} of the case's files, workdir-relative.
  """

  case_id: str
  grid: patient_space.SliceGrid
  predicted: np.ndarray
  explained: np.ndarray
  influence: np.ndarray
  saliency: dict[str, np.ndarray]
  files: list[dict[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ExportOutputs:
  """The export stage's result: one entry per exported case, and the manifest."""

  cases: list[CaseExport]
  manifest: base.Manifest


_VOLUME = base.Output("{case}/{name}", "{description}")
_GRID = base.Output("{case}/" + GRID_FILE, "{case}: the exported arrays on the model's grid "
                    "and the preprocessing record that puts them on the scan")
_CHECK = base.Output(rundir.EXPORT_CHECK_FIGURE, "{case}, {where}: the scan with the "
                     "prediction and the ET influence read back from the NIfTI outputs",
                     figure=True)


def _cases(context: base.Context, images, val_regions, n: int) -> list[str]:
  """The first n validation cases of the report's pages (`report.choose_pages`: the
  saliency stage's images first, then the largest regions of other patients)."""
  from tracin_jax import report  # pylint: disable=g-import-not-at-top

  ids = context.val_set.ids
  pages = report.choose_pages(ids, val_regions, images, len(ids))
  return list(dict.fromkeys(str(ids[a][0]) for a in pages))[:n]


def _scan_slices(context: base.Context, case_slices: SliceSet, full: bool) -> SliceSet:
  """Every axial slice of the case's scan preprocessed as the run's (`full`, where its
  files can be read), else the run's slices of the case."""
  from tracin_jax.data import brats  # pylint: disable=g-import-not-at-top

  if not full:
    return case_slices
  try:
    return patient_space.read_scan(case_slices)
  except (brats.BratsDataError, OSError) as e:
    context.log(f"export: {case_slices.cases[0]}: cannot read its scan again ({e}); its "
                "prediction covers the run's slices only.")
    return case_slices


@base.register_stage
class ExportStage(base.StageBase):
  """NIfTI volumes of the explained validation cases, on their own scans."""

  name, config_cls, needs = "export", ExportConfig, ("influence", "saliency")
  writes = (_VOLUME, _GRID, _CHECK)
  supports_volumes = True

  def check(self, context: base.Context) -> None:
    if context.val_set.record is None:
      raise base.StageError(
          "export stage: the validation slices carry no preprocessing record (slices built "
          "by hand, not read by tracin_jax.data.brats), so nothing can be put back on a "
          "scan; leave the stage out of --stages.")

  def compute(self, context: base.Context) -> ExportOutputs:
    """Predicts each case's scan and gathers its influence and saliency maps."""
    self.check(context)
    influence, sal = context.need("influence"), context.need("saliency")
    chosen = _cases(context, sal.images, influence.val_regions, self.config.cases)
    ran = list(context.configs["saliency"].methods) if "saliency" in context.configs else []
    methods = [m for m in self.config.methods if m in ran]
    skipped = sorted(set(self.config.methods) - set(methods))
    if skipped:
      context.log(f"export: {', '.join(skipped)} not among the saliency stage's methods; "
                  "not exported.")
    if self.config.full_volume and patient.is_volume(context.val_set):
      context.log("export: --export_full_volume does not apply to volumes (each is the "
                  "model's whole box of its scan); ignored.")
    out = [self._case(context, influence, sal, case, methods, ran) for case in chosen]
    return ExportOutputs(out, self.manifest())

  def _case(self, context: base.Context, influence, sal, case: str, methods: list[str],
            ran: list[str]) -> CaseExport:
    """One case: its scan predicted, its slices' influence support and saliency maps."""
    val = context.val_set
    rows = [a for a, c in enumerate(val.case_ids) if str(c) == case]
    case_slices = val.subset(np.asarray(rows))
    volume = patient.is_volume(case_slices)  # one volume, slice index NO_SLICE
    scan = case_slices if volume else _scan_slices(context, case_slices,
                                                   self.config.full_volume)
    _, predicted = segmentation.predict_regions_and_labels(
        influence.apply_fn, influence.params, scan.images, influence.threshold,
        batch_size=self.config.batch_size, state=influence.state)
    predicted = np.where(patient.in_brain(scan.images), predicted, 0)
    where = {int(z): i for i, z in enumerate(scan.slice_indices)}
    explained = np.asarray([where[int(z)] for z in case_slices.slice_indices], np.int32)
    blocks = influence.test_blocks[:, rows]
    entries = rankings.explain(blocks, [val.ids[a] for a in rows], context.train_set.ids,
                               CLASS_NAMES, k=context.configs["influence"].top_k
                               if "influence" in context.configs else 10)
    support = np.stack([patient.influence_support(
        [e for e in entries if (e["case"], e["slice"]) == val.ids[a]], influence.val_regions[a],
        context.train_set.ids, influence.train_regions) for a in rows])
    saliency = {m: np.zeros(support.shape, np.float32) for m in methods}
    for (c, z), maps in zip(sal.images, sal.maps):
      if str(c) == case:
        i = [int(s) for s in case_slices.slice_indices].index(int(z))
        for m in methods:  # maps.maps: [M, K, H, W, C]
          saliency[m][i] = np.moveaxis(patient.plane(m, maps.maps[ran.index(m)]), 0, -1)
    grid = patient.volume_grid(scan) if volume else patient_space.SliceGrid.of(scan)
    return CaseExport(case, grid, predicted.astype(np.int8), explained, support, saliency)

  def write(self, context: base.Context, result: ExportOutputs) -> base.Manifest:
    manifest = self.manifest()
    for one in result.cases:
      self._write_case(context, manifest, one)
    manifest.headline = {"cases": [c.case_id for c in result.cases],
                         "files": sum(len(c.files) for c in result.cases)}
    return manifest

  def _write_case(self, context: base.Context, manifest: base.Manifest,
                  one: CaseExport) -> None:
    tag = rundir.safe_name(one.case_id)
    out_dir = context.stage_dir(self.name) / tag
    explained_grid = patient_space.SliceGrid(
        one.grid.record.subset(one.explained), one.grid.slice_indices[one.explained],
        one.grid.shape)
    written = patient.write_case_outputs(one.grid, out_dir, predicted=one.predicted)
    written += patient.write_case_outputs(explained_grid, out_dir, influence=one.influence,
                                          saliency=one.saliency)
    one.files = []
    for f in written:
      description = f"{one.case_id}: {f['description']}"
      self.list_output(context, manifest, _VOLUME, case=tag,
                       name=pathlib.Path(f["path"]).name, description=description)
      one.files.append(manifest.files[-1])
    _save_grid(self.list_output(context, manifest, _GRID, case=tag), one)
    z, where = _largest_slice(one)
    about = {"kind": rundir.EXPORT_CHECK, "case": one.case_id, "slice": z}
    if patient.is_volume(one.grid):
      about["axial_slice"] = _representative(one)
    path = self.list_output(context, manifest, _CHECK, case=one.case_id, tag=tag,
                            where=where, about=about)
    patient.plot_check(out_dir, one.grid, z, path, title=f"{one.case_id}{context.suffix}",
                       where=where)

  def load(self, context: base.Context) -> ExportOutputs:
    record = base.read_manifest(context.workdir, self.name)
    manifest = base.Manifest.from_record(record)
    cases = []
    for case in record["headline"]["cases"]:
      one = _read_grid(context.stage_dir(self.name) / rundir.safe_name(case) / GRID_FILE)
      one.files = [f for f in manifest.files
                   if f["path"].startswith(f"{self.name}/{rundir.safe_name(case)}/")
                   and f["path"].endswith(".nii.gz")]
      cases.append(one)
    return ExportOutputs(cases, manifest)


def _representative(one: CaseExport) -> int:
  """A volume's axial slice d with the most predicted tumour
  (`figures.representative_slice`: the middle one where none is predicted)."""
  from tracin_jax.influence import figures  # pylint: disable=g-import-not-at-top

  return figures.representative_slice(one.predicted[0] > 0)


def _largest_slice(one: CaseExport) -> tuple[int, str]:
  """(the scan's axial index of the grid's slice with the most predicted tumour, its name
  in titles); a volume's: the scan's slice through the volume's such slice."""
  if patient.is_volume(one.grid):
    d = _representative(one)
    z = patient.scan_slice(one.grid, d)
    depth = int(one.grid.record.volume_shape[0][2])
    return z, (f"axial slice {z} of {depth} (the volume's slice {d} of "
               f"{one.grid.shape[0]}: its largest predicted tumour)")
  sizes = (one.predicted > 0).sum(axis=(1, 2))
  z = int(one.grid.slice_indices[int(np.argmax(sizes))])
  return z, f"axial slice {z}"


def _save_grid(path: pathlib.Path, one: CaseExport) -> None:
  outputs.save_npz(path, case_id=np.asarray(one.case_id), predicted=one.predicted,
                   influence=one.influence, methods=np.asarray(list(one.saliency), dtype=str),
                   **{f"saliency_{m}": v for m, v in one.saliency.items()},
                   **patient.grid_arrays(one.grid, one.explained))


def _read_grid(path: pathlib.Path) -> CaseExport:
  grid, explained = patient.read_grid(path)
  with np.load(path, allow_pickle=False) as f:
    saliency = {str(m): f[f"saliency_{m}"] for m in f["methods"]}
    return CaseExport(str(f["case_id"]), grid, f["predicted"], explained, f["influence"],
                      saliency)


__all__ = ["CaseExport", "ExportConfig", "ExportOutputs", "ExportStage"]
