"""A seeded synthetic brain-tumour cohort in the BraTS 2019 layout: the embedded default data.

Every file written here is synthetic and says so: case names are `BraTS19_SYN_0001`, ...,
and `cohort.json` at the root records `"synthetic": true`, the generator version, the seed
and the number of cases.

Layout (the loader for real BraTS 2019 reads it unchanged):

  <out>/cohort.json
  <out>/HGG/BraTS19_SYN_0001/BraTS19_SYN_0001_{t1,t1ce,t2,flair,seg}.nii.gz
  <out>/LGG/...                  (only when `lgg_fraction` > 0)

Volumes are 240 x 240 x 155 at 1 mm with the affine `constants.BRATS_AFFINE` (LPS-style
storage, as BraTS ships them); images are int16, non-negative, 0 outside the skull-stripped
brain; labels are uint8 in {0, 1, 2, 4}.

How a case is made (DESIGN.md section 1):

1. Anatomy. Grey matter, white matter and CSF fractions come from the MNI ICBM152 2009
   templates that nilearn bundles (CSF = clip(mask - GM - WM)), loaded once per process.
   Each case resamples them (trilinear) through its own small rotation, anisotropic scaling,
   shift and smooth elastic field, so no two patients share a brain.
2. Glioma, built in its bounding box: lobed shapes from noise-perturbed ellipsoidal distance
   fields; a necrotic core (label 1) inside an enhancing rim (label 4) inside an edema halo
   (label 2) that spreads further in white matter and stays out of CSF. Size, position and
   grade are random; some cases have no enhancing tumour (their core is non-enhancing,
   label 1). The tumour pushes the tissue around it outwards (a radial mass effect in the
   resampling) and replaces the tissue it occupies. Its centre lies within 4 mm of the
   brain's centre of mass along z (8-14 mm in about one case in seven), and whole tumours
   measure about 30-65 mm, so the loader's central 10-slice slab holds tumour, nearly
   always in every slice.
3. MR physics. Per tissue, S = PD (1 - e^{-TR/T1}) e^{-TE/T2} (spin echo: T1w, T2w) and
   S = PD |1 - 2 e^{-TI/T1} + e^{-TR/T1}| e^{-TE/T2} (FLAIR, which nulls CSF); partial
   volumes mix linearly; gadolinium shortens the enhancing tumour's T1 to 350 ms on T1Gd
   only. Relaxation times vary a few percent between cases. Then the blur of the imaging
   point-spread function, a smooth multiplicative bias field, folded-Gaussian (Rician-like)
   noise and a random per-case, per-modality intensity scale (so the loader's per-volume
   normalisation matters).

   The blur is applied to the tissue fractions rather than to the images: the images are a
   linear mix of the fractions with per-tissue constants, so blurring either gives the same
   image, and the template's fractions are blurred once per process instead of four images
   per case (the tumour's fractions are blurred per case, in its box).

Everything random is drawn from `numpy.random.SeedSequence([seed, case_index])`: the same
seed gives byte-identical files, and the number of worker processes does not change them.
A cohort of n cases is the first n cases of any larger cohort with the same seed.

Command line (prints progress and the time taken):

  python -m tracin_jax.data.synthetic --out DIR --cases 40 --seed 0 [--workers 2]
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
import zlib
from typing import Any, Mapping

import nibabel as nib
import numpy as np
from scipy import ndimage

from tracin_jax import outputs
from tracin_jax.data import constants

GENERATOR = "tracin_jax.data.synthetic"
# Bump whenever the generated data change: cached cohorts of another version are not reused.
GENERATOR_VERSION = "1"
CASE_PREFIX = "BraTS19_SYN_"
COHORT_FILE = "cohort.json"
# Written first and replaced by COHORT_FILE last: a directory holding it is unfinished.
PARTIAL_FILE = ".cohort.partial.json"
FILE_KINDS = constants.MODALITIES + (constants.SEG_SUFFIX,)
SHAPE = constants.VOLUME_SHAPE

# ---------------------------------------------------------------------------------------------
# MR physics. Relaxation times in ms; proton density relative to CSF.
# ---------------------------------------------------------------------------------------------

# "non_enhancing" is solid tumour whose blood-brain barrier holds (the NET of label 1 in a
# tumour without enhancement): the tumour's relaxation times without gadolinium shortening.
NORMAL_TISSUES = ("csf", "gm", "wm")
TUMOUR_TISSUES = ("edema", "necrosis", "non_enhancing", "enhancing")
TISSUES = NORMAL_TISSUES + TUMOUR_TISSUES
RELAXATION = {  # name: (T1, T2, PD)
    "csf": (2569.0, 329.0, 1.00),
    "gm": (833.0, 83.0, 0.86),
    "wm": (500.0, 70.0, 0.77),
    "edema": (1100.0, 130.0, 0.92),
    "necrosis": (2000.0, 250.0, 0.95),
    "non_enhancing": (1000.0, 100.0, 0.88),
    "enhancing": (1000.0, 100.0, 0.88),
}
T1_ENHANCING_GADOLINIUM = 350.0  # ms: the enhancing tumour's T1 on T1Gd

# Acquisition parameters (ms) per modality.
SEQUENCES = {
    "t1": {"tr": 500.0, "te": 10.0},
    "t1ce": {"tr": 500.0, "te": 10.0},  # T1w after gadolinium
    "t2": {"tr": 4000.0, "te": 100.0},
    "flair": {"tr": 9000.0, "te": 120.0, "ti": 1700.0},
}

PSF_SIGMA_MM = 0.6  # Gaussian point-spread function of the synthetic scanner


def spin_echo(t1, t2, pd, tr, te):
  """Spin-echo signal S = PD (1 - exp(-TR/T1)) exp(-TE/T2), times in ms."""
  return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery(t1, t2, pd, tr, te, ti):
  """Magnitude inversion recovery S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)."""
  return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def tissue_signals(
    relaxation: Mapping[str, tuple[float, float, float]] = RELAXATION) -> np.ndarray:
  """Signal of each pure tissue in each modality.

  Args:
    relaxation: tissue name -> (T1 ms, T2 ms, PD) for every name in TISSUES.

  Returns:
    [len(TISSUES), 4] float64; rows in TISSUES order, columns in constants.MODALITIES order
    (T1, T1Gd, T2, FLAIR).
  """
  out = np.zeros((len(TISSUES), len(constants.MODALITIES)))
  for i, name in enumerate(TISSUES):
    t1, t2, pd = relaxation[name]
    for j, modality in enumerate(constants.MODALITIES):
      seq = SEQUENCES[modality]
      if modality == "t1ce" and name == "enhancing":
        t1_here = T1_ENHANCING_GADOLINIUM
      else:
        t1_here = t1
      if "ti" in seq:
        out[i, j] = inversion_recovery(t1_here, t2, pd, seq["tr"], seq["te"], seq["ti"])
      else:
        out[i, j] = spin_echo(t1_here, t2, pd, seq["tr"], seq["te"])
  return out


# ---------------------------------------------------------------------------------------------
# Template anatomy, loaded once per process.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TissueMaps:
  """Template tissue fractions on the template's RAS voxel grid, blurred by the PSF.

  Attributes:
    packed: [X, Y, Z] uint32; its four bytes are CSF, GM, WM and brain-mask fractions x 255
      (CSF + GM + WM = brain), so one gather fetches all four.
    affine: [4, 4] float64, voxel -> MNI mm (RAS-aligned).
  """

  packed: np.ndarray
  affine: np.ndarray


@functools.lru_cache(maxsize=2)
def load_tissue_maps(resolution: int = 1) -> TissueMaps:
  """Tissue fractions from nilearn's bundled MNI ICBM152 2009 templates (offline), cached.

  Args:
    resolution: 1 or 2 (mm), passed to nilearn's loaders.

  Returns:
    TissueMaps: CSF = clip(mask - GM - WM, 0, 1), with GM and WM zeroed outside the mask,
    each blurred by the PSF (PSF_SIGMA_MM).
  """
  if resolution not in (1, 2):
    raise ValueError(f"template resolution must be 1 or 2 (mm), got {resolution}")
  from nilearn import datasets  # pylint: disable=g-import-not-at-top  (a slow import)

  mask_img = datasets.load_mni152_brain_mask(resolution=resolution)
  affine = np.asarray(mask_img.affine, np.float64)
  diag = np.diag(affine)[:3]
  if not np.allclose(affine[:3, :3], np.diag(diag)) or np.any(diag <= 0):
    raise ValueError(f"expected a RAS-aligned template affine, got\n{affine}")
  mask = np.asarray(mask_img.dataobj) > 0.5
  # Crop to the brain plus a margin (edge voxels repeat outside, so the margin must be 0).
  nz = np.nonzero(mask)
  lo = [max(int(a.min()) - 4, 0) for a in nz]
  hi = [min(int(a.max()) + 5, s) for a, s in zip(nz, mask.shape)]
  crop = tuple(slice(a, b) for a, b in zip(lo, hi))
  affine[:3, 3] += affine[:3, :3] @ np.array(lo, np.float64)
  mask = mask[crop].astype(np.float32)
  gm, wm = (np.asarray(f(resolution=resolution).dataobj[crop], np.float32)
            for f in (datasets.load_mni152_gm_template, datasets.load_mni152_wm_template))
  gm = np.clip(gm, 0, 1) * mask
  wm = np.clip(wm, 0, 1) * mask
  csf = np.clip(mask - gm - wm, 0, 1)
  sigma = PSF_SIGMA_MM / diag
  channels = [ndimage.gaussian_filter(a, sigma, truncate=2.5) for a in (csf, gm, wm)]
  channels.append(channels[0] + channels[1] + channels[2])  # brain, exactly, before rounding
  packed = np.empty(mask.shape + (4,), np.uint8)
  for i, a in enumerate(channels):
    np.clip(a, 0, 1, out=a)
    a *= 255
    np.rint(a, out=packed[..., i], casting="unsafe")
  return TissueMaps(packed.view(np.uint32)[..., 0], affine)


def _sample(maps: TissueMaps, coords: list[np.ndarray], order: int) -> np.ndarray:
  """All four fractions at template voxel coordinates (edge voxels repeat outside).

  Args:
    maps: the template.
    coords: 3 x [N] float32 template voxel coordinates.
    order: 0 (nearest) or 1 (trilinear).

  Returns:
    [N, 4] float32 in [0, 1]: CSF, GM, WM, brain.
  """
  shape = maps.packed.shape
  flat = maps.packed.ravel()
  strides = (shape[1] * shape[2], shape[2], 1)
  if order == 0:
    index = 0
    for c, n, s in zip(coords, shape, strides):
      index = index + np.clip(np.rint(c), 0, n - 1).astype(np.intp) * s
    return flat.take(index)[:, None].view(np.uint8).astype(np.float32) * (1.0 / 255.0)
  base, frac = 0, []
  for c, n, s in zip(coords, shape, strides):
    c = np.clip(c, 0.0, n - 1.001)
    c0 = np.floor(c)
    frac.append(c - c0)
    base = base + c0.astype(np.intp) * s
  out = np.zeros((len(base), 4), np.float32)
  for dx in (0, 1):
    wx = frac[0] if dx else 1.0 - frac[0]
    for dy in (0, 1):
      wxy = wx * (frac[1] if dy else 1.0 - frac[1])
      for dz in (0, 1):
        w = wxy * (frac[2] if dz else 1.0 - frac[2])
        corner = flat.take(base + (dx * strides[0] + dy * strides[1] + dz))
        out += w[:, None] * corner[:, None].view(np.uint8)
  out *= 1.0 / 255.0
  return out


# ---------------------------------------------------------------------------------------------
# Smooth random fields from separable Gaussian bases (a few small matrix products).
# ---------------------------------------------------------------------------------------------


def _gaussian_basis(x: np.ndarray, lo: float, hi: float, num: int) -> np.ndarray:
  """[len(x), num] float32 Gaussian bumps centred evenly over [lo, hi], rows of unit norm."""
  centres = np.linspace(lo, hi, num)
  width = (hi - lo) / (num - 1)
  b = np.exp(-0.5 * ((np.asarray(x, np.float64)[:, None] - centres[None, :]) / width)**2)
  return (b / np.sqrt((b**2).sum(1, keepdims=True))).astype(np.float32)


def _separable_field(coeffs: np.ndarray, bx: np.ndarray, by: np.ndarray,
                     bz: np.ndarray) -> np.ndarray:
  """sum_abc coeffs[a, b, c] bx[x, a] by[y, b] bz[z, c] as a [X, Y, Z] float32 array."""
  t = np.einsum("abc,zc->abz", coeffs.astype(np.float32), bz)
  t = np.einsum("yb,abz->ayz", by, t)
  return (bx @ t.reshape(bx.shape[1], -1)).reshape(len(bx), len(by), len(bz))


def _rotation(angles_deg) -> np.ndarray:
  """[3, 3] rotation about x, then y, then z, by angles in degrees."""
  ax, ay, az = np.deg2rad(angles_deg)
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


# ---------------------------------------------------------------------------------------------
# One case.
# ---------------------------------------------------------------------------------------------

# The template brain's bounding-box centre (MNI mm) lands on this output RAS voxel.
_MNI_CENTRE = np.array([0.0, -17.0, 5.0])
_OUT_CENTRE = np.array([119.5, 119.5, 73.0])
_ELASTIC_BASIS = (7, 7, 5)  # Gaussian bumps per axis over the volume, about 40 mm apart
_TUMOUR_BASIS = 9  # per axis, over the tumour's box
_NOISE_CLIP = 1.5  # the shape noise (unit variance) is clipped to +-this


@dataclasses.dataclass(frozen=True)
class CaseParams:
  """Every random choice of one case (drawn by draw_case_params)."""

  group: str  # "HGG" or "LGG"
  rotation: np.ndarray  # [3, 3]
  scale: np.ndarray  # [3], output size / template size
  shift: np.ndarray  # [3] mm
  elastic: np.ndarray  # [3, *_ELASTIC_BASIS] mm
  relaxation: dict[str, tuple[float, float, float]]
  gains: np.ndarray  # [4], intensity of each modality's brightest normal tissue
  noise: np.ndarray  # [4], noise sigma relative to the gain
  bias: np.ndarray  # [4, 10], coefficients of a quadratic log bias field
  radius: float  # mm, main lobe's mean semi-axis
  lobe_centres: np.ndarray  # [L, 3], in units of radius
  lobe_axes: np.ndarray  # [L, 3], semi-axes in units of radius
  lobe_rotations: np.ndarray  # [L, 3, 3]
  has_enhancing: bool
  has_necrosis: bool
  core_ratio: float  # tumour core / whole-tumour distance threshold
  necrosis_ratio: float  # necrosis / core threshold
  edema_occupancy: float  # share of an edema voxel that is edema (the rest stays tissue)
  wm_spread: float  # how much further edema reaches in white matter
  shape_noise: np.ndarray  # [2] amplitudes (core, edema)
  noise_coeffs: np.ndarray  # [2, B, B, B]
  mass_effect: float  # k in q' = q - k (q - t) exp(-|q - t|^2 / L^2)
  z_offset: float  # mm, tumour centre relative to the brain's centre of mass along z
  placement: float  # in [0, 1): which admissible in-plane position


def draw_case_params(rng: np.random.Generator, lgg_fraction: float = 0.0) -> CaseParams:
  """Draws one case's choices, always the same number of draws in the same order."""
  is_lgg = rng.random() < lgg_fraction
  rotation = _rotation(np.clip(rng.normal(0.0, [3.0, 3.0, 5.0]), -8, 8))
  scale = rng.uniform(0.90, 1.00) * rng.uniform(0.97, 1.03, 3)
  shift = rng.uniform(-4, 4, 3) * np.array([1.0, 1.0, 0.5])
  elastic = rng.normal(0.0, 2.0, (3,) + _ELASTIC_BASIS)
  relaxation = {
      t: (t1 * np.exp(rng.normal(0, 0.04)), t2 * np.exp(rng.normal(0, 0.04)),
          pd * np.exp(rng.normal(0, 0.02))) for t, (t1, t2, pd) in RELAXATION.items()}
  gains = np.exp(rng.uniform(np.log(300), np.log(3000), 4))
  noise = rng.uniform(0.01, 0.03, 4)
  bias = rng.normal(0.0, 1.0, (4, 10)) * np.array([0, .08, .08, .08, .05, .05, .05, .04, .04,
                                                    .04])
  radius = rng.uniform(16.0, 30.0)
  num_lobes = int(rng.integers(1, 5))
  directions = rng.normal(size=(4, 3))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  lobe_centres = directions * rng.uniform(0.3, 0.6, (4, 1))
  lobe_centres[0] = 0.0
  lobe_axes = np.concatenate([rng.uniform(0.8, 1.2, (1, 3)), rng.uniform(0.4, 0.7, (3, 3))])
  lobe_rotations = np.stack([_rotation(rng.uniform(-180, 180, 3)) for _ in range(4)])
  if is_lgg:
    has_enhancing = bool(rng.random() < 0.15)
    has_necrosis = has_enhancing and bool(rng.random() < 0.5)
    core_ratio = rng.uniform(0.4, 0.65)
  else:
    has_enhancing = bool(rng.random() < 0.88)
    has_necrosis = bool(rng.random() < 0.9)
    core_ratio = rng.uniform(0.55, 0.8)
  return CaseParams(
      group="LGG" if is_lgg else "HGG",
      rotation=rotation,
      scale=scale,
      shift=shift,
      elastic=elastic,
      relaxation=relaxation,
      gains=gains,
      noise=noise,
      bias=bias,
      radius=float(radius),
      lobe_centres=lobe_centres[:num_lobes],
      lobe_axes=lobe_axes[:num_lobes],
      lobe_rotations=lobe_rotations[:num_lobes],
      has_enhancing=has_enhancing,
      has_necrosis=has_necrosis,
      core_ratio=float(core_ratio),
      necrosis_ratio=float(rng.uniform(0.45, 0.8)),
      edema_occupancy=float(rng.uniform(0.6, 0.9)),
      wm_spread=float(rng.uniform(0.2, 0.4)),
      shape_noise=rng.uniform([0.12, 0.15], [0.25, 0.3]),
      noise_coeffs=rng.normal(size=(2,) + (_TUMOUR_BASIS,) * 3),
      mass_effect=float(rng.uniform(0.1, 0.3)),
      z_offset=float(rng.uniform(-4.0, 4.0) if rng.random() < 0.85 else
                     rng.choice([-1.0, 1.0]) * rng.uniform(8.0, 14.0)),
      placement=float(rng.random()),
  )


