"""Figures of the global interpretation: ranked scatter plots (Fig. 6), impact (Fig. 7).

Drawn on matplotlib `Figure` objects (never pyplot), so a notebook's backend is untouched.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from tracin_jax.influence.figures import REGION_COLOURS
from tracin_jax.influence.figures import new_figure


def plot_ranked_scatter(fi_curve: np.ndarray, panels: Sequence[dict[str, Any]],
                        class_name: str, feature: int, path: str | os.PathLike, *,
                        subtitle: str = "", title_suffix: str = "") -> None:
  """One feature's FI against TracIn rank, above its map on exemplar images (Fig. 6).

  Args:
    fi_curve: [R] FI of feature `feature` for test class `class_name`, rank 0 the first
      proponent.
    panels: dicts with "fmap" [H, W] (feature map), "region" [H, W] bool (outlined),
      "colour" (RGB of the region's class) and "title"; e.g. a test image, a proponent, a
      neutral and an opponent.
    class_name: the test class.
    feature: k, the feature map's index.
    path: the PNG to write.
    subtitle: a line under the scatter's title (e.g. the fit statistics).
    title_suffix: appended to the title (e.g. the dataset).
  """
  n = max(len(panels), 1)
  fig = new_figure(figsize=(2.3 * n, 5.2))
  grid = fig.add_gridspec(2, n, height_ratios=[1.1, 1])
  ax = fig.add_subplot(grid[0, :])
  ax.scatter(np.arange(len(fi_curve)), fi_curve, s=6, color=REGION_COLOURS[0] * 0.6)
  ax.axhline(0, color="grey", lw=0.5)
  ax.set(xlabel="TracIn rank (0: first proponent, last: strongest opponent)",
         ylabel=f"FI of feature {feature}")
  ax.set_title(f"Test class {class_name}, feature {feature}{title_suffix}\n{subtitle}",
               fontsize=9)
  for c, panel in enumerate(panels):
    a2 = fig.add_subplot(grid[1, c])
    fmap = panel["fmap"]
    a2.imshow(fmap.T, origin="lower", cmap="viridis")
    if panel["region"].any():
      a2.contour(panel["region"].T.astype(float), levels=[0.5], colors=[panel["colour"]],
                 linewidths=1.2)
    a2.set_title(panel["title"], fontsize=7)
    a2.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def plot_feature_impact(impact: np.ndarray, selected: np.ndarray,
                        tests: dict[str, dict[str, Any]], class_names: Sequence[str],
                        path: str | os.PathLike, *, title_suffix: str = "") -> None:
  """Per class, histograms of the impact of the selected features against the others (Fig. 7).

  Args:
    impact: F [C, K], Dice lost when each feature map is masked.
    selected: [K, C] bool, the predictive features per class.
    tests: class name -> {"p_value": float or None, "note": str} (Mann-Whitney U).
    class_names: the K class names.
    path: the PNG to write.
    title_suffix: appended to the title.
  """
  k = len(class_names)
  fig = new_figure(figsize=(3.6 * k, 3.2))
  axes = fig.subplots(1, k, squeeze=False)[0]
  finite = impact[np.isfinite(impact)]
  lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
  bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 21)
  for i, (ax, name) in enumerate(zip(axes, class_names)):
    sel = selected[i]
    ax.hist(impact[~sel, i], bins=bins, alpha=0.6, color="grey",
            label=f"other ({int((~sel).sum())})")
    ax.hist(impact[sel, i], bins=bins, alpha=0.7, color=REGION_COLOURS[i],
            label=f"selected ({int(sel.sum())})")
    p = tests[name]["p_value"]
    ax.set_title(f"{name}: " + (f"Mann-Whitney p = {p:.3g}" if p is not None
                                else tests[name]["note"]), fontsize=9)
    ax.set(xlabel="Dice lost when the feature is masked (F)", ylabel="features")
    ax.legend(fontsize=7)
  fig.suptitle("Feature impact, selected vs other features" + title_suffix, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
