"""MR signal physics of the synthetic scanner: tissue signals, blur, bias field and noise.

Per tissue, S = PD (1 - e^{-TR/T1}) e^{-TE/T2} (spin echo: T1w, T2w) and
S = PD |1 - 2 e^{-TI/T1} + e^{-TR/T1}| e^{-TE/T2} (FLAIR, which nulls CSF); partial volumes
mix linearly; gadolinium shortens the enhancing tumour's T1 to 350 ms on T1Gd only. Each case
varies the relaxation times by a few percent (drawn in `anatomy.draw_case_params`). Then the
blur of the imaging point-spread function, a smooth multiplicative bias field,
folded-Gaussian (Rician-like) noise and a random per-case, per-modality intensity scale (so
the loader's per-volume normalisation matters).

The blur is applied to the tissue fractions rather than to the images (in `anatomy`, with
PSF_SIGMA_MM): the images are a linear mix of the fractions with per-tissue constants, so
blurring either gives the same image, and the template's fractions are blurred once per
process instead of four images per case (the tumour's fractions are blurred per case, in its
box).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from tracin_jax.data import constants

# Relaxation times in ms; proton density relative to CSF.
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


def _bias_terms(ijk) -> np.ndarray:
  """[10, N] float32: 1, x, y, z, x^2, y^2, z^2, xy, xz, yz; coordinates in about [-1, 1]."""
  out = np.empty((10, len(ijk[0])), np.float32)
  out[0] = 1.0
  for e, (a, s) in enumerate(zip(ijk, constants.VOLUME_SHAPE)):
    np.multiply(a, np.float32(2.0 / s), out=out[1 + e], casting="unsafe")
    out[1 + e] -= 1.0
    np.multiply(out[1 + e], out[1 + e], out=out[4 + e])
  np.multiply(out[1], out[2], out=out[7])
  np.multiply(out[1], out[3], out=out[8])
  np.multiply(out[2], out[3], out=out[9])
  return out


def mr_images(frac: np.ndarray, tumour_frac: np.ndarray, sel: np.ndarray, ijk, *,
              relaxation: Mapping[str, tuple[float, float, float]], gains: np.ndarray,
              bias: np.ndarray, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The four images of a case at its brain's voxels.

  Partial volumes mix linearly, and each modality's brightest normal tissue gets its gain;
  then the bias field, the folded-Gaussian noise and rounding to int16.

  Args:
    frac: [N, 4] float32 CSF, GM, WM and brain fractions (the brain channel adds no signal),
      PSF-blurred.
    tumour_frac: [M, 4] float32 edema, necrosis, non-enhancing and enhancing fractions of
      the points `sel`, PSF-blurred.
    sel: [M] indices into the N points.
    ijk: 3 x [N] the points' output voxel indices (they place the bias field).
    relaxation: the case's tissue name -> (T1 ms, T2 ms, PD).
    gains: [4] intensity of each modality's brightest normal tissue.
    bias: [4, 10] coefficients of each modality's quadratic log bias field.
    noise: [4] noise sigma of each modality relative to its gain.
    rng: draws the noise ([4, N] standard normal float32, one draw).

  Returns:
    [4, N] int16 >= 0, in constants.MODALITIES order.
  """
  signals = tissue_signals(relaxation)
  signals = (signals * (gains / signals[:3].max(0))).astype(np.float32)
  mix = np.zeros((4, 4), np.float32)
  mix[:3] = signals[:3]  # the brain channel adds no signal
  images = mix.T @ frac.T  # [4, N]
  images[:, sel] += signals[3:].T @ tumour_frac.T
  images *= np.exp(bias.astype(np.float32) @ _bias_terms(ijk))
  draws = rng.standard_normal(images.shape, dtype=np.float32)
  draws *= (noise * gains).astype(np.float32)[:, None]
  images += draws
  np.abs(images, out=images)  # folded Gaussian: a Rician-like floor where the signal is low
  images += 0.5  # then truncation rounds (all values >= 0)
  np.minimum(images, np.iinfo(np.int16).max, out=images)
  return images.astype(np.int16)
