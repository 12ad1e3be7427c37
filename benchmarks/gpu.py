"""The GPU check: per-example gradient paths, the store at the paper's scale, saliency speed.

    PYTHONPATH=. python benchmarks/gpu.py --out=gpu.json            # one GPU: under 8 minutes
    PYTHONPATH=. python benchmarks/gpu.py --quick --out=/tmp/q.json   # tiny: a check on a CPU

It runs on whatever device JAX finds (the JSON names it, with the versions) and measures,
in this order:

1. influence: `tracin_jax.influence(loss_fn, checkpoints, train, test, vectorize=v)` for
   v = "auto" (the JSON's "auto" says which path it measured fastest on the first block and
   took, with what it measured: "loop", "vmap" and, on a CPU of several cores, "threads"),
   "loop" and "vmap", against the naive
   `jax.jit(jax.vmap(jax.grad(loss_j)))` once per class j followed by the Gram products
   (`common.naive_grads`), on the demo UNet (base width 8, depth 3, 96 px; `--train` x
   `--test` images) and on the paper's (base 64, depth 4, 192 px: 31.0 M parameters;
   `--large_train` x `--large_test`); K = 3 region losses on disk-shaped regions,
   `--checkpoints` perturbed checkpoints. Each path's scores are compared with the loop
   path's (max |difference| / max |scores|, "error_vs_loop"); "scores_agree" when all are
   within `--tolerance`.
2. store: `build_store` of `--store_slices` slices of the paper's UNet (blocks of
   `--store_block`, one checkpoint), exact and projected (`Projection(--dim)`, CountSketch),
   each into a fresh directory under `--workdir` that is removed after it, and the same
   blocks' per-example gradients alone. The seconds per slice are extrapolated to the
   paper's 2,070 slices x 5 checkpoints: hours, bytes on disk and whether the disk under
   `--workdir` holds them; and the exact train-influence's plan without a store under
   `--memory_budget_gib` (`plan_influence`: the gradient passes that budget forces).
3. saliency: maps per second of each method of `tracin_jax.saliency` (`common.
   saliency_methods`, the library's defaults: IG 50 steps, guided IG 200, SmoothGrad 25
   samples) on both UNets, `--saliency_batch` random images per call.

Every timing is the median of `--repeats` calls after one warm-up call (compilation
included: "warmup_seconds"), the methods of a comparison taking turns
(`common.time_in_turns`). The JSON (`--out`) is rewritten after every step, so whatever
finished is there however the run ends. The time budget keeps the run inside a device
lease: once `--deadline_s` seconds have passed since the start (imports included), no
further step or method starts and the JSON lists what was skipped; at `--hard_limit_s` a
watchdog writes the JSON ("stopped", naming the step it interrupted) and ends the process
with status 3. A step that fails (out of device memory, say) is recorded under "errors"
and the run goes on. "complete" is true when nothing was skipped and nothing failed.

`--quick` runs a tiny UNet (base 4, depth 1, 16 px) in every role, with 3 x 3 examples,
6 slices and few steps: a check that every part runs and that the paths agree (50 to 140 s
on 2 cores at load 5 to 8, most of it compilation). The script imports neither nibabel,
nilearn nor Grain.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback

# The time budget counts from here, the imports below (seconds with JAX) included.
_START = time.monotonic()

from absl import app, flags
import jax
import numpy as np

from benchmarks import common
import tracin_jax
from tracin_jax import models
from tracin_jax import outputs
from tracin_jax import saliency
from tracin_jax.influence import core
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import store as store_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("out", os.path.join(tempfile.gettempdir(), "tracin_jax_gpu_check.json"),
                    "JSON file of the figures (rewritten after every step).")
flags.DEFINE_bool("quick", False, "Tiny UNet, tiny images, a handful of examples: seconds on "
                  "a CPU.")
flags.DEFINE_float("deadline_s", 450.0, "Seconds from the start after which no step starts.")
flags.DEFINE_float("hard_limit_s", 480.0, "Seconds from the start at which a watchdog writes "
                   "the JSON and ends the process (status 3).")
flags.DEFINE_list("parts", ["influence", "store", "saliency"], "Parts to run, in this order.")
flags.DEFINE_list("influence_models", ["demo", "paper"], "Models of the influence part: demo, "
                  "large (base 16, depth 4, 128 px) or paper.")
flags.DEFINE_list("saliency_models", ["demo", "paper"], "Models of the saliency part.")
flags.DEFINE_integer("train", 32, "Train images of the demo UNet's influence comparison (as "
                     "many as --test: one block shape, so each path compiles once).")
flags.DEFINE_integer("test", 32, "Test images of the demo UNet's influence comparison.")
flags.DEFINE_integer("large_train", 8, "Train images of the larger UNets' comparisons (as "
                     "many as --large_test and --store_block: one compiled block shape).")
flags.DEFINE_integer("large_test", 8, "Test images of the larger UNets' comparisons.")
flags.DEFINE_integer("checkpoints", 2, "TracIn checkpoints of the influence comparison.")
flags.DEFINE_list("paths", ["auto", "loop", "vmap", "naive"], "Paths of the influence part.")
flags.DEFINE_integer("repeats", 3, "Timed calls after the warm-up; medians are reported.")
flags.DEFINE_float("tolerance", 1e-2, "Largest score difference relative to the largest "
                   "score for two paths to agree (float32 gradients near ReLU kinks differ "
                   "at about 1e-3; TF32 may add more).")
flags.DEFINE_float("memory_budget_gib", 16.0, "memory_budget_bytes of influence and "
                   "build_store (GiB), and of the exact plan.")
flags.DEFINE_integer("store_slices", 16, "Training slices of the store build sample.")
flags.DEFINE_integer("store_block", 8, "Slices per store block.")
flags.DEFINE_integer("dim", 4096, "Projected size d of the projected store.")
flags.DEFINE_integer("paper_slices", 2070, "The paper's training slices.")
flags.DEFINE_integer("paper_checkpoints", 5, "The paper's TracIn checkpoints.")
flags.DEFINE_integer("saliency_batch", 2, "Images per saliency call.")
flags.DEFINE_list("saliency_methods", [], "Saliency methods (label prefixes; default all).")
flags.DEFINE_string("workdir", None, "Directory in which the store samples are written, in a "
                    "temporary directory removed at the end (default: the system's "
                    "temporary directory).")
flags.DEFINE_enum("matmul_precision", "default",
                  ["default", "float32", "tensorfloat32", "bfloat16"],
                  "jax_default_matmul_precision of float32 matmuls and convolutions "
                  "('default' leaves JAX's own, which is TF32 on recent NVIDIA GPUs).")
flags.DEFINE_integer("seed", 0, "Seed of the weights and data.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  base_width: int
  depth: int
  size: int


MODELS = {
    "demo": ModelConfig(8, 3, 96),  # the demo's UNet
    "large": ModelConfig(16, 4, 128),  # benchmarks/vs_pytorch.py's larger one: 1.94 M
    "paper": ModelConfig(64, 4, 192),  # the paper's: 31.0 M parameters
    "quick": ModelConfig(4, 1, 16),
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a run uses: the flags, or `--quick`'s tiny versions of them."""

  influence_models: tuple[str, ...]
  saliency_models: tuple[str, ...]
  store_model: str
  sizes: dict  # model name -> (n_train, n_test)
  checkpoints: int
  repeats: int
  store_slices: int
  store_block: int
  dim: int
  saliency_batch: int
  saliency: common.SaliencySettings


