"""The `lds` stage: which TracIn is faithful for segmentation?

Scores variants of TracIn, and two references, by the linear datamodeling score (LDS;
Park et al. 2023, `tracin_jax.checks.lds`) and by the removal test of the validate stage
(`tracin_jax.checks.removal`), and writes under `<workdir>/lds/`:
  - `lds.json`: per variant its LDS (mean over the validation regions of Spearman's rho
    between the soft Dice it predicts for each random training subset and the soft Dice
    measured after retraining on it) with a bootstrap interval, its paired difference from
    the paper's TracIn, the removal test at each k (proponents minus random, opponents minus
    random), its global explainers and their region sizes, and the time its scores took;
    the regions it covers ("all", or a SAMPLED variant's list); with a noise ceiling (below)
    the ceiling itself ("ceiling") and per variant its LDS as a fraction of it
    ("ceiling_fraction", `checks.ceiling.lds_fraction`) and its LDS on the ceiling's subsets
    against either data order ("lds_on_both"); with the metagradient variant, its regions
    ("sampled_regions") and every variant's LDS on them ("lds_on_sampled");
  - `lds_table.md`: the same as a Markdown table (the ceiling's and the sampled regions'
    columns only where they were measured), the ceiling under it;
  - `lds.png`: LDS per variant with intervals, the noise ceiling as a band, and the removal
    test beside it;
  - `local_<variant>_<case>_<slice>.png`: the local explanation panel of the influence
    stage's first panel image, with the paper's TracIn and with the best variant;
  - `retraining/<key>/`: every retraining (random subsets and removal sets), saved as it
    finishes; `retraining_other_order/<key>/`: the noise ceiling's retrainings, the same
    way; `scores/<key>/`: every variant's scores, per checkpoint.

The retrainings replay the run's SGD phase (`training.retrain.Retrainer`, from the last Adam
checkpoint) without the left-out slices; each measures the soft Dice of every present
validation region (its class on its pixels, against the ground truth, the region held fixed:
1 - the loss TracIn explains). They do not depend on the variant, so every variant is scored
on the same retrainings. A variant's prediction for a subset is the sum of the kept slices'
scores (a slice's score for a region is the sum over its regions, as in the validate stage).
Higher scores predict a higher Dice when the slice is kept: TracIn's sign, the metagradient's.

The noise ceiling (`--lds_ceiling_subsets`, default 20, at most M; 0: none): the first of
those subsets are retrained a second time, with another data order (`Retrainer(order_seed=
--lds_ceiling_order_seed)`: the same examples and augmentation draws, each epoch permuted),
and per region the Spearman rho over those subsets of the two orders' soft Dice is the LDS a
method would score if it predicted one retraining exactly (`checks.ceiling.noise_ceiling`):
the ceiling, mean over regions with a bootstrap interval. Each variant's LDS is given as a
fraction of it on the same subsets and regions. The ceiling costs one retraining per subset.

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
  - `random`: seeded Gaussian scores, the floor;
  - `metagradient` (SAMPLED: not in the default `--lds_variants`): the exact metagradient of
    the SGD phase (`training.metagradient.run_metagradients`), the score of slice b for
    region r d(soft Dice of r after the replayed SGD phase)/d(w_b), w_b the weight of slice b
    in every batch it is in; its outputs are the very soft Dice the retrainings measure
    (`checks.removal.RegionSoftDice`, the evaluator's region losses). One forward pass for
    all its regions and one reverse pass per region, so it is scored on
    `--lds_metagradient_regions_per_class` present regions per class only (seeded, listed
    in `lds.json`): after compiling (about 20 s for the tests' tiny UNet) it cost about 0.73
    retrainings per region on one tiny run and 1.7 on the tests' (4 regions, one forward
    pass), so the default 8 per class cost about 17 to 40 retrainings; its memory grows
    with the replayed steps times the parameters. Its LDS is on its regions; every row also
    gives its LDS on those regions (`lds_on_sampled`) for a paired comparison, and the
    metagradient its paired difference from renormalised TracIn there
    (`minus_renormalised`, where renormalised is scored). It has no global explainers,
    local panels or removal test (its scores are per slice, for its regions) and is never
    recommended.

Settings that add nothing (`--lds_ceiling_subsets=0`, no metagradient) are left out of the
fingerprint, so a stage finished before they existed is still reused.
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
from tracin_jax.checks import ceiling as ceiling_lib
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
from tracin_jax.training import metagradient as metagradient_lib
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
    "metagradient": "the exact metagradient of the SGD phase: d(soft Dice of the region "
                    "after training)/d(weight of the slice), on a sample of the regions",
}
# Variants scored on a sample of the validation regions only (their slice scores are NaN
# for the others; their rows say which regions they cover).
SAMPLED = ("metagradient",)
# Not in the default --lds_variants: it costs about 0.7 to 1.7 retrainings per region.
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v not in SAMPLED)


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
      DEFAULT_VARIANTS, "Attribution methods scored (tracin is always scored: the others are "
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
  ceiling_subsets: int = setting(
      20, "The first this many LDS subsets (at most --lds_subsets) are retrained a second "
      "time with another data order, for the LDS's noise ceiling (0: no ceiling; else at "
      "least 3).", flag="lds_ceiling_subsets", minimum=0)
  ceiling_order_seed: int = setting(
      1, "Seed of the noise ceiling's second data order.", flag="lds_ceiling_order_seed",
      minimum=0)
  metagradient_regions_per_class: int = setting(
      8, "Validation regions per class (seeded among the present ones) that the "
      "metagradient variant explains, one reverse pass through the SGD phase each.",
      flag="lds_metagradient_regions_per_class", minimum=1)

  @property
  def num_ceiling_subsets(self) -> int:
    """The subsets the noise ceiling retrains: the first min(ceiling_subsets, M)."""
    return min(self.ceiling_subsets, self.num_subsets)


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


def on_every_region(entry: dict[str, Any]) -> bool:
  """Whether a variant's entry of `lds.json` is scored on every validation region (a
  SAMPLED variant's names its regions instead)."""
  return entry.get("regions", "all") == "all"


