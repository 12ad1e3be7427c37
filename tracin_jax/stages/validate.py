"""The `validate` stage: is TracIn's influence real?

Reads the influence stage's scores and writes under `<workdir>/validate/`:
  - `retraining.json` and `retraining.png`: for `regions_per_class` validation regions of
    each class, the change of the region's Dice after retraining the SGD phase without the
    region's top-k proponent slices, without its top-k opponent slices, and without k random
    slices (`num_random` random sets, shared by all regions); mean changes with 95%
    confidence intervals, paired comparisons with random removal, and the rank correlation
    between the TracIn score of each removed set and the loss change it actually caused;
  - `randomisation_check.json` and `randomisation_check.png`: the train-influence matrices
    with the trained checkpoints against the same computation with randomly initialised
    networks (model-parameter randomisation), on a seeded subset of training slices: the
    class-block structure of each, and how alike they rank each class's training regions;
    then cascading randomisation (the checkpoints' layers re-initialised from the output
    layer down, one more at each step) and TracIn without the output layer's parameters
    (`randomisation_cascade.png`): do the class blocks come from the output layer alone?
  - `retraining/<key>/` and `randomisation/<key>/`: each retraining's and each random
    network's result, saved as it finishes (an interrupted stage resumes; another k keeps
    the earlier results beside the new ones).

Retraining (`training.retrain.Retrainer`) starts from the last Adam checkpoint and replays
the run's SGD epochs in the run's order without the removed slices. A region's Dice is the
soft Dice of its class on the region's pixels (1 - the loss TracIn explains, eq 6), against
the ground truth, with the region held fixed; the hard Dice of that class on the whole slice
is recorded beside it. Each retrained model is measured with its own parameters and state.
Changes are against the replay with nothing removed, which is checked to reproduce the
run's final parameters. The removal test itself (its retrainings, the measure, the
summaries) is `tracin_jax.checks.removal`; this stage runs it on the influence stage's
scores and writes its files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable

import numpy as np
from flax import nnx

from tracin_jax import models
from tracin_jax import outputs
from tracin_jax import params as params_lib
from tracin_jax import rundir
from tracin_jax.checks import removal
from tracin_jax.influence import core
from tracin_jax.influence import layout
from tracin_jax.influence import segmentation
from tracin_jax.interpret import faithfulness
from tracin_jax.interpret import figures
from tracin_jax.saliency import layers as saliency_layers
from tracin_jax.settings import SettingsError
from tracin_jax.settings import setting
from tracin_jax.stages import base
from tracin_jax.training import retrain as retrain_lib
from tracin_jax.training import train as train_lib
from tracin_jax.types import Checkpoint

RETRAINING_FILE = rundir.RETRAINING_FILE
RETRAINING_FIGURE = rundir.RETRAINING_FIGURE
RANDOMISATION_FILE = rundir.RANDOMISATION_FILE
RANDOMISATION_FIGURE = rundir.RANDOMISATION_FIGURE
CASCADE_FIGURE = rundir.CASCADE_FIGURE


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
  """Settings of the validate stage."""

  regions_per_class: int = setting(7, "Validation regions per class checked by retraining.",
                                   minimum=1)
  num_removed: int = setting(20, "k: training slices removed per retraining (proponents, "
                             "opponents or random).", minimum=1)
  num_random: int = setting(5, "Random removal sets, shared by all checked regions.",
                            minimum=0)
  seed: int = setting(0, "Seed of the checked regions, random sets and randomisation subset.",
                      flag="validate_seed")
  from_epoch: int | None = setting(
      None, "Checkpoint that retraining starts from (unset: the last Adam epoch).",
      flag="retrain_from_epoch", minimum=1)
  randomisation_examples: int = setting(
      160, "Training slices in the randomisation check (0: all).", minimum=0)


@dataclasses.dataclass
class ValidateOutputs:
  """The validate stage's result.

  Attributes:
    summary: the retraining summary, as in `retraining.json` (None where undefined).
    reproduces_run: whether the replay with nothing removed reproduced the run bit for bit.
    randomisation: the randomisation check as `interpret.faithfulness` gives its numbers
      (floats, NaN where undefined; `randomisation_check.json` has null there): "trained"
      and "randomised" (class-block structure of each train-influence),
      "ranking_similarity" (of the two), "cascade" ({"order", "steps"}) and
      "without_output_layer".
    manifest: what the stage wrote.
  """

  summary: dict[str, Any]
  reproduces_run: bool
  randomisation: dict[str, Any]
  manifest: base.Manifest


def _check_settings(config: ValidateConfig, n_train: int, workdir) -> None:
  if config.num_removed > n_train // 2:
    raise SettingsError(
        f"--num_removed={config.num_removed}: must be between 1 and half of the {n_train} "
        "training slices (the proponent and opponent sets of a region must not overlap).")
  if config.randomisation_examples == 1:
    raise SettingsError("--randomisation_examples=1: must be at least 2 (or 0 for all "
                        "training slices).")
  run = train_lib.load_config(workdir)
  if config.from_epoch is not None and not 0 < config.from_epoch < run.num_epochs:
    raise SettingsError(f"--retrain_from_epoch={config.from_epoch}: the run in {workdir} has "
                        f"epochs 1-{run.num_epochs}; retraining must start before the last.")
  if (config.from_epoch is not None
      and config.from_epoch < run.optimizer.adam_epochs):
    raise SettingsError(
        f"--retrain_from_epoch={config.from_epoch}: the run switches from Adam to SGD after "
        f"epoch {run.optimizer.adam_epochs}; retraining with slices removed must start there "
        "or later (the switch is counted in steps, and removal changes the steps per epoch).")


def _jobs(regions, slice_scores, n_train: int, config: ValidateConfig
          ) -> list[removal.RemovalJob]:
  return removal.removal_jobs(regions, slice_scores, n_train, config.num_removed,
                              config.num_random, config.seed)


_summarise = removal.summarise_removals


def _verdict(summary: dict[str, Any]) -> str:
  """One honest sentence on the expected ordering (proponents < random < opponents)."""
  d = {k: summary["dice_change"][k]["mean"] for k in removal.REMOVALS}
  if any(v is None for v in d.values()):
    return "not enough results to compare the removals"
  order_ok = d["proponents"] < d["random"] < d["opponents"]
  pr, orr = summary["proponents_minus_random"], summary["opponents_minus_random"]
  sig = [f"proponents - random {pr['mean']:+.4f} (p {_p(pr['p_value'])})",
         f"opponents - random {orr['mean']:+.4f} (p {_p(orr['p_value'])})"]
  head = ("the mean Dice changes are in the expected order (proponents < random < "
          "opponents)" if order_ok else
          "the mean Dice changes are not in the expected order (proponents < random < "
          "opponents)")
  head += (f": proponents {d['proponents']:+.4f}, random {d['random']:+.4f}, opponents "
           f"{d['opponents']:+.4f}")
  return f"{head}; paired: " + "; ".join(sig)


def _p(p) -> str:
  return "n/a" if p is None else f"{p:.2g}"


# ----------------------------------------------------------------------------- the removal test


@dataclasses.dataclass(frozen=True)
class _RemovalPlan:
  """The removal test on the influence stage's scores, all but its retrainings: cheap to
  build, so `compute` builds it to run the retrainings and `write` to read their results.

  Attributes:
    regions: [(validation index a, class index i)] the checked regions.
    scores: [K, n_val, n_train] each validation region's score for each training slice.
    jobs: the retrainings (`removal.removal_jobs`).
    parts: where each retraining's result is saved as it finishes.
  """

  regions: list[tuple[int, int]]
  scores: np.ndarray
  jobs: list[removal.RemovalJob]
  parts: base.Parts


def _checked_regions(inputs, config: ValidateConfig) -> list[tuple[int, int]]:
  return faithfulness.choose_regions(inputs.presence_test, config.regions_per_class,
                                     config.seed)


def _removal_plan(context: base.Context, inputs, config: ValidateConfig,
                  regions: list[tuple[int, int]]) -> _RemovalPlan:
  scores = faithfulness.slice_scores(inputs.test_blocks)  # [K, n_val, n_train]
  jobs = _jobs(regions, scores, len(context.train_set), config)
  # A retraining's result depends on the run, where it starts and which regions it
  # measures (the parts' key), and on what it removes (in each part's name).
  parts = base.Parts(context.stage_dir(rundir.VALIDATE) / "retraining",
                     {"influence": inputs.fingerprint, "from_epoch": config.from_epoch,
                      "regions": regions}, what="retraining")
  return _RemovalPlan(regions, scores, jobs, parts)


def _retraining_check(context: base.Context, inputs, config: ValidateConfig
                      ) -> tuple[dict[str, Any], bool]:
  """Runs (or resumes) the removal test's retrainings: (the summary, whether the replay
  with nothing removed reproduced the run)."""
  log, names, train_set = context.log, inputs.class_names, context.train_set
  regions = _checked_regions(inputs, config)
  counts = [sum(1 for _, i in regions if i == c) for c in range(len(names))]
  log("Validation regions checked: " + ", ".join(f"{n} {c}" for n, c in zip(names, counts))
      + f"; k = {config.num_removed} of {len(train_set)} training slices removed each "
      "time.")
  plan = _removal_plan(context, inputs, config, regions)
  measure = removal.evaluator(inputs.apply_fn, context.val_set, inputs.val_regions, regions)
  t0 = time.perf_counter()
  results = removal.run_retrainings(
      plan.jobs, measure, inputs.params, plan.parts,
      lambda: retrain_lib.Retrainer(context.workdir, train_set, from_epoch=config.from_epoch),
      progress=context.progress, log=log)
  summary, _ = _summarise(plan.jobs, results, regions, plan.scores, names)
  log(f"Retraining check: {_verdict(summary)}.")
  agree = summary["sign_agreement"]["all"]
  log("Spearman rho of TracIn score against the actual loss change over removed sets: "
      f"{_fmt_rho(summary['rank_correlation']['all'])}; same sign in "
      + ("n/a" if agree["share"] is None else
         f"{agree['share']:.0%} of {agree['n']} (binomial p {_p(agree['p_value'])})") + ".")
  log(f"[retraining check took {time.perf_counter() - t0:.0f} s]")
  return summary, bool(results["baseline"].get("reproduces_run"))


def _retraining_record(context: base.Context, inputs, config: ValidateConfig,
                       result: ValidateOutputs) -> tuple[dict[str, Any], dict[str, Any]]:
  """(`retraining.json`'s contents, the per-region arrays of its figure): the result's
  summary, and the saved retrainings of the removal test, read back."""
  train_set, names = context.train_set, inputs.class_names
  plan = _removal_plan(context, inputs, config, _checked_regions(inputs, config))
  results = removal.saved_retrainings(plan.jobs, plan.parts)
  _, arrays = _summarise(plan.jobs, results, plan.regions, plan.scores, names)
  regions = []
  for r, (a, i) in enumerate(plan.regions):
    case, z = context.val_set.ids[a]
    regions.append({
        "case": case, "slice": z, "class": names[i],
        "baseline_region_dice": results["baseline"]["region_dice"][r],
        "dice_change": {name: outputs.json_ready(arrays["effect"][name][r])
                        for name in removal.REMOVALS},
        "proponents": [list(train_set.ids[b]) for b in _jobs_for(plan.jobs, "proponents", r)],
        "opponents": [list(train_set.ids[b]) for b in _jobs_for(plan.jobs, "opponents", r)]})
  record = {
      "dataset": context.data_name, "num_removed": config.num_removed,
      "num_random": config.num_random, "num_train_slices": len(train_set),
      "baseline_reproduces_run": result.reproduces_run,
      "dice": "soft Dice of the region's class on the region's pixels (1 - the TracIn "
              "loss); changes are retrained minus baseline replay, negative = worse",
      "verdict": _verdict(result.summary), **result.summary, "regions": regions,
      "random_sets": [[list(train_set.ids[b]) for b in job.removed]
                      for job in plan.jobs if job.removal == "random"]}
  return record, arrays


# ----------------------------------------------------------------------------- randomisation


@dataclasses.dataclass(frozen=True)
class _RandomisationPlan:
  """The randomisation check's seeded subset of training slices and the store of its
  parts: cheap to build, by `compute` and again by `write`.

  Attributes:
    index: [m] the subset's training slices, sorted.
    trained: [K, m, K * m] the influence stage's train-influence of the subset.
    presence: [m, K] bool, the subset's present regions.
    run_config: the training run's settings (its model).
    parts: each network's train-influence [m, K, m, K] of the subset, saved as it finishes.
    num: the checkpoints (and as many random networks).
  """

  index: np.ndarray
  trained: np.ndarray
  presence: np.ndarray
  run_config: Any
  parts: base.Parts
  num: int


def _randomisation_plan(context: base.Context, inputs, config: ValidateConfig
                        ) -> _RandomisationPlan:
  n = len(context.train_set)
  m = min(config.randomisation_examples or n, n)
  rng = np.random.default_rng(config.seed)
  index = np.sort(rng.choice(n, m, replace=False))
  run_config = train_lib.load_config(context.workdir)
  parts = base.Parts(context.stage_dir(rundir.VALIDATE) / "randomisation",
                     {"influence": inputs.fingerprint, "seed": config.seed,
                      "examples": config.randomisation_examples, "model": run_config.model},
                     what="randomisation check")
  return _RandomisationPlan(index, layout.subset(inputs.train_blocks, index),
                            inputs.presence_train[index], run_config, parts,
                            len(inputs.learning_rates))


def _summed(plan: _RandomisationPlan, prefix: str,
            part: Callable[[str, int], np.ndarray]) -> np.ndarray:
  """[K, m, K * m] class blocks of the sum over checkpoints t of `part(name, t)`, the part
  named `<prefix>network<t + 1>`, NaN where a region is absent."""
  total = None
  for t in range(plan.num):
    value = part(f"{prefix}network{t + 1}", t)
    total = value if total is None else total + value
  return layout.to_class_blocks(segmentation.mask_absent(total, plan.presence, plan.presence))


class _Randomisation:
  """The randomisation check's TracIn of the subset, each checkpoint's part saved. Random
  networks (seeds 1000 + seed + t) and the trained checkpoints are built or loaded only when
  a part that needs them is not saved yet, and then once."""

  def __init__(self, context: base.Context, inputs, config: ValidateConfig,
               plan: _RandomisationPlan):
    self.context, self.inputs, self.config, self.plan = context, inputs, config, plan
    train_set, index = context.train_set, plan.index
    self.examples = {"image": train_set.images[index],
                     "target": train_set.labels[index].astype(np.int32),
                     "region": inputs.train_regions[index]}
    self.loss_fn = segmentation.make_region_losses(inputs.apply_fn)
    self._loaded: dict[Any, Any] = {}

  def random_network(self, t: int) -> Checkpoint:
    if t not in self._loaded:
      model = train_lib.build_model(self.plan.run_config.model, seed=1000 + self.config.seed + t)
      _, params, state = models.functional(model)
      self._loaded[t] = Checkpoint(params, self.inputs.learning_rates[t], state)
    return self._loaded[t]

  def trained_checkpoint(self, t: int) -> Checkpoint:
    if "trained" not in self._loaded:
      self._loaded["trained"] = train_lib.tracin_checkpoints(self.context.workdir,
                                                             self.inputs.epochs)[1]
    return self._loaded["trained"][t]

  def tracin(self, ckpt: Checkpoint, **kwargs) -> np.ndarray:
    return core.influence(self.loss_fn, [ckpt], self.examples,
                          memory_budget_bytes=self.context.memory_budget_bytes,
                          progress=self.context.progress, **kwargs)

  def summed(self, prefix: str, label: str, compute: Callable[[int], np.ndarray]
             ) -> np.ndarray:
    """Class blocks of the sum over checkpoints of compute(t), each part saved."""
    parts, num = self.plan.parts, self.plan.num
    return _summed(self.plan, prefix, lambda name, t: parts.get(
        name, lambda: compute(t), label=f"{label}, checkpoint {t + 1}/{num}"))

  def summary(self, blocks: np.ndarray) -> dict[str, Any]:
    st = faithfulness.class_block_structure(blocks)
    sim = faithfulness.ranking_similarity(self.plan.trained, blocks)
    return {"auc": st["auc"], "same_class_top": st["same_class_top"],
            "median_rho": sim["median_rho"], "top_overlap": sim["top_overlap"]}

  def partly_random(self, groups: tuple[str, ...], t: int) -> np.ndarray:
    """TracIn at checkpoint t with its parameter `groups` those of random network t."""
    ckpt = self.trained_checkpoint(t)
    mixed = params_lib.replace_groups(ckpt.params, self.random_network(t).params, groups)
    return self.tracin(ckpt._replace(params=mixed))

  def cascade(self, order: tuple[str, ...], randomised: np.ndarray) -> dict[str, Any]:
    """The checkpoints' parameter groups `order[:step]` replaced by the random networks',
    one more at each step (all of them: `randomised`, the check itself)."""
    steps = []
    for step in range(1, len(order)):  # all groups randomised is the check itself
      blocks = self.summed(f"cascade{step}_", f"cascade {step}/{len(order)} "
                           f"({order[step - 1]})",
                           functools.partial(self.partly_random, order[:step]))
      steps.append({"randomised": list(order[:step]), **self.summary(blocks)})
    steps.append({"randomised": list(order), **self.summary(randomised)})
    return {"order": list(order), "steps": steps}

  def without(self, output_layer: str) -> dict[str, Any]:
    """TracIn of the trained checkpoints with the output layer's parameters left out."""
    keep = params_lib.as_predicate(output_layer)
    blocks = self.summed("without_output_layer_", f"TracIn without {output_layer}",
                         lambda t: self.tracin(self.trained_checkpoint(t),
                                               params_filter=lambda path: not keep(path)))
    return {"output_layer": output_layer, **self.summary(blocks)}


def _randomisation_check(context: base.Context, inputs, config: ValidateConfig
                         ) -> dict[str, Any]:
  """Train-influence of a seeded subset with trained and with random checkpoints; then the
  cascade from the head down, and TracIn without the output layer (the result's
  `randomisation`)."""
  t0 = time.perf_counter()
  plan = _randomisation_plan(context, inputs, config)
  check = _Randomisation(context, inputs, config, plan)
  randomised = check.summed("", "random networks",
                            lambda t: check.tracin(check.random_network(t)))
  # Cascading randomisation from the head down (Adebayo et al.), and TracIn without the
  # output layer's parameters: do the class blocks come from the output layer alone?
  order = _cascade_order(plan.run_config, context.train_set.images[:1])
  cascade = check.cascade(order, randomised)
  without = check.without(order[0])
  found = {"trained": faithfulness.class_block_structure(plan.trained),
           "randomised": faithfulness.class_block_structure(randomised),
           "ranking_similarity": faithfulness.ranking_similarity(plan.trained, randomised),
           "cascade": cascade, "without_output_layer": without}
  _log_randomisation(context.log, len(plan.index), found)
  context.log(f"[randomisation check took {time.perf_counter() - t0:.0f} s]")
  return found


def _log_randomisation(log: Callable[[str], None], num_examples: int,
                       check: dict[str, Any]) -> None:
  ts, rs, sim = check["trained"], check["randomised"], check["ranking_similarity"]
  cascade, without = check["cascade"], check["without_output_layer"]
  log(f"Randomisation check on {num_examples} training slices: class-block AUC "
      f"trained {ts['auc']:.3f}, randomised {rs['auc']:.3f} (0.5 = no class structure); "
      f"same-class share of top-10 proponents {ts['same_class_top']:.2f} vs "
      f"{rs['same_class_top']:.2f}; within a class, trained and randomised rankings agree "
      f"with median Spearman rho {sim['median_rho']:.2f}, top-10 overlap "
      f"{sim['top_overlap']:.2f} (chance {sim['top_overlap_chance']:.2f}).")
  log("Cascading randomisation (class-block AUC, median rho to trained): "
      + "; ".join(f"{s['randomised'][-1]} {s['auc']:.3f}, {s['median_rho']:.2f}"
                  for s in cascade["steps"])
      + f". Without the output layer ({without['output_layer']}): AUC "
      f"{without['auc']:.3f}, median rho to full TracIn {without['median_rho']:.2f}.")


def _randomisation_record(context: base.Context, index: np.ndarray,
                          check: dict[str, Any]) -> dict[str, Any]:
  """`randomisation_check.json`'s contents (numbers JSON-ready: null where undefined)."""
  cascade, without = check["cascade"], check["without_output_layer"]
  return {
      "dataset": context.data_name,
      "num_examples": len(index),
      "train_slices": [list(context.train_set.ids[b]) for b in index],
      "measure": "class-block AUC: probability that a same-class pair of regions (different "
                 "slices) has a larger self-influence-normalised TracIn than a pair of "
                 "different classes; 0.5 means no class structure",
      "trained": {k: outputs.json_ready(v) for k, v in check["trained"].items()},
      "randomised": {k: outputs.json_ready(v) for k, v in check["randomised"].items()},
      "ranking_similarity": {k: outputs.json_ready(v)
                             for k, v in check["ranking_similarity"].items()},
      "ranking_similarity_measure": "per region, over the same-class training regions of "
                                    "other slices: Spearman rho between the trained and "
                                    "the randomised scores, and the overlap of their "
                                    "top-10 proponents (chance: 10 / candidates); a "
                                    "ranking that survives randomisation does not explain "
                                    "what was learned",
      "randomised_checkpoints": "fresh initialisations (seeds 1000 + seed + t) with the "
                                "trained checkpoints' learning rates",
      "cascade": {"order": cascade["order"],
                  "steps": [{k: outputs.json_ready(v) if k != "randomised" else v
                             for k, v in st.items()} for st in cascade["steps"]],
                  "measure": "step s: the s parameter groups nearest the output replaced by "
                             "those of the random networks (trained state kept); auc and "
                             "same_class_top as above; median_rho and top_overlap compare "
                             "the ranking within a class with the trained checkpoints'"},
      "without_output_layer": {k: outputs.json_ready(v) if k != "output_layer" else v
                               for k, v in without.items()}}


def _as_computed(record: dict[str, Any]) -> dict[str, Any]:
  """A record of `randomisation_check.json` with its numbers as computed: JSON's null (an
  undefined number) back to NaN; its names (lists, strings) as they are."""
  return {k: float("nan") if v is None else v for k, v in record.items()}


def _cascade_order(run_config, image: np.ndarray) -> tuple[str, ...]:
  """The model's parameter groups from the output layer back to the input (traced on an
  abstract model: nothing is initialised or compiled)."""
  model = nnx.eval_shape(lambda: train_lib.build_model(run_config.model, seed=0))
  return tuple(reversed(saliency_layers.NnxModel(model).param_groups_in_call_order(image)))


# ----------------------------------------------------------------------------- the stage


@base.register_stage
class ValidateStage(base.StageBase):
  """Retraining without proponents, opponents and random slices; randomisation check."""

  name, config_cls, needs = "validate", ValidateConfig, ("influence",)

  writes = (
      base.Output(RETRAINING_FIGURE, "Change of each checked region's soft Dice after "
                  "retraining the SGD phase without its top {num_removed} proponent slices, "
                  "without random slices and without its top opponent slices, with 95% "
                  "intervals; and the TracIn score of each removed set against the loss "
                  "change it caused.", figure=True),
      base.Output(RETRAINING_FILE, "the retraining check: per checked region the Dice "
                  "changes of each removal, their means with 95% intervals, paired tests "
                  "against random removal, rank correlation and sign agreement of TracIn "
                  "scores with the actual loss changes"),
      base.Output(RANDOMISATION_FIGURE, "Train-influence of a seeded subset of training "
                  "slices with the trained checkpoints and with randomly initialised "
                  "networks, with their class-block AUC.", figure=True),
      base.Output(CASCADE_FIGURE, "Cascading randomisation of TracIn: the checkpoints' "
                  "layers re-initialised from the output layer down, one more at each step; "
                  "the class-block AUC of the train-influence and how alike it ranks each "
                  "class's training regions to the trained checkpoints' ranking; beside "
                  "them, TracIn with the output layer's parameters left out of the "
                  "gradients.", figure=True),
      base.Output(RANDOMISATION_FILE, "the randomisation check: class-block structure of "
                  "trained and randomised train-influence, and their ranking similarity"),
  )

  def compute(self, context: base.Context) -> ValidateOutputs:
    """The removal test's retrainings, then the randomisation check (each resumable)."""
    _check_settings(self.config, len(context.train_set), context.workdir)
    inputs = context.need("influence")
    summary, reproduces = _retraining_check(context, inputs, self.config)
    randomisation = _randomisation_check(context, inputs, self.config)
    return ValidateOutputs(summary, reproduces, randomisation, self.manifest())

  def write(self, context: base.Context, result: ValidateOutputs) -> base.Manifest:
    manifest = self.manifest()
    inputs = context.need("influence")
    self._write_retraining(context, manifest, inputs, result)
    self._write_randomisation(context, manifest, inputs, result)
    ts, rs = result.randomisation["trained"], result.randomisation["randomised"]
    manifest.headline.update({
        "baseline_reproduces_run": result.reproduces_run,
        "num_removed": self.config.num_removed,
        "dice_change": result.summary["dice_change"],
        "proponents_minus_random": result.summary["proponents_minus_random"],
        "opponents_minus_random": result.summary["opponents_minus_random"],
        "rank_correlation": result.summary["rank_correlation"]["all"],
        "class_block_auc": {
            "trained": ts["auc"], "randomised": rs["auc"],
            "without_output_layer": result.randomisation["without_output_layer"]["auc"]}})
    context.log(f"Wrote {context.stage_dir(self.name)}: {RETRAINING_FILE}, "
                f"{RETRAINING_FIGURE}, {RANDOMISATION_FILE}, {RANDOMISATION_FIGURE}.")
    return manifest

  def _write_retraining(self, context: base.Context, manifest: base.Manifest, inputs,
                        result: ValidateOutputs) -> None:
    """`retraining.png` and `retraining.json`."""
    figure, file = self.writes[:2]
    record, arrays = _retraining_record(context, inputs, self.config, result)
    figures.plot_retraining(
        arrays, result.summary, inputs.class_names,
        self.list_output(context, manifest, figure, num_removed=self.config.num_removed),
        k=self.config.num_removed, title_suffix=context.suffix)
    outputs.write_json(self.list_output(context, manifest, file), record)

  def _write_randomisation(self, context: base.Context, manifest: base.Manifest, inputs,
                           result: ValidateOutputs) -> None:
    """`randomisation_check.png`, `randomisation_cascade.png` and
    `randomisation_check.json`; the random networks' train-influence read from its parts."""
    check_figure, cascade_figure, file = self.writes[2:]
    check = result.randomisation
    plan = _randomisation_plan(context, inputs, self.config)
    randomised = _summed(plan, "", lambda name, t: plan.parts.load(name))
    figures.plot_randomisation_check(
        plan.trained, randomised, check["trained"], check["randomised"], inputs.class_names,
        self.list_output(context, manifest, check_figure), title_suffix=context.suffix,
        similarity=check["ranking_similarity"])
    figures.plot_randomisation_cascade(
        check["cascade"], check["trained"], check["without_output_layer"],
        self.list_output(context, manifest, cascade_figure), title_suffix=context.suffix)
    outputs.write_json(self.list_output(context, manifest, file),
                       _randomisation_record(context, plan.index, check))

  def load(self, context: base.Context) -> ValidateOutputs:
    out = context.workdir / self.name
    saved = json.loads((out / RETRAINING_FILE).read_text())
    check = json.loads((out / RANDOMISATION_FILE).read_text())
    summary = {k: saved[k] for k in ("dice_change", "hard_dice_change", "per_class",
                                     "proponents_minus_random", "opponents_minus_random",
                                     "rank_correlation", "sign_agreement")}
    randomisation = {
        "trained": _as_computed(check["trained"]),
        "randomised": _as_computed(check["randomised"]),
        "ranking_similarity": _as_computed(check["ranking_similarity"]),
        "cascade": {"order": check["cascade"]["order"],
                    "steps": [_as_computed(s) for s in check["cascade"]["steps"]]},
        "without_output_layer": _as_computed(check["without_output_layer"])}
    manifest = base.Manifest.from_record(base.read_manifest(context.workdir, self.name))
    return ValidateOutputs(summary, bool(saved["baseline_reproduces_run"]), randomisation,
                           manifest)


def _jobs_for(jobs, removal: str, region: int) -> tuple[int, ...]:
  for job in jobs:
    if job.removal == removal and job.region == region:
      return job.removed
  return ()


def _fmt_rho(c: dict[str, Any]) -> str:
  if c["rho"] is None:
    return f"undefined (n = {c['n']})"
  return f"{c['rho']:+.3f} (p {_p(c['p_value'])}, n = {c['n']})"
