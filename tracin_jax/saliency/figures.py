"""Figures of saliency maps: method grids per modality, information flow, instance numbers,
context curves, randomisation, and saliency beside TracIn's proponents and opponents.

Images are drawn as the influence figures draw them: the first spatial axis horizontal, the
second vertical (`origin="lower"`), so the same slice looks the same in every figure.

Volumes: every figure that takes an image also takes a volume ([D, H, W, C], maps and masks
[D, H, W(, C)]) and draws one axial slice of it, the one `axial_slice` picks (the explained
region's largest slice), or `slice_index` when given; the slice is named in the title.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from tracin_jax import outputs
from tracin_jax.influence.figures import REGION_COLOURS
from tracin_jax.influence.figures import new_figure
from tracin_jax.influence.figures import overlay
from tracin_jax.influence.figures import representative_slice

STATUS_COLOURS = {"TP": "#1b9e77", "FP": "#d95f02", "FN": "#7570b3", "predicted": "#666666"}


def axial_slice(region: np.ndarray | None, maps: Sequence[np.ndarray] = ()) -> int:
  """The axial slice d of a volume that a figure shows.

  Rule: the slice with the most voxels of `region` (a lesion's, or a region's, largest
  slice: `influence.figures.representative_slice`, the rule of every 3D figure); when the
  region is empty or None, the slice with the largest sum of |map| of the first map; when
  there is none either, the middle slice D // 2. Ties go to the lowest index.

  Args:
    region: [D, H, W] bool, or None.
    maps: [D, H, W] or [D, H, W, C] maps (only the first is used).

  Returns:
    d in [0, D).

  Raises:
    ValueError: when neither a region nor a map gives the depth D.
  """
  if region is not None and np.ndim(region) != 3:
    raise ValueError(f"region must be a [D, H, W] mask, got shape {np.shape(region)}")
  if region is not None and np.any(region):
    return representative_slice(np.asarray(region, bool))
  maps = list(maps)
  if maps:
    m = np.abs(np.nan_to_num(np.asarray(maps[0], np.float64)))
    per_slice = m.reshape(m.shape[0], -1).sum(1)
    if per_slice.max() > 0:
      return int(np.argmax(per_slice))
    return m.shape[0] // 2
  if region is None:
    raise ValueError("axial_slice needs a [D, H, W] region or a map to pick a slice")
  return np.shape(region)[0] // 2


def as_slices(index: int, image: np.ndarray, maps: dict[str, np.ndarray],
              region: np.ndarray, truth: np.ndarray | None = None
              ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray | None]:
  """Axial slice `index` of a volume, its maps and masks: image [D, H, W, C] -> [H, W, C],
  maps [D, H, W(, C)] -> [H, W(, C)], region and truth [D, H, W] -> [H, W]."""
  depth = np.shape(image)[0]
  if not 0 <= int(index) < depth:
    raise ValueError(f"slice_index {index} is outside the volume's {depth} axial slices")
  pick = lambda a: None if a is None else np.asarray(a)[int(index)]
  return (pick(image), {k: pick(m) for k, m in maps.items()}, pick(region), pick(truth))


def _volume_title(title: str, index: int) -> str:
  return f"{title} (axial slice {index})"


def _show(a: np.ndarray) -> np.ndarray:
  """[H, W, ...] -> the array as imshow draws it (first axis horizontal)."""
  return np.swapaxes(a, 0, 1)


def _grey(channel: np.ndarray) -> np.ndarray:
  return (np.clip(channel, -1, 1) + 1) / 2


def _outline(ax, mask: np.ndarray, colour, width: float = 1.0) -> None:
  if mask.any() and not mask.all():
    ax.contour(_show(mask.astype(float)), levels=[0.5], colors=[colour], linewidths=width,
               origin="lower")


def _scale(values: np.ndarray) -> tuple[str, float, float]:
  """(colour map, vmin, vmax): symmetric diverging for signed maps, sequential otherwise."""
  finite = values[np.isfinite(values)]
  peak = float(np.abs(finite).max()) if finite.size else 1.0
  peak = peak if peak > 0 else 1.0
  if finite.size and finite.min() < 0:
    return "RdBu_r", -peak, peak
  return "inferno", 0.0, peak


def _heat(ax, layer: np.ndarray, cmap: str, lo: float, hi: float):
  """Draws a map over the image: colour from `cmap` on [lo, hi], opacity growing with
  |value| / max(|lo|, |hi|), so the anatomy stays visible where the map is small. Returns a
  mappable for a colour bar."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib import cm  # pylint: disable=g-import-not-at-top

  norm = matplotlib.colors.Normalize(lo, hi)
  colours = matplotlib.colormaps[cmap]
  rgba = colours(norm(_show(layer)))
  peak = max(abs(lo), abs(hi)) or 1.0
  rgba[..., 3] = 0.9 * np.sqrt(np.clip(np.abs(_show(layer)) / peak, 0, 1))
  ax.imshow(rgba, origin="lower", interpolation="nearest")
  return cm.ScalarMappable(norm=norm, cmap=colours)