def settings_from_flags() -> Settings:
  if FLAGS.quick:
    return Settings(
        influence_models=("quick",), saliency_models=("quick",), store_model="quick",
        sizes={"quick": (3, 3)}, checkpoints=2, repeats=2, store_slices=6, store_block=3,
        dim=64, saliency_batch=1,
        saliency=common.SaliencySettings(ig_steps=4, gig_steps=4, samples=2, ies_samples=1,
                                         ies_side=2))
  unknown = [m for m in [*FLAGS.influence_models, *FLAGS.saliency_models] if m not in MODELS]
  if unknown:
    raise app.UsageError(f"unknown model {unknown} in --influence_models or "
                         f"--saliency_models; models: {', '.join(MODELS)}")
  return Settings(
      influence_models=tuple(FLAGS.influence_models),
      saliency_models=tuple(FLAGS.saliency_models), store_model="paper",
      sizes={m: ((FLAGS.train, FLAGS.test) if m == "demo" else
                 (FLAGS.large_train, FLAGS.large_test)) for m in MODELS},
      checkpoints=FLAGS.checkpoints, repeats=FLAGS.repeats, store_slices=FLAGS.store_slices,
      store_block=FLAGS.store_block, dim=FLAGS.dim, saliency_batch=FLAGS.saliency_batch,
      saliency=common.SaliencySettings())