class _Warp:
  """Output RAS voxel q -> template voxel v = m0 + M (q' - c) + N u(q).

  u is the smooth elastic field (mm) on the output grid; q' is q pulled towards the tumour
  centre t, q' = q - k (q - t) exp(-|q - t|^2 / L^2), so the tissue at q' appears at q: the
  tumour pushes its surroundings outwards (monotone for k < 1).
  """

  def __init__(self, maps: TissueMaps, params: CaseParams):
    inv = np.linalg.inv(maps.affine)
    self.n = inv[:3, :3]
    self.m = self.n @ params.rotation @ np.diag(1.0 / params.scale)
    self.m0 = self.n @ _MNI_CENTRE + inv[:3, 3]
    self.c = _OUT_CENTRE + params.shift
    self.elastic = params.elastic
    self.mass = None  # (t [3], k, L) once the tumour is placed

  def elastic_field(self, axes, index=None) -> list[np.ndarray]:
    """u (mm) on the grid spanned by `axes`, flattened, then taken at `index` if given."""
    bases = [_gaussian_basis(a, -20.0, s + 20.0, k)
             for a, s, k in zip(axes, SHAPE, _ELASTIC_BASIS)]
    out = []
    for d in range(3):
      u = _separable_field(self.elastic[d], *bases).ravel()
      out.append(u if index is None else u.take(index))
    return out

  def __call__(self, q: list[np.ndarray], u: list[np.ndarray]) -> list[np.ndarray]:
    """Template voxel coordinates 3 x [N] float32 of output points q (3 x [N]) with u."""
    rel = [q[e] - np.float32(self.c[e]) for e in range(3)]
    if self.mass is not None:
      t, k, length = self.mass
      dt = [q[e] - np.float32(t[e]) for e in range(3)]
      shrink = dt[0] * dt[0] + dt[1] * dt[1] + dt[2] * dt[2]
      shrink *= np.float32(-1.0 / length**2)
      np.exp(shrink, out=shrink)
      shrink *= np.float32(-k)
      rel = [r + shrink * d for r, d in zip(rel, dt)]
    out = []
    for d in range(3):
      v = np.float32(self.m0[d]) + np.float32(self.n[d, d]) * u[d]
      for e in range(3):
        v += np.float32(self.m[d, e]) * rel[e]
      out.append(v)
    return out


