"""What several benchmark scripts share: timing in turns, synthetic inputs, the naive
per-example gradients, the saliency methods' table and the paper-scale extrapolation.

    from benchmarks import common   # scripts run from the repository root, PYTHONPATH=.

Nothing here reads flags: each script passes its settings in, so that scripts with
different flags share one piece of code.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax import saliency
from tracin_jax.influence import projection as projection_lib
from tracin_jax.influence import store as store_lib

K = 3  # region losses per example (the tumour classes)


# ----------------------------------------------------------------------------- timing


def load_average() -> str:
  """The machine's load (`os.getloadavg()`), as printed beside every timing."""
  return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def peak_rss_gib() -> float:
  """This process's peak resident memory (Linux: ru_maxrss in KiB), GiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


@dataclasses.dataclass
class Timings:
  """What `time_in_turns` measured.

  Attributes:
    warmup: {name: seconds of the first call (compilation included)}.
    seconds: {name: median seconds of the timed calls}.
    repeats: {name: timed calls made}.
    results: {name: what the first call returned}.
    skipped: names not run at all because the deadline had passed.
  """

  warmup: dict[str, float] = dataclasses.field(default_factory=dict)
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  repeats: dict[str, int] = dataclasses.field(default_factory=dict)
  results: dict[str, Any] = dataclasses.field(default_factory=dict)
  skipped: list[str] = dataclasses.field(default_factory=list)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def time_in_turns(fns: Mapping[str, Callable[[], Any]], repeats: int, *,
                  warm_up: bool = True, deadline: float | None = None,
                  log: Callable[[str, float], None] | None = None) -> Timings:
  """Each function once to compile (the warm-up), then `repeats` timed calls, the functions
  taking turns so that a busy spell on a shared machine hits all of them.

  Args:
    fns: {name: fn()}; each result is waited for (`jax.block_until_ready`).
    repeats: timed rounds (at least one is made for every function that was warmed up).
    warm_up: False when the caller has compiled the functions already: the first timed
      call's result is kept instead.
    deadline: a `time.monotonic()` value: past it, functions not yet warmed up are skipped
      and no further round starts.
    log: called with (name, seconds) after each warm-up call.

  Returns:
    The medians, the warm-up times and the first results.
  """
  out = Timings()
  names = []
  for name, fn in fns.items():
    if deadline is not None and time.monotonic() > deadline:
      out.skipped.append(name)
      continue
    names.append(name)
    if warm_up:
      out.results[name], out.warmup[name] = _timed(fn)
      if log:
        log(name, out.warmup[name])
  times = {name: [] for name in names}
  for r in range(repeats):
    if r and deadline is not None and time.monotonic() > deadline:
      break
    for name in names:
      result, seconds = _timed(fns[name])
      out.results.setdefault(name, result)
      times[name].append(seconds)
  out.seconds = {name: statistics.median(t) for name, t in times.items()}
  out.repeats = {name: len(t) for name, t in times.items()}
  return out


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median seconds of `repeats` calls of an already compiled `fn`."""
  return time_in_turns({"fn": fn}, repeats, warm_up=False).seconds["fn"]


# ----------------------------------------------------------------------------- inputs


def region_examples(n: int, size: int, seed: int) -> dict[str, np.ndarray]:
  """N examples for the region losses: uniform images, K disk-shaped regions (never empty)
  and targets that are the regions' classes.

  Returns:
    {"image": [N, S, S, 4] float32 in [-1, 1], "target": [N, S, S] int32 in 0..K,
     "region": [N, S, S, K] bool}.
  """
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, size=(n, size, size, 4)).astype(np.float32)
  yy, xx = np.mgrid[:size, :size]
  regions = np.zeros((n, size, size, K), bool)
  for b in range(n):
    for j, r in enumerate((0.25, 0.18, 0.1)):
      cy, cx = rng.uniform(0.35, 0.65, 2) * size
      regions[b, ..., j] = (yy - cy)**2 + (xx - cx)**2 < max(r * size, 1.0)**2
  targets = regions.argmax(-1) + regions.any(-1)
  return {"image": images, "target": targets.astype(np.int32), "region": regions}