def plot_method_grid(image: np.ndarray, maps: dict[str, np.ndarray], region: np.ndarray,
                     channel_names: Sequence[str], path: str | os.PathLike, *, title: str,
                     truth: np.ndarray | None = None, colour=(1.0, 0.85, 0.1),
                     slice_index: int | None = None) -> None:
  """Rows the methods, columns the input channels: each map over its channel's image.

  Args:
    image: [H, W, C] in [-1, 1], or a volume [D, H, W, C] (one axial slice is drawn).
    maps: method name -> [H, W, C] map, or [H, W] for a map without channels (the Grad-CAM
      family: drawn once per column, the same map); [D, ...] with a volume.
    region: [H, W] bool, the explained region (outlined in `colour`); [D, H, W] with a
      volume.
    channel_names: the C channel names.
    path: the PNG.
    title: the figure's title.
    truth: [H, W] bool ground truth of the class (outlined dashed in white), optional.
    slice_index: a volume's slice to draw; None: `axial_slice(region, maps)`.
  """
  if np.ndim(image) == 4:
    index = axial_slice(region, list(maps.values())) if slice_index is None else slice_index
    image, maps, region, truth = as_slices(index, image, maps, region, truth)
    title = _volume_title(title, int(index))
  c = image.shape[-1]
  rows = len(maps)
  fig = new_figure(figsize=(2.0 * c + 1.3, 2.0 * rows + 1.1))
  grid = fig.add_gridspec(rows, c + 1, width_ratios=[1] * c + [0.07], wspace=0.04,
                          hspace=0.08, left=0.08, right=0.93, top=1 - 0.85 / (2.0 * rows + 1.1),
                          bottom=0.01)
  for r, (name, m) in enumerate(maps.items()):
    m = np.asarray(m, np.float64)
    cmap, lo, hi = _scale(m)
    for k in range(c):
      ax = fig.add_subplot(grid[r, k])
      ax.imshow(_show(_grey(image[..., k])), cmap="gray", origin="lower", vmin=0, vmax=1)
      im = _heat(ax, m if m.ndim == 2 else m[..., k], cmap, lo, hi)
      _outline(ax, region, colour)
      if truth is not None:
        ax.contour(_show(truth.astype(float)), levels=[0.5], colors=["white"],
                   linewidths=0.6, linestyles="dashed", origin="lower")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(channel_names[k], fontsize=9)
      if k == 0:
        ax.set_ylabel(name + ("\n(no channels)" if m.ndim == 2 else ""), fontsize=8)
    bar = fig.colorbar(im, cax=fig.add_subplot(grid[r, c]))
    bar.ax.tick_params(labelsize=6)
  fig.suptitle(title, fontsize=10)
  outputs.save_figure(fig, path, dpi=90)


def plot_information_flow(image: np.ndarray, flows: dict[str, dict[str, np.ndarray]],
                          regions: dict[str, np.ndarray], path: str | os.PathLike, *,
                          title: str, channel: int = 3, slice_index: int | None = None) -> None:
  """Grad-CAM at every layer (each normalised to [0, 1]): rows the classes, columns the
  layers in call order.

  Args:
    image: [H, W, C]; `channel` is drawn beneath (default FLAIR). Or a volume [D, H, W, C]
      with [D, H, W] maps and regions: every panel shows the same axial slice.
    flows: class name -> {layer name: [H, W] map in [0, 1]}.
    regions: class name -> [H, W] bool region (outlined).
    slice_index: a volume's slice; None: the largest slice of the union of the regions
      (`axial_slice`, the first map when all regions are empty).
  """
  if np.ndim(image) == 4:
    if slice_index is None:
      union = np.any(np.stack([np.asarray(r, bool) for r in regions.values()]), axis=0)
      first = next(iter(next(iter(flows.values())).values()))
      slice_index = axial_slice(union, [first])
    flows = {k: as_slices(slice_index, image, f, None)[1] for k, f in flows.items()}
    image, regions = as_slices(slice_index, image, regions, None)[:2]
    title = _volume_title(title, int(slice_index))
  classes = list(flows)
  layers = list(next(iter(flows.values())))
  fig = new_figure(figsize=(1.45 * len(layers) + 0.9, 1.6 * len(classes) + 0.8))
  axes = fig.subplots(len(classes), len(layers), squeeze=False)
  for r, name in enumerate(classes):
    for k, layer in enumerate(layers):
      ax = axes[r, k]
      ax.imshow(_show(_grey(image[..., channel])), cmap="gray", origin="lower")
      im = _heat(ax, flows[name][layer], "inferno", 0.0, 1.0)
      _outline(ax, regions[name], "cyan", 0.7)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(layer, fontsize=7)
      if k == 0:
        ax.set_ylabel(name, fontsize=8)
  fig.colorbar(im, ax=axes, fraction=0.015, pad=0.01, label="Grad-CAM (each layer / its max)")
  fig.suptitle(title, fontsize=10)
  outputs.save_figure(fig, path, dpi=90)