def sampled_regions(name: str, presence: np.ndarray, config: LdsConfig
                    ) -> list[tuple[int, int]]:
  """The validation regions [(a, i)] that the SAMPLED variant `name` explains: for the
  metagradient, `metagradient_regions_per_class` present regions per class, seeded
  (`faithfulness.choose_regions` with the stage's seed), from presence [n_val, K] bool."""
  if name == "metagradient":
    return faithfulness.choose_regions(presence, config.metagradient_regions_per_class,
                                       config.seed)
  raise ValueError(f"unknown sampled variant {name!r}; known: {', '.join(SAMPLED)}.")


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
  """The recommended variant: the one with the highest LDS among those scored on every
  region whose paired difference from the paper's TracIn has an interval above 0; else
  TracIn itself."""
  best, best_lds = BASELINE, None
  for name, entry in lds_by_variant.items():
    diff = entry.get("minus_tracin") or {}
    if (name in (BASELINE, FLOOR) or not on_every_region(entry)
        or diff.get("low") is None or diff["low"] <= 0):
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
               log: Callable[[str], None] | None = None, retrainer: _Lazy | None = None):
    self.context, self.inputs, self.config, self.parts = context, inputs, config, parts
    self.retrainer = retrainer
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
    # More variants with scores for every (validation region, training region) pair go
    # above; those on a sample of the validation regions (SAMPLED) in `sampled`.
    raise ValueError(f"unknown variant {name!r}; known: "
                     f"{', '.join(v for v in VARIANTS if v not in SAMPLED)}.")

  def sampled(self, name: str) -> tuple[np.ndarray, list[tuple[int, int]], float]:
    """A SAMPLED variant's [K, n_val, n_train] slice scores (NaN outside its regions), its
    regions [(a, i)] and the seconds its scores took."""
    chosen = sampled_regions(name, self.inputs.presence_test, self.config)
    if name == "metagradient":
      # Its outputs are the soft Dice that the retrainings measure (`removal.evaluator`'s
      # region losses), differentiated through the SGD phase they replay.
      def compute():
        soft_dice = removal.RegionSoftDice(self.inputs.apply_fn, self.context.val_set,
                                             self.inputs.val_regions, chosen)
        _, grads = metagradient_lib.run_metagradients(
            self.retrainer.get(), soft_dice, progress=self.context.progress,
            desc="lds metagradients")
        return grads  # [R_sampled, n_train]
      per_class = self.config.metagradient_regions_per_class
      rows, seconds = self._timed(f"metagradient_{per_class}per_class_seed{self.config.seed}",
                                  compute)
    else:
      raise ValueError(f"unknown sampled variant {name!r}; known: {', '.join(SAMPLED)}.")
    k, n_val = self.inputs.presence_test.shape[1], len(self.val["image"])
    scores = np.full((k, n_val, len(self.train["image"])), np.nan)
    for row, (a, i) in zip(rows, chosen):
      scores[i, a] = row
    return scores, chosen, seconds