def perturbed_checkpoints(params, num: int, rng: np.random.Generator) -> list[tuple[Any, float]]:
  """`num` TracIn checkpoints: (params, 0.01), then copies with 2% noise (of each leaf's
  standard deviation) and learning rates 0.01 / (t + 1)."""
  checkpoints = [(params, 0.01)]
  for t in range(1, num):
    checkpoints.append((jax.tree.map(
        lambda x: x + 0.02 * np.std(x) * rng.normal(size=x.shape).astype(x.dtype), params),
        0.01 / (t + 1)))
  return checkpoints


# ----------------------------------------------------------------------------- gradients


def _ravel(tree, rows: int):
  return jnp.concatenate([jnp.reshape(x, (rows, -1)) for x in jax.tree.leaves(tree)], axis=1)


def naive_grads(loss_fn, k: int = K) -> Callable[[Any, Any], jax.Array]:
  """What a JAX user writes first: `jax.jit(jax.vmap(jax.grad(loss_j)))` for each class j,
  each its own compiled function (K forward passes per example; one jit over all K would let
  XLA share the forward pass).

  Args:
    loss_fn: `loss_fn(params, example) -> [K]`.
    k: K.

  Returns:
    fn(params, batch) -> [N * K, P]: row n * K + j is grad loss_j(params, example n), raveled
    in leaf order.
  """

  def per_class(j):
    def class_loss(params, example):
      return loss_fn(params, example)[j]

    grad = jax.vmap(jax.grad(class_loss), (None, 0))
    return jax.jit(lambda params, batch: _ravel(grad(params, batch),
                                                jax.tree.leaves(batch)[0].shape[0]))

  classes = [per_class(j) for j in range(k)]

  def grads(params, batch):
    g = jnp.stack([f(params, batch) for f in classes], axis=1)  # [N, K, P]
    return jnp.reshape(g, (-1, g.shape[-1]))

  return grads


def gram_scores(rows_and_cols, n_test: int, n_train: int, k: int = K) -> np.ndarray:
  """sum_t eta_t G_test G_train^T from (G_test [n_test K, P], G_train [n_train K, P], eta_t)
  triples (jax, numpy or torch arrays: the product runs where they are).

  Returns:
    [n_test, K, n_train, K] float32 numpy.
  """
  total = 0.0
  for g_test, g_train, lr in rows_and_cols:
    total = total + lr * np.asarray(g_test @ g_train.T)
  return np.asarray(total, np.float32).reshape(n_test, k, n_train, k)


# ----------------------------------------------------------------------------- saliency


@dataclasses.dataclass(frozen=True)
class SaliencySettings:
  """The saliency methods' settings (the library's defaults unless changed)."""

  layer: str = "bottleneck"
  ig_steps: int = 50
  gig_steps: int = 200
  samples: int = 25
  ies_samples: int = 5
  ies_side: int = 8


def saliency_inputs(n: int, size: int, ies_side: int, seed: int = 0):
  """A batch of random images and the two targets the saliency benchmarks use.

  Returns:
    x [N, S, S, 4] float32 in [-1, 1]; the sum of the NCR/NET logit over the predicted whole
    tumour (`masked_class_sum(1, predicted_region("WT"))`); and the same logit over a fixed
    centred `ies_side` x `ies_side` square, for SmoothGrad's "max" (IES) aggregation, whose
    cost is one backward pass per voxel of the mask per sample.
  """
  x = jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 4)), jnp.float32)
  target = saliency.masked_class_sum(1, saliency.predicted_region("WT"))
  mask = np.zeros((n, size, size), np.float32)
  start = (size - ies_side) // 2
  mask[:, start:start + ies_side, start:start + ies_side] = 1.0
  return x, target, saliency.masked_class_sum(1, mask)


