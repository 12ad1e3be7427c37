"""Tests for tracin_jax.data.synthetic.physics."""

import numpy as np

from tracin_jax.data import constants
from tracin_jax.data import synthetic


def test_tissue_signals_closed_form():
  signals = synthetic.tissue_signals()
  row = {t: i for i, t in enumerate(synthetic.TISSUES)}
  col = {m: j for j, m in enumerate(constants.MODALITIES)}
  # CSF (T1 2569, T2 329, PD 1) on FLAIR, TR 9000, TE 120, TI 1700.
  expected = abs(1 - 2 * np.exp(-1700 / 2569) + np.exp(-9000 / 2569)) * np.exp(-120 / 329)
  np.testing.assert_allclose(signals[row["csf"], col["flair"]], expected, rtol=1e-12)
  # WM (500, 70, 0.77) on T1w, TR 500, TE 10.
  expected = 0.77 * (1 - np.exp(-1)) * np.exp(-10 / 70)
  np.testing.assert_allclose(signals[row["wm"], col["t1"]], expected, rtol=1e-12)
  # Gadolinium changes the enhancing tumour on T1Gd only.
  et = row["enhancing"]
  assert signals[et, col["t1ce"]] > 1.3 * signals[row["wm"], col["t1ce"]]
  np.testing.assert_allclose(signals[et, col["t1"]], signals[row["non_enhancing"], col["t1"]])
  np.testing.assert_allclose(signals[et, [2, 3]], signals[row["non_enhancing"], [2, 3]])
  assert signals[row["csf"], col["flair"]] < 0.05 * signals[:, col["flair"]].max()