class _Retraining:
  """The lds stage's retrainings: the store of their results, the measure of every LDS
  region, and the retrainer, loaded on first use (the random subsets and the removal tests
  share all three)."""

  def __init__(self, context: base.Context, inputs, depends: dict[str, Any], regions, *,
               order_seed: int | None = None, measure: removal.Measure | None = None):
    """`order_seed`: None for the run's data order (`retraining/<key>/`), else another
    order's (`retraining_other_order/<key>/`, keyed by the seed too); `measure`: one to
    share (default: made here)."""
    if order_seed is None:
      root, key = "retraining", {**depends, "measured": regions}
    else:
      root, key = "retraining_other_order", {**depends, "measured": regions,
                                             "order_seed": order_seed}
    self.parts = base.Parts(context.stage_dir(rundir.LDS) / root, key, what="lds retraining")
    self.measure = measure or removal.evaluator(inputs.apply_fn, context.val_set,
                                                inputs.val_regions, regions)
    self.retrainer = _Lazy(lambda: retrain_lib.Retrainer(context.workdir, context.train_set,
                                                         order_seed=order_seed))
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
      slices' scores; NaN for a region a SAMPLED variant does not explain).
    seconds: the time the scores took.
    rows: the indices into the LDS regions of those the variant explains (every one but
      for SAMPLED variants).
  """

  blocks: dict[str, np.ndarray | None]
  slice_scores: dict[str, np.ndarray]
  predicted: dict[str, np.ndarray]
  seconds: dict[str, float]
  rows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def sampled(self) -> list[str]:
    """The variants scored on a sample of the regions only."""
    return [name for name in self.blocks if self.blocks[name] is None]


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
  return _retrain_subsets(context, masks, retraining)


def _retrain_subsets(context: base.Context, masks: np.ndarray, retraining: _Retraining
                     ) -> tuple[np.ndarray, float]:
  """Retrains on each subset of `masks` (or reuses it): ([R, M] soft Dice, seconds)."""
  t0 = time.perf_counter()
  measured = lds_lib.measure_subsets(masks, retraining.retrain_and_measure, retraining.parts,
                                     log=context.log)
  return measured[:, 0, :].T, time.perf_counter() - t0


def _per_class(per_output: np.ndarray, classes: np.ndarray, names) -> dict[str, Any]:
  """{class name: mean and interval of `per_output` [R] over its regions}, `classes` [R]
  each region's class index."""
  return {names[i]: stats.mean_ci(per_output[classes == i]) for i in range(len(names))}


def _score_variants(source: _Scores, variants: list[str], regions, masks: np.ndarray
                    ) -> _Scored:
  scored = _Scored({}, {}, {}, {})
  where = {region: r for r, region in enumerate(regions)}
  for name in variants:
    if name in SAMPLED:
      scored.slice_scores[name], chosen, scored.seconds[name] = source.sampled(name)
      scored.blocks[name] = None
      scored.rows[name] = np.array([where[region] for region in chosen], int)
    else:
      scores, scored.seconds[name] = source.variant(name)
      scored.blocks[name] = layout.to_class_blocks(scores)
      scored.slice_scores[name] = faithfulness.slice_scores(scored.blocks[name])
      scored.rows[name] = np.arange(len(regions))
    scored.predicted[name] = lds_lib.predicted_outputs(
        region_rows(scored.slice_scores[name], regions), masks)
  return scored