def _coarse_pass(maps: TissueMaps, warp: _Warp, step: int):
  """Nearest-neighbour fractions on the output grid of spacing `step` voxels.

  Returns:
    (axes, frac): axes 3 x [n] output voxel coordinates of the grid's cell centres;
    frac [nx, ny, nz, 4] float32 CSF, GM, WM, brain.
  """
  shape = [-(-s // step) for s in SHAPE]
  axes = [step * np.arange(n, dtype=np.float32) + 0.5 * (step - 1) for n in shape]
  q = [g.ravel() for g in np.meshgrid(*axes, indexing="ij")]
  frac = _sample(maps, warp(q, warp.elastic_field(axes)), order=0)
  return axes, frac.reshape(shape + [4])


def _place_tumour(maps: TissueMaps, warp: _Warp, params: CaseParams) -> np.ndarray:
  """Tumour centre (output RAS voxel coordinates, [3]) from a 4 mm pass over the brain.

  Its axial position is the brain's centre of mass along z (where the loader centres its
  slices by default; the bounding box's middle lies a few mm lower) plus params.z_offset;
  in-plane, a point of that slice deep enough inside the brain for the tumour, out of CSF
  and off the midline.
  """
  step = 4
  axes, frac = _coarse_pass(maps, warp, step)
  inside = frac[..., 3] > 0.5
  per_slice = inside.sum((0, 1))
  tz = float((axes[2] * per_slice).sum() / per_slice.sum()) + params.z_offset
  kz = int(np.clip(np.rint((tz - axes[2][0]) / step), 0, len(axes[2]) - 1))
  section = inside[:, :, kz]
  depth = ndimage.distance_transform_edt(section) * step
  xs = np.nonzero(section.any(1))[0]
  x_mid = 0.5 * (axes[0][xs[0]] + axes[0][xs[-1]])
  ok = (depth >= min(0.7 * params.radius, 15.0)) & (frac[:, :, kz, 0] < 0.3)
  ok &= np.abs(axes[0] - x_mid)[:, None] >= 8.0
  if not ok.any():
    ok = depth >= 0.5 * depth.max()
  admissible = np.argwhere(ok)
  ci, cj = admissible[int(params.placement * len(admissible))]
  return np.array([axes[0][ci], axes[1][cj], tz])


def _brain_points(maps: TissueMaps, warp: _Warp):
  """Output voxels that may hold brain: a 2 mm pass, dilated by one of its cells.

  Returns:
    (ijk, lo, hi): ijk 3 x [N] intp voxel indices; lo, hi their bounding box.
  """
  step = 2
  _, frac = _coarse_pass(maps, warp, step)
  near = ndimage.maximum_filter((frac[..., 3] > 0).view(np.uint8), size=3)
  cells = [c * step for c in np.nonzero(near)]
  offsets = np.stack(np.meshgrid(*[np.arange(step)] * 3, indexing="ij")).reshape(3, -1)
  ijk = [(c[:, None] + o[None, :]).ravel() for c, o in zip(cells, offsets)]
  keep = (ijk[0] < SHAPE[0]) & (ijk[1] < SHAPE[1]) & (ijk[2] < SHAPE[2])
  ijk = [a[keep] for a in ijk]
  lo = [int(a.min()) for a in ijk]
  hi = [int(a.max()) + 1 for a in ijk]
  return ijk, lo, hi


def _tumour_shape(params: CaseParams, sub: list[np.ndarray]):
  """Distance field and shape noise of the tumour on the grid `sub` (mm from its centre).

  Returns:
    (dist, noise): dist [X, Y, Z] the union (minimum) of the lobes' normalised ellipsoid
    distances (1 on a lobe's surface); noise 2 x [X, Y, Z] smooth, about unit variance,
    clipped to +-_NOISE_CLIP (for the core and for the edema).
  """
  r = params.radius
  d2min = None
  for c, axes, rot in zip(params.lobe_centres, params.lobe_axes, params.lobe_rotations):
    a = (rot / (axes * r)[None, :]).astype(np.float32)  # column e: direction e / semi-axis e
    d2 = None
    for e in range(3):
      p = ((a[0, e] * (sub[0] - np.float32(c[0] * r)))[:, None, None]
           + (a[1, e] * (sub[1] - np.float32(c[1] * r)))[None, :, None]
           + (a[2, e] * (sub[2] - np.float32(c[2] * r)))[None, None, :])
      p *= p
      d2 = p if d2 is None else d2 + p
    d2min = d2 if d2min is None else np.minimum(d2min, d2)
  reach = _tumour_reach(params)
  bases = [_gaussian_basis(x, -1.5 * reach, 1.5 * reach, _TUMOUR_BASIS) for x in sub]
  noise = [np.clip(_separable_field(params.noise_coeffs[i], *bases), -_NOISE_CLIP, _NOISE_CLIP)
           for i in range(2)]
  return np.sqrt(d2min), noise


def _tumour_reach(params: CaseParams) -> float:
  """mm from the centre to the farthest point of any lobe."""
  return params.radius * float(
      (np.linalg.norm(params.lobe_centres, axis=1) + params.lobe_axes.max(1)).max())


def _tumour(params: CaseParams, centre: np.ndarray, ijk, frac: np.ndarray):
  """Labels and tumour tissue fractions in the tumour's box.

  Args:
    params: the case.
    centre: [3] tumour centre, output voxel coordinates.
    ijk: 3 x [N] the brain's output voxels.
    frac: [N, 4] their CSF, GM, WM, brain fractions.

  Returns:
    (box_lo, labels, sel, tumour_frac): labels [bx, by, bz] uint8 in {0, 1, 2, 4} for the box
    starting at box_lo; sel [M] indices of the points inside the box; tumour_frac [M, 4]
    their edema, necrosis, non-enhancing and enhancing fractions (PSF-blurred).
  """
  # A box that surely holds the tumour, then a 2 mm pass over it for a tight box.
  stretch = np.exp(params.shape_noise.max() * _NOISE_CLIP) / (1.0 - params.wm_spread / 2)
  half = _tumour_reach(params) * stretch + 2.0
  box_lo = [max(int(np.floor(c - half)), 0) for c in centre]
  box_hi = [min(int(np.ceil(c + half)) + 1, s) for c, s in zip(centre, SHAPE)]
  sub = [np.arange(lo, hi, 2, dtype=np.float32) - np.float32(c)
         for lo, hi, c in zip(box_lo, box_hi, centre)]
  dist, noise = _tumour_shape(params, sub)
  reach_edema = dist * np.exp(params.shape_noise[1] * noise[1]) * (1.0 - params.wm_spread / 2)
  reach_core = dist * np.exp(params.shape_noise[0] * noise[0]) / params.core_ratio
  near = np.nonzero(np.minimum(reach_edema, reach_core) < 1.2)
  margin = 3 + int(np.ceil(3 * PSF_SIGMA_MM))
  new_lo, new_hi = [], []
  for n, lo, hi in zip(near, box_lo, box_hi):
    new_lo.append(max(lo + 2 * int(n.min()) - margin, lo) if len(n) else lo)
    new_hi.append(min(lo + 2 * int(n.max()) + margin + 1, hi) if len(n) else lo + 1)
  box_lo, box_hi = new_lo, new_hi
  bshape = tuple(b - a for a, b in zip(box_lo, box_hi))
  sub = [np.arange(a, b, dtype=np.float32) - np.float32(c)
         for a, b, c in zip(box_lo, box_hi, centre)]

  # The points inside the box and their fractions, on the box grid.
  inside = np.ones(len(ijk[0]), bool)
  for a, lo, hi in zip(ijk, box_lo, box_hi):
    inside &= (a >= lo) & (a < hi)
  sel = np.nonzero(inside)[0]
  local = np.ravel_multi_index([a[sel] - lo for a, lo in zip(ijk, box_lo)], bshape)
  csf, wm = np.zeros(bshape, np.float32), np.zeros(bshape, np.float32)
  csf.flat[local] = frac[sel, 0]
  wm.flat[local] = frac[sel, 2]
  brain = np.zeros(bshape, bool)
  brain.flat[local] = True

  dist, noise = _tumour_shape(params, sub)
  d_core = dist * np.exp(params.shape_noise[0] * noise[0])
  d_edema = dist * np.exp(params.shape_noise[1] * noise[1])
  d_edema *= 1.0 - params.wm_spread * (wm - 0.5)  # edema reaches further in white matter

  rho_core = params.core_ratio
  core = (d_core < rho_core) & brain
  edema = (d_edema < 1.0) & brain & ~core & (csf < 0.5)
  if params.has_necrosis:
    # Its own irregular outline, inside the core less a rim of at least about 3 mm.
    d_nec = dist * np.exp(params.shape_noise[0] * (0.5 * noise[0] - 0.8 * noise[1]))
    necrotic = ((d_nec < rho_core * params.necrosis_ratio)
                & (d_core < rho_core - 3.0 / params.radius) & core)
  else:
    necrotic = np.zeros_like(core)
  labels = np.zeros(bshape, np.uint8)
  labels[edema] = 2
  if params.has_enhancing:
    labels[core] = 4
    labels[necrotic] = 1
  else:
    labels[core] = 1

  # Tissue fractions, with some texture from the shape noise.
  texture = 0.5 + noise[0] / (2 * _NOISE_CLIP)  # in [0, 1]
  tumour_frac = np.zeros((4,) + bshape, np.float32)
  tumour_frac[0] = edema * (params.edema_occupancy * (0.85 + 0.3 * texture))
  if params.has_enhancing:
    tumour_frac[3] = core & ~necrotic
    tumour_frac[1] = necrotic * (0.85 + 0.15 * texture)
    tumour_frac[2] = necrotic * (0.15 - 0.15 * texture)
  else:  # a non-enhancing core, necrotic in places
    share = (0.3 + 0.6 * texture) if params.has_necrosis else 0.2 * texture
    tumour_frac[1] = core * share
    tumour_frac[2] = core * (1.0 - share)
  points_frac = np.empty((len(sel), 4), np.float32)
  for i in range(4):
    blurred = ndimage.gaussian_filter(tumour_frac[i], PSF_SIGMA_MM, truncate=3.0)
    points_frac[:, i] = blurred.ravel().take(local)
  return box_lo, labels, sel, points_frac


def _bias_terms(ijk) -> np.ndarray:
  """[10, N] float32: 1, x, y, z, x^2, y^2, z^2, xy, xz, yz; coordinates in about [-1, 1]."""
  out = np.empty((10, len(ijk[0])), np.float32)
  out[0] = 1.0
  for e, (a, s) in enumerate(zip(ijk, SHAPE)):
    np.multiply(a, np.float32(2.0 / s), out=out[1 + e], casting="unsafe")
    out[1 + e] -= 1.0
    np.multiply(out[1 + e], out[1 + e], out=out[4 + e])
  np.multiply(out[1], out[2], out=out[7])
  np.multiply(out[1], out[3], out=out[8])
  np.multiply(out[2], out[3], out=out[9])
  return out


@dataclasses.dataclass(frozen=True)
class Case:
  """One synthetic case in BraTS storage orientation (BRATS_AFFINE maps voxels to mm).

  Attributes:
    name: e.g. "BraTS19_SYN_0001".
    group: "HGG" or "LGG".
    images: modality (constants.MODALITIES) -> [240, 240, 155] int16, >= 0.
    seg: [240, 240, 155] uint8 in {0, 1, 2, 4}.
    meta: JSON-able facts about the case (tumour centre in storage voxels, grade, sizes).
  """

  name: str
  group: str
  images: dict[str, np.ndarray]
  seg: np.ndarray
  meta: dict[str, Any]


def case_name(index: int) -> str:
  """Name of the case with 0-based `index`: BraTS19_SYN_0001 for index 0."""
  return f"{CASE_PREFIX}{index + 1:04d}"


def case_rng(seed: int, index: int) -> np.random.Generator:
  """The generator of case `index` of the cohort with `seed`."""
  return np.random.default_rng(np.random.SeedSequence([seed, index]))


def synthesize_case(index: int, seed: int = 0, *, lgg_fraction: float = 0.0,
                    maps: TissueMaps | None = None) -> Case:
  """Makes case `index` of the cohort with `seed` (no files written).

  Args:
    index: 0-based case index; the name is case_name(index).
    seed: the cohort's seed, >= 0.
    lgg_fraction: probability that the case is a lower-grade glioma (filed under LGG/).
    maps: template tissue maps; load_tissue_maps(1) when None.

  Returns:
    The Case, in BraTS storage orientation.
  """
  maps = load_tissue_maps(1) if maps is None else maps
  rng = case_rng(seed, index)
  params = draw_case_params(rng, lgg_fraction)
  warp = _Warp(maps, params)
  centre = _place_tumour(maps, warp, params)
  warp.mass = (centre, params.mass_effect, 1.3 * params.radius)

  # Anatomy at the voxels that may hold brain (about half of the brain's bounding box).
  ijk, lo, hi = _brain_points(maps, warp)
  bbox = [h - l for l, h in zip(lo, hi)]
  bbox_index = np.ravel_multi_index([a - l for a, l in zip(ijk, lo)], bbox)
  axes = [np.arange(l, h, dtype=np.float32) for l, h in zip(lo, hi)]
  q = [a.astype(np.float32) for a in ijk]
  frac = _sample(maps, warp(q, warp.elastic_field(axes, bbox_index)), order=1)
  del q, bbox_index
  brain = np.nonzero(frac[:, 3] > 0.5)[0]  # skull-stripped: the rest stays 0
  frac = frac[brain]
  ijk = [a[brain] for a in ijk]

  # The tumour replaces the tissue it occupies.
  box_lo, labels, sel, tumour_frac = _tumour(params, centre, ijk, frac)
  frac[sel, :3] *= (1.0 - tumour_frac.sum(1))[:, None]

  # Signals: partial volumes mix linearly; each modality's brightest normal tissue -> gain.
  signals = tissue_signals(params.relaxation)
  signals = (signals * (params.gains / signals[:3].max(0))).astype(np.float32)
  mix = np.zeros((4, 4), np.float32)
  mix[:3] = signals[:3]  # the brain channel adds no signal
  images = mix.T @ frac.T  # [4, N]
  images[:, sel] += signals[3:].T @ tumour_frac.T
  images *= np.exp(params.bias.astype(np.float32) @ _bias_terms(ijk))
  noise = rng.standard_normal(images.shape, dtype=np.float32)
  noise *= (params.noise * params.gains).astype(np.float32)[:, None]
  images += noise
  np.abs(images, out=images)  # folded Gaussian: a Rician-like floor where the signal is low
  images += 0.5  # then truncation rounds (all values >= 0)
  np.minimum(images, np.iinfo(np.int16).max, out=images)
  images = images.astype(np.int16)

  # Scatter straight into BraTS storage order: x and y flipped, Fortran (NIfTI) layout.
  flat = np.ravel_multi_index(
      (SHAPE[0] - 1 - ijk[0], SHAPE[1] - 1 - ijk[1], ijk[2]), SHAPE, order="F")
  out_images = {}
  for m, modality in enumerate(constants.MODALITIES):
    vol = np.zeros(SHAPE, np.int16, order="F")
    vol.ravel(order="F")[flat] = images[m]
    out_images[modality] = vol
  seg = np.zeros(SHAPE, np.uint8, order="F")
  (x0, y0, z0), (bx, by, bz) = box_lo, labels.shape
  x1, y1 = SHAPE[0] - x0, SHAPE[1] - y0  # flipped: RAS index i is storage index 239 - i
  seg[x1 - bx:x1, y1 - by:y1, z0:z0 + bz] = labels[::-1, ::-1, :]

  name = case_name(index)
  storage_centre = [SHAPE[0] - 1 - centre[0], SHAPE[1] - 1 - centre[1], centre[2]]
  counts = {str(v): int((labels == v).sum()) for v in (1, 2, 4)}
  whole = sum(counts.values())
  meta = {
      "case": name,
      "group": params.group,
      "synthetic": True,
      "has_enhancing": params.has_enhancing,
      "has_necrosis": params.has_necrosis,
      "tumour_centre_voxel": [round(float(c), 1) for c in storage_centre],
      "whole_tumour_diameter_mm": round(float((6.0 * whole / np.pi)**(1 / 3)), 1),
      "label_voxels": counts,
  }
  return Case(name, params.group, out_images, seg, meta)


# ---------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------

_DESCRIP = b"SYNTHETIC tracin_jax cohort, not patient data"


def _write_nifti_gz(path: pathlib.Path, volume: np.ndarray) -> None:
  """Writes a .nii.gz with BRATS_AFFINE: gzip level 1, mtime 0 (byte-reproducible)."""
  header = nib.Nifti1Header()
  header.set_data_shape(volume.shape)
  header.set_data_dtype(volume.dtype)
  header.set_qform(constants.BRATS_AFFINE, code=1)
  header.set_sform(constants.BRATS_AFFINE, code=1)
  header.set_xyzt_units("mm", "sec")
  header["descrip"] = _DESCRIP
  buffer = io.BytesIO()
  header.write_to(buffer)
  if buffer.tell() != int(header["vox_offset"]):
    raise AssertionError("unexpected NIfTI header size")
  # wbits 31: a gzip stream with mtime 0. Run-length matching only (Z_RLE) is faster than
  # level 1's default and smaller on these noisy volumes; any gzip reader reads it.
  gz = zlib.compressobj(1, zlib.DEFLATED, 31, 8, zlib.Z_RLE)
  with open(path, "wb") as f:
    f.write(gz.compress(buffer.getvalue()))
    f.write(gz.compress(memoryview(np.asfortranarray(volume).ravel(order="F"))))
    f.write(gz.flush())


def case_files(case_dir: str | os.PathLike, name: str | None = None) -> dict[str, pathlib.Path]:
  """kind (t1, t1ce, t2, flair, seg) -> path of <case_dir>/<name>_<kind>.nii.gz.

  `name` defaults to the directory's name, as in BraTS.
  """
  case_dir = pathlib.Path(case_dir)
  name = case_dir.name if name is None else name
  return {k: case_dir / f"{name}_{k}.nii.gz" for k in FILE_KINDS}


def write_case(case: Case, case_dir: str | os.PathLike) -> None:
  """Writes the five files of `case` into `case_dir` (which must exist)."""
  files = case_files(case_dir, case.name)
  for modality, volume in case.images.items():
    _write_nifti_gz(files[modality], volume)
  _write_nifti_gz(files[constants.SEG_SUFFIX], case.seg)


# ---------------------------------------------------------------------------------------------
# Cohorts.
# ---------------------------------------------------------------------------------------------

# Template maps handed to worker processes (so they need not import nilearn).
_PROCESS_MAPS: dict[int, TissueMaps] = {}


def _maps(resolution: int) -> TissueMaps:
  return _PROCESS_MAPS.get(resolution) or load_tissue_maps(resolution)


def _init_worker(resolution: int, maps_queue) -> None:
  """Waits for the parent's template maps (the parent loads them while workers start).

  None means the parent failed; a task then loads them itself (and meets the same error).
  """
  maps = maps_queue.get()
  if maps is not None:
    _PROCESS_MAPS[resolution] = maps


def _make_case(root: str, index: int, settings: dict[str, Any]) -> dict[str, Any]:
  """Synthesises case `index` and moves its finished directory into place; returns its meta."""
  case = synthesize_case(index, settings["seed"], lgg_fraction=settings["lgg_fraction"],
                         maps=_maps(settings["template_resolution"]))
  group_dir = pathlib.Path(root) / case.group
  group_dir.mkdir(exist_ok=True)
  tmp = group_dir / f".{case.name}.tmp"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir()
  write_case(case, tmp)
  final = group_dir / case.name
  if final.exists():  # a leftover of an interrupted run of this cohort
    shutil.rmtree(final)
  os.replace(tmp, final)
  return case.meta


def _settings(num_cases: int, seed: int, lgg_fraction: float,
              template_resolution: int) -> dict[str, Any]:
  if not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
    raise ValueError(f"num_cases must be a positive integer, got {num_cases!r}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  if not 0.0 <= lgg_fraction <= 1.0:
    raise ValueError(f"lgg_fraction must be in [0, 1], got {lgg_fraction}")
  if template_resolution not in (1, 2):
    raise ValueError(f"template_resolution must be 1 or 2, got {template_resolution}")
  return {
      "generator": GENERATOR,
      "version": GENERATOR_VERSION,
      "synthetic": True,
      "seed": int(seed),
      "num_cases": int(num_cases),
      "lgg_fraction": float(lgg_fraction),
      "template_resolution": int(template_resolution),
  }


_SETTING_KEYS = ("version", "seed", "num_cases", "lgg_fraction", "template_resolution")


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return None
  return data if isinstance(data, dict) else None


def _differences(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={found.get(k)!r} (asked {wanted[k]!r})"
                   for k in _SETTING_KEYS if found.get(k) != wanted[k])


def _existing_cases(root: pathlib.Path, settings: Mapping[str, Any]) -> dict[str, dict]:
  """Finished cases (name -> meta) of the cohort in `root`; raises if root is not ours.

  Raises:
    FileExistsError: root is not empty and holds no cohort with these settings.
    NotADirectoryError: root is a file.
  """
  if not root.exists():
    return {}
  if not root.is_dir():
    raise NotADirectoryError(f"{root} exists and is not a directory")
  for marker in (COHORT_FILE, PARTIAL_FILE):
    if (root / marker).exists():
      data = _read_json(root / marker)
      if data is None or not data.get("synthetic"):
        raise FileExistsError(
            f"{root / marker} is not a synthetic cohort record written by {GENERATOR}; "
            "refusing to write into that directory.")
      if _differences(data, settings):
        raise FileExistsError(
            f"{root} holds a synthetic cohort with other settings "
            f"({_differences(data, settings)}); choose another directory or delete it.")
      cases = data.get("cases", [])
      metas = cases if isinstance(cases, list) else list(cases.values())
      return {m["case"]: m for m in metas
              if all(f.exists() for f in case_files(root / m["group"] / m["case"]).values())}
  if any(p.name != PARTIAL_FILE + ".tmp" for p in root.iterdir()):
    raise FileExistsError(
        f"{root} is not empty and holds no synthetic cohort ({COHORT_FILE}); refusing to "
        "write into it. Choose an empty or new directory.")
  return {}


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _default_workers(num_todo: int) -> int:
  return max(1, min(os.cpu_count() or 1, 4, num_todo))


def generate_cohort(out_dir: str | os.PathLike, num_cases: int, seed: int = 0, *,
                    workers: int | None = None, progress: bool = True,
                    lgg_fraction: float = 0.0,
                    template_resolution: int = 1) -> list[pathlib.Path]:
  """Writes a synthetic cohort in the BraTS 2019 layout (see the module docstring).

  Only an empty or new directory, or one holding this very cohort (finished, or interrupted:
  it resumes), is written to; cases already finished are kept.

  Args:
    out_dir: cohort root.
    num_cases: number of cases, BraTS19_SYN_0001 ... .
    seed: cohort seed (>= 0); case i draws from SeedSequence([seed, i]).
    workers: processes; None picks min(cpu count, 4, cases to make), 1 runs in this process.
      The files do not depend on it. Workers are spawned, so a script that asks for more
      than one needs the usual `if __name__ == "__main__":` guard.
    progress: print one line per case and the time taken to stderr.
    lgg_fraction: probability of a lower-grade glioma, filed under LGG/ (default all HGG).
    template_resolution: 1 or 2 (mm) MNI templates.

  Returns:
    The case directories, in case order.

  Raises:
    FileExistsError: out_dir is not empty and holds no cohort with these settings.
  """
  settings = _settings(num_cases, seed, lgg_fraction, template_resolution)
  root = pathlib.Path(out_dir)
  done = _existing_cases(root, settings)
  names = [case_name(i) for i in range(num_cases)]
  todo = [i for i, n in enumerate(names) if n not in done]
  if not todo and (root / COHORT_FILE).exists():
    return [root / done[n]["group"] / n for n in names]

  start = time.time()
  root.mkdir(parents=True, exist_ok=True)
  record = dict(settings, cases={n: done[n] for n in names if n in done})
  outputs.write_json(root / PARTIAL_FILE, record)  # first: the directory is now known to be ours
  (root / COHORT_FILE).unlink(missing_ok=True)
  workers = _default_workers(len(todo)) if workers is None else max(1, int(workers))
  workers = min(workers, max(len(todo), 1))
  if progress and todo:
    print(f"[synthetic] writing {len(todo)} of {num_cases} synthetic cases to {root} "
          f"(seed {seed}, {workers} worker{'s' if workers > 1 else ''})",
          file=sys.stderr, flush=True)

  def finished(meta):
    record["cases"][meta["case"]] = meta
    outputs.write_json(root / PARTIAL_FILE, record)
    if progress:
      print(f"[synthetic] {len(record['cases'])}/{num_cases} {meta['case']} ({meta['group']}) "
            f"{time.time() - start:.1f} s", file=sys.stderr, flush=True)

  if workers == 1:
    for i in todo:
      finished(_make_case(str(root), i, settings))
  elif todo:
    # "spawn": safe in a parent that runs JAX threads. One BLAS thread per worker: the
    # workers already fill the cores, and their matrix products are small.
    context = multiprocessing.get_context("spawn")
    maps_queue = context.Queue()
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: "1" for k in _THREAD_VARS})
    try:
      with concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=context, initializer=_init_worker,
          initargs=(template_resolution, maps_queue)) as pool:
        # Submitting starts the workers; they import while this process loads the maps.
        futures = [pool.submit(_make_case, str(root), i, settings) for i in todo]
        try:
          try:
            maps = load_tissue_maps(template_resolution)
          except BaseException:
            for _ in range(workers):
              maps_queue.put(None)
            raise
          for _ in range(workers):
            maps_queue.put(maps)
          for future in concurrent.futures.as_completed(futures):
            finished(future.result())
        except BaseException:
          for future in futures:  # stop at once; what is finished stays for a resume
            future.cancel()
          raise
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v

  metas = [record["cases"][n] for n in names]
  outputs.write_json(root / COHORT_FILE, dict(
      settings,
      description=("Synthetic brain-tumour cohort in the BraTS 2019 layout, generated by "
                   "tracin_jax from the MNI ICBM152 2009 templates. Not patient data."),
      cases=metas))
  (root / PARTIAL_FILE).unlink()
  if progress:
    print(f"[synthetic] {num_cases} cases in {root} ({len(todo)} made in "
          f"{time.time() - start:.1f} s)", file=sys.stderr, flush=True)
  return [root / m["group"] / m["case"] for m in metas]


