"""The `lds` stage: which TracIn is faithful for segmentation?

Scores variants of TracIn, and two references, by the linear datamodeling score (LDS;
Park et al. 2023, `tracin_jax.checks.lds`) and by the removal test of the validate stage
(`tracin_jax.checks.removal`), and writes under `<workdir>/lds/`:
  - `lds.json`: per variant its LDS (mean over the validation regions of Spearman's rho
    between the soft Dice it predicts for each random training subset and the soft Dice
    measured after retraining on it) with a bootstrap interval, its paired difference from
    the paper's TracIn, the removal test at each k (proponents minus random, opponents minus
    random), its global explainers and their region sizes, and the time its scores took;
  - `lds_table.md`: the same as a Markdown table;
  - `lds.png`: LDS per variant with intervals, and the removal test beside it;
  - `local_<variant>_<case>_<slice>.png`: the local explanation panel of the influence
    stage's first panel image, with the paper's TracIn and with the best variant;
  - `retraining/<key>/`: every retraining (random subsets and removal sets), saved as it
    finishes; `scores/<key>/`: every variant's scores, per checkpoint.

The retrainings replay the run's SGD phase (`training.retrain.Retrainer`, from the last Adam
checkpoint) without the left-out slices; each measures the soft Dice of every present
validation region (its class on its pixels, against the ground truth, the region held fixed:
1 - the loss TracIn explains). They do not depend on the variant, so every variant is scored
on the same retrainings. A variant's prediction for a subset is the sum of the kept slices'
scores (a slice's score for a region is the sum over its regions, as in the validate stage).

Variants (`VARIANTS`):
  - `tracin`: the paper's TracIn (eq 6) over the influence stage's checkpoints;
  - `renormalised`: each per-example, per-region gradient divided by its norm at each
    checkpoint (a sum of eta_t-weighted cosines; Hammoudeh and Lowd's renormalised
    influence), `influence(..., normalize=True)`;
  - `last_checkpoint`: the last of those checkpoints only;
  - `more_checkpoints`: every checkpoint the run saved (`--lds_more_checkpoints`), Adam
    epochs weighted by their learning rate;
  - `last_layer`: gradients of the output layer only (`--lds_last_layer_params`);
  - `projected`: gradients projected to `--lds_projection_dim` numbers (`Projection`);
  - `representation`: the cosine of the regions' last-hidden-layer feature vectors
    (`interpret.features.region_cosine`), no gradient;
  - `random`: seeded Gaussian scores, the floor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import time
from typing import Any, Callable

import numpy as np

from tracin_jax import outputs
from tracin_jax import rundir
from tracin_jax.checks import lds as lds_lib
from tracin_jax.checks import removal
from tracin_jax.checks import stats
from tracin_jax.influence import core
from tracin_jax.influence import figures as influence_figures
from tracin_jax.influence import layout
from tracin_jax.influence import rankings
from tracin_jax.influence import segmentation
from tracin_jax.influence.topk import top_k
from tracin_jax.interpret import faithfulness
from tracin_jax.interpret import features
from tracin_jax.settings import SettingsError
from tracin_jax.settings import setting
from tracin_jax.stages import base
from tracin_jax.stages import influence as influence_stage
from tracin_jax.training import retrain as retrain_lib
from tracin_jax.training import train as train_lib

LDS_FILE = rundir.LDS_FILE
TABLE_FILE = rundir.LDS_TABLE_FILE
FIGURE = rundir.LDS_FIGURE
BASELINE = "tracin"
FLOOR = "random"
VARIANTS = {
    "tracin": "TracIn as the paper defines it (eq 6), over the influence stage's checkpoints",
    "renormalised": "renormalised TracIn: gradients divided by their norms per checkpoint "
                    "(eta_t-weighted cosines)",
    "last_checkpoint": "TracIn at the last of those checkpoints only",
    "more_checkpoints": "TracIn over every checkpoint the run saved (Adam epochs weighted by "
                        "their learning rate)",
    "last_layer": "TracIn of the output layer's parameters only",
    "projected": "TracIn of randomly projected gradients",
    "representation": "cosine of the regions' last-hidden-layer feature vectors (no "
                      "gradients)",
    "random": "seeded Gaussian scores (the floor)",
}


@dataclasses.dataclass(frozen=True)
class LdsConfig:
  """Settings of the lds stage."""

  num_subsets: int = setting(50, "M: random training subsets the SGD phase is retrained on "
                             "for the LDS.", flag="lds_subsets", minimum=2)
  fraction: float = setting(0.5, "Share of the training slices each LDS subset keeps.",
                            flag="lds_fraction", minimum=0.0, maximum=1.0, exclusive=True)
  seed: int = setting(0, "Seed of the LDS subsets, the bootstrap, the removal test's regions "
                      "and random sets, the random scores and the projection.",
                      flag="lds_seed")
  variants: tuple[str, ...] = setting(
      tuple(VARIANTS), "Attribution methods scored (tracin is always scored: the others are "
      "compared with it).", flag="lds_variants", choices=tuple(VARIANTS))
  removal_k: tuple[int, ...] = setting(
      (20, 80), "k of the removal test of each variant (empty: no removal test).",
      flag="lds_removal_k", minimum=1)
  removal_regions_per_class: int = setting(
      2, "Validation regions per class in each variant's removal test.",
      flag="lds_removal_regions_per_class", minimum=1)
  removal_random: int = setting(2, "Random removal sets per k (shared by the variants).",
                                flag="lds_removal_random", minimum=1)
  removal_skip: tuple[str, ...] = setting(
      ("random",), "Variants without a removal test (random scores' top-k sets are random "
      "sets by construction).", flag="lds_removal_skip", choices=tuple(VARIANTS))
  more_checkpoint_epochs: tuple[int, ...] | None = setting(
      None, "Epochs of the more_checkpoints variant (unset: every epoch the run saved).",
      flag="lds_more_checkpoints", minimum=1)
  last_layer_params: tuple[str, ...] = setting(
      ("head",), "Parameters of the last_layer variant (path prefixes).",
      flag="lds_last_layer_params")
  projection_dim: int = setting(2048, "Projected gradient size of the projected variant.",
                                flag="lds_projection_dim", minimum=1)
  num_bootstrap: int = setting(1000, "Bootstrap resamples of the LDS intervals.",
                               flag="lds_bootstrap", minimum=0)


@dataclasses.dataclass
class LdsOutputs:
  """The lds stage's result.

  Attributes:
    summary: as in `lds.json`: per variant its LDS, removal test, global explainers, time.
    recommended: the variant the evidence recommends ("tracin" unless one is clearly
      better on the LDS).
    manifest: what the stage wrote.
  """

  summary: dict[str, Any]
  recommended: str
  manifest: base.Manifest


# ----------------------------------------------------------------------------- pure parts


def lds_regions(presence: np.ndarray) -> list[tuple[int, int]]:
  """Every present validation region, class by class: [(validation index a, class i)]."""
  return [(int(a), i) for i in range(presence.shape[1])
          for a in np.flatnonzero(presence[:, i])]


def region_rows(slice_scores: np.ndarray, regions) -> np.ndarray:
  """[R, n_train]: each region's score for each training slice (from [K, n_val, n_train])."""
  return np.stack([slice_scores[i, a] for a, i in regions])


