"""The removal test: is a region's Dice lowered by retraining without its proponents?

For chosen validation regions, the SGD phase is retrained without each region's top-k
proponent slices, without its top-k opponent slices, and without k random slices (random
sets shared by all regions); each retrained model's Dice of the regions is measured and
compared with the replay with nothing removed:
  - `removal_jobs`: the retrainings (`RemovalJob`), from any attribution method's slice
    scores (`interpret.faithfulness.slice_scores`, `removal_sets`);
  - `evaluator`: the measure of a retrained model, the soft Dice of each region and the
    hard Dice of its class (the LDS measures its retrainings with it too);
  - `run_retrainings`: runs or reuses every retraining, each result saved in a store as it
    finishes (`saved_retrainings` reads the saved ones back without running any);
  - `summarise_removals`: the per-region effects, their means with intervals, the paired
    tests against random removal, and the rank correlation and sign agreement of the scores
    of the removed sets with the loss changes they caused (`checks.stats`).

Sign convention as in `interpret.faithfulness`: removing proponents is expected to lower a
region's Dice, removing opponents to raise it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np
from flax import nnx

from tracin_jax import models
from tracin_jax import outputs
from tracin_jax.checks import stats
from tracin_jax.influence import segmentation
from tracin_jax.interpret import faithfulness
from tracin_jax.training import losses
from tracin_jax.training import retrain as retrain_lib
from tracin_jax.training import train as train_lib

logger = logging.getLogger("tracin_jax")

REMOVALS = ("proponents", "random", "opponents")
Measure = Callable[[nnx.Module], tuple[list[float], list[float]]]


class RetrainingStore(Protocol):
  """Where `run_retrainings` keeps finished results (`tracin_jax.stages.Parts` is one)."""

  dir: pathlib.Path

  def load(self, name: str) -> dict | None:
    ...

  def save(self, name: str, value: dict) -> None:
    ...


@dataclasses.dataclass(frozen=True)
class RemovalJob:
  """One retraining of the removal test: what it removes and which region it is for."""

  name: str
  removal: str  # "baseline" or one of REMOVALS
  removed: tuple[int, ...]
  region: int | None  # index into the chosen regions (proponents/opponents), else None


def removal_jobs(regions, slice_scores: np.ndarray, n_train: int, num_removed: int,
                 num_random: int, seed: int) -> list[RemovalJob]:
  """The retrainings of the removal test: the replay with nothing removed, `num_random`
  random sets of `num_removed` slices (shared by all regions), and each region's top
  `num_removed` proponent and opponent slices.

  Args:
    regions: [(test index a, class index i)] the checked regions.
    slice_scores: [K, n_test, n_train] scores of each test region for each training slice
      (`faithfulness.slice_scores`), from whichever attribution method is tested.
    n_train: training slices.
    num_removed: k, slices removed per retraining.
    num_random: random sets.
    seed: the random sets' seed.

  Returns:
    The jobs: "baseline", "random_<r>", then "proponents_<r>" and "opponents_<r>" per
    region r.
  """
  jobs = [RemovalJob("baseline", "baseline", (), None)]
  rng = np.random.default_rng(seed)
  for r in range(num_random):
    removed = np.sort(rng.choice(n_train, num_removed, replace=False))
    jobs.append(RemovalJob(f"random_{r}", "random", tuple(int(b) for b in removed), None))
  for r, (a, i) in enumerate(regions):
    prop, opp = faithfulness.removal_sets(slice_scores[i, a], num_removed)
    jobs.append(RemovalJob(f"proponents_{r}", "proponents", tuple(int(b) for b in prop), r))
    jobs.append(RemovalJob(f"opponents_{r}", "opponents", tuple(int(b) for b in opp), r))
  return jobs


def _region_examples(apply_fn, val_set, val_regions: np.ndarray, regions):
  """The slices that hold `regions`, each region's row among them, and their region losses
  (`make_region_losses`, vmapped over the slices, jitted): what `evaluator` and
  `region_soft_dice` both measure with."""
  slices = sorted({a for a, _ in regions})
  row = {a: s for s, a in enumerate(slices)}
  examples = {"image": val_set.images[slices],
              "target": val_set.labels[slices].astype(np.int32),
              "region": val_regions[slices]}
  region_losses = jax.jit(jax.vmap(segmentation.make_region_losses(apply_fn),
                                   in_axes=(None, 0, None)))
  return examples, row, region_losses


def evaluator(apply_fn, val_set, val_regions: np.ndarray, regions) -> Measure:
  """measure(model) -> (region soft Dice [R], slice hard Dice [R]) of the chosen regions
  [(validation index a, class index i)], with the model's own parameters and state.

  A region's soft Dice is that of its class on the region's pixels (1 - the loss TracIn
  explains, eq 6), against the ground truth, with the region held fixed; the hard Dice is
  that class's on the whole slice.

  Args:
    apply_fn: `apply_fn(params, images, state)`, the model's function
      (`models.functional`).
    val_set: the validation slices.
    val_regions: [n_val, H, W, K] bool, the regions (held fixed over retrainings).
    regions: [(validation index a, class index i)] the R measured regions.
  """
  examples, row, region_losses = _region_examples(apply_fn, val_set, val_regions, regions)

  def measure(model: nnx.Module):
    _, params, state = models.functional(model)
    loss = np.asarray(region_losses(params, examples, state))  # [S, K]
    pred = train_lib.predict_classes(model, examples["image"])
    soft = [1.0 - float(loss[row[a], i]) for a, i in regions]
    hard = [losses.hard_dice(pred[row[a]] == i + 1, examples["target"][row[a]] == i + 1)
            for a, i in regions]
    return soft, hard

  return measure


class RegionSoftDice:
  """The soft Dice that `evaluator`'s measure gives, as a differentiable function.

  `soft_dice(params, state) -> [R] float32`: region r's soft Dice, 1 - its region loss
  computed by the same function as `evaluator`'s (in float32 here, where the measure
  subtracts in float64), e.g. the outputs `training.metagradient.run_metagradients`
  differentiates. Two of them are equal (and hash alike) when they have the same
  `apply_fn` and the same regions of the same slices, so what was compiled for one is
  reused for the other.
  """

  def __init__(self, apply_fn, val_set, val_regions: np.ndarray, regions):
    """Args: as `evaluator`."""
    self._examples, row, self._region_losses = _region_examples(apply_fn, val_set,
                                                                val_regions, regions)
    self._rows = np.array([row[a] for a, _ in regions], np.int32)
    self._classes = np.array([i for _, i in regions], np.int32)
    h = hashlib.sha256()
    outputs.hash_arrays(h, self._rows, self._classes, *(self._examples[k] for k in
                                                         sorted(self._examples)))
    self._key = (apply_fn, h.hexdigest())

  def __call__(self, params, state) -> jax.Array:
    return 1.0 - self._region_losses(params, self._examples, state)[self._rows, self._classes]

  def __eq__(self, other) -> bool:
    return isinstance(other, RegionSoftDice) and self._key == other._key

  def __hash__(self) -> int:
    return hash(self._key)


def _same_params(a, b) -> bool:
  """Whether two parameter pytrees hold bit-identical arrays."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def default_part_name(job: RemovalJob) -> str:
  """A retraining's default name in the store: its job and a hash of the removed set (so
  that another k, or other sets, never reuse it by mistake)."""
  digest = hashlib.sha256(repr(job.removed).encode()).hexdigest()[:8]
  return job.name if job.removal == "baseline" else f"{job.name}_{digest}"


