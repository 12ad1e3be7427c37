"""A synthetic patient's anatomy: template tissue maps, the per-case warp, the glioma.

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

Every fraction here is already blurred by the scanner's point-spread function
(`physics.PSF_SIGMA_MM`; see `physics` for why the fractions rather than the images).
`draw_case_params` draws all of a case's random choices, the MR ones included, and
`case_anatomy` turns them into tissue fractions and labels on the output RAS voxel grid.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage

from tracin_jax.data import constants
from tracin_jax.data.synthetic.physics import PSF_SIGMA_MM
from tracin_jax.data.synthetic.physics import RELAXATION

_SHAPE = constants.VOLUME_SHAPE  # the output grid: RAS voxels, 1 mm

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
# One case: its random choices, its warp, its tumour.
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
             for a, s, k in zip(axes, _SHAPE, _ELASTIC_BASIS)]
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
  shape = [-(-s // step) for s in _SHAPE]
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
  keep = (ijk[0] < _SHAPE[0]) & (ijk[1] < _SHAPE[1]) & (ijk[2] < _SHAPE[2])
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
  box_hi = [min(int(np.ceil(c + half)) + 1, s) for c, s in zip(centre, _SHAPE)]
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


@dataclasses.dataclass(frozen=True)
class CaseAnatomy:
  """One case's brain and tumour on the output RAS voxel grid (1 mm, VOLUME_SHAPE).

  Attributes:
    ijk: 3 x [N] intp output voxel indices of the skull-stripped brain.
    frac: [N, 4] float32 CSF, GM, WM and brain fractions there, less the tumour's share.
    centre: [3] the tumour's centre, output voxel coordinates.
    box_lo: [3] the first voxel of the tumour's box.
    labels: [bx, by, bz] uint8 in {0, 1, 2, 4}, the labels of the box.
    sel: [M] indices (into the N points) of the points inside the box.
    tumour_frac: [M, 4] float32 edema, necrosis, non-enhancing and enhancing fractions of
      those points.
  """

  ijk: list[np.ndarray]
  frac: np.ndarray
  centre: np.ndarray
  box_lo: list[int]
  labels: np.ndarray
  sel: np.ndarray
  tumour_frac: np.ndarray


def case_anatomy(maps: TissueMaps, params: CaseParams) -> CaseAnatomy:
  """Warps the template and places and grows the tumour of the case drawn as `params`."""
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
  return CaseAnatomy(ijk, frac, centre, box_lo, labels, sel, tumour_frac)
