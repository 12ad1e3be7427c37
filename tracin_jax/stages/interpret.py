"""The `interpret` stage: TracIn rankings against the last hidden layer (paper section 3.5).

Reads the influence stage's validation-train scores and writes under `<workdir>/interpret/`:
  - `feature_importance.npz`: `fi` [K, C, R] (eq 8, global explainers removed), the
    selection statistics of `select_predictive` (each [K, C]) and `class_names`;
  - `feature_impact.json`: F[k, i] (eq 9, on the validation set) for every feature and
    class, the predictive features per class, the fit statistics per feature and class, a
    Mann-Whitney U test of the selected features' impact against the others, the dataset;
  - figures: `ranked_scatter_<class>_f<k>.png` (Fig. 6) for the most and the least
    predictive features of each class (by FI at the first proponents), and
    `feature_impact.png` (Fig. 7).
Regions come from the influence stage's result (the final model, its threshold).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import numpy as np
from scipy import stats

from tracin_jax import outputs
from tracin_jax import rundir
from tracin_jax.influence import layout
from tracin_jax.influence.figures import REGION_COLOURS
from tracin_jax.interpret import features
from tracin_jax.interpret import figures
from tracin_jax.settings import setting
from tracin_jax.stages import base

FI_FILE = rundir.FEATURE_IMPORTANCE_FILE
IMPACT_FILE = rundir.FEATURE_IMPACT_FILE
IMPACT_FIGURE = rundir.FEATURE_IMPACT_FIGURE
SELECTION = ("slope", "intercept", "r2", "curvature", "head", "middle", "tail", "fi_first",
             "u_shape", "negative_slope", "predictive")


@dataclasses.dataclass(frozen=True)
class InterpretConfig:
  """Settings of the interpret stage."""

  fi_threshold: float = setting(
      features.DEFAULT_FI_THRESHOLD, "FI at the first proponents that a predictive feature "
      "must exceed (the paper: 0.65).", minimum=0.0, maximum=1.0)
  num_scatter_features: int = setting(
      1, "Ranked scatter figures per class: every selected (predictive) feature, or this many "
      "of the highest FI when none is selected, and this many of the lowest.", minimum=0)
  exclude_global_explainers: bool = setting(
      True, "Drop the influence stage's global explainers before ranking.")
  batch_size: int = setting(16, "Images per compiled call of the interpret stage.",
                            flag="interpret_batch_size", minimum=1)


@dataclasses.dataclass
class InterpretOutputs:
  """The interpret stage's result.

  Attributes:
    fi: [K, C, R] feature importance per class, feature and rank (eq 8).
    selection: the statistics of `features.select_predictive`, each [K, C].
    impact: [C, K] feature impact (eq 9) on the validation set.
    predictive: class name -> indices of its predictive features.
    manifest: what the stage wrote.
  """

  fi: np.ndarray
  selection: dict[str, np.ndarray]
  impact: np.ndarray
  predictive: dict[str, list[int]]
  manifest: base.Manifest


def _mann_whitney(impact: np.ndarray, selected: np.ndarray) -> dict[str, Any]:
  """Selected vs other features' impact for one class: impact, selected [C]."""
  a, b = impact[selected], impact[~selected]
  if not selected.any():
    return {"p_value": None, "statistic": None, "note": "no selected feature"}
  if selected.all():
    return {"p_value": None, "statistic": None, "note": "every feature selected"}
  res = stats.mannwhitneyu(a, b, alternative="two-sided")
  return {"p_value": outputs.json_ready(res.pvalue),
          "statistic": outputs.json_ready(res.statistic),
          "note": f"{len(a)} selected vs {len(b)} other features"}


def _scatter_choices(fi_first: np.ndarray, predictive: np.ndarray, num: int) -> list[int]:
  """The features the rule selected (all of them), else the `num` highest by fi_first; then
  the `num` lowest finite fi_first features for contrast (no repeats)."""
  finite = np.flatnonzero(np.isfinite(fi_first))
  order = finite[np.argsort(-fi_first[finite], kind="stable")]
  selected = np.flatnonzero(predictive).tolist()
  first = selected if selected else order[:num].tolist()
  return list(dict.fromkeys(first + order[::-1][:num].tolist()))


@functools.lru_cache(maxsize=4)
def _hidden_fn(apply_fn):
  """apply_fn with return_hidden, compiled once per model function."""
  return jax.jit(functools.partial(apply_fn, return_hidden=True))


