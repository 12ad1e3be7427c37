"""Figures of TracIn explanations (the paper's Fig. 4 and 5, self-influence, local panels).

Examples are slices ([H, W, 4] images, [H, W, K] regions) or volumes ([D, H, W, 4],
[D, H, W, K]). A volume is drawn as one axial slice, `representative_slice` of the region
the panel is about: the slice where that region has the most voxels. So a proponent volume
shows the slice of its influential region's largest cross-section, titled with that slice's
index, and a test volume's rows for class i show class i's largest cross-section.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from tracin_jax import outputs
from tracin_jax.data.slices import SliceSet
from tracin_jax.influence import layout

REGION_COLOURS = np.array([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [1.0, 0.85, 0.1]])  # NCR ED ET
_FLAIR = 3


def _region_legend(fig, class_names: Sequence[str], *, truth: bool = False) -> None:
  """A legend of the region colours at the bottom of the figure."""
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top

  handles = [Patch(color=REGION_COLOURS[j], label=f"{c} region")
             for j, c in enumerate(class_names)]
  if truth:
    handles.append(Line2D([], [], color="white", ls="--", label="ground truth (outline)"))
  legend = fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
                      frameon=True)
  if truth:
    legend.get_frame().set_facecolor("#cccccc")


def new_figure(**kwargs):
  """A figure that is not registered with pyplot: saving it leaves the caller's backend
  (a notebook's inline display, say) untouched."""
  from matplotlib.figure import Figure
  return Figure(**kwargs)


def representative_slice(region_mask: np.ndarray) -> int:
  """The axial slice that shows a volume's region: the one where it has the most voxels.

  Args:
    region_mask: [D, H, W] bool, one region of a volume (a class's region, or the union
      of several: `regions.any(axis=-1)`).

  Returns:
    z in 0..D-1 with the largest area of the region; among equal areas the lowest z; for
    an empty mask the middle slice D // 2.

  Raises:
    ValueError: a mask that is not [D, H, W].
  """
  mask = np.asarray(region_mask)
  if mask.ndim != 3:
    raise ValueError(f"region_mask must be one volume's mask [D, H, W], got shape "
                     f"{mask.shape}.")
  if mask.shape[0] == 0:
    raise ValueError("region_mask has no slice (D = 0).")
  area = np.count_nonzero(mask, axis=(1, 2))
  return int(np.argmax(area)) if area.any() else mask.shape[0] // 2


def shown_slice(image: np.ndarray, regions: np.ndarray, mask: np.ndarray | None = None,
                truth: np.ndarray | None = None):
  """What a panel draws of one example: a slice as it is, a volume's representative slice.

  Args:
    image: [H, W, C] or [D, H, W, C].
    regions: [H, W, K] or [D, H, W, K] bool, drawn over the image.
    mask: [D, H, W] bool, the region that chooses a volume's slice (default: the union
      of `regions`); unused for a slice.
    truth: [H, W] or [D, H, W] labels, or None.

  Returns:
    (image [H, W, C], regions [H, W, K], truth [H, W] or None, z): z is the volume's slice
    drawn (`representative_slice` of `mask`), None for a slice.
  """
  image, regions = np.asarray(image), np.asarray(regions)
  if image.ndim == 3:
    return image, regions, truth, None
  if image.ndim != 4 or regions.shape[:-1] != image.shape[:-1]:
    raise ValueError(f"image {image.shape} and regions {regions.shape} must be a slice's "
                     "[H, W, C] and [H, W, K] or a volume's [D, H, W, C] and [D, H, W, K].")
  z = representative_slice(regions.any(axis=-1) if mask is None else mask)
  return image[z], regions[z], None if truth is None else np.asarray(truth)[z], z


def _label(ids, b: int, z: int | None) -> str:
  """"case zN" of example b: its own slice index, or the volume's slice drawn."""
  case, own = ids[b]
  return f"{case} z{own if z is None else z}"


def overlay(image: np.ndarray, regions: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """RGB [W, H, 3] for display: FLAIR in grey with the class regions coloured.

  Args:
    image: [H, W, 4] in [-1, 1] (a volume's slice: see `shown_slice`).
    regions: [H, W, 3] bool.

  Raises:
    ValueError: an image that is not one slice.
  """
  if np.ndim(image) != 3:
    raise ValueError(f"overlay draws one slice [H, W, C], got an image of shape "
                     f"{np.shape(image)}; `shown_slice` picks a volume's slice.")
  grey = (np.clip(image[..., _FLAIR], -1, 1) + 1) / 2
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  for j in range(regions.shape[-1]):
    m = regions[..., j]
    rgb[m] = (1 - alpha) * rgb[m] + alpha * REGION_COLOURS[j]
  return np.transpose(rgb, (1, 0, 2))  # x horizontal, y vertical


def clip_level(blocks: np.ndarray) -> float:
  """The colour scale's limit: the 99th percentile of |score| (1.0 without a finite one)."""
  finite = np.abs(blocks[np.isfinite(blocks)])
  vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
  return vmax if vmax > 0 else 1.0


def draw_influence_matrices(fig, axes: Sequence, blocks: np.ndarray,
                            class_names: Sequence[str], *, colorbar: bool = True,
                            rows: str = "test") -> None:
  """Draws the K matrices [n, K * n] of `blocks` on `axes` (one per explained class): class
  blocks separated by lines, NaN (absent regions) white, a symmetric colour scale clipped at
  the 99th percentile of |score| (`clip_level`).

  Args:
    rows: what the rows are: "test" (validation regions) or "train" (a train-influence
      matrix, whose rows are training regions too).
  """
  import matplotlib
  k, n, _ = blocks.shape
  vmax = clip_level(blocks)
  cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
  for i, ax in enumerate(axes):
    im = ax.imshow(blocks[i], cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    for j in range(1, k):
      ax.axvline(j * n - 0.5, color="k", lw=1)
    ax.set_xticks([(j + 0.5) * n for j in range(k)])
    ax.set_xticklabels([f"train {c}" for c in class_names])
    ax.set_ylabel(f"{rows} {class_names[i]} region\n(example index)")
    if colorbar:
      fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, extend="both",
                   label=f"TracIn (clipped at ±{vmax:.2g})")


def plot_influence_matrices(blocks: np.ndarray, class_names: Sequence[str],
                            path: str | os.PathLike, title: str = "Train-influence") -> None:
  """The K train-influence matrices [n, K * n] with their class blocks (Fig. 4).

  NaN (absent regions) is white; the colour scale is symmetric, clipped at the 99th
  percentile of |score|.
  """
  k = blocks.shape[0]
  fig = new_figure(figsize=(10, 2.6 * k + 0.9))
  axes = fig.subplots(k, 1, squeeze=False)[:, 0]
  draw_influence_matrices(fig, axes, blocks, class_names, rows="train")
  fig.suptitle(title + ": rows a training region of class i, columns every training region "
               "by class j\nwhite rows and columns: regions absent from that example (no pixel "
               f"with p > threshold); colours clipped at the 99th percentile of |score| "
               f"(±{clip_level(blocks):.2g})", fontsize=10)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=110)


def plot_class_distribution(dist: np.ndarray, class_names: Sequence[str],
                            path: str | os.PathLike, *, k: int = 10,
                            title_suffix: str = "") -> None:
  """Class of the top-k proponents per test class (Fig. 5): grouped bars."""
  kk = len(class_names)
  fig = new_figure(figsize=(6.5, 3.6))
  ax = fig.subplots()
  width = 0.8 / kk
  for j in range(kk):
    ax.bar(np.arange(kk) + (j - (kk - 1) / 2) * width, dist[:, j], width,
           color=REGION_COLOURS[j], label=f"proponent class {class_names[j]}")
  ax.set_xticks(np.arange(kk))
  ax.set_xticklabels([f"test {c}" for c in class_names])
  ax.set_ylabel(f"fraction of the top {k} proponents")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  ax.set_title(f"Classes of the top {k} proponents{title_suffix}")
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=110)