# ----------------------------------------------------------------------------- the report


class Report:
  """The JSON's contents, written after every step (and by the watchdog), under one lock."""

  def __init__(self, path: str, deadline_s: float):
    self.path, self.deadline = path, _START + deadline_s
    self.lock = threading.RLock()
    self.step = "start"
    self.data = {"benchmark": "benchmarks/gpu.py", "complete": False, "skipped": [],
                 "errors": []}

  def elapsed(self) -> float:
    return time.monotonic() - _START

  def past_deadline(self) -> bool:
    return time.monotonic() > self.deadline

  def set(self, key, value) -> None:
    with self.lock:
      self.data[key] = value
      self.write()

  def append(self, key, value) -> None:
    with self.lock:
      self.data.setdefault(key, []).append(value)
      self.write()

  def skip(self, what: str, reason: str) -> None:
    print(f"skipped {what}: {reason}", flush=True)
    self.append("skipped", {"step": what, "reason": reason})

  def write(self) -> None:
    with self.lock:
      self.data["elapsed_s"] = self.elapsed()
      self.data["load_average_end"] = list(os.getloadavg())
      outputs.write_json(self.path, outputs.plain(self.data), unique=True)


def _watchdog(report: Report, hard_limit_s: float, cleanup) -> threading.Timer:
  """Starts a timer that, at `hard_limit_s` from the start, writes the JSON, calls
  `cleanup()` and ends the process with status 3."""

  def fire():
    # The main thread may hold the lock in a long write; wait a little, then write anyway.
    got = report.lock.acquire(timeout=5)
    try:
      report.data["stopped"] = {"reason": f"hard limit of {hard_limit_s:g} s reached",
                                "during": report.step}
      report.write()
    finally:
      if got:
        report.lock.release()
    print(f"\nhard limit of {hard_limit_s:g} s reached during {report.step}; the JSON is "
          f"at {report.path}", file=sys.stderr, flush=True)
    cleanup()
    os._exit(3)  # pylint: disable=protected-access

  timer = threading.Timer(max(0.0, hard_limit_s - report.elapsed()), fire)
  timer.daemon = True
  timer.start()
  return timer


