"""The experiment's `validate` stage: is TracIn's influence real?

`run_validate_stage(workdir, train_set, val_set, config)` reads the influence stage's scores
and writes under `<workdir>/interpret/`:
  - `retraining.json` and `retraining.png`: for `regions_per_class` validation regions of
    each class, the change of the region's Dice after retraining the SGD phase without the
    region's top-k proponent slices, without its top-k opponent slices, and without k random
    slices (`num_random` random sets, shared by all regions); mean changes with 95%
    confidence intervals, paired comparisons with random removal, and the rank correlation
    between the TracIn score of each removed set and the loss change it actually caused;
  - `randomisation_check.json` and `randomisation_check.png`: the train-influence matrices
    with the trained checkpoints against the same computation with randomly initialised
    networks (model-parameter randomisation), on a seeded subset of training slices: the
    class-block structure of each, and how alike they rank each class's training regions.

Retraining (`training.retrain.Retrainer`) starts from the last Adam checkpoint and replays
the run's SGD epochs in the run's order without the removed slices. A region's Dice is the
soft Dice of its class on the region's pixels (1 - the loss TracIn explains, eq 6), against
the ground truth, with the region held fixed; the hard Dice of that class on the whole slice
is recorded beside it. Changes are against the replay with nothing removed, which is
checked to reproduce the run's final parameters.

Every retraining's result is saved as it finishes, so an interrupted stage resumes; a rerun
with the same inputs and settings reuses them (another k replaces them, except the replay
with nothing removed).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from tracin_jax import models
from tracin_jax import outputs
from tracin_jax.data.slices import SliceSet
from tracin_jax.influence import core
from tracin_jax.influence import report
from tracin_jax.influence import segmentation
from tracin_jax.influence import stage as influence_stage
from tracin_jax.interpret import faithfulness
from tracin_jax.interpret import figures
from tracin_jax.interpret import stage as interpret_stage
from tracin_jax.training import losses
from tracin_jax.training import retrain as retrain_lib
from tracin_jax.training import train as train_lib

RETRAINING_FILE = "retraining.json"
RETRAINING_FIGURE = "retraining.png"
RANDOMISATION_FILE = "randomisation_check.json"
RANDOMISATION_FIGURE = "randomisation_check.png"
REMOVALS = ("proponents", "random", "opponents")


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
  """Settings of the validate stage.

  Attributes:
    regions_per_class: validation regions checked per class (drawn with `seed`).
    num_removed: k, the training slices removed per retraining.
    num_random: random removal sets (each of k slices), shared by all regions; a region's
      random effect is the mean over them.
    seed: seeds the choice of regions, the random sets and the randomisation subset.
    from_epoch: the checkpoint retraining starts from; default the last Adam epoch.
    randomisation_examples: training slices in the randomisation check (seeded subset;
      None: all).
    memory_budget_bytes: for the randomisation check's TracIn.
  """

  regions_per_class: int = 7
  num_removed: int = 20
  num_random: int = 5
  seed: int = 0
  from_epoch: int | None = None
  randomisation_examples: int | None = 160
  memory_budget_bytes: int = core.DEFAULT_MEMORY_BUDGET_BYTES


class SettingsError(ValueError):
  """A setting of the validate stage that the run cannot meet (the message names it)."""


def _check_settings(config: ValidateConfig, n_train: int, workdir: pathlib.Path) -> None:
  if config.regions_per_class < 1:
    raise SettingsError(f"regions_per_class={config.regions_per_class}: must be at least 1.")
  if not 1 <= config.num_removed <= n_train // 2:
    raise SettingsError(
        f"num_removed={config.num_removed}: must be between 1 and half of the {n_train} "
        "training slices (the proponent and opponent sets of a region must not overlap).")
  if config.num_random < 0:
    raise SettingsError(f"num_random={config.num_random}: must not be negative.")
  if config.randomisation_examples is not None and config.randomisation_examples < 2:
    raise SettingsError(f"randomisation_examples={config.randomisation_examples}: must be "
                        "at least 2 (or None for all training slices).")
  run = train_lib.load_config(workdir)
  if config.from_epoch is not None and not 0 < config.from_epoch < run.num_epochs:
    raise SettingsError(f"from_epoch={config.from_epoch} (--retrain_from_epoch): the run in "
                        f"{workdir} has epochs 1-{run.num_epochs}; retraining must start "
                        "before the last.")


@dataclasses.dataclass(frozen=True)
class _Job:
  name: str
  removal: str  # "baseline" or one of REMOVALS
  removed: tuple[int, ...]
  region: int | None  # index into the chosen regions (proponents/opponents), else None


def _jobs(regions, slice_scores, n_train: int, config: ValidateConfig) -> list[_Job]:
  jobs = [_Job("baseline", "baseline", (), None)]
  rng = np.random.default_rng(config.seed)
  for r in range(config.num_random):
    removed = np.sort(rng.choice(n_train, config.num_removed, replace=False))
    jobs.append(_Job(f"random_{r}", "random", tuple(int(b) for b in removed), None))
  for r, (a, i) in enumerate(regions):
    prop, opp = faithfulness.removal_sets(slice_scores[i, a], config.num_removed)
    jobs.append(_Job(f"proponents_{r}", "proponents", tuple(int(b) for b in prop), r))
    jobs.append(_Job(f"opponents_{r}", "opponents", tuple(int(b) for b in opp), r))
  return jobs


def _evaluator(apply_fn, val_set: SliceSet, val_regions: np.ndarray, regions):
  """measure(model) -> (region soft Dice [R], slice hard Dice [R]) of the chosen regions."""
  slices = sorted({a for a, _ in regions})
  row = {a: s for s, a in enumerate(slices)}
  examples = {"image": val_set.images[slices],
              "target": val_set.labels[slices].astype(np.int32),
              "region": val_regions[slices]}
  region_losses = jax.jit(jax.vmap(segmentation.make_region_losses(apply_fn),
                                   in_axes=(None, 0)))

  def measure(model: nnx.Module):
    _, params = models.functional(model)
    loss = np.asarray(region_losses(params, examples))  # [S, K]
    pred = train_lib.predict_classes(model, examples["image"])
    soft = [1.0 - float(loss[row[a], i]) for a, i in regions]
    hard = [losses.hard_dice(pred[row[a]] == i + 1, examples["target"][row[a]] == i + 1)
            for a, i in regions]
    return soft, hard

  return measure


def _same_params(a, b) -> bool:
  """Whether two parameter pytrees hold bit-identical arrays."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _run_jobs(jobs, workdir, train_set, config, measure, final_params,
              job_dir: pathlib.Path, *, progress: bool, log) -> dict[str, dict[str, Any]]:
  """Runs (or reuses) every retraining; returns name -> saved result. The replay with
  nothing removed is compared with the run's final parameters `final_params`."""
  results, todo = {}, []
  for job in jobs:
    path = job_dir / f"{job.name}.json"
    if path.exists():
      saved = json.loads(path.read_text())
      if saved.get("removed") == list(job.removed):
        results[job.name] = saved
        continue
    todo.append(job)
  if results:
    log(f"Retraining: {len(results)} of {len(jobs)} results reused from {job_dir}.")
  if not todo:
    return results
  retrainer = retrain_lib.Retrainer(workdir, train_set, from_epoch=config.from_epoch)
  log(f"Retraining epochs {retrainer.epochs[0]}-{retrainer.epochs[-1]} from the checkpoint "
      f"of epoch {retrainer.from_epoch}, {len(todo)} times (the run made "
      f"{retrainer.num_steps} steps; fewer without the removed slices); each result is saved "
      "as it finishes.")
  times = []
  for t, job in enumerate(todo):
    t0 = time.perf_counter()
    model = retrainer(job.removed, progress=progress,
                      desc=f"retrain {t + 1}/{len(todo)} ({job.name})")
    soft, hard = measure(model)
    record = {"name": job.name, "removal": job.removal, "region": job.region,
              "removed": list(job.removed), "region_dice": soft, "hard_dice": hard}
    if job.removal == "baseline":
      record["reproduces_run"] = _same_params(models.functional(model)[1], final_params)
    outputs.write_json(job_dir / f"{job.name}.json", record)
    results[job.name] = record
    times.append(time.perf_counter() - t0)
    left = np.median(times) * (len(todo) - t - 1)
    log(f"retraining {t + 1}/{len(todo)} ({job.name}) done in {times[-1]:.0f} s; "
        f"about {left / 60:.0f} min left.")
  return results