def run_retrainings(jobs: Sequence[RemovalJob], measure: Measure, final_params,
                    store: RetrainingStore, make_retrainer: Callable[[], retrain_lib.Retrainer],
                    *, part_name: Callable[[RemovalJob], str] = default_part_name,
                    progress: bool = False, log: Callable[[str], None] = logger.info
                    ) -> dict[str, dict[str, Any]]:
  """Runs (or reuses) every retraining of `jobs`, each saved in `store` as it finishes.

  Args:
    jobs: the retrainings (`removal_jobs`).
    measure: `measure(model) -> (region soft Dice [R], hard Dice [R])` (`evaluator`).
    final_params: the run's final parameters; the replay with nothing removed is compared
      with them (`reproduces_run` in its record).
    store: where the results are saved and found (`load(name)`, `save(name, record)`).
    make_retrainer: `make_retrainer() -> Retrainer`, called once, and only if a retraining
      is left to do (loading a run's checkpoint takes a while): e.g.
      `lambda: Retrainer(workdir, train_set, from_epoch=e)`.
    part_name: a job's name in the store (default `default_part_name`: its name and a hash
      of its removed set); jobs of the same part name share one retraining.
    progress: show a progress bar over each retraining's steps.
    log: receives a line per retraining, with the time left.

  Returns:
    job name -> {"name", "removal", "region", "removed", "region_dice", "hard_dice"} (and
    "reproduces_run" for the baseline).
  """
  results = saved_retrainings(jobs, store, part_name=part_name)
  todo, seen = [], set()
  for job in jobs:
    if job.name not in results and part_name(job) not in seen:
      todo.append(job)
      seen.add(part_name(job))
  if results:
    log(f"Retraining: {len(results)} of {len(jobs)} results reused from {store.dir}.")
  if todo:
    retrainer = make_retrainer()
    log(f"Retraining epochs {retrainer.epochs[0]}-{retrainer.epochs[-1]} from the "
        f"checkpoint of epoch {retrainer.from_epoch}, {len(todo)} times (the run made "
        f"{retrainer.num_steps} steps; fewer without the removed slices); each result "
        "is saved as it finishes.")
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
    store.save(part_name(job), record)
    results[job.name] = record
    times.append(time.perf_counter() - t0)
    left = np.median(times) * (len(todo) - t - 1)
    log(f"retraining {t + 1}/{len(todo)} ({job.name}) done in {times[-1]:.0f} s; "
        f"about {left / 60:.0f} min left.")
  for job in jobs:  # jobs that share a part with one run above
    if job.name not in results:
      results[job.name] = store.load(part_name(job))
  return results