def plot_modality_shares(rows: Sequence[dict[str, Any]], channel_names: Sequence[str],
                         class_names: Sequence[str], path: str | os.PathLike, *,
                         title: str) -> None:
  """Each instance's share of saliency per modality, by class and TP/FP/FN status.

  Args:
    rows: one dict per instance with "class", "status" and "share" ([C] shares).
    class_names: the classes to draw, one panel each (in this order).
  """
  statuses = [s for s in ("TP", "FP", "FN", "predicted") if any(r["status"] == s for r in rows)]
  fig = new_figure(figsize=(4.2 * len(class_names), 3.6))
  axes = fig.subplots(1, len(class_names), squeeze=False, sharey=True)[0]
  c = len(channel_names)
  width = 0.8 / max(len(statuses), 1)
  for ax, name in zip(axes, class_names):
    for s_i, status in enumerate(statuses):
      shares = np.array([r["share"] for r in rows if r["class"] == name
                         and r["status"] == status and np.all(np.isfinite(r["share"]))])
      if not len(shares):
        continue
      x = np.arange(c) + (s_i - (len(statuses) - 1) / 2) * width
      ax.bar(x, shares.mean(0), width, color=STATUS_COLOURS[status], alpha=0.55,
             label=f"{status} (n = {len(shares)})")
      jitter = np.random.default_rng(s_i).uniform(-width / 4, width / 4, shares.shape)
      ax.scatter((x + jitter).ravel(), shares.ravel(), s=8, color=STATUS_COLOURS[status],
                 edgecolor="black", linewidth=0.3, zorder=3)
    ax.axhline(1 / c, color="grey", lw=0.8, ls=":")
    ax.set_xlim(-0.5, c - 0.5)  # the same columns in a panel without instances
    ax.set_xticks(np.arange(c), channel_names)
    ax.set_title(name, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc="upper left")
    else:
      ax.text(0.5, 0.5, "no instances", ha="center", transform=ax.transAxes, color="grey")
  axes[0].set_ylabel("share of |saliency| inside the instance")
  fig.suptitle(title + "\nbars: mean per status; dots: instances; dotted: equal shares",
               fontsize=9)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=100)


def plot_context_curves(curves: Sequence[dict[str, Any]], class_names: Sequence[str],
                        path: str | os.PathLike, *, title: str) -> None:
  """Mean probability of each instance's class as context is added, one panel per class.

  Args:
    curves: one dict per instance: "class", "status", "label", "dilations", "probability",
      "detected".
  """
  fig = new_figure(figsize=(4.2 * len(class_names), 3.4))
  axes = fig.subplots(1, len(class_names), squeeze=False, sharey=True)[0]
  for ax, name in zip(axes, class_names):
    seen = set()
    for cv in curves:
      if cv["class"] != name:
        continue
      colour = STATUS_COLOURS[cv["status"]]
      label = cv["status"] if cv["status"] not in seen else None
      seen.add(cv["status"])
      k, p, det = map(np.asarray, (cv["dilations"], cv["probability"], cv["detected"]))
      ax.plot(k, p, color=colour, lw=1.2, label=label)
      ax.scatter(k[~det], p[~det], s=7, facecolor="white", edgecolor=colour, zorder=3)
    ax.set(xlabel="dilations of the instance kept (k)", title=name, ylim=(-0.02, 1.02))
    if seen:
      ax.legend(fontsize=7)
  axes[0].set_ylabel("mean probability of the class\nover the instance")
  fig.suptitle(title + "\nopen dots: no longer detected", fontsize=9)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=100)


