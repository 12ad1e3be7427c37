"""The `influence` stage: TracIn explanations of a training run (eq 6).

Reads the run's SGD checkpoints and writes under `<workdir>/influence/`:
  - `train_influence.npz`: `scores` [3, n_train, 3 * n_train] (test class i, then train class
    j's block), `presence` [n_train, 3], example ids, checkpoint epochs and learning rates;
  - `test_influence.npz`: the same for validation against training
    (`scores` [3, n_val, 3 * n_train], `presence_test`, `presence_train`);
  - `proponents.json`: per validation example and predicted class, the top-k proponents and
    opponents (case, slice, class, score, global_explainer);
  - `global_explainers.json`: train regions in the top `global_top` of more than
    `global_fraction` of the validation regions;
  - figures: `train_influence.png` (Fig. 4), `proponent_classes.png` (Fig. 5),
    `self_influence.png` (not with `normalize`: every self-influence is then the sum of the
    learning rates), `local_<case>_<slice>.png` (local explanation panels);
  - `parts/<key>/epoch<e>.npy`: each checkpoint's share of the sum, saved as it finishes;
  - `store/`: the gradient store of the training regions (`influence.store`; projected
    by default), which `tracin_jax.explain` queries for new images.
Regions come from the final model (its own parameters and state) and are held fixed over
the checkpoints; every checkpoint's gradients use that checkpoint's own state. `compute`
gives the scores, the global explainers and the store (the parts and the store are its own
checkpointing: an interrupted run resumes); `write` the files, figures and the manifest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import shutil
from typing import Any, Callable, Iterator

import numpy as np

from tracin_jax import models
from tracin_jax import outputs
from tracin_jax import progress as progress_lib
from tracin_jax import rundir
from tracin_jax import runs
from tracin_jax.data import constants
from tracin_jax.influence import core
from tracin_jax.influence import figures
from tracin_jax.influence import layout
from tracin_jax.influence import projection as projection_lib
from tracin_jax.influence import rankings
from tracin_jax.influence import segmentation
from tracin_jax.influence import store as store_lib
from tracin_jax.settings import setting
from tracin_jax.stages import base
from tracin_jax.training import train as train_lib
from tracin_jax.types import Checkpoint

CLASS_NAMES = constants.TUMOUR_CLASS_NAMES
TRAIN_FILE = rundir.INFLUENCE_TRAIN_FILE
TEST_FILE = rundir.INFLUENCE_TEST_FILE
PROPONENTS_FILE = rundir.PROPONENTS_FILE
GLOBAL_FILE = rundir.GLOBAL_FILE
STORE_DIR = rundir.STORE_DIR


@dataclasses.dataclass(frozen=True)
class InfluenceConfig:
  """Settings of the influence stage."""

  threshold: float = setting(0.8, "Region threshold on p_j (strict: p_j > threshold).",
                             minimum=0.0, maximum=1.0, exclusive=True)
  checkpoint_epochs: tuple[int, ...] | None = setting(
      None, "TracIn checkpoint epochs (unset: the first --max_checkpoints SGD epochs).",
      minimum=1)
  max_checkpoints: int = setting(5, "SGD checkpoints TracIn sums over by default.", minimum=1)
  allow_adam_checkpoints: bool = setting(
      False, "Accept Adam epochs in --checkpoint_epochs (TracIn assumes plain SGD; the "
      "manifest records the choice).")
  top_k: int = setting(10, "Proponents and opponents listed per region.", minimum=1)
  global_top: int = setting(20, "Top-n proponents and opponents that find global explainers.",
                            minimum=1)
  global_fraction: float = setting(
      0.5, "Share of the validation regions above which a train region is a global "
      "explainer.", minimum=0.0, maximum=1.0)
  num_local_panels: int = setting(2, "Local explanation figures.", minimum=0)
  block_size: int | None = setting(
      None, "Examples per gradient block (unset: the library's default, lowered to fit the "
      "memory budget).", flag="influence_block_size", minimum=1)
  params_filter: tuple[str, ...] | None = setting(
      None, "Parameters TracIn differentiates, as path prefixes of the model's parameters "
      "(e.g. head: TracIn's last-layer variant; head,last_hidden); the others are held "
      "fixed (unset: all parameters).", flag="influence_params")
  normalize: bool = setting(
      False, "Renormalised TracIn: every region's gradient is divided by its norm at each "
      "checkpoint, so a score is a learning-rate-weighted sum of cosines (more faithful than "
      "the paper's TracIn by the lds stage's score on the demo; off: the paper's TracIn).",
      flag="influence_normalize")
  store: bool = setting(
      True, "Also write the gradient store of the training regions (influence/store), which "
      "explains new images in seconds (python -m experiments.explain).")
  store_projection: str = setting(
      "countsketch", "How the store keeps gradients: projected by countsketch, srht or "
      "dense random projections, by logra (each layer's inputs and output gradients "
      "projected inside the model, no per-example gradient formed), or exact (none: K x P "
      "floats per slice).",
      choices=("countsketch", "srht", "dense", "logra", "none"))
  store_dim: int = setting(
      4096, "Projected size d of the stored gradients (4096: rank correlation 0.997 with "
      "exact TracIn on the demo).", minimum=1)
  store_seed: int = setting(0, "Seed of the store's projection.")


# The stage's result is the library's reading of a run's influence (`runs.read_influence`).
InfluenceOutputs = runs.InfluenceResults


def checkpoint_hash(checkpoint: Checkpoint) -> str:
  """A hash of a checkpoint's parameters, state and learning rate."""
  import jax  # pylint: disable=g-import-not-at-top

  h = hashlib.sha256(repr(float(checkpoint.learning_rate)).encode())
  outputs.hash_arrays(h, *jax.tree.leaves((checkpoint.params, checkpoint.state)))
  return h.hexdigest()[:16]


