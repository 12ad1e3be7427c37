"""Do the export stage's NIfTI outputs line up with the input scans? Read back and measured.

    tracin-jax run --flagfile=demo --data_dir=/tmp/brats2021 --workdir=runs/brats2021
    python benchmarks/nifti_alignment.py --workdir=runs/brats2021

For every case the export stage wrote (`<workdir>/export/<case>/`), reads back
`prediction.nii.gz` and the case's own segmentation from its folder (found from the
preprocessing record's T1 file) with nibabel, and reports:

* whether the output has the input T1's affine and shape;
* Dice per class and of the whole tumour between the two on the run's slices of the case,
  each label read in the case's layout (ET 4, or 3 for 2023);
* the whole-tumour Dice with the prediction shifted by -2..2 voxels along each in-plane
  axis: a misplaced output (a crop box off by some voxels, a flipped axis) has its best
  Dice far from zero shift. Where the preprocessing halved the plane, labels were sampled
  at the second voxel of each pair (nearest neighbour) while images average both: half a
  voxel, which may put the best Dice at a shift of one.

Prints one line per case and a JSON summary; exits with status 1 if an affine or shape
differs or a best shift is more than one voxel.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app
from absl import flags
import nibabel
import numpy as np

from tracin_jax import patient
from tracin_jax.data import brats
from tracin_jax.data import constants
from tracin_jax.data import layouts

_WORKDIR = flags.DEFINE_string("workdir", None, "The run whose export stage finished.",
                               required=True)
SHIFTS = (-2, -1, 0, 1, 2)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
  total = int(a.sum()) + int(b.sum())
  return float(2 * np.logical_and(a, b).sum() / total) if total else float("nan")


def measure(folder: pathlib.Path) -> dict:
  """The alignment figures of one exported case."""
  grid, explained = patient.read_grid(folder / "grid.npz")
  layout = str(grid.record.layout[0])
  case = brats.case_files(pathlib.Path(str(grid.record.source[0])).parent)
  source = nibabel.load(case.path("t1"))
  written = nibabel.load(folder / patient.PREDICTION_FILE)
  zs = [int(grid.slice_indices[a]) for a in explained]
  predicted = layouts.to_classes(np.asarray(written.dataobj), layout)[:, :, zs]
  truth = layouts.to_classes(np.asarray(nibabel.load(case.path("seg")).dataobj), layout)
  truth = truth[:, :, zs]
  shifted = {f"{axis}{d:+d}": _dice(np.roll(predicted > 0, d, axis=k), truth > 0)
             for k, axis in enumerate("xy") for d in SHIFTS}
  best = {axis: max(SHIFTS, key=lambda d, axis=axis: shifted[f"{axis}{d:+d}"])
          for axis in "xy"}
  return {
      "case": case.case_id, "layout": layout, "slices": zs,
      "same_affine": bool(np.allclose(written.affine, source.affine)),
      "same_shape": written.shape == source.shape,
      "dice": {name: _dice(predicted == c, truth == c)
               for c, name in zip(constants.TUMOUR_CLASSES, constants.TUMOUR_CLASS_NAMES)},
      "dice_wt": _dice(predicted > 0, truth > 0), "dice_wt_shifted": shifted,
      "best_shift": best,
  }


def main(argv):
  del argv
  export = pathlib.Path(_WORKDIR.value) / "export"
  folders = sorted(p.parent for p in export.glob("*/grid.npz"))
  if not folders:
    sys.exit(f"error: {export}: no exported case (run the export stage first).")
  rows = [measure(f) for f in folders]
  ok = True
  for r in rows:
    fine = (r["same_affine"] and r["same_shape"]
            and all(abs(d) <= 1 for d in r["best_shift"].values()))
    ok &= fine
    dice = ", ".join(f"{k} {v:.3f}" for k, v in r["dice"].items())
    print(f"{r['case']} ({r['layout']}, slices {r['slices'][0]}..{r['slices'][-1]}): affine "
          f"{'same' if r['same_affine'] else 'DIFFERS'}, shape "
          f"{'same' if r['same_shape'] else 'DIFFERS'}; Dice {dice}, WT "
          f"{r['dice_wt']:.3f}; WT Dice shifted x -1/+1: {r['dice_wt_shifted']['x-1']:.3f}/"
          f"{r['dice_wt_shifted']['x+1']:.3f}, y -1/+1: {r['dice_wt_shifted']['y-1']:.3f}/"
          f"{r['dice_wt_shifted']['y+1']:.3f}; best shift {r['best_shift']}")
  print(json.dumps(rows, indent=1))
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  app.run(main)