def saved_retrainings(jobs: Sequence[RemovalJob], store: RetrainingStore, *,
                      part_name: Callable[[RemovalJob], str] = default_part_name
                      ) -> dict[str, dict[str, Any]]:
  """The finished retrainings of `jobs` in `store`, read without running any: job name ->
  record as `run_retrainings` saved it (jobs without a saved result are left out)."""
  results = {job.name: store.load(part_name(job)) for job in jobs}
  return {name: r for name, r in results.items() if r is not None}


def summarise_removals(jobs: Sequence[RemovalJob], results: dict[str, dict[str, Any]], regions,
                       slice_scores: np.ndarray, class_names) -> tuple[dict, dict]:
  """Per-region effects, their summaries, paired tests and the rank correlation.

  Args:
    jobs: the removal test's retrainings (`removal_jobs`).
    results: job name -> record with "region_dice" [R] and "hard_dice" [R], R the checked
      regions (`run_retrainings`).
    regions: [(test index a, class index i)] the checked regions.
    slice_scores: [K, n_test, n_train] the scores the removal sets came from.
    class_names: the K class names.

  Returns:
    (summary, arrays): the JSON-ready summary (`dice_change` per removal with intervals,
    `per_class`, `proponents_minus_random`, `opponents_minus_random` with Wilcoxon
    p-values, `rank_correlation`, `sign_agreement`), and the per-region arrays behind it.
  """
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
      "dice_change": {name: stats.mean_ci(effect[name]) for name in REMOVALS},
      "hard_dice_change": {name: stats.mean_ci(hard[name]) for name in REMOVALS},
      "per_class": {
          class_names[i]: {name: stats.mean_ci(effect[name][classes == i])
                           for name in REMOVALS}
          for i in sorted(set(classes.tolist()))},
      "proponents_minus_random": stats.paired_test(effect["proponents"], effect["random"]),
      "opponents_minus_random": stats.paired_test(effect["opponents"], effect["random"]),
      "rank_correlation": {
          "all": stats.rank_correlation(predicted, actual),
          **{name: stats.rank_correlation(predicted[kinds == name], actual[kinds == name])
             for name in REMOVALS}},
      "sign_agreement": {
          "all": stats.sign_agreement(predicted, actual),
          **{name: stats.sign_agreement(predicted[kinds == name], actual[kinds == name])
             for name in REMOVALS}},
  }
  arrays = {"effect": effect, "hard": hard, "predicted": predicted, "actual": actual,
            "kinds": kinds, "classes": classes}
  return summary, arrays