def _progress(show: bool, desc: str):
  """A progress callback that draws one bar for the whole computation (the store's build)."""
  if not show:
    return False
  bar = None

  def report(info: progress_lib.Progress) -> None:
    nonlocal bar
    if bar is None:
      bar = progress_lib.ProgressBar(info.examples_total, desc)
    bar.update(info.examples_done - bar.count, path=info.vectorize)
    if info.examples_done >= info.examples_total:
      bar.close()

  return report


def _checkpoint_progress(show: bool, descs: list[str]):
  """A progress callback for `core.influence_per_checkpoint` that draws one bar per
  checkpoint: `descs[i]` names the computation's i-th checkpoint (`Progress.checkpoint` is
  i + 1)."""
  if not show:
    return False
  bar, current = None, None

  def report(info: progress_lib.Progress) -> None:
    nonlocal bar, current
    if info.checkpoint != current:
      if bar is not None:
        bar.close()
      current = info.checkpoint
      bar = progress_lib.ProgressBar(info.checkpoint_examples_total, descs[current - 1])
    bar.update(info.checkpoint_examples_done - bar.count, path=info.vectorize)
    if info.checkpoint_examples_done >= info.checkpoint_examples_total:
      bar.close()

  return report


def _checkpoint_label(t: int, epochs: list[int]) -> str:
  return f"checkpoint of epoch {epochs[t]} ({t + 1}/{len(epochs)})"


