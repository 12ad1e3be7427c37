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
    tests: class name -> Mann-Whitney U test of the selected against the other features'
      impact.
    excluded: the score columns (global explainers) left out of the ranking.
    manifest: what the stage wrote.
  """

  fi: np.ndarray
  selection: dict[str, np.ndarray]
  impact: np.ndarray
  predictive: dict[str, list[int]]
  tests: dict[str, dict[str, Any]]
  excluded: list[int]
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

  writes = (
      base.Output(FI_FILE, "fi [K, C, R] (eq 8, global explainers removed) and the selection "
                  "statistics per class and feature"),
      base.Output(IMPACT_FILE, "feature impact F[k, i] (eq 9) per feature and class, the "
                  "predictive features, fit statistics and Mann-Whitney U tests"),
      base.Output("ranked_scatter_{class_file}_f{feature}.png",
                  "Ranked scatter of feature {feature} for {name} ({verdict}): FI along "
                  "TracIn's ranking of the training regions, with the feature maps of a test "
                  "image, its first proponent, a neutral region and its strongest opponent "
                  "(the paper's Fig. 6).", figure=True),
      base.Output(IMPACT_FIGURE, "Feature impact: the Dice lost per class when a feature of "
                  "the last hidden layer is masked, selected predictive features against the "
                  "others (the paper's Fig. 7).", figure=True),
  )

  def compute(self, context: base.Context) -> InterpretOutputs:
    config, log = self.config, context.log
    inputs = context.need("influence")
    exclude = ([g["column"] for g in inputs.global_explainers]
               if config.exclude_global_explainers else [])
    fi, exclude = self._importance(context, inputs, exclude)
    selection = self._selection(context, fi)
    t0 = time.perf_counter()
    log(f"interpret: feature impact (eq 9), each of the {fi.shape[1]} features masked in "
        f"turn over {len(context.val_set)} validation slices ...")
    impact = features.feature_impact(inputs.apply_fn, inputs.params, context.val_set.images,
                                     context.val_set.labels,
                                     batch_size=config.batch_size)  # [C, K]
    log(f"interpret: feature impact in {time.perf_counter() - t0:.1f} s.")
    names = inputs.class_names
    predictive = {names[i]: np.flatnonzero(selection["predictive"][i]).tolist()
                  for i in range(fi.shape[0])}
    tests = {names[i]: _mann_whitney(impact[:, i], selection["predictive"][i])
             for i in range(fi.shape[0])}
    log(f"Predictive features (FI > {config.fi_threshold} first, U shape or negative slope): "
        + "; ".join(f"{n} {len(v)}/{fi.shape[1]}" for n, v in predictive.items()) + ".")
    return InterpretOutputs(fi, selection, impact, predictive, tests, list(exclude),
                            self.manifest())

  def _importance(self, context: base.Context, inputs, exclude: list[int]):
    """(fi [K, C, R] along TracIn's ranking (eq 8), the columns left out of it)."""
    train_set, val_set, bs = context.train_set, context.val_set, self.config.batch_size
    t0 = time.perf_counter()
    context.log(f"interpret: last hidden layer over the regions of {len(train_set)} training "
                f"and {len(val_set)} validation slices ...")
    f_train = features.hidden_features(inputs.apply_fn, inputs.params, train_set.images,
                                       inputs.train_regions, batch_size=bs)
    f_test = features.hidden_features(inputs.apply_fn, inputs.params, val_set.images,
                                      inputs.val_regions, batch_size=bs)
    context.log(f"interpret: features in {time.perf_counter() - t0:.1f} s; FI along "
                "TracIn's ranking (eq 8) ...")
    scores = layout.from_class_blocks(inputs.test_blocks)  # [n_val, K, n_train, K]
    fi = features.feature_importance(scores, f_train, f_test, exclude_columns=exclude)
    if exclude and fi.shape[2] < 3:
      context.log(f"Removing the {len(exclude)} global explainers leaves {fi.shape[2]} ranked "
                  "train regions: too few to fit; they are kept.")
      exclude = []
      fi = features.feature_importance(scores, f_train, f_test)
    return fi, exclude

  def _selection(self, context: base.Context, fi: np.ndarray) -> dict[str, np.ndarray]:
    """The predictive-feature rule's statistics, each [K, C] (none selected on curves too
    short to fit)."""
    k, c, r_len = fi.shape
    if r_len >= 3:
      return features.select_predictive(fi, self.config.fi_threshold)
    context.log(f"Only {r_len} ranked train regions: the FI curves are too short to fit; "
                "every feature is reported as not predictive.")
    selection = {name: np.full((k, c), np.nan) for name in SELECTION[:8]}
    selection.update({name: np.zeros((k, c), bool) for name in SELECTION[8:]})
    return selection

  def write(self, context: base.Context, result: InterpretOutputs) -> base.Manifest:
    manifest = self.manifest()
    fi_file, impact_file, scatter, impact_figure = self.writes
    self._write_scatters(context, manifest, scatter, result)
    inputs = context.need("influence")
    names = inputs.class_names
    figures.plot_feature_impact(
        result.impact, result.selection["predictive"], result.tests, names,
        self.list_output(context, manifest, impact_figure), title_suffix=context.suffix)
    outputs.save_npz(self.list_output(context, manifest, fi_file), fi=result.fi,
                     class_names=np.asarray(names), dataset=np.asarray(context.data_name),
                     synthetic=np.asarray(context.synthetic), **result.selection)
    outputs.write_json(self.list_output(context, manifest, impact_file), {
        "dataset": context.data_name, "class_names": list(names),
        "fi_threshold": self.config.fi_threshold, "num_features": result.fi.shape[1],
        "num_ranks": result.fi.shape[2], "excluded_global_explainers": len(result.excluded),
        "feature_impact": {names[i]: outputs.json_ready(result.impact[:, i])
                           for i in range(len(names))},
        "predictive_features": result.predictive,
        "statistics": {names[i]: {s: outputs.json_ready(v[i])
                                  for s, v in result.selection.items()}
                       for i in range(len(names))},
        "mann_whitney": result.tests})
    manifest.headline.update({
        "predictive_features": result.predictive,
        "mann_whitney_p": {n: t["p_value"] for n, t in result.tests.items()}})
    context.log(f"Wrote {context.workdir / self.name}: {FI_FILE}, {IMPACT_FILE} and "
                f"{len(manifest.figures)} figures.")
    return manifest

  def _write_scatters(self, context: base.Context, manifest: base.Manifest,
                      scatter: base.Output, result: InterpretOutputs) -> None:
    """The ranked scatter figures (Fig. 6) of each class's chosen features."""
    inputs = context.need("influence")
    scores = layout.from_class_blocks(inputs.test_blocks)
    selection = result.selection
    for i, name in enumerate(inputs.class_names):
      exemplars = _exemplars(scores, i, result.excluded, inputs.apply_fn, inputs.params,
                             inputs.state, context.val_set, inputs.val_regions,
                             context.train_set, inputs.train_regions, inputs.class_names)
      for feat in _scatter_choices(selection["fi_first"][i], selection["predictive"][i],
                                   self.config.num_scatter_features):
        st = {s: selection[s][i, feat] for s in ("fi_first", "slope", "r2")}
        verdict = "predictive" if selection["predictive"][i, feat] else "not predictive"
        path = self.list_output(context, manifest, scatter, class_file=rundir.class_file(name),
                                feature=feat, name=name, verdict=verdict)
        figures.plot_ranked_scatter(
            result.fi[i, feat], [dict(p, fmap=p["hidden"][..., feat]) for p in exemplars],
            name, feat, path, title_suffix=context.suffix,
            subtitle=", ".join(f"{s} {v:.3g}" for s, v in st.items()) + f": {verdict}")

  def load(self, context: base.Context) -> InterpretOutputs:
    out = context.workdir / self.name
    with np.load(out / FI_FILE) as f:
      selection = {name: f[name] for name in f.files
                   if name not in ("fi", "class_names", "dataset", "synthetic")}
      fi = f["fi"]
    saved = json.loads((out / IMPACT_FILE).read_text())
    impact = np.array([[np.nan if v is None else v for v in saved["feature_impact"][c]]
                       for c in saved["class_names"]]).T
    inputs = context.need("influence")
    excluded = ([g["column"] for g in inputs.global_explainers]
                if saved["excluded_global_explainers"] else [])
    manifest = base.Manifest.from_record(base.read_manifest(context.workdir, self.name))
    return InterpretOutputs(fi, selection, impact, saved["predictive_features"],
                            saved["mann_whitney"], excluded, manifest)