def _exemplars(scores, i, exclude, apply_fn, params, state, val_set, val_regions, train_set,
               train_regions, class_names) -> list[dict[str, Any]]:
  """Panels of Fig. 6 for test class i: the validation image with the largest region of
  class i, its first proponent, a neutral (score nearest 0) and its strongest opponent,
  global explainers excluded; each with its hidden maps [H, W, C] and outlined region."""
  size = val_regions[..., i].sum(axis=(1, 2))
  if not size.any():
    return []
  a = int(np.argmax(size))
  n_train = scores.shape[2]
  row = layout.block_row(scores, a, i)
  row[np.asarray(exclude, int)] = np.nan
  ranked = np.flatnonzero(np.isfinite(row))
  picks = []
  if ranked.size:
    picks = [("proponent", ranked[np.argmax(row[ranked])]),
             ("neutral", ranked[np.argmin(np.abs(row[ranked]))]),
             ("opponent", ranked[np.argmin(row[ranked])])]
  images = [val_set.images[a]] + [train_set.images[layout.split_column(int(col), n_train)[1]]
                                  for _, col in picks]
  _, hidden = _hidden_fn(apply_fn)(params, np.stack(images), state)
  hidden = np.asarray(hidden)
  case, z = val_set.ids[a]
  panels = [{"hidden": hidden[0], "region": val_regions[a, ..., i],
             "colour": REGION_COLOURS[i], "title": f"test {class_names[i]}\n{case} z{z}"}]
  for (kind, col), h in zip(picks, hidden[1:]):
    j, b = layout.split_column(int(col), n_train)
    tc, tz = train_set.ids[b]
    panels.append({"hidden": h, "region": train_regions[b, ..., j],
                   "colour": REGION_COLOURS[j],
                   "title": f"{kind} {class_names[j]}\n{tc} z{tz}, {row[col]:.3g}"})
  return panels