@dataclasses.dataclass
class _Ceiling:
  """The noise ceiling's retrainings: the first `num_subsets` LDS subsets retrained with
  another data order.

  Attributes:
    num_subsets: c, the subsets retrained twice.
    measured: [R, c] soft Dice of the LDS regions after the second order's retrainings.
    summary: `lds.json`'s "ceiling".
  """

  num_subsets: int
  measured: np.ndarray
  summary: dict[str, Any]


def _ceiling(context: base.Context, inputs, config: LdsConfig, regions, masks: np.ndarray,
             soft: np.ndarray, retraining: _Retraining, depends: dict[str, Any]
             ) -> _Ceiling | None:
  """Retrains the first subsets with another data order (or reuses them) and measures the
  noise ceiling per region; None without a ceiling (`ceiling_subsets` 0)."""
  c = config.num_ceiling_subsets
  if c == 0:
    return None
  other = _Retraining(context, inputs, depends, regions, order_seed=config.ceiling_order_seed,
                      measure=retraining.measure)
  context.log(f"LDS noise ceiling: the first {c} subsets retrained again with data order "
              f"seed {config.ceiling_order_seed}.")
  measured, seconds = _retrain_subsets(context, masks[:c], other)  # [R, c]
  found = ceiling_lib.noise_ceiling(soft[:, :c].T, measured.T,
                                    num_bootstrap=config.num_bootstrap, seed=config.seed)
  per_output = found.pop("per_output")
  names = inputs.class_names
  summary = {**found, "num_subsets": c, "order_seed": config.ceiling_order_seed,
             "retraining_seconds": seconds,
             "per_class": _per_class(per_output, np.array([k for _, k in regions], int),
                                     names),
             "measure": "per validation region: Spearman rho over the first subsets between "
                        "its soft Dice after retraining in the run's data order and after "
                        "retraining in another; mean over regions"}
  context.log(f"LDS noise ceiling ({c} subsets): {_interval(found)}.")
  return _Ceiling(c, measured, summary)


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


def _region_names(context: base.Context, inputs, regions) -> list[list[Any]]:
  """[[case, slice, class]] of validation regions [(a, i)], as `lds.json` lists them."""
  ids, names = context.val_set.ids, inputs.class_names
  return [[ids[a][0], int(ids[a][1]), names[i]] for a, i in regions]


def _lds(config: LdsConfig, predicted: np.ndarray, measured: np.ndarray) -> dict[str, Any]:
  """`lds_lib.lds` with the stage's bootstrap, without the per-region rhos."""
  score = lds_lib.lds(predicted, measured, num_bootstrap=config.num_bootstrap,
                      seed=config.seed)
  score.pop("per_output")
  return score