def plot_randomisation(curves: dict[str, dict[str, Any]], path: str | os.PathLike, *,
                       title: str) -> None:
  """Cascading parameter randomisation: similarity to the trained model's map per method as
  layers are re-drawn from the head down.

  Args:
    curves: method -> {"layers": [L] names, "spearman": [L], "ssim": [L]}.
  """
  fig = new_figure(figsize=(12.5, 3.9))
  axes = fig.subplots(1, 2, sharex=True)
  layers = None
  for name, cv in curves.items():
    layers = cv["layers"]
    for ax, key in zip(axes, ("spearman", "ssim")):
      ax.plot(np.arange(len(layers)), cv[key], marker="o", ms=3, label=name)
  lowest = min([np.nanmin(np.asarray(cv[k], float)) for cv in curves.values()
                for k in ("spearman", "ssim") if np.isfinite(np.asarray(cv[k], float)).any()]
               + [0.0])
  for ax, label in zip(axes, ("Spearman's rho (|map|)", "SSIM")):
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xticks(np.arange(len(layers)), [f"+{n}" for n in layers], rotation=60, fontsize=7,
                  ha="right")
    ax.set(ylabel=f"{label} with the trained map", ylim=(min(-0.2, lowest - 0.05), 1.02),
           xlabel="layers re-drawn (cumulative, head first)")
  axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=100)


def plot_tracin_beside_saliency(image: np.ndarray, region: np.ndarray, maps: dict[str, Any],
                                neighbours: Sequence[dict[str, Any]],
                                path: str | os.PathLike, *, title: str,
                                colour=(1.0, 0.85, 0.1), channel: int = 3,
                                channel_name: str = "FLAIR",
                                slice_index: int | None = None) -> None:
  """One region explained twice: by its saliency maps and by its training data.

  Args:
    image: [H, W, C] the validation image; region [H, W] bool the explained region.
    maps: method name -> [H, W] map (channels already reduced).
    neighbours: training regions, each {"image" [H, W, C], "regions" [H, W, K] bool (the
      one outlined), "kind" ("proponent"/"opponent"), "label" (a title)}.
    slice_index: with a volume (image [D, H, W, C], region and maps [D, H, W]), the axial
      slice drawn; None: `axial_slice(region, maps)`. A neighbour given as a volume
      ("image" [D, H, W, C], "regions" [D, H, W, K]) is drawn at its "slice" when it has
      one (e.g. its most influenced slice), else at its regions' largest slice.
  """
  if np.ndim(image) == 4:
    index = axial_slice(region, list(maps.values())) if slice_index is None else slice_index
    image, maps, region, _ = as_slices(index, image, maps, region)
    title = _volume_title(title, int(index))
  neighbours = [_neighbour_slice(n) for n in neighbours]
  n_left = 1 + len(maps)
  cols = max(n_left, (len(neighbours) + 1) // 2)
  fig = new_figure(figsize=(2.1 * cols, 2.3 * 3 + 0.6))
  axes = fig.subplots(3, cols, squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  ax = axes[0, 0]
  ax.imshow(_show(_grey(image[..., channel])), cmap="gray", origin="lower")
  _outline(ax, region, colour)
  ax.set_title(f"region ({channel_name})", fontsize=8)
  for k, (name, m) in enumerate(maps.items()):
    ax = axes[0, 1 + k]
    m = np.asarray(m, np.float64)
    cmap, lo, hi = _scale(m)
    ax.imshow(_show(_grey(image[..., channel])), cmap="gray", origin="lower")
    _heat(ax, m, cmap, lo, hi)
    _outline(ax, region, colour)
    ax.set_title(name, fontsize=8)
  for row, kind in ((1, "proponent"), (2, "opponent")):
    items = [n for n in neighbours if n["kind"] == kind]
    for k, n in enumerate(items[:cols]):
      ax = axes[row, k]
      ax.imshow(overlay(n["image"], n["regions"]), origin="lower")
      ax.set_title(n["label"], fontsize=6.5,
                   color="darkgreen" if kind == "proponent" else "darkred")
    if not items:
      axes[row, 0].text(0.5, 0.5, f"no {kind}s", ha="center", transform=axes[row, 0].transAxes)
  axes[1, 0].text(-0.12, 0.5, "proponents", rotation=90, va="center", ha="right",
                  transform=axes[1, 0].transAxes, fontsize=9, color="darkgreen")
  axes[2, 0].text(-0.12, 0.5, "opponents", rotation=90, va="center", ha="right",
                  transform=axes[2, 0].transAxes, fontsize=9, color="darkred")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=100)


def _neighbour_slice(neighbour: dict[str, Any]) -> dict[str, Any]:
  """A training region given as a volume, cut to its "slice" (or its regions' largest)."""
  if np.ndim(neighbour["image"]) != 4:
    return neighbour
  regions = np.asarray(neighbour["regions"], bool)
  index = neighbour.get("slice")
  if index is None:
    index = axial_slice(regions.any(-1))
  return {**neighbour, "image": np.asarray(neighbour["image"])[int(index)],
          "regions": regions[int(index)]}


__all__ = ["REGION_COLOURS", "as_slices", "axial_slice", "plot_context_curves", "plot_information_flow",
           "plot_method_grid", "plot_modality_shares", "plot_randomisation",
           "plot_tracin_beside_saliency"]