def saliency_methods(m: saliency.NnxModel, x, target, ies_target,
                     s: SaliencySettings = SaliencySettings()) -> dict[str, Callable[[], Any]]:
  """{label: fn()} for each method of `tracin_jax.saliency` on model `m` and input x; each
  label starts with the method's name."""
  f, p = m.apply_fn, m.params
  layer = m.layer(s.layer)
  layers = m.layers()
  return {
      "vanilla_gradient": lambda: saliency.vanilla_gradient(f, p, x, target),
      "guided_backprop": lambda: saliency.guided_backprop(f, p, x, target),
      f"integrated_gradients ({s.ig_steps} steps)":
          lambda: saliency.integrated_gradients(f, p, x, target, steps=s.ig_steps),
      f"guided_integrated_gradients ({s.gig_steps} steps)":
          lambda: saliency.guided_integrated_gradients(f, p, x, target, steps=s.gig_steps),
      f"smoothgrad mean_of_squares ({s.samples} samples)":
          lambda: saliency.smoothgrad(f, p, x, target, key=0, num_samples=s.samples),
      f"smoothgrad max / IES ({s.ies_samples} samples, {s.ies_side}x{s.ies_side} mask)":
          lambda: saliency.smoothgrad(f, p, x, ies_target, key=0, num_samples=s.ies_samples,
                                      aggregation="max"),
      f"grad_cam ({s.layer})": lambda: saliency.grad_cam(f, p, x, target, layer=layer),
      f"grad_cam_plus_plus ({s.layer})":
          lambda: saliency.grad_cam_plus_plus(f, p, x, target, layer=layer),
      f"guided_grad_cam ({s.layer})":
          lambda: saliency.guided_grad_cam(f, p, x, target, layer=layer),
      f"information_flow ({len(layers)} blocks)":
          lambda: saliency.information_flow(f, p, x, target, layers=layers),
  }


def time_saliency(methods: Mapping[str, Callable[[], Any]], batch: int, repeats: int, *,
                  deadline: float | None = None) -> tuple[list[dict], list[str]]:
  """Times saliency methods in turns (`time_in_turns`), each printed after its warm-up.

  Args:
    methods: {label: fn()} (see `saliency_methods`); batch: images per call.
    repeats, deadline: see `time_in_turns`.

  Returns:
    rows [{"method", "warmup_seconds", "seconds", "repeats", "maps_per_second"}], and the
    labels skipped at the deadline.
  """
  t = time_in_turns(methods, repeats, deadline=deadline, log=lambda name, seconds: print(
      f"  {name}: warm-up {seconds:.2f} s", flush=True))
  rows = [{"method": name, "warmup_seconds": t.warmup[name], "seconds": t.seconds[name],
           "repeats": t.repeats[name], "maps_per_second": batch / t.seconds[name]}
          for name in t.seconds]
  return rows, t.skipped


def select(labels, prefixes) -> list:
  """The labels that start with one of `prefixes` (all of them for no prefixes)."""
  return [x for x in labels if not prefixes or any(x.startswith(p) for p in prefixes)]


# ----------------------------------------------------------------------------- scale


def store_extrapolation(seconds_per_slice: float, num_slices: int, num_checkpoints: int,
                        num_outputs: int, num_parameters: int,
                        projection: projection_lib.Projection | None) -> dict:
  """A store build of `num_slices` x `num_checkpoints` at the measured speed.

  Args:
    seconds_per_slice: seconds to compute, transform and write one slice's K rows at one
      checkpoint.
    num_slices, num_checkpoints, num_outputs, num_parameters: n, T, K, P.
    projection: the store's projection (None: exact rows, P numbers each).

  Returns:
    {"seconds", "hours", "bytes", "gib", "bytes_per_slice"} (float32 rows).
  """
  seconds = num_slices * num_checkpoints * seconds_per_slice
  size = store_lib.plan_store(num_slices, num_outputs, num_parameters, num_checkpoints,
                              projection)
  return {"seconds": seconds, "hours": seconds / 3600, "bytes": size["bytes"],
          "gib": size["bytes"] / 2**30, "bytes_per_slice": size["bytes_per_example"]}