def _summarise(jobs, results, regions, slice_scores, class_names) -> dict[str, Any]:
  """Per-region effects, their summaries, paired tests and the rank correlation."""
  base = results["baseline"]
  n = len(regions)
  effect = {name: np.full(n, np.nan) for name in REMOVALS}
  hard = {name: np.full(n, np.nan) for name in REMOVALS}
  random_soft, random_hard = [], []
  predicted, actual, kinds = [], [], []
  for job in jobs:
    if job.removal == "baseline":
      continue
    res = results[job.name]
    d_soft = np.asarray(res["region_dice"]) - np.asarray(base["region_dice"])
    d_hard = np.asarray(res["hard_dice"]) - np.asarray(base["hard_dice"])
    targets = range(n) if job.region is None else [job.region]
    for r in targets:
      a, i = regions[r]
      predicted.append(float(slice_scores[i, a, list(job.removed)].sum()))
      actual.append(float(-d_soft[r]))  # the change of the region's loss
      kinds.append(job.removal)
    if job.region is None:
      random_soft.append(d_soft)
      random_hard.append(d_hard)
    else:
      effect[job.removal][job.region] = d_soft[job.region]
      hard[job.removal][job.region] = d_hard[job.region]
  if random_soft:
    effect["random"] = np.mean(random_soft, axis=0)
    hard["random"] = np.mean(random_hard, axis=0)
  classes = np.array([i for _, i in regions])
  predicted, actual, kinds = np.array(predicted), np.array(actual), np.array(kinds)
  summary = {
      "dice_change": {name: faithfulness.mean_ci(effect[name]) for name in REMOVALS},
      "hard_dice_change": {name: faithfulness.mean_ci(hard[name]) for name in REMOVALS},
      "per_class": {
          class_names[i]: {name: faithfulness.mean_ci(effect[name][classes == i])
                           for name in REMOVALS}
          for i in sorted(set(classes.tolist()))},
      "proponents_minus_random": faithfulness.paired_test(effect["proponents"],
                                                          effect["random"]),
      "opponents_minus_random": faithfulness.paired_test(effect["opponents"],
                                                         effect["random"]),
      "rank_correlation": {
          "all": faithfulness.rank_correlation(predicted, actual),
          **{name: faithfulness.rank_correlation(predicted[kinds == name],
                                                 actual[kinds == name])
             for name in REMOVALS}},
      "sign_agreement": {
          "all": faithfulness.sign_agreement(predicted, actual),
          **{name: faithfulness.sign_agreement(predicted[kinds == name],
                                               actual[kinds == name])
             for name in REMOVALS}},
  }
  arrays = {"effect": effect, "hard": hard, "predicted": predicted, "actual": actual,
            "kinds": kinds, "classes": classes}
  return summary, arrays