def _summed_parts(parts: base.Parts, epochs: list[int],
                  terms: Callable[[list[int]], Iterator[np.ndarray]],
                  check: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
  """The sum over checkpoints of their TracIn terms, each saved as a part as it finishes.

  Args:
    parts: where the terms are saved, one part `epoch<e>` per checkpoint.
    epochs: the checkpoints' epochs, in order.
    terms: `terms(todo)` gives the terms of the checkpoints `todo` (indices into `epochs`)
      in order, each computed when it is asked for.
    check: `check(term, epoch)` returns a freshly computed term if it may be saved, and
      raises otherwise.

  Returns:
    part_0 + part_1 + ... in checkpoint order: saved parts are reused, the others
    computed in one call of `terms`.

  Raises:
    StageError: from `check`, or when a part appeared or vanished on disk meanwhile.
  """
  names = [f"epoch{e}" for e in epochs]
  todo = [t for t, name in enumerate(names) if not parts.has(name)]
  fresh = zip(todo, terms(todo)) if todo else iter(())

  def compute(t: int) -> np.ndarray:
    s, term = next(fresh, (None, None))
    if s != t:
      raise base.StageError(f"influence: the saved parts in {parts.dir} changed while the "
                            "stage ran (is another run of it writing there?); run it again.")
    return check(term, epochs[t])

  total = None
  for t, name in enumerate(names):
    part = parts.get(name, functools.partial(compute, t), label=_checkpoint_label(t, epochs))
    total = part if total is None else total + part
  return total


def _examples(slices, regions: np.ndarray) -> dict[str, np.ndarray]:
  return {"image": slices.images, "target": slices.labels.astype(np.int32), "region": regions}


# What the stage writes, each declared once (the local panels' names are `rundir`'s).
_TRAIN_SCORES = base.Output(
    TRAIN_FILE, "train-influence: scores [3, n_train, 3 n_train] (test class i, then train "
    "class j's block), presence [n_train, 3], example ids, checkpoint epochs and learning "
    "rates")
_TEST_SCORES = base.Output(
    TEST_FILE, "validation-train influence: scores [3, n_val, 3 n_train], presence_test, "
    "presence_train, example ids")
_GLOBALS = base.Output(
    GLOBAL_FILE, "train regions in the top {top} proponents or opponents of more than "
    "{fraction:.0%} of the validation regions")
_PROPONENTS = base.Output(
    PROPONENTS_FILE, "per validation example and predicted class: the top {k} proponents and "
    "opponents (case, slice, class, score, global_explainer)")
_MATRICES = base.Output(
    rundir.TRAIN_INFLUENCE_FIGURE, "Train-influence matrices: for each class of the explained "
    "training region (rows), its TracIn score with every training region of each class "
    "(column blocks); white bands are absent regions (the paper's Fig. 4).", figure=True)
_CLASSES = base.Output(
    rundir.PROPONENT_CLASSES_FIGURE, "Classes of the top {k} proponents of each training "
    "region, per class (the paper's Fig. 5).", figure=True)
_SELF = base.Output(
    rundir.SELF_INFLUENCE_FIGURE, "Self-influence of the training regions per class, highest "
    "first, with the top-ranked slices and their regions.", figure=True)
_LOCAL = base.Output(
    rundir.local_panel("{case}", "{z}"), "Local explanation of validation case {case}, slice "
    "{z}: per predicted class, its top {k} proponents and opponents, global explainers "
    "marked.", figure=True)
_STORE = base.Output(
    STORE_DIR, "gradient store of the training regions: {description}; query it with python "
    "-m experiments.explain")


@base.register_stage
class InfluenceStage(base.StageBase):
  """TracIn of every validation and training region against every training region."""

  name, config_cls, needs = "influence", InfluenceConfig, ("train",)
  supports_volumes = True
  writes = (_TRAIN_SCORES, _TEST_SCORES, _GLOBALS, _PROPONENTS, _MATRICES, _CLASSES, _SELF,
            _LOCAL, _STORE)

  def __init__(self, config: InfluenceConfig | None = None):
    super().__init__(config)
    self._cache: dict[tuple, dict[str, Any]] = {}  # per (workdir, data): loaded, hashed

  def _cached(self, context: base.Context) -> dict[str, Any]:
    return self._cache.setdefault((context.workdir, context.data_fingerprint()), {})

  def _checkpoints(self, context: base.Context):
    """(apply_fn, checkpoints, epochs, final Checkpoint, final apply_fn), loaded once.

    The final model's own apply_fn defaults to its own state, so library functions that
    take `apply_fn(params, images)` (features, regions) see the explained model exactly.
    """
    cache = self._cached(context)
    if "loaded" not in cache:
      apply_fn, checkpoints, epochs = train_lib.tracin_checkpoints(
          context.workdir, self.config.checkpoint_epochs, self.config.max_checkpoints,
          allow_adam=self.config.allow_adam_checkpoints)
      final_model, meta = train_lib.load_model(context.workdir)
      final_apply, params, state = models.functional(final_model)
      final = Checkpoint(params, float(meta["learning_rate"]), state)
      cache["loaded"] = apply_fn, checkpoints, epochs, final, final_apply
    return cache["loaded"]

  def _inputs(self, context: base.Context) -> dict[str, Any]:
    """What the TracIn sums depend on (the checkpoints hashed once)."""
    cache = self._cached(context)
    if "inputs" not in cache:
      _, checkpoints, epochs, final, _ = self._checkpoints(context)
      cache["inputs"] = {
          "run": train_lib.load_record(context.workdir),
          "data": context.data_fingerprint(),
          "threshold": self.config.threshold,
          "checkpoints": {str(e): checkpoint_hash(c) for e, c in zip(epochs, checkpoints)},
          "final_model": checkpoint_hash(final),
      }
      if self.config.params_filter is not None:  # absent when unset: old parts still match
        cache["inputs"]["params_filter"] = list(self.config.params_filter)
      if self.config.normalize:  # likewise
        cache["inputs"]["normalize"] = True
    return cache["inputs"]

  def fingerprint(self, context: base.Context) -> str:
    return base.inputs_key({**self._inputs(context), "settings": outputs.plain(self.config)})

  def compute(self, context: base.Context) -> InfluenceOutputs:
    """TracIn of every validation and training region against every training region, summed
    over the checkpoints, its global explainers, and the training regions' gradient store.

    Each checkpoint's term is saved as a part as it finishes and the store is built in
    blocks, so an interrupted computation resumes; the result's files are `write`'s.
    """
    config = self.config
    apply_fn, checkpoints, epochs, final, final_apply = self._checkpoints(context)
    self._log_settings(context, checkpoints, epochs, final)
    train_set, val_set = context.train_set, context.val_set
    # Regions of the explained model (the final checkpoint), held fixed over checkpoints.
    train_regions, val_regions = (
        segmentation.predict_regions(final_apply, final.params, s.images, config.threshold,
                                     state=final.state) for s in (train_set, val_set))
    presence_train = segmentation.region_presence(train_regions)
    presence_val = segmentation.region_presence(val_regions)
    context.log(f"Regions (p > {config.threshold}) present in train: "
                + _class_counts(presence_train) + "; validation: "
                + _class_counts(presence_val) + ".")
    loss_fn = segmentation.make_region_losses(apply_fn)
    train_ex, val_ex = _examples(train_set, train_regions), _examples(val_set, val_regions)
    train_blocks, test_blocks = self._scores(context, loss_fn, checkpoints, epochs, train_ex,
                                             val_ex, presence_train, presence_val)
    store = None
    if config.store:
      store = _store_headline(
          self._build_store(context, loss_fn, checkpoints, epochs, train_ex, train_set))
    return InfluenceOutputs(
        train_blocks, test_blocks, presence_train, presence_val, config.threshold,
        CLASS_NAMES, list(epochs), [c.learning_rate for c in checkpoints],
        _global_explainers(test_blocks, train_set, config, train_regions), final_apply,
        final.params,
        final.state, train_regions, val_regions, self.manifest(), store=store)

  def _log_settings(self, context: base.Context, checkpoints, epochs: list[int],
                    final: Checkpoint) -> None:
    """Logs the checkpoints and the gradients' settings.

    Raises:
      StageError: `params_filter` selects no parameter of the final model.
    """
    config = self.config
    rates = [c.learning_rate for c in checkpoints]
    context.log(f"TracIn checkpoints: epochs {epochs}, learning rates "
                f"{[f'{r:g}' for r in rates]}.")
    if config.params_filter is not None:
      kept = _check_params_filter(config.params_filter, final.params)
      context.log(f"TracIn gradients restricted to {kept}.")
    if config.normalize:
      context.log("Renormalised TracIn: each region's gradient is unit-normalised per "
                  "checkpoint.")

  def _scores(self, context: base.Context, loss_fn, checkpoints, epochs: list[int],
              train_ex, val_ex, presence_train: np.ndarray,
              presence_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train_blocks [K, n_train, K * n_train], test_blocks [K, n_val, K * n_train]): TracIn
    summed over the checkpoints, NaN for absent regions.

    One train-influence of train + validation, each checkpoint's term saved as it finishes:
    each example's gradients are computed once per checkpoint (when they fit in the budget)
    and serve both the train-train and the validation-train blocks; the
    validation-validation block is cheap and dropped.
    """
    config = self.config
    both = {key: np.concatenate([train_ex[key], val_ex[key]]) for key in train_ex}
    parts = base.Parts(context.stage_dir(self.name) / "parts", self._inputs(context),
                       what="influence")
    present = np.concatenate([presence_train, presence_val])

    def terms(todo: list[int]):
      descs = [f"TracIn gradients, {_checkpoint_label(t, epochs)}" for t in todo]
      return core.influence_per_checkpoint(
          loss_fn, [checkpoints[t] for t in todo], both,
          memory_budget_bytes=context.memory_budget_bytes, batch_size=config.block_size,
          progress=_checkpoint_progress(context.progress, descs),
          params_filter=config.params_filter, normalize=config.normalize)

    total = _summed_parts(parts, epochs, terms, lambda term, epoch: _finite_part(
        term, present, presence_train, epoch))
    n = len(presence_train)
    train_scores = segmentation.mask_absent(total[:n, :, :n, :], presence_train,
                                            presence_train)
    test_scores = segmentation.mask_absent(total[n:, :, :n, :], presence_val, presence_train)
    return layout.to_class_blocks(train_scores), layout.to_class_blocks(test_scores)

  def write(self, context: base.Context, result: InfluenceOutputs) -> base.Manifest:
    """The score files, the explainers, the figures and the manifest listing them (and the
    store `compute` built); proponents and figures are drawn from the result's scores."""
    manifest = self.manifest()
    self._write_scores(context, manifest, result)
    self._write_explainers(context, manifest, result)
    self._write_figures(context, manifest, result)
    self._write_local_panels(context, manifest, result)
    if result.store is not None:  # built by `compute`: listed here
      store = store_lib.open_store(context.stage_dir(self.name) / _STORE.path())
      self.list_output(context, manifest, _STORE, description=_store_description(
          store, _unit(context.train_set)))
      manifest.headline["store"] = result.store
    manifest.headline.update({
        "checkpoint_epochs": list(result.epochs),
        "renormalised": bool(self.config.normalize),
        # float32 rates, as written
        "learning_rates": [float(f"{r:.7g}") for r in result.learning_rates],
        "regions_train": dict(zip(CLASS_NAMES, result.presence_train.sum(0).tolist())),
        "regions_validation": dict(zip(CLASS_NAMES, result.presence_test.sum(0).tolist())),
        "global_explainers": len(result.global_explainers)})
    context.log(f"Wrote {context.stage_dir(self.name)}: {TRAIN_FILE}, {TEST_FILE}, "
                f"{PROPONENTS_FILE}, {GLOBAL_FILE} ({len(result.global_explainers)} global "
                "explainers) and figures.")
    return manifest

  def _write_scores(self, context: base.Context, manifest: base.Manifest,
                    result: InfluenceOutputs) -> None:
    """The train-influence and validation-train influence files."""
    train_set, val_set = context.train_set, context.val_set
    ids = dict(train_case_ids=np.asarray(train_set.case_ids, str),
               train_slice_indices=np.asarray(train_set.slice_indices, np.int32))
    common = dict(epochs=np.asarray(result.epochs),
                  learning_rates=np.asarray(result.learning_rates),
                  threshold=np.asarray(result.threshold),
                  class_names=np.asarray(result.class_names),
                  dataset=np.asarray(context.data_name), synthetic=np.asarray(context.synthetic))
    outputs.save_npz(self.list_output(context, manifest, _TRAIN_SCORES),
                     scores=result.train_blocks, presence=result.presence_train, **ids,
                     **common)
    outputs.save_npz(self.list_output(context, manifest, _TEST_SCORES),
                     scores=result.test_blocks, presence_test=result.presence_test,
                     presence_train=result.presence_train,
                     test_case_ids=np.asarray(val_set.case_ids, str),
                     test_slice_indices=np.asarray(val_set.slice_indices, np.int32),
                     **ids, **common)

  def _write_explainers(self, context: base.Context, manifest: base.Manifest,
                        result: InfluenceOutputs) -> None:
    """The global explainers and, per validation region, its proponents and opponents."""
    config, globals_ = self.config, result.global_explainers
    outputs.write_json(self.list_output(context, manifest, _GLOBALS, top=config.global_top,
                                        fraction=config.global_fraction), {
        "dataset": context.data_name, "top": config.global_top,
        "min_fraction": config.global_fraction,
        "num_test_regions": int(result.presence_test.sum()), "global_explainers": globals_})
    explanations = rankings.explain(
        result.test_blocks, context.val_set.ids, context.train_set.ids, result.class_names,
        k=config.top_k, global_columns=[g["column"] for g in globals_])
    if _volumes(context.val_set):
      _record_drawn_slices(explanations, context, result)
    outputs.write_json(self.list_output(context, manifest, _PROPONENTS, k=config.top_k), {
        "dataset": context.data_name, "k": config.top_k,
        "checkpoint_epochs": list(result.epochs), "threshold": result.threshold,
        "explanations": explanations})

  def _write_figures(self, context: base.Context, manifest: base.Manifest,
                     result: InfluenceOutputs) -> None:
    """Fig. 4 (train-influence), Fig. 5 (proponents' classes) and the self-influence."""
    config, suffix, names = self.config, context.suffix, result.class_names
    figures.plot_influence_matrices(
        result.train_blocks, names, self.list_output(context, manifest, _MATRICES),
        title="Train-influence" + (", renormalised" if config.normalize else "") + suffix)
    dist = rankings.proponent_class_distribution(result.train_blocks, k=config.top_k,
                                                 exclude_self=True)
    figures.plot_class_distribution(
        dist, names, self.list_output(context, manifest, _CLASSES, k=config.top_k),
        k=config.top_k, title_suffix=suffix)
    if config.normalize:
      # A unit gradient's score with itself is 1: every self-influence is the sum of the
      # learning rates, and a figure of them would rank nothing.
      (context.stage_dir(self.name) / _SELF.path()).unlink(missing_ok=True)
      context.log(f"No {_SELF.path()}: renormalised, every region's self-influence is the "
                  "sum of the learning rates.")
    else:
      self_inf = layout.self_scores(layout.from_class_blocks(result.train_blocks))
      figures.plot_self_influence(self_inf, context.train_set, result.train_regions, names,
                                  self.list_output(context, manifest, _SELF),
                                  title_suffix=suffix)

  def _write_local_panels(self, context: base.Context, manifest: base.Manifest,
                          result: InfluenceOutputs) -> None:
    """Local explanations of the validation examples that
    `rankings.local_explanation_examples` picks."""
    k, val_set = self.config.top_k, context.val_set
    global_columns = [g["column"] for g in result.global_explainers]
    drawn = {}
    for a in rankings.local_explanation_examples(result.val_regions,
                                                 self.config.num_local_panels,
                                                 val_set.case_ids):
      case, z = val_set.ids[a]
      if _volumes(val_set):  # named by the slice of its regions' largest cross-section
        z = figures.representative_slice(result.val_regions[a].any(axis=-1))
        drawn[case] = {name: figures.representative_slice(result.val_regions[a][..., i])
                       for i, name in enumerate(result.class_names)
                       if result.presence_test[a, i]}
      figures.plot_local_explanation(
          a, result.test_blocks, val_set, result.val_regions, context.train_set,
          result.train_regions, result.class_names,
          self.list_output(context, manifest, _LOCAL, case=case, z=z, k=k), k=k,
          global_columns=global_columns, title_suffix=context.suffix)
    if drawn:  # which axial slice each volume's rows show, per class
      manifest.headline["local_panel_slices"] = drawn

  def store_settings(self) -> dict[str, Any]:
    """The `build_store` settings of this configuration."""
    config = self.config
    return {"projection": None if config.store_projection == "none" else
            projection_lib.Projection(config.store_dim, config.store_projection,
                                      config.store_seed),
            "params_filter": config.params_filter, "normalize": config.normalize}

  def _build_store(self, context: base.Context, loss_fn, checkpoints, epochs, train_ex,
                   train_set) -> store_lib.GradientStore:
    """Builds (or finishes, or reuses) the training regions' gradient store."""
    path = context.stage_dir(self.name) / STORE_DIR
    settings = self.store_settings()
    fingerprint = base.inputs_key(self._inputs(context))
    kwargs = dict(example_ids=[f"{c}:{z}" for c, z in train_set.ids],
                  checkpoint_names=[str(e) for e in epochs], fingerprint=fingerprint,
                  batch_size=self.config.block_size,
                  memory_budget_bytes=context.memory_budget_bytes, **settings)
    progress = _progress(context.progress, "Gradient store of the training regions")
    try:
      store = store_lib.build_store(path, loss_fn, checkpoints, train_ex, progress=progress,
                                    **kwargs)
    except (store_lib.StoreMismatch, outputs.DamagedFile) as e:
      # The store is this stage's output: one built for other weights or settings, or
      # whose store.json is damaged, is replaced, as the stage's other outputs are (a
      # damaged block alone is built again by `build_store`).
      why = f"{e.path}: {e.problem}" if isinstance(e, outputs.DamagedFile) else e
      context.log(f"Rebuilding the gradient store: {why}")
      shutil.rmtree(path)
      store = store_lib.build_store(path, loss_fn, checkpoints, train_ex, progress=progress,
                                    **kwargs)
    report_ = store.last_build
    context.log(f"Gradient store {path}: {_store_description(store, _unit(train_set))}; "
                f"{report_.blocks_built} blocks built, {report_.blocks_reused} reused in "
                f"{report_.seconds:.1f} s.")
    return store

  def load(self, context: base.Context) -> InfluenceOutputs:
    """Reads the stage's results and recomputes the final model's regions.

    Raises:
      StageError: the outputs are missing, were computed on other data, or the final model
        changed since.
    """
    try:
      return runs.read_influence(context.workdir, context.train_set, context.val_set)
    except runs.RunMismatch as e:
      raise base.StageError(str(e)) from None


def _volumes(examples) -> bool:
  """Whether the examples are volumes [N, D, H, W, C] (a run with --spatial_dims=3)."""
  return examples.images.ndim == 5


def _record_drawn_slices(explanations: list[dict[str, Any]], context: base.Context,
                         result: InfluenceOutputs) -> None:
  """Sets each explanation's and each of its entries' "slice" to the axial slice a figure
  draws of that volume's region (`figures.representative_slice`: its largest
  cross-section), in place; volumes have no slice of their own."""
  names = list(result.class_names)
  test_index = {c: a for a, c in enumerate(context.val_set.cases)}
  train_index = {c: b for b, c in enumerate(context.train_set.cases)}
  for e in explanations:
    e["slice"] = figures.representative_slice(
        result.val_regions[test_index[e["case"]]][..., names.index(e["class"])])
    for entry in e["proponents"] + e["opponents"]:
      entry["slice"] = figures.representative_slice(
          result.train_regions[train_index[entry["case"]]][..., names.index(entry["class"])])


def _class_counts(presence: np.ndarray) -> str:
  """The regions present per class of presence [n, K], as "NCR/NET 3, ED 5, ET 2"."""
  return ", ".join(f"{n} {int(c)}" for n, c in zip(CLASS_NAMES, presence.sum(0)))


def _global_explainers(test_blocks: np.ndarray, train_set, config: InfluenceConfig,
                       train_regions: np.ndarray | None = None) -> list[dict[str, Any]]:
  """`rankings.global_explainers` of test_blocks [K, n_val, K * n_train], each with its
  training slice's case, slice and class name (a training volume's slice: the one its
  region is drawn at, from `train_regions` [n_train, D, H, W, K])."""
  globals_ = rankings.global_explainers(test_blocks, top=config.global_top,
                                      min_fraction=config.global_fraction)
  for g in globals_:
    g["case"], g["slice"] = train_set.ids[g["train_index"]]
    g["class"] = CLASS_NAMES[g["train_class"]]
    if train_regions is not None and _volumes(train_set):  # the drawn slice of its region
      g["slice"] = figures.representative_slice(
          train_regions[g["train_index"]][..., g["train_class"]])
  return globals_


def _store_headline(store: store_lib.GradientStore) -> dict[str, Any]:
  """What the manifest's headline says of a store just built: bytes, projection, seconds."""
  return {"bytes": store.nbytes(), "projection": store.meta["projection"],
          "seconds": round(store.last_build.seconds, 1)}


def _unit(examples) -> str:
  return "volumes" if _volumes(examples) else "slices"


def _store_description(store: store_lib.GradientStore, unit: str = "slices") -> str:
  spec = store.meta["projection"]
  kind = "exact gradients" if spec is None else f"{spec['kind']} projection to d = {spec['dim']}"
  return (f"{store.num_examples} {unit} x {store.num_outputs} regions x "
          f"{len(store.learning_rates)} checkpoints, {kind}, {store.nbytes() / 1e6:.1f} MB")


def _finite_part(part: np.ndarray, present: np.ndarray, present_train: np.ndarray,
                 epoch: int) -> np.ndarray:
  """`part` [n, K, n_train, K] if its scores of present regions are finite; it is then
  saved and reused, so a non-finite one is never cached.

  Raises:
    StageError: naming the checkpoint's epoch.
  """
  n_train = present_train.shape[0]
  scores = part[:, :, :n_train, :][present][:, present_train]
  bad = int(scores.size - np.count_nonzero(np.isfinite(scores)))
  if bad:
    raise base.StageError(
        f"influence: the checkpoint of epoch {epoch} gives {bad} non-finite TracIn scores "
        f"of {scores.size} (its gradients are not finite); nothing was saved. Check that "
        "checkpoint, or leave it out with --checkpoint_epochs.")
  return part


def _check_params_filter(prefixes: tuple[str, ...], params) -> str:
  """What the `params_filter` setting keeps, in words.

  Raises:
    StageError: a prefix selects no parameter (the message lists the top-level groups).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from tracin_jax import params as params_lib  # pylint: disable=g-import-not-at-top

  for prefix in prefixes:
    try:
      params_lib.selection(params, prefix)
    except ValueError:
      raise base.StageError(
          f"--influence_params: {prefix!r} selects no parameter; the model's top-level "
          f"groups are {', '.join(params_lib.group_names(params))}.") from None
  mask = params_lib.selection(params, prefixes)
  kept = [x for x, m in zip(jax.tree.leaves(params), mask) if m]
  return (f"{', '.join(prefixes)} ({len(kept)} arrays, "
          f"{sum(int(np.size(x)) for x in kept)} parameters)")
