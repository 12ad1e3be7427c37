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
import time
from typing import Any

import numpy as np
from flax import nnx

from tracin_jax import models
from tracin_jax import outputs
from tracin_jax import params as params_lib
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

RETRAINING_FILE = "retraining.json"
RETRAINING_FIGURE = "retraining.png"
RANDOMISATION_FILE = "randomisation_check.json"
RANDOMISATION_FIGURE = "randomisation_check.png"
CASCADE_FIGURE = "randomisation_cascade.png"


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
    summary: the retraining summary, as in `retraining.json`.
    reproduces_run: whether the replay with nothing removed reproduced the run bit for bit.
    randomisation: class-block structure of the trained and randomised train-influence,
      and their ranking similarity.
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


def _randomisation_check(context: base.Context, inputs, config: ValidateConfig
                         ) -> dict[str, Any]:
  """Train-influence of a seeded subset with trained and with random checkpoints; then the
  cascade from the head down, and TracIn without the output layer."""
  train_set = context.train_set
  n = len(train_set)
  m = min(config.randomisation_examples or n, n)
  rng = np.random.default_rng(config.seed)
  index = np.sort(rng.choice(n, m, replace=False))
  trained = layout.subset(inputs.train_blocks, index)
  presence = inputs.presence_train[index]
  examples = {"image": train_set.images[index],
              "target": train_set.labels[index].astype(np.int32),
              "region": inputs.train_regions[index]}
  loss_fn = segmentation.make_region_losses(inputs.apply_fn)
  run_config = train_lib.load_config(context.workdir)
  parts = base.Parts(context.stage_dir("validate") / "randomisation",
                     {"influence": inputs.fingerprint, "seed": config.seed,
                      "examples": config.randomisation_examples, "model": run_config.model},
                     what="randomisation check")
  num = len(inputs.learning_rates)
  # Random networks (seeds 1000 + seed + t) and the trained checkpoints are built or loaded
  # only when a part that needs them is not saved yet, and then once.
  loaded: dict[Any, Any] = {}

  def random_network(t: int) -> Checkpoint:
    if t not in loaded:
      model = train_lib.build_model(run_config.model, seed=1000 + config.seed + t)
      _, params, state = models.functional(model)
      loaded[t] = Checkpoint(params, inputs.learning_rates[t], state)
    return loaded[t]

  def trained_checkpoint(t: int) -> Checkpoint:
    if "trained" not in loaded:
      loaded["trained"] = train_lib.tracin_checkpoints(context.workdir, inputs.epochs)[1]
    return loaded["trained"][t]

  def tracin(ckpt: Checkpoint, **kwargs) -> np.ndarray:
    return core.influence(loss_fn, [ckpt], examples,
                          memory_budget_bytes=context.memory_budget_bytes,
                          progress=context.progress, **kwargs)

  def summed(prefix: str, label: str, compute) -> np.ndarray:
    """Class blocks of the sum over checkpoints of compute(t), each part saved."""
    total = None
    for t in range(num):
      part = parts.get(f"{prefix}network{t + 1}", lambda t=t: compute(t),
                       label=f"{label}, checkpoint {t + 1}/{num}")
      total = part if total is None else total + part
    return layout.to_class_blocks(segmentation.mask_absent(total, presence, presence))

  def summary(blocks) -> dict[str, Any]:
    st = faithfulness.class_block_structure(blocks)
    sim = faithfulness.ranking_similarity(trained, blocks)
    return {"auc": st["auc"], "same_class_top": st["same_class_top"],
            "median_rho": sim["median_rho"], "top_overlap": sim["top_overlap"]}

  randomised = summed("", "random networks", lambda t: tracin(random_network(t)))
  check = {"index": index, "trained": trained, "randomised": randomised,
           "trained_structure": faithfulness.class_block_structure(trained),
           "randomised_structure": faithfulness.class_block_structure(randomised),
           "ranking_similarity": faithfulness.ranking_similarity(trained, randomised)}

  # Cascading randomisation from the head down (Adebayo et al.), and TracIn without the
  # output layer's parameters: do the class blocks come from the output layer alone?
  order = _cascade_order(run_config, train_set.images[:1])

  def cascade(step: int):
    def compute(t):
      ckpt = trained_checkpoint(t)
      mixed = params_lib.replace_groups(ckpt.params, random_network(t).params, order[:step])
      return tracin(ckpt._replace(params=mixed))
    return compute

  steps = []
  for step in range(1, len(order)):  # all groups randomised is the check above
    blocks = summed(f"cascade{step}_", f"cascade {step}/{len(order)} ({order[step - 1]})",
                    cascade(step))
    steps.append({"randomised": list(order[:step]), **summary(blocks)})
  steps.append({"randomised": list(order), **summary(randomised)})
  output_layer = order[0]
  keep = params_lib.as_predicate(output_layer)
  without = summed("without_output_layer_", f"TracIn without {output_layer}",
                   lambda t: tracin(trained_checkpoint(t),
                                    params_filter=lambda path: not keep(path)))
  check["cascade"] = {"order": list(order), "steps": steps}
  check["without_output_layer"] = {"output_layer": output_layer, **summary(without)}
  return check