def global_explainer_stats(blocks: np.ndarray, train_regions: np.ndarray, *, top: int = 20,
                           min_fraction: float = 0.5) -> dict[str, Any]:
  """A variant's global explainers (`rankings.global_explainers` on its own scores), how much
  of its top proponents they take, and their region sizes against the other regions'.

  Args:
    blocks: [K, n_val, K * n_train] validation-train scores, NaN where absent.
    train_regions: [n_train, H, W, K] bool.
    top: proponents per region (and the global explainers' top).
    min_fraction: the global explainers' fraction of validation regions.

  Returns:
    {"count", "share_top" (mean over present validation regions of the share of their
    `top` proponents that are global explainers), "median_size" (pixels of the global
    explainers' regions), "median_size_rest" (of every other present training region),
    "columns"}.
  """
  kn = blocks.shape[2]
  found = rankings.global_explainers(blocks, top=top, min_fraction=min_fraction)
  columns = np.array([g["column"] for g in found], int)
  rows = blocks.reshape(-1, kn)
  rows = rows[~np.all(np.isnan(rows), axis=1)]
  idx = top_k(rows, top)[0]
  share = float(np.mean([np.isin(r[r >= 0], columns).mean() for r in idx])) if len(idx) else 0.0
  sizes = np.transpose(train_regions.sum(axis=(1, 2)), (1, 0)).reshape(-1)  # [K * n_train]
  present = sizes > 0
  rest = present.copy()
  rest[columns] = False
  return {"count": int(len(columns)), "share_top": share,
          "median_size": float(np.median(sizes[columns])) if len(columns) else None,
          "median_size_rest": float(np.median(sizes[rest])) if rest.any() else None,
          "columns": columns.tolist()}