@base.register_stage
class InterpretStage(base.StageBase):
  """Feature importance of the last hidden layer along TracIn's ranking (eq 7-9)."""

  name, config_cls, needs = "interpret", InterpretConfig, ("influence",)

  def run(self, context: base.Context) -> InterpretOutputs:
    config, log = self.config, context.log
    inputs = context.need("influence")
    out = context.stage_dir(self.name)
    train_set, val_set = context.train_set, context.val_set
    test_blocks, class_names = inputs.test_blocks, inputs.class_names
    apply_fn, params, state = inputs.apply_fn, inputs.params, inputs.state
    train_regions, val_regions = inputs.train_regions, inputs.val_regions
    exclude = ([g["column"] for g in inputs.global_explainers]
               if config.exclude_global_explainers else [])

    bs = config.batch_size
    t0 = time.perf_counter()
    log(f"interpret: last hidden layer over the regions of {len(train_set)} training and "
        f"{len(val_set)} validation slices ...")
    f_train = features.hidden_features(apply_fn, params, train_set.images, train_regions,
                                       batch_size=bs)
    f_test = features.hidden_features(apply_fn, params, val_set.images, val_regions,
                                      batch_size=bs)
    log(f"interpret: features in {time.perf_counter() - t0:.1f} s; FI along TracIn's "
        "ranking (eq 8) ...")
    scores = layout.from_class_blocks(test_blocks)  # [n_val, K, n_train, K]
    fi = features.feature_importance(scores, f_train, f_test, exclude_columns=exclude)
    if exclude and fi.shape[2] < 3:
      log(f"Removing the {len(exclude)} global explainers leaves {fi.shape[2]} ranked train "
          "regions: too few to fit; they are kept.")
      exclude = []
      fi = features.feature_importance(scores, f_train, f_test)
    k, c, r_len = fi.shape
    if r_len >= 3:
      selection = features.select_predictive(fi, config.fi_threshold)
    else:
      log(f"Only {r_len} ranked train regions: the FI curves are too short to fit; every "
          "feature is reported as not predictive.")
      selection = {name: np.full((k, c), np.nan) for name in SELECTION[:8]}
      selection.update({name: np.zeros((k, c), bool) for name in SELECTION[8:]})
    t0 = time.perf_counter()
    log(f"interpret: feature impact (eq 9), each of the {c} features masked in turn over "
        f"{len(val_set)} validation slices ...")
    impact = features.feature_impact(apply_fn, params, val_set.images, val_set.labels,
                                     batch_size=bs)  # [C, K]
    log(f"interpret: feature impact in {time.perf_counter() - t0:.1f} s.")

    predictive = {class_names[i]: np.flatnonzero(selection["predictive"][i]).tolist()
                  for i in range(k)}
    tests = {class_names[i]: _mann_whitney(impact[:, i], selection["predictive"][i])
             for i in range(k)}
    manifest = self.manifest()
    exemplars = [_exemplars(scores, i, exclude, apply_fn, params, state, val_set, val_regions,
                            train_set, train_regions, class_names) for i in range(k)]
    for i, name in enumerate(class_names):
      for feat in _scatter_choices(selection["fi_first"][i], selection["predictive"][i],
                                   config.num_scatter_features):
        path = out / f"ranked_scatter_{name.replace('/', '-')}_f{feat}.png"
        st = {s: selection[s][i, feat] for s in ("fi_first", "slope", "r2")}
        verdict = "predictive" if selection["predictive"][i, feat] else "not predictive"
        figures.plot_ranked_scatter(
            fi[i, feat], [dict(p, fmap=p["hidden"][..., feat]) for p in exemplars[i]],
            name, feat, path, title_suffix=context.suffix,
            subtitle=", ".join(f"{s} {v:.3g}" for s, v in st.items()) + f": {verdict}")
        manifest.figure(self.rel(path.name), f"Ranked scatter of feature {feat} for {name} "
                        f"({verdict}): FI along TracIn's ranking of the training regions, "
                        "with the feature maps of a test image, its first proponent, a "
                        "neutral region and its strongest opponent (the paper's Fig. 6).")
    figures.plot_feature_impact(impact, selection["predictive"], tests, class_names,
                                out / IMPACT_FIGURE, title_suffix=context.suffix)
    manifest.figure(self.rel(IMPACT_FIGURE), "Feature impact: the Dice lost per class when a "
                    "feature of the last hidden layer is masked, selected predictive "
                    "features against the others (the paper's Fig. 7).")

    outputs.save_npz(out / FI_FILE, fi=fi, class_names=np.asarray(class_names),
                     dataset=np.asarray(context.data_name),
                     synthetic=np.asarray(context.synthetic), **selection)
    manifest.file(self.rel(FI_FILE), "fi [K, C, R] (eq 8, global explainers removed) and the "
                  "selection statistics per class and feature")
    outputs.write_json(out / IMPACT_FILE, {
        "dataset": context.data_name, "class_names": list(class_names),
        "fi_threshold": config.fi_threshold, "num_features": c, "num_ranks": r_len,
        "excluded_global_explainers": len(exclude),
        "feature_impact": {class_names[i]: outputs.json_ready(impact[:, i])
                           for i in range(k)},
        "predictive_features": predictive,
        "statistics": {class_names[i]: {s: outputs.json_ready(v[i])
                                        for s, v in selection.items()}
                       for i in range(k)},
        "mann_whitney": tests})
    manifest.file(self.rel(IMPACT_FILE), "feature impact F[k, i] (eq 9) per feature and class, the "
                  "predictive features, fit statistics and Mann-Whitney U tests")
    manifest.headline.update({"predictive_features": predictive,
                              "mann_whitney_p": {n: t["p_value"] for n, t in tests.items()}})
    log(f"Predictive features (FI > {config.fi_threshold} first, U shape or negative slope): "
        + "; ".join(f"{n} {len(v)}/{c}" for n, v in predictive.items()) + ".")
    log(f"Wrote {out}: {FI_FILE}, {IMPACT_FILE} and {len(manifest.figures)} figures.")
    return InterpretOutputs(fi, selection, impact, predictive, manifest)

  def load(self, context: base.Context) -> InterpretOutputs:
    out = context.workdir / self.name
    with np.load(out / FI_FILE) as f:
      selection = {name: f[name] for name in f.files
                   if name not in ("fi", "class_names", "dataset", "synthetic")}
      fi = f["fi"]
    saved = json.loads((out / IMPACT_FILE).read_text())
    impact = np.array([[np.nan if v is None else v for v in saved["feature_impact"][c]]
                       for c in saved["class_names"]]).T
    manifest = base.Manifest.from_record(base.read_manifest(context.workdir, self.name))
    return InterpretOutputs(fi, selection, impact, saved["predictive_features"], manifest)