def ensure_cohort(out_dir: str | os.PathLike, num_cases: int, seed: int = 0,
                  **kwargs) -> pathlib.Path:
  """The root of the cohort with these settings in out_dir, generated only if not there.

  A finished cohort (its cohort.json matches and every case is on disk) is returned
  untouched; an interrupted one is completed. kwargs go to generate_cohort.
  """
  generate_cohort(out_dir, num_cases, seed, **kwargs)
  return pathlib.Path(out_dir)


def _cli() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("out", None, "Cohort root directory (new or empty).", required=True)
  flags.DEFINE_integer("cases", 40, "Number of cases.")
  flags.DEFINE_integer("seed", 0, "Cohort seed.")
  flags.DEFINE_integer("workers", None, "Worker processes (default: up to 4 CPUs).")
  flags.DEFINE_float("lgg_fraction", 0.0, "Share of lower-grade gliomas, written to LGG/.")
  flags.DEFINE_integer("template_resolution", 1, "MNI template resolution in mm (1 or 2).")
  flag_values = flags.FLAGS

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tracin_jax.data import synthetic  # pylint: disable=g-import-not-at-top,import-self
    start = time.time()
    dirs = synthetic.generate_cohort(
        flag_values.out, flag_values.cases, flag_values.seed, workers=flag_values.workers,
        lgg_fraction=flag_values.lgg_fraction,
        template_resolution=flag_values.template_resolution)
    print(f"{len(dirs)} synthetic cases in {flag_values.out}; {time.time() - start:.1f} s")

  app.run(main)


if __name__ == "__main__":
  _cli()