def influence_stage_variant(config: influence_stage.InfluenceConfig | None) -> str | None:
  """The variant whose scores the influence stage wrote with `config` (None: a layer
  selection, which no variant here reproduces exactly)."""
  config = config or influence_stage.InfluenceConfig()
  if config.params_filter is not None:
    return None
  return "renormalised" if config.normalize else BASELINE


def relative_deviation(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b| / max |b| over the entries finite in both (NaN must match)."""
  ok = np.isfinite(a) & np.isfinite(b)
  if not np.array_equal(np.isnan(a), np.isnan(b)) or not ok.any():
    return float("inf")
  scale = np.abs(b[ok]).max()
  return float(np.abs(a[ok] - b[ok]).max() / scale) if scale > 0 else float(
      np.abs(a[ok]).max())


def recommend(lds_by_variant: dict[str, dict[str, Any]]) -> str:
  """The recommended variant: the one with the highest LDS among those whose paired
  difference from the paper's TracIn has an interval above 0; else TracIn itself."""
  best, best_lds = BASELINE, None
  for name, entry in lds_by_variant.items():
    diff = entry.get("minus_tracin") or {}
    if name in (BASELINE, FLOOR) or diff.get("low") is None or diff["low"] <= 0:
      continue
    if best_lds is None or entry["lds"]["mean"] > best_lds:
      best, best_lds = name, entry["lds"]["mean"]
  return best


# ----------------------------------------------------------------------------- the stage


def _digest(removed) -> str:
  return hashlib.sha256(repr(tuple(int(b) for b in removed)).encode()).hexdigest()[:12]


def _removal_part(job: removal.RemovalJob) -> str:
  """Removal retrainings are named by what they remove: variants that remove the same set
  (and every variant's random sets) share one retraining."""
  return f"removed_{_digest(job.removed)}"


def _depends(context: base.Context, inputs) -> dict[str, Any]:
  """What retrainings and scores depend on: the run (its settings, cases and data hash,
  hence its checkpoints), the data, and the regions of the explained model."""
  h = hashlib.sha256(repr(float(inputs.threshold)).encode())
  outputs.hash_arrays(h, inputs.train_regions, inputs.val_regions)
  return {"run": train_lib.load_record(context.workdir), "data": context.data_fingerprint(),
          "regions": h.hexdigest()[:16]}


def _available(name: str) -> bool:
  params = inspect.signature(core.influence).parameters
  return {"renormalised": "normalize" in params,
          "projected": "projection" in params}.get(name, True)


class _Lazy:
  """A value made on first use (a `Retrainer` is only loaded when a retraining is left)."""

  def __init__(self, make: Callable[[], Any]):
    self._make, self._value = make, None

  def get(self) -> Any:
    if self._value is None:
      self._value = self._make()
    return self._value


class _Scores:
  """Every variant's validation-train scores, each part saved with the time it took."""

  def __init__(self, context: base.Context, inputs, config: LdsConfig, parts: base.Parts, *,
               log: Callable[[str], None] | None = None):
    self.context, self.inputs, self.config, self.parts = context, inputs, config, parts
    self.log = context.log if log is None else log
    self.loss_fn = segmentation.make_region_losses(inputs.apply_fn)
    self.train = {"image": context.train_set.images,
                  "target": context.train_set.labels.astype(np.int32),
                  "region": inputs.train_regions}
    self.val = {"image": context.val_set.images,
                "target": context.val_set.labels.astype(np.int32),
                "region": inputs.val_regions}
    self._checkpoints: dict[int, Any] = {}

  def _timed(self, name: str, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    value, meta = self.parts.load(name), self.parts.load(f"{name}_time")
    if value is not None and meta is not None:
      self.log(f"lds: scores {name} reused.")
      return value, float(meta["seconds"])
    t0 = time.perf_counter()
    value = np.asarray(compute())
    seconds = time.perf_counter() - t0
    self.parts.save(name, value)
    self.parts.save(f"{name}_time", {"seconds": seconds})
    self.log(f"lds: scores {name} done in {seconds:.0f} s.")
    return value, seconds

  def checkpoint(self, epoch: int):
    if epoch not in self._checkpoints:
      _, ckpts, _ = train_lib.tracin_checkpoints(self.context.workdir, [epoch],
                                                 allow_adam=True)
      self._checkpoints[epoch] = ckpts[0]
    return self._checkpoints[epoch]

  def gradient(self, tag: str, epochs, **kwargs) -> tuple[np.ndarray, float]:
    """Sum over `epochs` of one checkpoint's TracIn [n_val, K, n_train, K] (`influence`
    with `kwargs`), masked where absent, and the seconds it took."""
    total, seconds = None, 0.0
    for epoch in epochs:
      part, s = self._timed(f"{tag}_epoch{epoch}", lambda epoch=epoch: core.influence(
          self.loss_fn, [self.checkpoint(epoch)], self.train, self.val,
          memory_budget_bytes=self.context.memory_budget_bytes, **kwargs))
      total = part if total is None else total + part
      seconds += s
    return self.mask(total), seconds

  def mask(self, scores: np.ndarray) -> np.ndarray:
    return segmentation.mask_absent(scores, self.inputs.presence_test,
                                    self.inputs.presence_train)

  def variant(self, name: str) -> tuple[np.ndarray, float]:
    """[n_val, K, n_train, K] scores of variant `name`, NaN where absent, and seconds."""
    config, inputs = self.config, self.inputs
    if name == "tracin":
      return self.gradient("tracin", inputs.epochs)
    if name == "renormalised":
      return self.gradient("renormalised", inputs.epochs, normalize=True)
    if name == "last_checkpoint":
      return self.gradient("tracin", inputs.epochs[-1:])
    if name == "more_checkpoints":
      epochs = config.more_checkpoint_epochs or sorted(train_lib.phases_of(
          self.context.workdir))
      return self.gradient("tracin", epochs)
    if name == "last_layer":
      tag = "last_layer_" + "+".join(config.last_layer_params)
      return self.gradient(tag, inputs.epochs, params_filter=config.last_layer_params)
    if name == "projected":
      from tracin_jax.influence.projection import Projection  # pylint: disable=g-import-not-at-top

      projection = Projection(dim=config.projection_dim, seed=config.seed)
      tag = f"projected_{projection.kind}{projection.dim}_seed{projection.seed}"
      return self.gradient(tag, inputs.epochs, projection=projection)
    if name == "representation":
      def compute():
        f_train = features.hidden_features(inputs.apply_fn, inputs.params,
                                           self.train["image"], inputs.train_regions)
        f_val = features.hidden_features(inputs.apply_fn, inputs.params, self.val["image"],
                                         inputs.val_regions)
        return features.region_cosine(f_val, f_train)
      scores, seconds = self._timed("representation", compute)
      return self.mask(scores), seconds
    if name == "random":
      def compute():
        rng = np.random.default_rng(config.seed)
        return rng.normal(size=(len(self.val["image"]), inputs.presence_test.shape[1],
                                len(self.train["image"]), inputs.presence_train.shape[1]))
      scores, seconds = self._timed(f"random_seed{config.seed}", compute)
      return self.mask(scores), seconds
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}.")


class _Retraining:
  """The lds stage's retrainings: the store of their results, the measure of every LDS
  region, and the retrainer, loaded on first use (the random subsets and the removal tests
  share all three)."""

  def __init__(self, context: base.Context, inputs, depends: dict[str, Any], regions):
    self.parts = base.Parts(context.stage_dir(rundir.LDS) / "retraining",
                            {**depends, "measured": regions}, what="lds retraining")
    self.measure = removal.evaluator(inputs.apply_fn, context.val_set, inputs.val_regions,
                                     regions)
    self.retrainer = _Lazy(lambda: retrain_lib.Retrainer(context.workdir, context.train_set))
    self.progress = context.progress

  def retrain_and_measure(self, removed: np.ndarray) -> np.ndarray:
    model = self.retrainer.get()(removed, progress=self.progress, desc="lds retraining")
    return np.array(self.measure(model))  # [2, R]: soft Dice, hard Dice


@dataclasses.dataclass
class _Scored:
  """Every variant's scores, by variant name.

  Attributes:
    blocks: [K, n_val, K * n_train] validation-train scores, NaN where absent.
    slice_scores: [K, n_val, n_train] each validation region's score for each training slice.
    predicted: [R, M] each LDS region's prediction for each subset (the sum of the kept
      slices' scores).
    seconds: the time the scores took.
  """

  blocks: dict[str, np.ndarray]
  slice_scores: dict[str, np.ndarray]
  predicted: dict[str, np.ndarray]
  seconds: dict[str, float]


def _scores_source(context: base.Context, inputs, config: LdsConfig, depends: dict[str, Any],
                   **kwargs) -> _Scores:
  parts = base.Parts(context.stage_dir(rundir.LDS) / "scores", depends, what="lds scores")
  return _Scores(context, inputs, config, parts, **kwargs)


def _measure_subsets(context: base.Context, config: LdsConfig, regions, masks: np.ndarray,
                     retraining: _Retraining) -> tuple[np.ndarray, float]:
  """Retrains on each random subset (or reuses it): ([R, M] soft Dice, seconds)."""
  n_train = len(context.train_set)
  context.log(f"LDS: {len(regions)} validation regions measured after retraining the SGD "
              f"phase on {config.num_subsets} random subsets of "
              f"{lds_lib.subset_size(n_train, config.fraction)} of the {n_train} training "
              "slices.")
  t0 = time.perf_counter()
  measured = lds_lib.measure_subsets(masks, retraining.retrain_and_measure, retraining.parts,
                                     log=context.log)
  return measured[:, 0, :].T, time.perf_counter() - t0


def _score_variants(source: _Scores, variants: list[str], regions, masks: np.ndarray
                    ) -> _Scored:
  scored = _Scored({}, {}, {}, {})
  for name in variants:
    scores, scored.seconds[name] = source.variant(name)
    scored.blocks[name] = layout.to_class_blocks(scores)
    scored.slice_scores[name] = faithfulness.slice_scores(scored.blocks[name])
    scored.predicted[name] = lds_lib.predicted_outputs(
        region_rows(scored.slice_scores[name], regions), masks)
  return scored


def _compare_with_influence(context: base.Context, inputs, blocks: dict[str, np.ndarray]
                            ) -> dict[str, Any]:
  """A check on both computations: the variant the influence stage computed, recomputed
  here (`lds.json`'s entries of it)."""
  stage_variant = influence_stage_variant(context.configs.get("influence"))
  deviation, same = None, None
  if stage_variant in blocks:
    deviation = relative_deviation(blocks[stage_variant], inputs.test_blocks)
    same = deviation <= 1e-4
    context.log(f"LDS: the {stage_variant} variant's scores "
                f"{'agree' if same else 'DISAGREE'} with the influence stage's (largest "
                f"difference {deviation:.1e} of the largest |score|; float32 sums in another "
                "order).")
  else:
    context.log("LDS: the influence stage's scores are not compared with a variant (it used "
                + ("a layer selection" if stage_variant is None else
                   f"the {stage_variant} variant, not scored here") + ").")
  return {"influence_stage_variant": stage_variant, "equals_influence_stage": same,
          "deviation_from_influence_stage": deviation}


def _lds_entry(context: base.Context, inputs, config: LdsConfig, name: str, regions,
               scored: _Scored, soft: np.ndarray) -> dict[str, Any]:
  """A variant's entry of `lds.json` but its removal test: LDS, per class, difference from
  TracIn, global explainers, seconds."""
  names = inputs.class_names
  score = lds_lib.lds(scored.predicted[name], soft, num_bootstrap=config.num_bootstrap,
                      seed=config.seed)
  per_output = score.pop("per_output")
  entry = {"description": VARIANTS[name], "seconds": scored.seconds[name], "lds": score,
           "lds_per_class": {names[i]: stats.mean_ci(
               per_output[[r for r, (_, c) in enumerate(regions) if c == i]])
               for i in range(len(names))}}
  if name != BASELINE:
    entry["minus_tracin"] = lds_lib.lds_difference(
        scored.predicted[name], scored.predicted[BASELINE], soft,
        num_bootstrap=config.num_bootstrap, seed=config.seed)
  influence_config = context.configs.get("influence") or influence_stage.InfluenceConfig()
  entry["global_explainers"] = global_explainer_stats(
      scored.blocks[name], inputs.train_regions, top=influence_config.global_top,
      min_fraction=influence_config.global_fraction)
  context.log(f"LDS {name}: {_interval(score)} ({scored.seconds[name]:.0f} s of scores).")
  return entry


def _removal_test(context: base.Context, inputs, config: LdsConfig, k: int, name: str,
                  chosen, regions, slice_scores: np.ndarray, retraining: _Retraining
                  ) -> dict[str, Any]:
  """The validate stage's removal test of one variant at one k, on the `chosen` regions
  (each measured among every LDS region: `regions`)."""
  jobs = removal.removal_jobs(chosen, slice_scores, len(context.train_set), k,
                              config.removal_random, config.seed)
  records = removal.run_retrainings(jobs, retraining.measure, inputs.params, retraining.parts,
                                    retraining.retrainer.get, part_name=_removal_part,
                                    progress=context.progress, log=context.log)
  where = {region: r for r, region in enumerate(regions)}
  results = {job: {key: [rec[key][where[region]] for region in chosen]
                   for key in ("region_dice", "hard_dice")}
             for job, rec in records.items()}
  test, _ = removal.summarise_removals(jobs, results, chosen, slice_scores, inputs.class_names)
  context.log(f"Removal test k = {k}, {name}: proponents - random "
              f"{_fmt(test['proponents_minus_random'])}, opponents - random "
              f"{_fmt(test['opponents_minus_random'])}.")
  return {key: test[key] for key in ("dice_change", "proponents_minus_random",
                                     "opponents_minus_random")}


def _removal_tests(context: base.Context, inputs, config: LdsConfig, variants: list[str],
                   regions, scored: _Scored, retraining: _Retraining
                   ) -> tuple[list[tuple[int, int]], dict[str, dict[str, Any]], float]:
  """Each variant's removal test at each k: (the chosen regions, variant -> k -> test,
  seconds)."""
  chosen = faithfulness.choose_regions(inputs.presence_test,
                                       config.removal_regions_per_class, config.seed)
  tests: dict[str, dict[str, Any]] = {}
  t0 = time.perf_counter()
  for k in config.removal_k:
    for name in variants:
      if name not in config.removal_skip:
        tests.setdefault(name, {})[str(k)] = _removal_test(
            context, inputs, config, k, name, chosen, regions, scored.slice_scores[name],
            retraining)
  return chosen, tests, time.perf_counter() - t0


def _shown(record: dict[str, Any]) -> str:
  """The variant explained beside TracIn: the recommended one, else the best other by LDS."""
  recommended = record["recommended"]
  ranked = sorted((v for v in record["variants"] if v not in (BASELINE, FLOOR)),
                  key=lambda v: -record["variants"][v]["lds"]["mean"])
  return recommended if recommended != BASELINE else (ranked[0] if ranked else BASELINE)


@base.register_stage
class LdsStage(base.StageBase):
  """Linear datamodeling score and removal test of TracIn variants."""

  name, config_cls, needs = "lds", LdsConfig, ("influence",)

  writes = (
      base.Output(LDS_FILE, "per variant: LDS with bootstrap interval, paired difference "
                  "from TracIn, removal test at each k, global explainers and their region "
                  "sizes, run time"),
      base.Output(TABLE_FILE, "the variants' table in Markdown"),
      base.Output(FIGURE, "LDS of each attribution method on {num_subsets} random "
                  "{fraction:.0%} subsets of the training slices (mean over {num_regions} "
                  "validation regions, 95% bootstrap interval), and the removal test: Dice "
                  "change after removing each region's top-k proponents or opponents, minus "
                  "random removal.", figure=True),
      # `rundir.local_panel`'s name, its fields left to fill.
      base.Output(rundir.local_panel("{case}", "{z}", "{variant}"),
                  "Local explanation of validation case {case}, slice {z} by the {variant} "
                  "variant: per predicted class its top 10 proponents and opponents, global "
                  "explainers of that variant marked.", figure=True),
  )

  def check(self, context: base.Context) -> None:
    n_train = len(context.train_set)
    for k in self.config.removal_k:
      if k > n_train // 2:
        raise SettingsError(f"--lds_removal_k={','.join(map(str, self.config.removal_k))}: "
                            f"each k must be at most half of the {n_train} training slices.")
    missing = [v for v in self.config.variants if not _available(v)]
    if missing:
      raise SettingsError(f"--lds_variants: {', '.join(missing)} need(s) an argument that "
                          "this version of tracin_jax.influence lacks.")

  def compute(self, context: base.Context) -> LdsOutputs:
    """Retrains on random subsets, scores every variant by the LDS, runs their removal
    tests (retrainings and scores each resumable) and recommends a variant."""
    config, inputs = self.config, context.need("influence")
    variants = [BASELINE] + [v for v in config.variants if v != BASELINE]
    # 1. Retrain on M random subsets; measure every present validation region.
    regions = lds_regions(inputs.presence_test)
    masks = lds_lib.sample_subsets(len(context.train_set), config.num_subsets,
                                   config.fraction, config.seed)
    # Retrainings and scores depend on the run and the regions, not on the influence stage's
    # other settings: they are keyed by those alone, so a new influence setting keeps them.
    depends = _depends(context, inputs)
    retraining = _Retraining(context, inputs, depends, regions)
    soft, retrain_seconds = _measure_subsets(context, config, regions, masks, retraining)
    # 2. Each variant's scores, its LDS and its paired difference from TracIn.
    scored = _score_variants(_scores_source(context, inputs, config, depends), variants,
                             regions, masks)
    comparison = _compare_with_influence(context, inputs, scored.blocks)
    summary = {name: _lds_entry(context, inputs, config, name, regions, scored, soft)
               for name in variants}
    # 3. The removal test of each variant (the validate stage's, on fewer regions).
    chosen, tests, removal_seconds = _removal_tests(context, inputs, config, variants,
                                                    regions, scored, retraining)
    for name, by_k in tests.items():
      summary[name]["removal"] = by_k
    # 4. The recommendation.
    recommended = recommend(summary)
    context.log(f"LDS: recommended variant {recommended}" + (
        " (no variant beats the paper's TracIn clearly)" if recommended == BASELINE else "")
        + ".")
    record = self._record(context, regions, chosen, {
        "retraining_seconds": retrain_seconds, "removal_seconds": removal_seconds,
        **comparison, "recommended": recommended, "variants": summary})
    return LdsOutputs(record, recommended, self.manifest())

  def _record(self, context: base.Context, regions, chosen, found: dict[str, Any]
              ) -> dict[str, Any]:
    """`lds.json`'s contents: the settings and regions, then what was `found`."""
    config, val_set, n_train = self.config, context.val_set, len(context.train_set)
    names = context.need("influence").class_names
    return {
        "dataset": context.data_name, "num_subsets": config.num_subsets,
        "fraction": config.fraction, "subset_size": lds_lib.subset_size(n_train,
                                                                        config.fraction),
        "num_train_slices": n_train, "num_regions": len(regions),
        "regions_per_class": {names[i]: sum(1 for _, c in regions if c == i)
                              for i in range(len(names))},
        "measure": "per validation region: Spearman rho over the subsets between the sum of "
                   "the kept slices' scores and the region's soft Dice measured after "
                   "retraining the SGD phase on the subset; LDS = mean over regions; "
                   "interval: percentile bootstrap over regions and subsets",
        "removal_regions": [[val_set.ids[a][0], int(val_set.ids[a][1]), names[i]]
                            for a, i in chosen],
        **found}

  def write(self, context: base.Context, result: LdsOutputs) -> base.Manifest:
    manifest = self.manifest()
    record, config = result.summary, self.config
    file, table_file, figure, panel = self.writes
    outputs.write_json(self.list_output(context, manifest, file), record)
    outputs.write_text(self.list_output(context, manifest, table_file), table(record))
    plot_lds(record, self.list_output(context, manifest, figure,
                                      num_subsets=config.num_subsets, fraction=config.fraction,
                                      num_regions=record["num_regions"]),
             title_suffix=context.suffix)
    self._write_panels(context, manifest, panel, record)
    manifest.headline.update({
        "lds": {v: entry["lds"]["mean"] for v, entry in record["variants"].items()},
        "recommended": result.recommended, "num_subsets": config.num_subsets,
        "num_regions": record["num_regions"]})
    return manifest

  def _write_panels(self, context: base.Context, manifest: base.Manifest, panel: base.Output,
                    record: dict[str, Any]) -> None:
    """The influence stage's first local panel image, explained by TracIn and by the best
    variant (their scores read back from the saved parts)."""
    inputs, val_set = context.need("influence"), context.val_set
    source = _scores_source(context, inputs, self.config, _depends(context, inputs),
                            log=lambda _: None)
    panels = rankings.local_explanation_examples(inputs.val_regions, 1, val_set.case_ids)
    for name in dict.fromkeys([BASELINE, _shown(record)]):
      blocks = layout.to_class_blocks(source.variant(name)[0])
      for a in panels:
        case, z = val_set.ids[a]
        influence_figures.plot_local_explanation(
            a, blocks, val_set, inputs.val_regions, context.train_set, inputs.train_regions,
            inputs.class_names, self.list_output(context, manifest, panel, variant=name,
                                                 case=case, z=z),
            k=10, global_columns=record["variants"][name]["global_explainers"]["columns"],
            title_suffix=f" — {name}{context.suffix}")

  def load(self, context: base.Context) -> LdsOutputs:
    record = json.loads((context.workdir / self.name / LDS_FILE).read_text())
    manifest = base.Manifest.from_record(base.read_manifest(context.workdir, self.name))
    return LdsOutputs(record, record["recommended"], manifest)


# ----------------------------------------------------------------------------- output


def _interval(c: dict[str, Any], digits: int = 3) -> str:
  if c.get("mean") is None:
    return "n/a"
  if c.get("low") is None:
    return f"{c['mean']:+.{digits}f}"
  return f"{c['mean']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"


def _fmt(c: dict[str, Any]) -> str:
  p = c.get("p_value")
  return f"{_interval(c, 4)} (p {'n/a' if p is None else f'{p:.2g}'})"


def table(record: dict[str, Any]) -> str:
  """The variants as a Markdown table (the README's)."""
  ks = sorted({int(k) for v in record["variants"].values() for k in v.get("removal", {})})
  head = ["variant", "LDS [95% interval]", "LDS - tracin"]
  for k in ks:
    head += [f"k={k}: proponents - random", f"k={k}: opponents - random"]
  head += ["global explainers", "GE share of top-20 proponents", "scores s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, v in record["variants"].items():
    row = [f"`{name}`", _interval(v["lds"]),
           _interval(v["minus_tracin"]) if "minus_tracin" in v else "-"]
    for k in ks:
      test = v.get("removal", {}).get(str(k))
      row += ([_fmt(test["proponents_minus_random"]), _fmt(test["opponents_minus_random"])]
              if test else ["-", "-"])
    ge = v["global_explainers"]
    row += [str(ge["count"]), f"{ge['share_top']:.2f}", f"{v['seconds']:.0f}"]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def plot_lds(record: dict[str, Any], path, *, title_suffix: str = "") -> None:
  """LDS per variant with intervals; beside it, the removal test per variant and k."""
  variants = list(record["variants"])
  ks = sorted({int(k) for v in record["variants"].values() for k in v.get("removal", {})})
  fig = influence_figures.new_figure(figsize=(12 if ks else 6.5, 0.45 * len(variants) + 1.8))
  axes = fig.subplots(1, 2 if ks else 1, squeeze=False)[0]
  y = np.arange(len(variants))[::-1]

  def errorbar(ax, y, c, *, marker="o", **kwargs):
    if c.get("mean") is None:
      return
    lo = c["mean"] - c["low"] if c.get("low") is not None else 0.0
    hi = c["high"] - c["mean"] if c.get("high") is not None else 0.0
    ax.errorbar([c["mean"]], [y], xerr=[[lo], [hi]], fmt=marker, capsize=3, **kwargs)

  ax = axes[0]
  for yy, name in zip(y, variants):
    colour = "C3" if name == record["recommended"] else ("C0" if name != FLOOR else "grey")
    c = record["variants"][name]["lds"]
    errorbar(ax, yy, c, color=colour)
    if c.get("mean") is not None:
      ax.annotate(f"{c['mean']:+.3f}", (c["high"] if c.get("high") is not None else c["mean"],
                                        yy), xytext=(4, 3), textcoords="offset points",
                  fontsize=7, color=colour)
  ax.axvline(0, color="k", lw=0.6)
  ax.set_yticks(y, variants)
  ax.set_xlabel("LDS: mean Spearman rho over validation regions (95% bootstrap interval)")
  ax.set_title(f"LDS, {record['num_subsets']} subsets of {record['fraction']:.0%}, "
               f"{record['num_regions']} regions; red: recommended", fontsize=10)
  if ks:
    ax = axes[1]
    styles = {"proponents_minus_random": ("v", "proponents - random"),
              "opponents_minus_random": ("^", "opponents - random")}
    for n, k in enumerate(ks):
      for m, (key, (marker, label)) in enumerate(styles.items()):
        off = (n * 2 + m - (2 * len(ks) - 1) / 2) * 0.12
        for yy, name in zip(y, variants):
          test = record["variants"][name].get("removal", {}).get(str(k))
          if test:
            errorbar(ax, yy + off, test[key], color=f"C{n * 2 + m}", marker=marker,
                     label=f"k={k}: {label}" if yy == y[0] or name == variants[0] else None)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(y, variants)
    ax.set_xlabel("change of the region's soft Dice, minus random removal")
    ax.set_title(f"Removal test ({len(record['removal_regions'])} regions)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
  fig.suptitle("Which TracIn is faithful?" + title_suffix, fontsize=11)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=110)
