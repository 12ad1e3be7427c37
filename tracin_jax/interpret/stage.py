"""The experiment's `interpret` stage: TracIn rankings against the last hidden layer.

`run_interpret_stage(workdir, train_set, val_set, config)` reads the influence stage's
validation-train scores and writes under `<workdir>/interpret/` (paper section 3.5):
  - `feature_importance.npz`: `fi` [K, C, R] (eq 8, global explainers removed), the
    selection statistics of `select_predictive` (each [K, C]) and `class_names`;
  - `feature_impact.json`: F[k, i] (eq 9, on the validation set) for every feature and
    class, the predictive features per class, the fit statistics per feature and class, a
    Mann-Whitney U test of the selected features' impact against the others, the dataset;
  - figures: `ranked_scatter_<class>_f<k>.png` (Fig. 6) for the most and the least
    predictive features of each class (by FI at the first proponents), and
    `feature_impact.png` (Fig. 7).
Regions are recomputed from the final model with the threshold stored by the influence
stage, and checked against its presence masks. A rerun whose inputs (the influence files'
contents and the config) are unchanged reuses the outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
from scipy import stats

from tracin_jax import outputs
from tracin_jax.data.slices import SliceSet
from tracin_jax.influence import report
from tracin_jax.influence import stage as influence_stage
from tracin_jax.influence.figures import REGION_COLOURS
from tracin_jax.interpret import features
from tracin_jax.interpret import figures

OUT_DIR = "interpret"
FI_FILE = "feature_importance.npz"
IMPACT_FILE = "feature_impact.json"
IMPACT_FIGURE = "feature_impact.png"


@dataclasses.dataclass(frozen=True)
class InterpretConfig:
  """Settings of the interpret stage (DESIGN 4).

  Attributes:
    fi_threshold: FI the first proponents of a predictive feature must exceed (paper: 0.65).
    num_scatter_features: ranked scatter figures per class for the most and, as many, for
      the least predictive features (by FI at the first proponents).
    exclude_global_explainers: drop the influence stage's global explainers before ranking.
    batch_size: images per compiled call.
  """

  fi_threshold: float = features.DEFAULT_FI_THRESHOLD
  num_scatter_features: int = 1
  exclude_global_explainers: bool = True
  batch_size: int = 16


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


def _scatter_choices(fi_first: np.ndarray, num: int) -> list[int]:
  """The `num` highest and `num` lowest finite fi_first features (no repeats)."""
  finite = np.flatnonzero(np.isfinite(fi_first))
  order = finite[np.argsort(-fi_first[finite], kind="stable")]
  return list(dict.fromkeys(order[:num].tolist() + order[::-1][:num].tolist()))


@functools.lru_cache(maxsize=4)
def _hidden_fn(apply_fn):
  """apply_fn with return_hidden, compiled once per model function."""
  return jax.jit(functools.partial(apply_fn, return_hidden=True))


def _exemplars(scores, i, exclude, apply_fn, params, val_set, val_regions, train_set,
               train_regions, class_names) -> list[dict[str, Any]]:
  """Panels of Fig. 6 for test class i: the validation image with the largest region of
  class i, its first proponent, a neutral (score nearest 0) and its strongest opponent,
  global explainers excluded; each with its hidden maps [H, W, C] and outlined region."""
  size = val_regions[..., i].sum(axis=(1, 2))
  if not size.any():
    return []
  a = int(np.argmax(size))
  n_train, k = scores.shape[2], scores.shape[3]
  row = np.transpose(scores[a, i], (1, 0)).reshape(k * n_train).copy()  # column j*n + b
  row[np.asarray(exclude, int)] = np.nan
  ranked = np.flatnonzero(np.isfinite(row))
  picks = []
  if ranked.size:
    picks = [("proponent", ranked[np.argmax(row[ranked])]),
             ("neutral", ranked[np.argmin(np.abs(row[ranked]))]),
             ("opponent", ranked[np.argmin(row[ranked])])]
  images = [val_set.images[a]] + [train_set.images[col % n_train] for _, col in picks]
  _, hidden = _hidden_fn(apply_fn)(params, np.stack(images))
  hidden = np.asarray(hidden)
  case, z = val_set.ids[a]
  panels = [{"hidden": hidden[0], "region": val_regions[a, ..., i],
             "colour": REGION_COLOURS[i], "title": f"test {class_names[i]}\n{case} z{z}"}]
  for (kind, col), h in zip(picks, hidden[1:]):
    j, b = divmod(int(col), n_train)
    tc, tz = train_set.ids[b]
    panels.append({"hidden": h, "region": train_regions[b, ..., j],
                   "colour": REGION_COLOURS[j],
                   "title": f"{kind} {class_names[j]}\n{tc} z{tz}, {row[col]:.3g}"})
  return panels


def run_interpret_stage(workdir: str | os.PathLike, train_set: SliceSet, val_set: SliceSet,
                        config: InterpretConfig = InterpretConfig(), *, dataset: str = "",
                        progress: bool = True, log=print) -> dict[str, Any]:
  """Computes and writes the global interpretation of the run in `workdir` (module doc).

  Args:
    workdir: the run's directory, with its checkpoints and `influence/` outputs.
    train_set: the training slices the influence stage used.
    val_set: the validation slices the influence stage used (the test set).
    config: the stage's settings.
    dataset: a name for the data, recorded in the outputs.
    progress: unused (the stage takes seconds); kept for a uniform stage signature.
    log: a function taking one line of text.

  Returns:
    dict: "fi" [K, C, R], "selection" (dict of [K, C] arrays), "impact" [C, K],
    "predictive" (class name -> feature indices), "reused" (bool), "paths".

  Raises:
    FileNotFoundError: if the influence stage has not been run in `workdir`.
    ValueError: if the influence stage was run on other data or another model.
  """
  del progress
  workdir = pathlib.Path(workdir)
  train_npz, test_npz, explainers_json = influence_stage.output_paths(
      workdir, needed_by="interpret")
  out = workdir / OUT_DIR
  out.mkdir(parents=True, exist_ok=True)
  key = outputs.fingerprint((train_npz, test_npz, explainers_json), config, dataset)
  fi_path, impact_path = out / FI_FILE, out / IMPACT_FILE
  if fi_path.exists() and impact_path.exists() and (out / IMPACT_FIGURE).exists():
    previous = json.loads(impact_path.read_text())
    if previous.get("fingerprint") == key:
      log(f"Interpretation in {out} is up to date (inputs unchanged): reusing it.")
      with np.load(fi_path) as f:
        selection = {name: f[name] for name in f.files if name not in ("fi", "class_names")}
        fi = f["fi"]
      impact = np.array([[np.nan if v is None else v for v in previous["feature_impact"][c]]
                         for c in previous["class_names"]]).T
      return {"fi": fi, "selection": selection, "impact": impact,
              "predictive": previous["predictive_features"], "reused": True,
              "paths": sorted(str(p) for p in out.glob("*.*"))}

  inputs = influence_stage.load_outputs(workdir, train_set, val_set, needed_by="interpret")
  test_blocks, class_names = inputs.test_blocks, inputs.class_names
  apply_fn, params = inputs.apply_fn, inputs.params
  train_regions, val_regions = inputs.train_regions, inputs.val_regions
  exclude = ([g["column"] for g in inputs.global_explainers]
             if config.exclude_global_explainers else [])

  bs = config.batch_size
  f_train = features.hidden_features(apply_fn, params, train_set.images, train_regions,
                                     batch_size=bs)
  f_test = features.hidden_features(apply_fn, params, val_set.images, val_regions,
                                    batch_size=bs)
  scores = report.from_class_blocks(test_blocks)  # [n_val, K, n_train, K]
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
    selection = {name: np.full((k, c), np.nan) for name in (
        "slope", "intercept", "r2", "curvature", "head", "middle", "tail", "fi_first")}
    selection.update({name: np.zeros((k, c), bool)
                      for name in ("u_shape", "negative_slope", "predictive")})
  impact = features.feature_impact(apply_fn, params, val_set.images, val_set.labels,
                                   batch_size=bs)  # [C, K]

  predictive = {class_names[i]: np.flatnonzero(selection["predictive"][i]).tolist()
                for i in range(k)}
  tests = {class_names[i]: _mann_whitney(impact[:, i], selection["predictive"][i])
           for i in range(k)}
  suffix = f" ({dataset})" if dataset else ""
  paths = []
  exemplars = [_exemplars(scores, i, exclude, apply_fn, params, val_set, val_regions,
                          train_set, train_regions, class_names) for i in range(k)]
  for i, name in enumerate(class_names):
    for feat in _scatter_choices(selection["fi_first"][i], config.num_scatter_features):
      path = out / f"ranked_scatter_{name.replace('/', '-')}_f{feat}.png"
      st = {s: selection[s][i, feat] for s in ("fi_first", "slope", "r2")}
      verdict = "predictive" if selection["predictive"][i, feat] else "not predictive"
      figures.plot_ranked_scatter(
          fi[i, feat], [dict(p, fmap=p["hidden"][..., feat]) for p in exemplars[i]],
          name, feat, path, title_suffix=suffix,
          subtitle=", ".join(f"{s} {v:.3g}" for s, v in st.items()) + f": {verdict}")
      paths.append(str(path))
  figures.plot_feature_impact(impact, selection["predictive"], tests, class_names,
                              out / IMPACT_FIGURE, title_suffix=suffix)
  paths.append(str(out / IMPACT_FIGURE))

  outputs.save_npz(fi_path, fi=fi, class_names=np.asarray(class_names), **selection)
  outputs.write_json(impact_path, {
      "dataset": dataset, "fingerprint": key, "class_names": list(class_names),
      "fi_threshold": config.fi_threshold, "num_features": c, "num_ranks": r_len,
      "excluded_global_explainers": len(exclude),
      "feature_impact": {class_names[i]: outputs.json_ready(impact[:, i]) for i in range(k)},
      "predictive_features": predictive,
      "statistics": {class_names[i]: {s: outputs.json_ready(v[i])
                                      for s, v in selection.items()}
                     for i in range(k)},
      "mann_whitney": tests})
  log(f"Predictive features (FI > {config.fi_threshold} first, U shape or negative slope): "
      + "; ".join(f"{n} {len(v)}/{c}" for n, v in predictive.items()) + ".")
  log(f"Wrote {out}: {FI_FILE}, {IMPACT_FILE} and {len(paths)} figures.")
  return {"fi": fi, "selection": selection, "impact": impact, "predictive": predictive,
          "reused": False, "paths": [str(fi_path), str(impact_path)] + paths}