def plot_self_influence(self_inf: np.ndarray, train_set: SliceSet, regions: np.ndarray,
                        class_names: Sequence[str], path: str | os.PathLike, *,
                        num_top: int = 4, title_suffix: str = "") -> None:
  """Self-influence ranking per class, with the top-ranked train images and regions (a
  volume at the slice of its ranked region's largest area)."""
  kk = len(class_names)
  fig = new_figure(figsize=(3 + 2.2 * num_top, 2.4 * kk))
  grid = fig.add_gridspec(kk, num_top + 1, width_ratios=[1.6] + [1] * num_top)
  for i in range(kk):
    vals = self_inf[:, i]
    order = np.argsort(-np.nan_to_num(vals, nan=-np.inf))
    finite = np.isfinite(vals[order])
    ax = fig.add_subplot(grid[i, 0])
    ax.plot(np.arange(finite.sum()), vals[order][finite], color=REGION_COLOURS[i])
    ax.set_yscale("log") if np.all(vals[order][finite] > 0) and finite.any() else None
    ax.set(xlabel="rank", ylabel=f"self-influence\n{class_names[i]}")
    for r, b in enumerate(order[:num_top]):
      if not np.isfinite(vals[b]):
        continue
      a2 = fig.add_subplot(grid[i, r + 1])
      image, shown, _, z = shown_slice(train_set.images[b], regions[b], regions[b][..., i])
      a2.imshow(overlay(image, shown), origin="lower")
      a2.set_title(f"{_label(train_set.ids, b, z)}\n{vals[b]:.3g}", fontsize=7)
      a2.axis("off")
  fig.suptitle("Self-influence T_ii(z_i, z_i), highest first" + title_suffix
               + "\nimages: FLAIR with the slice's predicted regions", fontsize=10)
  _region_legend(fig, class_names)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  outputs.save_figure(fig, path, dpi=100)