def _lds_entry(context: base.Context, inputs, config: LdsConfig, name: str, regions,
               scored: _Scored, soft: np.ndarray, ceiling: _Ceiling | None = None
               ) -> dict[str, Any]:
  """A variant's entry of `lds.json` but its removal test: LDS, per class, difference from
  TracIn, global explainers, seconds; with a `ceiling`, its LDS as a fraction of it and on
  both data orders; the LDS on each SAMPLED variant's regions, and a SAMPLED variant's
  difference from renormalised TracIn on its regions."""
  names = inputs.class_names
  rows = scored.rows[name]
  predicted, measured = scored.predicted[name][rows], soft[rows]
  score = lds_lib.lds(predicted, measured, num_bootstrap=config.num_bootstrap,
                      seed=config.seed)
  per_output = score.pop("per_output")
  classes = np.array([regions[r][1] for r in rows], int)
  entry = {"description": VARIANTS[name], "seconds": scored.seconds[name], "lds": score,
           "lds_per_class": _per_class(per_output, classes, names)}
  # Which regions the row covers: "all" the LDS regions, or a SAMPLED variant's own.
  entry["regions"] = (_region_names(context, inputs, [regions[r] for r in rows])
                      if name in SAMPLED else "all")
  if name != BASELINE:
    entry["minus_tracin"] = lds_lib.lds_difference(
        predicted, scored.predicted[BASELINE][rows], measured,
        num_bootstrap=config.num_bootstrap, seed=config.seed)
  if name in SAMPLED and "renormalised" in scored.predicted:
    entry["minus_renormalised"] = lds_lib.lds_difference(
        predicted, scored.predicted["renormalised"][rows], measured,
        num_bootstrap=config.num_bootstrap, seed=config.seed)
  if ceiling is not None:
    c = ceiling.num_subsets
    entry["ceiling_fraction"] = ceiling_lib.lds_fraction(
        predicted[:, :c], measured[:, :c].T, ceiling.measured[rows].T,
        num_bootstrap=config.num_bootstrap, seed=config.seed)
    entry["lds_on_both"] = {"num_subsets": c,
                            "run_order": _lds(config, predicted[:, :c], measured[:, :c]),
                            "other_order": _lds(config, predicted[:, :c],
                                                ceiling.measured[rows])}
  if scored.sampled():
    entry["lds_on_sampled"] = {other: _lds(config, scored.predicted[name][scored.rows[other]],
                                           soft[scored.rows[other]])
                               for other in scored.sampled()}
  influence_config = context.configs.get("influence") or influence_stage.InfluenceConfig()
  entry["global_explainers"] = None if scored.blocks[name] is None else global_explainer_stats(
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
      if name not in config.removal_skip and name not in SAMPLED:
        tests.setdefault(name, {})[str(k)] = _removal_test(
            context, inputs, config, k, name, chosen, regions, scored.slice_scores[name],
            retraining)
  return chosen, tests, time.perf_counter() - t0


def _shown(record: dict[str, Any]) -> str:
  """The variant explained beside TracIn: the recommended one, else the best other by LDS."""
  recommended = record["recommended"]
  ranked = sorted((v for v, entry in record["variants"].items()
                   if v not in (BASELINE, FLOOR) and on_every_region(entry)),
                  key=lambda v: -record["variants"][v]["lds"]["mean"])
  return recommended if recommended != BASELINE else (ranked[0] if ranked else BASELINE)


@base.register_stage
class LdsStage(base.StageBase):
  """Linear datamodeling score and removal test of TracIn variants."""

  name, config_cls, needs = "lds", LdsConfig, ("influence",)

  writes = (
      base.Output(LDS_FILE, "per variant: LDS with bootstrap interval, paired difference "
                  "from TracIn, removal test at each k, global explainers and their region "
                  "sizes, run time, the regions it covers, its fraction of the noise "
                  "ceiling; the noise ceiling"),
      base.Output(TABLE_FILE, "the variants' table in Markdown"),
      base.Output(FIGURE, "LDS of each attribution method on {num_subsets} random "
                  "{fraction:.0%} subsets of the training slices (mean over {num_regions} "
                  "validation regions, 95% bootstrap interval; grey band: the noise ceiling, "
                  "where measured), and the removal test: Dice "
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
    c = self.config.num_ceiling_subsets
    if 0 < c < 3:
      raise SettingsError(
          f"--lds_ceiling_subsets={self.config.ceiling_subsets}: the noise ceiling would "
          f"retrain {c} subset(s) (at most --lds_subsets={self.config.num_subsets}); a rank "
          "correlation over subsets needs at least 3 (0: no ceiling).")

  def fingerprint_settings(self, context: base.Context) -> dict:
    """Every setting, but those of the noise ceiling without one (`ceiling_subsets` 0) and
    of the metagradient variant without it: with them at values that add nothing, a
    finished stage keeps its fingerprint."""
    settings = super().fingerprint_settings(context)
    if self.config.ceiling_subsets == 0:
      settings.pop("ceiling_subsets")
      settings.pop("ceiling_order_seed")
    if "metagradient" not in self.config.variants:
      settings.pop("metagradient_regions_per_class")
    return settings

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
    # 1b. The noise ceiling: the first subsets retrained again in another data order.
    ceiling = _ceiling(context, inputs, config, regions, masks, soft, retraining, depends)
    # 2. Each variant's scores, its LDS and its paired difference from TracIn (a SAMPLED
    # variant's on its regions), its fraction of the ceiling.
    scored = _score_variants(_scores_source(context, inputs, config, depends,
                                            retrainer=retraining.retrainer),
                             variants, regions, masks)
    comparison = _compare_with_influence(context, inputs, scored.blocks)
    summary = {name: _lds_entry(context, inputs, config, name, regions, scored, soft,
                                ceiling)
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
    found = {"retraining_seconds": retrain_seconds, "removal_seconds": removal_seconds}
    if ceiling is not None:
      found["ceiling"] = ceiling.summary
    if scored.sampled():
      found["sampled_regions"] = {name: summary[name]["regions"] for name in scored.sampled()}
    record = self._record(context, regions, chosen, {
        **found, **comparison, "recommended": recommended, "variants": summary})
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


def _count(n: int, what: str) -> str:
  return f"{n} {what}" + ("" if n == 1 else "s")


def _fraction(c: dict[str, Any] | None) -> str:
  if not c or c.get("fraction") is None:
    return "n/a"
  if c.get("low") is None:
    return f"{c['fraction']:.2f}"
  return f"{c['fraction']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"


def table(record: dict[str, Any]) -> str:
  """The variants as a Markdown table (the README's); with a noise ceiling, it follows
  the table, and the rows gain the LDS as a fraction of it and on both data orders; with
  SAMPLED variants, which regions each row covers and the LDS on their regions."""
  ks = sorted({int(k) for v in record["variants"].values() for k in v.get("removal", {})})
  ceiling, sampled = record.get("ceiling"), list(record.get("sampled_regions", {}))
  head = ["variant"] + (["regions"] if sampled else []) + ["LDS [95% interval]",
                                                            "LDS - tracin"]
  if ceiling:
    head += ["LDS / ceiling [95%]",
             f"LDS on both orders ({ceiling['num_subsets']} subsets): run / other"]
  for other in sampled:
    head += [f"LDS on {other}'s regions", f"{other} - renormalised, its regions"]
  for k in ks:
    head += [f"k={k}: proponents - random", f"k={k}: opponents - random"]
  head += ["global explainers", "GE share of top-20 proponents", "scores s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, v in record["variants"].items():
    row = [f"`{name}`"]
    if sampled:
      row.append("all" if on_every_region(v) else f"{len(v['regions'])} sampled")
    row += [_interval(v["lds"]), _interval(v["minus_tracin"]) if "minus_tracin" in v else "-"]
    if ceiling:
      both = v["lds_on_both"]
      row += [_fraction(v["ceiling_fraction"]),
              f"{_interval(both['run_order'])} / {_interval(both['other_order'])}"]
    for other in sampled:
      row += [_interval(v["lds_on_sampled"][other]),
              _interval(v["minus_renormalised"]) if name == other and "minus_renormalised"
              in v else "-"]
    for k in ks:
      test = v.get("removal", {}).get(str(k))
      row += ([_fmt(test["proponents_minus_random"]), _fmt(test["opponents_minus_random"])]
              if test else ["-", "-"])
    ge = v["global_explainers"]
    row += ([str(ge["count"]), f"{ge['share_top']:.2f}"] if ge else ["-", "-"])
    row.append(f"{v['seconds']:.0f}")
    lines.append("| " + " | ".join(row) + " |")
  if ceiling:
    lines += ["", f"Noise ceiling of the LDS (the first {ceiling['num_subsets']} subsets "
              f"retrained again with data order seed {ceiling['order_seed']}): "
              f"{_interval(ceiling)} over {ceiling['n_outputs']} regions."]
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
  ceiling = record.get("ceiling")
  if ceiling and ceiling.get("mean") is not None:
    if ceiling.get("low") is not None:
      ax.axvspan(ceiling["low"], ceiling["high"], color="grey", alpha=0.2, lw=0)
    ax.axvline(ceiling["mean"], color="grey", ls="--", lw=1,
               label=f"noise ceiling ({ceiling['num_subsets']} subsets, 95% interval)")
    ax.legend(fontsize=7, loc="best")
  ax.axvline(0, color="k", lw=0.6)
  ax.set_yticks(y, [name if on_every_region(record["variants"][name]) else
                    f"{name} ({_count(len(record['variants'][name]['regions']), 'region')})"
                    for name in variants])
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