def _cascade_order(run_config, image: np.ndarray) -> tuple[str, ...]:
  """The model's parameter groups from the output layer back to the input (traced on an
  abstract model: nothing is initialised or compiled)."""
  model = nnx.eval_shape(lambda: train_lib.build_model(run_config.model, seed=0))
  return tuple(reversed(saliency_layers.NnxModel(model).param_groups_in_call_order(image)))


@base.register_stage
class ValidateStage(base.StageBase):
  """Retraining without proponents, opponents and random slices; randomisation check."""

  name, config_cls, needs = "validate", ValidateConfig, ("influence",)

  def run(self, context: base.Context) -> ValidateOutputs:
    _check_settings(self.config, len(context.train_set), context.workdir)
    config, log, inputs = self.config, context.log, context.need("influence")
    train_set, val_set, names = context.train_set, context.val_set, inputs.class_names
    out = context.stage_dir(self.name)
    manifest = self.manifest()

    regions = faithfulness.choose_regions(inputs.presence_test, config.regions_per_class,
                                          config.seed)
    counts = [sum(1 for _, i in regions if i == c) for c in range(len(names))]
    log("Validation regions checked: " + ", ".join(f"{n} {c}" for n, c in zip(names, counts))
        + f"; k = {config.num_removed} of {len(train_set)} training slices removed each "
        "time.")
    scores = faithfulness.slice_scores(inputs.test_blocks)  # [K, n_val, n_train]
    jobs = _jobs(regions, scores, len(train_set), config)
    # A retraining's result depends on the run, where it starts and which regions it
    # measures (the parts' key), and on what it removes (in each part's name).
    parts = base.Parts(out / "retraining",
                       {"influence": inputs.fingerprint, "from_epoch": config.from_epoch,
                        "regions": regions}, what="retraining")
    measure = removal.evaluator(inputs.apply_fn, val_set, inputs.val_regions, regions)
    t0 = time.perf_counter()
    results = removal.run_retrainings(
        jobs, measure, inputs.params, parts,
        lambda: retrain_lib.Retrainer(context.workdir, train_set, from_epoch=config.from_epoch),
        progress=context.progress, log=log)
    summary, arrays = removal.summarise_removals(jobs, results, regions, scores, names)
    reproduces = bool(results["baseline"].get("reproduces_run"))
    verdict = _verdict(summary)
    log(f"Retraining check: {verdict}.")
    agree = summary["sign_agreement"]["all"]
    log("Spearman rho of TracIn score against the actual loss change over removed sets: "
        f"{_fmt_rho(summary['rank_correlation']['all'])}; same sign in "
        + ("n/a" if agree["share"] is None else
           f"{agree['share']:.0%} of {agree['n']} (binomial p {_p(agree['p_value'])})") + ".")

    figures.plot_retraining(arrays, summary, names, out / RETRAINING_FIGURE,
                            k=config.num_removed, title_suffix=context.suffix)
    manifest.figure(self.rel(RETRAINING_FIGURE), f"Change of each checked region's soft Dice after "
                    f"retraining the SGD phase without its top {config.num_removed} proponent "
                    "slices, without random slices and without its top opponent slices, with "
                    "95% intervals; and the TracIn score of each removed set against the loss "
                    "change it caused.")
    region_records = []
    for r, (a, i) in enumerate(regions):
      case, z = val_set.ids[a]
      region_records.append({
          "case": case, "slice": z, "class": names[i],
          "baseline_region_dice": results["baseline"]["region_dice"][r],
          "dice_change": {name: outputs.json_ready(arrays["effect"][name][r])
                          for name in removal.REMOVALS},
          "proponents": [list(train_set.ids[b]) for b in _jobs_for(jobs, "proponents", r)],
          "opponents": [list(train_set.ids[b]) for b in _jobs_for(jobs, "opponents", r)]})
    outputs.write_json(out / RETRAINING_FILE, {
        "dataset": context.data_name, "num_removed": config.num_removed,
        "num_random": config.num_random, "num_train_slices": len(train_set),
        "baseline_reproduces_run": reproduces,
        "dice": "soft Dice of the region's class on the region's pixels (1 - the TracIn "
                "loss); changes are retrained minus baseline replay, negative = worse",
        "verdict": verdict, **summary, "regions": region_records,
        "random_sets": [[list(train_set.ids[b]) for b in job.removed]
                        for job in jobs if job.removal == "random"]})
    manifest.file(self.rel(RETRAINING_FILE), "the retraining check: per checked region the Dice "
                  "changes of each removal, their means with 95% intervals, paired tests "
                  "against random removal, rank correlation and sign agreement of TracIn "
                  "scores with the actual loss changes")
    log(f"[retraining check took {time.perf_counter() - t0:.0f} s]")

    t0 = time.perf_counter()
    check = _randomisation_check(context, inputs, config)
    ts, rs = check["trained_structure"], check["randomised_structure"]
    sim = check["ranking_similarity"]
    log(f"Randomisation check on {len(check['index'])} training slices: class-block AUC "
        f"trained {ts['auc']:.3f}, randomised {rs['auc']:.3f} (0.5 = no class structure); "
        f"same-class share of top-10 proponents {ts['same_class_top']:.2f} vs "
        f"{rs['same_class_top']:.2f}; within a class, trained and randomised rankings agree "
        f"with median Spearman rho {sim['median_rho']:.2f}, top-10 overlap "
        f"{sim['top_overlap']:.2f} (chance {sim['top_overlap_chance']:.2f}).")
    figures.plot_randomisation_check(check["trained"], check["randomised"], ts, rs, names,
                                     out / RANDOMISATION_FIGURE, title_suffix=context.suffix,
                                     similarity=sim)
    manifest.figure(self.rel(RANDOMISATION_FIGURE), "Train-influence of a seeded subset of "
                    "training slices with the trained checkpoints and with randomly "
                    "initialised networks, with their class-block AUC.")
    cascade, without = check["cascade"], check["without_output_layer"]
    figures.plot_randomisation_cascade(cascade, ts, without, out / CASCADE_FIGURE,
                                       title_suffix=context.suffix)
    manifest.figure(self.rel(CASCADE_FIGURE), "Cascading randomisation of TracIn: the "
                    "checkpoints' layers re-initialised from the output layer down, one more "
                    "at each step; the class-block AUC of the train-influence and how alike it "
                    "ranks each class's training regions to the trained checkpoints' ranking; "
                    "beside them, TracIn with the output layer's parameters left out of the "
                    "gradients.")
    log("Cascading randomisation (class-block AUC, median rho to trained): "
        + "; ".join(f"{s['randomised'][-1]} {s['auc']:.3f}, {s['median_rho']:.2f}"
                    for s in cascade["steps"])
        + f". Without the output layer ({without['output_layer']}): AUC "
        f"{without['auc']:.3f}, median rho to full TracIn {without['median_rho']:.2f}.")
    outputs.write_json(out / RANDOMISATION_FILE, {
        "dataset": context.data_name,
        "num_examples": len(check["index"]),
        "train_slices": [list(train_set.ids[b]) for b in check["index"]],
        "measure": "class-block AUC: probability that a same-class pair of regions (different "
                   "slices) has a larger self-influence-normalised TracIn than a pair of "
                   "different classes; 0.5 means no class structure",
        "trained": {k: outputs.json_ready(v) for k, v in ts.items()},
        "randomised": {k: outputs.json_ready(v) for k, v in rs.items()},
        "ranking_similarity": {k: outputs.json_ready(v) for k, v in sim.items()},
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
                                 for k, v in without.items()}})
    manifest.file(self.rel(RANDOMISATION_FILE), "the randomisation check: class-block structure "
                  "of trained and randomised train-influence, and their ranking similarity")
    log(f"[randomisation check took {time.perf_counter() - t0:.0f} s]")
    randomisation = {"trained": ts, "randomised": rs, "ranking_similarity": sim,
                     "cascade": cascade, "without_output_layer": without}
    manifest.headline.update({
        "baseline_reproduces_run": reproduces, "num_removed": config.num_removed,
        "dice_change": summary["dice_change"],
        "proponents_minus_random": summary["proponents_minus_random"],
        "opponents_minus_random": summary["opponents_minus_random"],
        "rank_correlation": summary["rank_correlation"]["all"],
        "class_block_auc": {"trained": ts["auc"], "randomised": rs["auc"],
                            "without_output_layer": without["auc"]}})
    log(f"Wrote {out}: {RETRAINING_FILE}, {RETRAINING_FIGURE}, {RANDOMISATION_FILE}, "
        f"{RANDOMISATION_FIGURE}.")
    return ValidateOutputs(summary, reproduces, randomisation, manifest)

  def load(self, context: base.Context) -> ValidateOutputs:
    import json  # pylint: disable=g-import-not-at-top

    out = context.workdir / self.name
    saved = json.loads((out / RETRAINING_FILE).read_text())
    check = json.loads((out / RANDOMISATION_FILE).read_text())
    summary = {k: saved[k] for k in ("dice_change", "hard_dice_change", "per_class",
                                     "proponents_minus_random", "opponents_minus_random",
                                     "rank_correlation", "sign_agreement")}
    randomisation = {"trained": check["trained"], "randomised": check["randomised"],
                     "ranking_similarity": check["ranking_similarity"],
                     "cascade": check["cascade"],
                     "without_output_layer": check["without_output_layer"]}
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