def _versions() -> dict:
  out = {"python": platform.python_version(), "jax": jax.__version__}
  for name in ("jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "jax-cuda13-pjrt",
               "jax-cuda12-pjrt", "flax", "optax", "numpy"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def _device() -> dict:
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {"platform": device.platform, "device_kind": device.device_kind,
          "devices": jax.device_count(), "memory_bytes": stats.get("bytes_limit"),
          "cpus": os.cpu_count()}


def _peak_memory() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  return {"device_peak_gib_so_far": (stats["peak_bytes_in_use"] / 2**30
                                     if "peak_bytes_in_use" in stats else None),
          "host_peak_gib_so_far": common.peak_rss_gib()}


# ----------------------------------------------------------------------------- the parts


class Setup:
  """One UNet: its pure view, the region losses, perturbed checkpoints (built once, shared
  by the parts, so that compiled functions are reused)."""

  def __init__(self, name: str, config: ModelConfig, num_checkpoints: int, seed: int):
    self.name, self.config = name, config
    self.model = models.get_model("unet", base_width=config.base_width, depth=config.depth,
                                  seed=seed)
    self.apply_fn, params, _ = models.functional(self.model)
    self.loss_fn = tracin_jax.make_region_losses(self.apply_fn)
    self.p = grads_lib.parameter_count(params)
    self.checkpoints = common.perturbed_checkpoints(params, num_checkpoints,
                                                    np.random.default_rng(seed))

  def describe(self) -> dict:
    return {"model": self.name, **dataclasses.asdict(self.config), "parameters": self.p}


def influence_part(s: Setup, n_train: int, n_test: int, settings: Settings, report: Report,
                   budget: int) -> dict:
  """Times every path of the influence core and the naive gradients on one model."""
  train = common.region_examples(n_train, s.config.size, 1)
  test = common.region_examples(n_test, s.config.size, 2)
  naive = common.naive_grads(s.loss_fn)

  def naive_scores():
    parts = [(naive(params, test), naive(params, train), lr) for params, lr in s.checkpoints]
    return common.gram_scores(parts, n_test, n_train)

  def path(v):
    return lambda: tracin_jax.influence(s.loss_fn, s.checkpoints, train, test, vectorize=v,
                                        memory_budget_bytes=budget)

  fns = {v: (naive_scores if v == "naive" else path(v)) for v in FLAGS.paths}

  def log(name, seconds):
    report.step = f"influence {s.name}: {name}"
    print(f"  {s.name} {name:6s} warm-up {seconds:.2f} s", flush=True)

  t = common.time_in_turns(fns, settings.repeats, deadline=report.deadline, log=log)
  # What "auto" measured for this loss and example shape (here, or in an earlier part).
  auto = grads_lib.auto_choice(s.loss_fn, common.K, s.checkpoints[0][0], test)
  reference = t.results.get("loop")
  errors = {}
  if reference is not None:
    scale = float(np.abs(reference).max())
    errors = {m: float(np.abs(r - reference).max() / scale) for m, r in t.results.items()}
  gradients = (n_train + n_test) * common.K * settings.checkpoints
  return {
      **s.describe(), "n_train": n_train, "n_test": n_test, "k": common.K,
      "checkpoints": settings.checkpoints, "memory_budget_bytes": budget,
      "auto": dataclasses.asdict(auto) if auto else None,
      "seconds": t.seconds, "warmup_seconds": t.warmup, "repeats": t.repeats,
      "class_gradients_per_second": {m: gradients / x for m, x in t.seconds.items()},
      "error_vs_loop": errors, "tolerance": FLAGS.tolerance,
      "scores_agree": bool(errors) and all(e <= FLAGS.tolerance for e in errors.values()),
      "skipped_paths": t.skipped, **_peak_memory()}


def store_part(s: Setup, settings: Settings, report: Report, budget: int, workdir: str) -> dict:
  """Builds the store of a sample of slices, exact and projected, and extrapolates."""
  n, block = settings.store_slices, settings.store_block
  sample = common.region_examples(n, s.config.size, 3)
  first = {key: x[:block] for key, x in sample.items()}
  checkpoint = s.checkpoints[:1]
  projection = tracin_jax.Projection(settings.dim)
  k = common.K

  def build(data, proj):
    def run():
      path = tempfile.mkdtemp(dir=workdir, prefix="store-")
      try:
        store = store_lib.build_store(path, s.loss_fn, checkpoint, data, projection=proj,
                                      batch_size=block, memory_budget_bytes=budget)
        return store.nbytes()
      finally:
        shutil.rmtree(path, ignore_errors=True)
    return run

  def gradients(data):
    def run():
      return [grads_lib.block_grads(s.loss_fn, k, checkpoint[0][0],
                                    {key: x[b:b + block] for key, x in data.items()},
                                    "auto")[0].block_until_ready().shape
              for b in range(0, n, block)]
    return run

  # Warm-up: one block of each (compiles every path "auto" measures, and the projection).
  fns = {"exact": build(sample, None), "projected": build(sample, projection),
         "gradients": gradients(sample)}
  warm = {"exact": build(first, None), "projected": build(first, projection)}
  warmup = {}
  for name, fn in warm.items():
    report.step = f"store {s.name}: warm-up {name}"
    start = time.perf_counter()
    fn()
    warmup[name] = time.perf_counter() - start
    print(f"  store {name:9s} warm-up (one block of {block}) {warmup[name]:.2f} s", flush=True)
  report.step = f"store {s.name}: timed builds"
  t = common.time_in_turns(fns, settings.repeats, warm_up=False, deadline=report.deadline)
  per_slice = {name: x / n for name, x in t.seconds.items()}
  auto = grads_lib.auto_choice(s.loss_fn, k, checkpoint[0][0], first)
  c, slices = FLAGS.paper_checkpoints, FLAGS.paper_slices
  free = shutil.disk_usage(workdir).free
  extrapolated = {}
  for name, proj in (("exact", None), ("projected", projection)):
    if name in per_slice:
      e = common.store_extrapolation(per_slice[name], slices, c, k, s.p, proj)
      extrapolated[name] = {**e, "fits_on_disk": e["bytes"] <= free}
  plan = None
  if "gradients" in per_slice:
    plan = dataclasses.asdict(core.plan_influence(
        slices, None, k, s.p, c, memory_budget_bytes=budget,
        seconds_per_example=per_slice["gradients"]))
  return {
      **s.describe(), "slices": n, "block": block, "checkpoints_built": 1, "k": k,
      "dim": settings.dim, "projection": projection.describe(),
      "auto": dataclasses.asdict(auto) if auto else None,
      "warmup_seconds": warmup, "seconds": t.seconds, "repeats": t.repeats,
      "seconds_per_slice": per_slice, "bytes_measured": {m: t.results[m] for m in
                                                         ("exact", "projected") if m in t.results},
      "paper_slices": slices, "paper_checkpoints": c, "disk_free_bytes": free,
      "extrapolated": extrapolated, "exact_influence_plan": plan,
      "memory_budget_bytes": budget, "skipped_timings": t.skipped, **_peak_memory()}


def saliency_part(s: Setup, settings: Settings, report: Report) -> dict:
  """Maps per second of each saliency method on one model."""
  n = settings.saliency_batch
  m = saliency.NnxModel(s.model)
  x, target, ies_target = common.saliency_inputs(n, s.config.size, settings.saliency.ies_side)
  methods = common.saliency_methods(m, x, target, ies_target, settings.saliency)
  chosen = {label: methods[label] for label in common.select(methods, FLAGS.saliency_methods)}
  report.step = f"saliency {s.name}"
  rows, skipped = common.time_saliency(chosen, n, settings.repeats, deadline=report.deadline)
  for label in skipped:
    report.skip(f"saliency {s.name}: {label}", "past the deadline")
  return {**s.describe(), "batch": n, "settings": dataclasses.asdict(settings.saliency),
          "methods": rows, **_peak_memory()}


# ----------------------------------------------------------------------------- the run


def _run_step(report: Report, what: str, fn, key: str) -> None:
  if report.past_deadline():
    report.skip(what, f"past the deadline of {FLAGS.deadline_s:g} s")
    return
  report.step = what
  print(f"\n{what} ({report.elapsed():.0f} s into the run)", flush=True)
  try:
    report.append(key, fn())
  except Exception as e:  # pylint: disable=broad-except  (out of memory: record, go on)
    traceback.print_exc()
    report.append("errors", {"step": what, "error": f"{type(e).__name__}: {str(e)[:2000]}"})


def print_tables(data: dict) -> None:
  for r in data.get("influence", []):
    auto = r["auto"]["path"] if r.get("auto") else "?"
    print(f"\ninfluence, {r['model']} UNet (P = {r['parameters']:,}, {r['size']} px), "
          f"{r['n_train']} train x {r['n_test']} test, K = {r['k']}, {r['checkpoints']} "
          f"checkpoints; 'auto' took {auto}; scores agree: {r['scores_agree']}")
    print("| path | median s | class gradients / s | error vs loop |")
    print("|---|---|---|---|")
    for m, x in r["seconds"].items():
      print(f"| {m} | {x:.3f} | {r['class_gradients_per_second'][m]:.1f} | "
            f"{r['error_vs_loop'].get(m, float('nan')):.1e} |")
  for r in data.get("store", []):
    print(f"\nstore, {r['model']} UNet (P = {r['parameters']:,}), {r['slices']} slices in "
          f"blocks of {r['block']}, extrapolated to {r['paper_slices']} x "
          f"{r['paper_checkpoints']} checkpoints")
    print("| build | s per slice | extrapolated h | on disk GiB |")
    print("|---|---|---|---|")
    for m, x in r["seconds_per_slice"].items():
      e = r["extrapolated"].get(m)
      print(f"| {m} | {x:.4f} | " + (f"{e['hours']:.2f} | {e['gib']:.2f} |" if e else "| |"))
    if r["exact_influence_plan"]:
      plan = r["exact_influence_plan"]
      print(f"exact train-influence without a store: {plan['gradient_passes']:.1f} gradient "
            f"passes per slice, {plan['seconds'] / 3600:.2f} h of gradients")
  for r in data.get("saliency", []):
    print(f"\nsaliency, {r['model']} UNet ({r['size']} px), batch {r['batch']}")
    print("| method | median s | maps / s |")
    print("|---|---|---|")
    for row in r["methods"]:
      print(f"| {row['method']} | {row['seconds']:.3f} | {row['maps_per_second']:.2f} |")
  for x in data.get("skipped", []):
    print(f"skipped: {x['step']} ({x['reason']})")
  for x in data.get("errors", []):
    print(f"error: {x['step']}: {x['error'][:300]}")


def main(argv):
  del argv
  if FLAGS.matmul_precision != "default":
    jax.config.update("jax_default_matmul_precision", FLAGS.matmul_precision)
  unknown = [p for p in FLAGS.parts if p not in ("influence", "store", "saliency")]
  if unknown:
    raise app.UsageError(f"unknown part {unknown} in --parts; parts: influence, store, "
                         "saliency")
  settings = settings_from_flags()
  report = Report(FLAGS.out, FLAGS.deadline_s)
  if FLAGS.workdir:
    os.makedirs(FLAGS.workdir, exist_ok=True)
  workdir = tempfile.mkdtemp(prefix="tracin_jax_gpu_check_", dir=FLAGS.workdir)

  def cleanup():  # the store samples: GBs at the paper's size
    shutil.rmtree(workdir, ignore_errors=True)

  timer = _watchdog(report, FLAGS.hard_limit_s, cleanup)
  report.data.update({
      "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": FLAGS.quick,
      "device": _device(), "versions": _versions(),
      "matmul_precision": jax.config.jax_default_matmul_precision,
      "deadline_s": FLAGS.deadline_s, "hard_limit_s": FLAGS.hard_limit_s,
      "load_average_start": list(os.getloadavg()), "settings": dataclasses.asdict(settings),
      "startup_s": report.elapsed()})
  report.write()
  d = report.data["device"]
  print(f"jax {jax.__version__} on {d['platform']} ({d['device_kind']}, {d['devices']} "
        f"device(s)); {common.load_average()}; JSON: {FLAGS.out}", flush=True)
  budget = int(FLAGS.memory_budget_gib * 2**30)
  setups = {}

  def setup(name):
    if name not in setups:
      setups[name] = Setup(name, MODELS[name], settings.checkpoints, FLAGS.seed)
    return setups[name]

  try:
    for part in FLAGS.parts:
      if part == "influence":
        for name in settings.influence_models:
          n_train, n_test = settings.sizes[name]
          _run_step(report, f"influence {name}",
                    lambda name=name, a=n_train, b=n_test: influence_part(
                        setup(name), a, b, settings, report, budget), "influence")
      elif part == "store":
        _run_step(report, f"store {settings.store_model}",
                  lambda: store_part(setup(settings.store_model), settings, report, budget,
                                     workdir), "store")
      else:
        for name in settings.saliency_models:
          _run_step(report, f"saliency {name}",
                    lambda name=name: saliency_part(setup(name), settings, report),
                    "saliency")
  finally:
    timer.cancel()
    cleanup()
  report.set("complete", not report.data["skipped"] and not report.data["errors"])
  print_tables(report.data)
  print(f"\n{report.elapsed():.0f} s; {common.load_average()}; JSON: {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