def _verdict(summary: dict[str, Any]) -> str:
  """One honest sentence on the expected ordering (proponents < random < opponents)."""
  d = {k: summary["dice_change"][k]["mean"] for k in REMOVALS}
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


def _randomisation_check(workdir, inputs, train_set, config: ValidateConfig, out: pathlib.Path,
                         key: str, *, progress: bool, log) -> dict[str, Any]:
  """Train-influence of a seeded subset with trained and with random checkpoints."""
  n = len(train_set)
  m = n if config.randomisation_examples is None else min(config.randomisation_examples, n)
  rng = np.random.default_rng(config.seed)
  index = np.sort(rng.choice(n, m, replace=False))
  trained = faithfulness.subset_blocks(inputs.train_blocks, index)
  presence = inputs.presence_train[index]

  run_config = train_lib.load_config(workdir)
  # (seed, learning rate) per random network; a network is built only when its part of the
  # sum is not saved yet.
  seeds = [(1000 + config.seed + t, lr) for t, lr in enumerate(inputs.learning_rates)]

  def random_checkpoint(seed_lr):
    seed, lr = seed_lr
    return models.functional(train_lib.build_model(run_config.model, seed=seed))[1], lr

  examples = {"image": train_set.images[index],
              "target": train_set.labels[index].astype(np.int32),
              "region": inputs.train_regions[index]}
  loss_fn = segmentation.make_region_losses(inputs.apply_fn)
  partial = out / "randomisation" / key
  partial.mkdir(parents=True, exist_ok=True)
  scores = influence_stage.accumulate_checkpoints(
      "randomised", partial, list(range(1, len(seeds) + 1)), seeds,
      lambda seed_lr: core.influence(loss_fn, [random_checkpoint(seed_lr)], examples,
                                  memory_budget_bytes=config.memory_budget_bytes,
                                  progress=progress), log, label="random network")
  scores = segmentation.mask_absent(scores, presence, presence)
  randomised = report.to_class_blocks(scores)
  return {"index": index, "trained": trained, "randomised": randomised,
          "trained_structure": faithfulness.class_block_structure(trained),
          "randomised_structure": faithfulness.class_block_structure(randomised),
          "ranking_similarity": faithfulness.ranking_similarity(trained, randomised)}