def plot_local_explanation(a: int, test_blocks: np.ndarray, test_set: SliceSet,
                           test_regions: np.ndarray, train_set: SliceSet,
                           train_regions: np.ndarray, class_names: Sequence[str],
                           path: str | os.PathLike, *, k: int = 10,
                           global_columns: Sequence[int] = (),
                           title_suffix: str = "") -> None:
  """One test image: per predicted class, its top-k proponents and top-k opponents.

  Per class two rows: the test image with the region (and the ground truth outlined) then k
  proponents; the region alone then k opponents (FLAIR with the training region of the
  scored class), each titled with class, case, slice and score; global explainers are
  marked "GE". Volumes are drawn at `representative_slice` of the region of each panel:
  the test volume at its class-i region's largest slice, each training volume at its
  scored region's.
  """
  from tracin_jax.influence.topk import top_k

  kk, _, kn = test_blocks.shape
  n_train = kn // kk
  ge = {int(c) for c in global_columns}
  classes = [i for i in range(kk) if not np.all(np.isnan(test_blocks[i, a]))]
  rows = max(2 * len(classes), 1)
  fig = new_figure(figsize=(max(1.32 * (k + 1) + 0.3, 10.0), 1.62 * rows + 1.0))
  axes = fig.subplots(rows, k + 1, squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  case, z = test_set.ids[a]
  for r, i in enumerate(classes):
    img, all_regions, truth, shown_z = shown_slice(test_set.images[a], test_regions[a],
                                                   test_regions[a][..., i], test_set.labels[a])
    only = np.zeros_like(all_regions)
    only[..., i] = all_regions[..., i]
    for row, regions, label in ((2 * r, all_regions, f"test {_label(test_set.ids, a, shown_z)}"),
                                (2 * r + 1, only, f"region {class_names[i]}")):
      ax = axes[row, 0]
      ax.imshow(overlay(img, regions), origin="lower")
      if (truth == i + 1).any():
        ax.contour((truth == i + 1).T.astype(float), levels=[0.5], colors=["white"],
                   linestyles="dashed", linewidths=0.7, origin="lower")
      ax.set_title(label, fontsize=7.5)
    pi, ps, oi, os_ = top_k(test_blocks[i, a][None], k)
    for row, kind, idx, vals in ((2 * r, "proponent", pi[0], ps[0]),
                                 (2 * r + 1, "opponent", oi[0], os_[0])):
      for c, (col, val) in enumerate(zip(idx, vals)):
        if col < 0:
          continue
        j, b = layout.split_column(int(col), n_train)
        reg = np.zeros_like(train_regions[b])
        reg[..., j] = train_regions[b][..., j]
        image, reg, _, tz = shown_slice(train_set.images[b], reg)
        ax = axes[row, 1 + c]
        ax.imshow(overlay(image, reg), origin="lower")
        mark = " GE" if int(col) in ge else ""
        ax.set_title(f"{c + 1}. {class_names[j]}{mark}\n{_label(train_set.ids, b, tz)}\n"
                     f"{val:.3g}", fontsize=6.5,
                     color="darkgreen" if kind == "proponent" else "darkred")
    axes[2 * r, 1].text(-0.08, 1.35, "proponents", transform=axes[2 * r, 1].transAxes,
                        fontsize=8, color="darkgreen", ha="left")
    axes[2 * r + 1, 1].text(-0.08, 1.35, "opponents", transform=axes[2 * r + 1, 1].transAxes,
                            fontsize=8, color="darkred", ha="left")
  volume = np.ndim(test_set.images[a]) == 4
  fig.suptitle(f"Local explanation of {f'volume {case}' if volume else f'{case} slice {z}'}: "
               f"top {k} proponents and opponents of each predicted region{title_suffix}\n"
               "GE: a global explainer (in the top of most validation regions); images: FLAIR"
               + (", each volume at the axial slice where its region is largest" if volume
                  else ""), fontsize=9.5)
  _region_legend(fig, class_names, truth=True)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  outputs.save_figure(fig, path, dpi=100)
