"""A tiny BraTS-layout data set (NIfTI files) for the reliability tests: seconds to load.

    make_tiny_brats(root, num_cases=6, seed=0)

writes `<root>/HGG/BraTS19_TINY_000<i>/BraTS19_TINY_000<i>_{t1,t1ce,t2,flair,seg}.nii.gz`,
volumes 16 x 16 x 6 (int16 images, uint8 labels in {0, 1, 2, 4}): an ellipsoidal brain
with a bright nested tumour (edema > enhancing rim > necrotic core). Two seeds give the same
case names and shapes but other voxels, the way another cohort would.
"""

from __future__ import annotations

import pathlib

import nibabel as nib
import numpy as np

SHAPE = (16, 16, 6)
KINDS = ("t1", "t1ce", "t2", "flair", "seg")
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def case_name(index: int) -> str:
  return f"BraTS19_TINY_{index + 1:04d}"


def case_path(root: str | pathlib.Path, index: int, kind: str) -> pathlib.Path:
  name = case_name(index)
  return pathlib.Path(root) / "HGG" / name / f"{name}_{kind}.nii.gz"


def write_volume(path: pathlib.Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(data, affine), str(path))


def make_case(index: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([seed, index])
  x, y, z = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
  brain = ((x - 7.5) / 7) ** 2 + ((y - 7.5) / 7) ** 2 + ((z - 2.5) / 4) ** 2 < 1
  cx, cy = rng.uniform(5, 10, size=2)
  r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
  seg = np.zeros(SHAPE, np.uint8)
  seg[(r < 4.0) & brain] = 2
  seg[(r < 2.6) & brain] = 4
  seg[(r < 1.3) & brain] = 1
  volumes = {}
  for k, kind in enumerate(KINDS[:4]):
    v = 200 + 40 * k + rng.normal(0, 15, SHAPE) + 300 * (seg > 0) + 150 * k * (seg == 4)
    volumes[kind] = np.where(brain, np.clip(v, 1, None), 0).astype(np.int16)
  volumes["seg"] = seg
  return volumes


def make_tiny_brats(root: str | pathlib.Path, num_cases: int = 6, seed: int = 0) -> pathlib.Path:
  """Writes the tiny cohort under `root` (see the module docstring); returns root."""
  root = pathlib.Path(root)
  for i in range(num_cases):
    for kind, data in make_case(i, seed).items():
      write_volume(case_path(root, i, kind), data)
  return root
