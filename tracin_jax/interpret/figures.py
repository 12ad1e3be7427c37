"""Figures of the global interpretation: ranked scatter plots (Fig. 6), impact (Fig. 7).

Drawn on matplotlib `Figure` objects (never pyplot), so a notebook's backend is untouched.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from tracin_jax import outputs
from tracin_jax.influence.figures import REGION_COLOURS
from tracin_jax.influence.figures import draw_influence_matrices
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
  maps = [np.asarray(p["fmap"], float) for p in panels]
  lo = min((float(np.nanmin(m)) for m in maps), default=0.0)
  hi = max((float(np.nanmax(m)) for m in maps), default=1.0)
  im = None
  for c, panel in enumerate(panels):
    a2 = fig.add_subplot(grid[1, c])
    fmap = panel["fmap"]
    im = a2.imshow(fmap.T, origin="lower", cmap="viridis", vmin=lo, vmax=hi)
    if panel["region"].any():
      a2.contour(panel["region"].T.astype(float), levels=[0.5], colors=[panel["colour"]],
                 linewidths=1.2)
    a2.set_title(panel["title"], fontsize=7)
    a2.axis("off")
  fig.tight_layout(rect=(0, 0, 0.92, 1))
  if im is not None:  # one scale for every panel, so the maps compare
    bar = fig.colorbar(im, cax=fig.add_axes([0.935, 0.08, 0.012, 0.36]))
    bar.set_label(f"feature {feature} (one scale)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
  outputs.save_figure(fig, path, dpi=100)


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
  outputs.save_figure(fig, path, dpi=100)


_REMOVAL_COLOURS = {"proponents": "tab:red", "random": "tab:grey", "opponents": "tab:blue"}


def plot_retraining(arrays: dict[str, Any], summary: dict[str, Any],
                    class_names: Sequence[str], path: str | os.PathLike, *, k: int,
                    title_suffix: str = "") -> None:
  """The retraining check: Dice change per removal, and TracIn against actual loss change.

  Left: each checked region's Dice change after removing its k proponents, k random slices
  (mean over the random sets) and its k opponents, coloured by class, with the mean and its
  95% confidence interval. Right: the TracIn score of each removed set against the change of
  the region's loss it caused, with Spearman's rho.

  Args:
    arrays: "effect" (removal -> [R] Dice change), "classes" [R], "predicted", "actual",
      "kinds" (one entry per removed set and region).
    summary: "dice_change" (removal -> mean/low/high) and "rank_correlation" ("all" -> rho).
    class_names: the K class names.
    path: the PNG to write.
    k: slices removed per set (for the labels).
    title_suffix: appended to the title.
  """
  removals = list(arrays["effect"])
  fig = new_figure(figsize=(11, 4.2))
  left, right = fig.subplots(1, 2)
  rng = np.random.default_rng(0)
  classes = arrays["classes"]
  for x, name in enumerate(removals):
    y = arrays["effect"][name]
    jitter = rng.uniform(-0.12, 0.12, len(y))
    left.scatter(x + jitter, y, s=14, c=REGION_COLOURS[classes], edgecolors="k",
                 linewidths=0.3, zorder=3)
    s = summary["dice_change"][name]
    if s["mean"] is not None:
      low = s["low"] if s["low"] is not None else s["mean"]
      high = s["high"] if s["high"] is not None else s["mean"]
      left.errorbar(x + 0.28, s["mean"], yerr=[[s["mean"] - low], [high - s["mean"]]],
                    fmt="D", color=_REMOVAL_COLOURS.get(name, "k"), capsize=4, zorder=4)
  left.axhline(0, color="k", lw=0.8)
  left.set_xticks(range(len(removals)))
  left.set_xticklabels([f"top-{k} {n}" if n != "random" else f"{k} random"
                        for n in removals])
  left.set(ylabel="change of the region's Dice after retraining",
           title="Dice change per region (diamond: mean, 95% CI)")
  for i, name in enumerate(class_names):
    left.scatter([], [], s=14, color=REGION_COLOURS[i], edgecolors="k", linewidths=0.3,
                 label=name)
  left.legend(fontsize=7, loc="best")
  left.grid(alpha=0.3, axis="y")

  kinds = arrays["kinds"]
  for name in removals:
    m = kinds == name
    right.scatter(arrays["predicted"][m], arrays["actual"][m], s=12, alpha=0.7,
                  color=_REMOVAL_COLOURS.get(name, "k"), label=name)
  right.axhline(0, color="k", lw=0.6)
  right.axvline(0, color="k", lw=0.6)
  finite = np.abs(arrays["predicted"][np.isfinite(arrays["predicted"])])
  if finite.size and finite.max() > 0:
    right.set_xscale("symlog", linthresh=max(float(np.percentile(finite, 10)), 1e-12))
  rho = summary["rank_correlation"]["all"]
  rho_s = "n/a" if rho["rho"] is None else f"{rho['rho']:+.2f} (n = {rho['n']})"
  right.set(xlabel="TracIn score of the removed set (sum over its slices)",
            ylabel="actual change of the region's loss",
            title=f"Predicted vs actual: Spearman rho {rho_s}")
  right.legend(fontsize=7)
  right.grid(alpha=0.3)
  fig.suptitle("Retraining without the top-k proponents, random slices or top-k opponents"
               + title_suffix, fontsize=10)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=100)


def plot_randomisation_check(trained: np.ndarray, randomised: np.ndarray,
                             trained_structure: dict[str, float],
                             randomised_structure: dict[str, float],
                             class_names: Sequence[str], path: str | os.PathLike, *,
                             title_suffix: str = "",
                             similarity: dict[str, float] | None = None) -> None:
  """Train-influence matrices with trained (left) and randomly initialised (right)
  checkpoints, each with its class-block AUC; `similarity` (from
  `faithfulness.ranking_similarity`) is summarised under the title."""
  k = trained.shape[0]
  fig = new_figure(figsize=(14, 2.4 * k + 0.8))
  axes = fig.subplots(k, 2, squeeze=False)
  for col, (blocks, st, name) in enumerate(((trained, trained_structure, "trained"),
                                            (randomised, randomised_structure,
                                             "randomised"))):
    draw_influence_matrices(fig, axes[:, col], blocks, class_names, rows="train")
    axes[0, col].set_title(
        f"{name} checkpoints: class-block AUC {st['auc']:.3f}, same-class share of top-10 "
        f"proponents {st['same_class_top']:.2f}", fontsize=9)
  title = ("Randomisation check: TracIn of the same regions with trained and with "
           "randomly initialised networks" + title_suffix)
  if similarity is not None:
    title += (f"\nwithin a class, the two rank training regions with median Spearman rho "
              f"{similarity['median_rho']:.2f}; top-10 proponents overlap "
              f"{similarity['top_overlap']:.2f} (chance {similarity['top_overlap_chance']:.2f})")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=100)


def plot_randomisation_cascade(cascade: dict[str, Any], trained_structure: dict[str, float],
                               without_output_layer: dict[str, Any],
                               path: str | os.PathLike, *, title_suffix: str = "") -> None:
  """Cascading randomisation of TracIn: per step (one more layer re-initialised from the
  output down), the class-block AUC (left) and the within-class ranking's similarity to the
  trained checkpoints' (right); TracIn without the output layer's parameters as a marker."""
  steps = cascade["steps"]
  x = np.arange(1, len(steps) + 1)
  labels = [s["randomised"][-1] for s in steps]
  fig = new_figure(figsize=(12, 4.2))
  left, right = fig.subplots(1, 2)
  left.plot(x, [s["auc"] for s in steps], marker="o", label="cascading randomisation")
  left.axhline(trained_structure["auc"], color="k", ls="--", lw=1, label="trained")
  left.axhline(0.5, color="grey", ls=":", lw=1, label="no class structure")
  left.scatter([0], [without_output_layer["auc"]], marker="*", s=120, color="tab:red",
               zorder=3, label=f"trained, without {without_output_layer['output_layer']}")
  left.set(ylabel="class-block AUC", ylim=(0.4, 1.02),
           title="Class blocks of the train-influence")
  right.plot(x, [s["median_rho"] for s in steps], marker="o",
             label="median Spearman rho to trained")
  right.plot(x, [s["top_overlap"] for s in steps], marker="s",
             label="top-10 proponent overlap with trained")
  right.scatter([0], [without_output_layer["median_rho"]], marker="*", s=120,
                color="tab:red", zorder=3, label="without the output layer: median rho")
  right.axhline(0, color="grey", ls=":", lw=1)
  right.set(ylim=(-0.2, 1.02), title="Ranking within a class, against the trained one")
  for ax in (left, right):
    ax.set_xticks([0] + list(x), ["trained, no\noutput layer"] + labels, rotation=60, ha="right",
                  fontsize=7)
    ax.set_xlabel("layers re-initialised, from the output down (cumulative)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("Cascading randomisation of TracIn's checkpoints" + title_suffix, fontsize=10)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=100)
