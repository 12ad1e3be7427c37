"""Figures of TracIn explanations (the paper's Fig. 4 and 5, self-influence, local panels)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from tracin_jax import outputs
from tracin_jax.data.slices import SliceSet
from tracin_jax.influence import layout

REGION_COLOURS = np.array([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [1.0, 0.85, 0.1]])  # NCR ED ET
_FLAIR = 3


def new_figure(**kwargs):
  """A figure that is not registered with pyplot: saving it leaves the caller's backend
  (a notebook's inline display, say) untouched."""
  from matplotlib.figure import Figure
  return Figure(**kwargs)


def overlay(image: np.ndarray, regions: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """RGB [W, H, 3] for display: FLAIR in grey with the class regions coloured.

  Args:
    image: [H, W, 4] in [-1, 1].
    regions: [H, W, 3] bool.
  """
  grey = (np.clip(image[..., _FLAIR], -1, 1) + 1) / 2
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  for j in range(regions.shape[-1]):
    m = regions[..., j]
    rgb[m] = (1 - alpha) * rgb[m] + alpha * REGION_COLOURS[j]
  return np.transpose(rgb, (1, 0, 2))  # x horizontal, y vertical


def draw_influence_matrices(fig, axes: Sequence, blocks: np.ndarray,
                            class_names: Sequence[str], *, colorbar: bool = True) -> None:
  """Draws the K matrices [n, K * n] of `blocks` on `axes` (one per test class): class
  blocks separated by lines, NaN (absent regions) white, a symmetric colour scale clipped at
  the 99th percentile of |score|."""
  import matplotlib
  k, n, _ = blocks.shape
  finite = np.abs(blocks[np.isfinite(blocks)])
  vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
  vmax = vmax if vmax > 0 else 1.0
  cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
  for i, ax in enumerate(axes):
    im = ax.imshow(blocks[i], cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    for j in range(1, k):
      ax.axvline(j * n - 0.5, color="k", lw=1)
    ax.set_xticks([(j + 0.5) * n for j in range(k)])
    ax.set_xticklabels([f"train {c}" for c in class_names])
    ax.set_ylabel(f"test {class_names[i]}\n(example)")
    if colorbar:
      fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="TracIn")


def plot_influence_matrices(blocks: np.ndarray, class_names: Sequence[str],
                            path: str | os.PathLike, title: str = "Train-influence") -> None:
  """The K train-influence matrices [n, K * n] with their class blocks (Fig. 4).

  NaN (absent regions) is white; the colour scale is symmetric, clipped at the 99th
  percentile of |score|.
  """
  k = blocks.shape[0]
  fig = new_figure(figsize=(10, 2.6 * k + 0.6))
  axes = fig.subplots(k, 1, squeeze=False)[:, 0]
  draw_influence_matrices(fig, axes, blocks, class_names)
  fig.suptitle(title + ": rows test region of class i, columns train regions by class j")
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
  """Self-influence ranking per class, with the top-ranked train images and regions."""
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
      a2.imshow(overlay(train_set.images[b], regions[b]), origin="lower")
      case, z = train_set.ids[b]
      a2.set_title(f"{case} z{z}\n{vals[b]:.3g}", fontsize=7)
      a2.axis("off")
  fig.suptitle("Self-influence T_ii(z_i, z_i), highest first" + title_suffix)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=100)


def plot_local_explanation(a: int, test_blocks: np.ndarray, test_set: SliceSet,
                           test_regions: np.ndarray, train_set: SliceSet,
                           train_regions: np.ndarray, class_names: Sequence[str],
                           path: str | os.PathLike, *, k: int = 5,
                           title_suffix: str = "") -> None:
  """One test image: per predicted class, its top-k proponents and top-k opponents.

  Each row: the test image, its predicted regions, then k proponents and k opponents
  (FLAIR with their predicted regions) titled with case, slice, class and score.
  """
  from tracin_jax.influence.topk import top_k

  kk, _, kn = test_blocks.shape
  n_train = kn // kk
  classes = [i for i in range(kk) if not np.all(np.isnan(test_blocks[i, a]))]
  rows = max(len(classes), 1)
  fig = new_figure(figsize=(1.9 * (2 + 2 * k), 2.3 * rows))
  axes = fig.subplots(rows, 2 + 2 * k, squeeze=False)
  case, z = test_set.ids[a]
  for r, i in enumerate(classes):
    img = test_set.images[a]
    axes[r, 0].imshow(overlay(img, np.zeros_like(test_regions[a])), origin="lower")
    axes[r, 0].set_title(f"test {case} z{z}", fontsize=7)
    only = np.zeros_like(test_regions[a])
    only[..., i] = test_regions[a][..., i]
    axes[r, 1].imshow(overlay(img, only), origin="lower")
    axes[r, 1].set_title(f"region {class_names[i]}", fontsize=7)
    pi, ps, oi, os_ = top_k(test_blocks[i, a][None], k)
    for c, (idx, val, kind) in enumerate(
        [(x, y, "proponent") for x, y in zip(pi[0], ps[0])] +
        [(x, y, "opponent") for x, y in zip(oi[0], os_[0])]):
      ax = axes[r, 2 + c]
      ax.axis("off")
      if idx < 0:
        continue
      j, b = layout.split_column(int(idx), n_train)
      reg = np.zeros_like(train_regions[b])
      reg[..., j] = train_regions[b][..., j]
      ax.imshow(overlay(train_set.images[b], reg), origin="lower")
      tc, tz = train_set.ids[b]
      ax.set_title(f"{kind} {class_names[j]}\n{tc} z{tz}\n{val:.3g}", fontsize=6,
                   color="darkgreen" if kind == "proponent" else "darkred")
    axes[r, 0].axis("off")
    axes[r, 1].axis("off")
  fig.suptitle(f"Local explanation of {case} slice {z}: top {k} proponents and opponents"
               + title_suffix)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=100)