def run_validate_stage(workdir, train_set: SliceSet, val_set: SliceSet,
                       config: ValidateConfig = ValidateConfig(), *, dataset: str = "",
                       progress: bool = True,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the retraining and randomisation checks of the run in `workdir` (module doc).

  Args:
    workdir: the run's directory, with its checkpoints and `influence/` outputs.
    train_set: the run's training slices (those the influence stage used).
    val_set: its validation slices.
    config: the stage's settings.
    dataset: a name for the data, recorded in the outputs.
    progress: progress bars for retraining and TracIn.
    log: a function taking one line of text.

  Returns:
    dict: "summary" (as in retraining.json), "randomisation" (the two structure measures
    and the ranking similarity), "reproduces_run" (bool), "paths".

  Raises:
    FileNotFoundError: the influence stage has not been run in `workdir`.
    ValueError: it was run on other data.
    SettingsError: a setting the run cannot meet (k above half the training slices, say).
  """
  workdir = pathlib.Path(workdir)
  paths = influence_stage.output_paths(workdir, needed_by="validate")
  _check_settings(config, len(train_set), workdir)
  inputs = influence_stage.load_outputs(workdir, train_set, val_set, needed_by="validate")
  out = workdir / interpret_stage.OUT_DIR
  out.mkdir(parents=True, exist_ok=True)
  key = outputs.fingerprint(paths, config, dataset)  # of the outputs as a whole
  names = inputs.class_names

  regions = faithfulness.choose_regions(inputs.presence_test, config.regions_per_class,
                                        config.seed)
  counts = [sum(1 for _, i in regions if i == c) for c in range(len(names))]
  log("Validation regions checked: " + ", ".join(f"{n} {c}" for n, c in zip(names, counts))
      + f"; k = {config.num_removed} of {len(train_set)} training slices removed each time.")
  scores = faithfulness.slice_scores(inputs.test_blocks)  # [K, n_val, n_train]
  jobs = _jobs(regions, scores, len(train_set), config)
  # A retraining's result depends on the run, where it starts, what it removes and which
  # regions it measures, and the directory is keyed by those. Each result file records its
  # removed set, checked on reuse: more random sets reuse the earlier ones (the same seed
  # draws them first); another k redoes (and replaces) all but the replay with nothing removed.
  job_dir = out / "retraining" / outputs.fingerprint(
      paths, {"from_epoch": config.from_epoch, "regions": regions})
  job_dir.mkdir(parents=True, exist_ok=True)
  measure = _evaluator(inputs.apply_fn, val_set, inputs.val_regions, regions)
  t0 = time.perf_counter()
  results = _run_jobs(jobs, workdir, train_set, config, measure, inputs.params, job_dir,
                      progress=progress, log=log)
  summary, arrays = _summarise(jobs, results, regions, scores, names)
  reproduces = bool(results["baseline"].get("reproduces_run"))
  verdict = _verdict(summary)
  log(f"Retraining check: {verdict}.")
  agree = summary["sign_agreement"]["all"]
  log("Spearman rho of TracIn score against the actual loss change over removed sets: "
      f"{_fmt_rho(summary['rank_correlation']['all'])}; same sign in "
      + ("n/a" if agree["share"] is None else
         f"{agree['share']:.0%} of {agree['n']} (binomial p {_p(agree['p_value'])})") + ".")

  suffix = f" ({dataset})" if dataset else ""
  figures.plot_retraining(arrays, summary, names, out / RETRAINING_FIGURE,
                          k=config.num_removed, title_suffix=suffix)
  region_records = []
  for r, (a, i) in enumerate(regions):
    case, z = val_set.ids[a]
    region_records.append({
        "case": case, "slice": z, "class": names[i],
        "baseline_region_dice": results["baseline"]["region_dice"][r],
        "dice_change": {name: outputs.json_ready(arrays["effect"][name][r])
                        for name in REMOVALS},
        "proponents": [list(train_set.ids[b]) for b in _jobs_for(jobs, "proponents", r)],
        "opponents": [list(train_set.ids[b]) for b in _jobs_for(jobs, "opponents", r)]})
  outputs.write_json(out / RETRAINING_FILE, {
      "dataset": dataset, "fingerprint": key, "num_removed": config.num_removed,
      "num_random": config.num_random, "num_train_slices": len(train_set),
      "baseline_reproduces_run": reproduces,
      "dice": "soft Dice of the region's class on the region's pixels (1 - the TracIn loss); "
              "changes are retrained minus baseline replay, negative = worse",
      "verdict": verdict, **summary, "regions": region_records,
      "random_sets": [[list(train_set.ids[b]) for b in job.removed]
                      for job in jobs if job.removal == "random"]})
  log(f"[retraining check took {time.perf_counter() - t0:.0f} s]")

  t0 = time.perf_counter()
  check_key = outputs.fingerprint(
      paths, {"seed": config.seed, "examples": config.randomisation_examples})
  check = _randomisation_check(workdir, inputs, train_set, config, out, check_key,
                               progress=progress, log=log)
  ts, rs = check["trained_structure"], check["randomised_structure"]
  sim = check["ranking_similarity"]
  log(f"Randomisation check on {len(check['index'])} training slices: class-block AUC "
      f"trained {ts['auc']:.3f}, randomised {rs['auc']:.3f} (0.5 = no class structure); "
      f"same-class share of top-10 proponents {ts['same_class_top']:.2f} vs "
      f"{rs['same_class_top']:.2f}; within a class, trained and randomised rankings agree "
      f"with median Spearman rho {sim['median_rho']:.2f}, top-10 overlap "
      f"{sim['top_overlap']:.2f} (chance {sim['top_overlap_chance']:.2f}).")
  figures.plot_randomisation_check(check["trained"], check["randomised"], ts, rs, names,
                                   out / RANDOMISATION_FIGURE, title_suffix=suffix,
                                   similarity=sim)
  outputs.write_json(out / RANDOMISATION_FILE, {
      "dataset": dataset, "fingerprint": key,
      "num_examples": len(check["index"]),
      "train_slices": [list(train_set.ids[b]) for b in check["index"]],
      "measure": "class-block AUC: probability that a same-class pair of regions (different "
                 "slices) has a larger self-influence-normalised TracIn than a pair of "
                 "different classes; 0.5 means no class structure",
      "trained": {k: outputs.json_ready(v) for k, v in ts.items()},
      "randomised": {k: outputs.json_ready(v) for k, v in rs.items()},
      "ranking_similarity": {k: outputs.json_ready(v) for k, v in sim.items()},
      "ranking_similarity_measure": "per region, over the same-class training regions of "
                                    "other slices: Spearman rho between the trained and the "
                                    "randomised scores, and the overlap of their top-10 "
                                    "proponents (chance: 10 / candidates); a ranking that "
                                    "survives randomisation does not explain what was learned",
      "randomised_checkpoints": "fresh initialisations (seeds 1000 + seed + t) with the "
                                "trained checkpoints' learning rates"})
  log(f"[randomisation check took {time.perf_counter() - t0:.0f} s]")
  written = [out / n for n in (RETRAINING_FILE, RETRAINING_FIGURE, RANDOMISATION_FILE,
                               RANDOMISATION_FIGURE)]
  log(f"Wrote {out}: {', '.join(p.name for p in written)}.")
  return {"summary": summary, "reproduces_run": reproduces,
          "randomisation": {"trained": ts, "randomised": rs, "ranking_similarity": sim},
          "paths": [str(p) for p in written]}


def _jobs_for(jobs, removal: str, region: int) -> tuple[int, ...]:
  for job in jobs:
    if job.removal == removal and job.region == region:
      return job.removed
  return ()


def _fmt_rho(c: dict[str, Any]) -> str:
  if c["rho"] is None:
    return f"undefined (n = {c['n']})"
  return f"{c['rho']:+.3f} (p {_p(c['p_value'])}, n = {c['n']})"
