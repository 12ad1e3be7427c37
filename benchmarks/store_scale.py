"""The gradient store at the paper's scale on this machine: time, bytes and memory.

    PYTHONPATH=. python benchmarks/store_scale.py                # about 10 minutes on 2 cores
    PYTHONPATH=. python benchmarks/store_scale.py --examples=4   # a quicker look
    PYTHONPATH=. python benchmarks/store_scale.py --image_size=96 --base_width=8 --depth=3 \
        --build_examples=320 --build_checkpoints=4                # the demo's store, built

The paper's UNet (base width 64, depth 4: 31.0 M parameters), 192 px, four channels, the
three region losses on random regions (the cost of a gradient does not depend on the
values). Measured, on this CPU:

* seconds per example for its K = 3 region gradients (the library's batch-1 loop, compiled
  once, median over `--examples` examples after one warm-up block);
* each projection kind's seconds per gradient row at P = 31 M and d = `--dim` (the dense
  kind from one chunk of `--chunk` columns, times the number of chunks: holding or drawing
  a full 31 M x d Gaussian is what it costs);
* the factored (LoGra) projection of one convolution's per-example gradient against forming
  that gradient from the same input patches and output gradients, per level of the UNet;
* LoGra's rows (`Projection(--logra_dim, "logra")`: each layer's inputs and output
  gradients projected inside the model, no per-example gradient formed) per example, timed
  block by block interleaved with the formed gradients above (the same load for both), and
  the process's peak memory after LoGra alone (measured first);
* with `--build_examples`, both stores built whole with `build_store` (compilation, rows
  and block files included): today's default (CountSketch to `--dim`) and LoGra, each on
  the same random examples and `--build_checkpoints` checkpoints (perturbed weights);
* the process's peak resident memory.

Then the extrapolation to the paper's 2,070 training slices x 5 checkpoints (store build
time and bytes, today's and LoGra's), and the exact mode's plan under an 8 GiB budget
(`plan_influence`): how many gradient passes the budget forces, and the time at the
measured speed.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from tracin_jax import models
from tracin_jax.influence import core
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import logra
from tracin_jax.influence import projection as projection_lib
from tracin_jax.influence import segmentation
from tracin_jax.influence import store as store_lib

flags.DEFINE_integer("image_size", 192, "Image side in pixels (the paper's crop).")
flags.DEFINE_integer("base_width", 64, "UNet base width (the paper's: 64).")
flags.DEFINE_integer("depth", 4, "UNet depth.")
flags.DEFINE_integer("examples", 8, "Examples whose gradients are timed (after a warm-up).")
flags.DEFINE_integer("dim", 4096, "Projected size d (the store's default).")
flags.DEFINE_integer("chunk", 8192, "Columns of the dense projection drawn at once.")
flags.DEFINE_integer("factor_dim", 16, "d_in = d_out of the factored projection per layer.")
flags.DEFINE_integer("train_slices", 2070, "The paper's training slices.")
flags.DEFINE_integer("checkpoints", 5, "The paper's TracIn checkpoints.")
flags.DEFINE_float("budget_gib", 8.0, "Memory budget of the exact mode's plan.")
flags.DEFINE_integer("logra_dim", 4096, "Row width d of the LoGra rows (at most).")
flags.DEFINE_integer("build_examples", 0, "Also build today's and LoGra's stores of this "
                     "many random examples whole (0: skip).")
flags.DEFINE_integer("build_checkpoints", 2, "Checkpoints of the built stores.")
flags.DEFINE_string("out", None, "JSON file for the numbers (optional).")

FLAGS = flags.FLAGS


def _factored_vs_formed(size: int, width: int, depth: int, factor_dim: int) -> list[dict]:
  """Per UNet level: ms to form one example's 3x3 convolution gradient from its patches and
  output gradients, against ms of its factored projection."""
  rng = np.random.default_rng(0)
  out = []
  for level in range(depth + 1):
    side, c = size // 2**level, width * 2**level
    x = jnp.asarray(rng.normal(size=(side, side, c)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(side * side, c)), jnp.float32)
    patches = jax.jit(lambda v: projection_lib.conv_patches(v, (3, 3)))
    p = patches(x).block_until_ready()
    a, b = projection_lib.factor_matrices(level, 9 * c, c, factor_dim, factor_dim)
    formed = jax.jit(lambda p_, d_: jnp.matmul(p_.T, d_))
    formed(p, dy).block_until_ready()
    projection_lib.factored_projection(p, dy, a, b).block_until_ready()
    out.append({
        "level": level, "side": side, "channels": c, "parameters": 9 * c * c,
        "patches_ms": 1e3 * common.median_seconds(lambda: patches(x), 3),
        "formed_ms": 1e3 * common.median_seconds(lambda: formed(p, dy), 3),
        "factored_ms": 1e3 * common.median_seconds(
            lambda: projection_lib.factored_projection(p, dy, a, b), 3)})
  return out


def _builds(loss_fn, params, state, size, projection, factored) -> dict:
  """Builds today's and LoGra's stores of the same examples and checkpoints, whole (the
  LoGra one first, then today's, then LoGra's again: the median of its two builds)."""
  n, c = FLAGS.build_examples, FLAGS.build_checkpoints
  train = common.region_examples(n, size, 3)
  ckpts = [(params if t == 0 else jax.tree.map(lambda x, t=t: x * (1 + 0.01 * t), params),
            0.1, state) for t in range(c)]
  out = {}
  with tempfile.TemporaryDirectory() as root:
    for i, (name, proj) in enumerate([("logra", factored), ("today", projection),
                                      ("logra", factored)]):
      t0 = time.perf_counter()
      store = store_lib.build_store(pathlib.Path(root) / f"{name}{i}", loss_fn, ckpts, train,
                                    projection=proj)
      seconds = time.perf_counter() - t0
      out.setdefault(name, []).append(seconds)
      print(f"build_store of {n} examples x {c} checkpoints, {name} ({proj.kind}, d = "
            f"{proj.dim}, {store.block_size} examples per block): {seconds:.1f} s "
            f"(load {os.getloadavg()[0]:.1f})", flush=True)
  today, factored_s = out["today"][0], statistics.median(out["logra"])
  print(f"build_store: LoGra {today / factored_s:.2f}x faster than today's "
        f"({factored_s:.1f} s against {today:.1f} s)", flush=True)
  return {"examples": n, "checkpoints": c, "seconds": out}


def main(argv):
  del argv
  size, k = FLAGS.image_size, 3
  model = models.get_model("unet", base_width=FLAGS.base_width, depth=FLAGS.depth)
  apply_fn, params, state = models.functional(model)
  p = grads_lib.parameter_count(params)
  loss_fn = segmentation.make_region_losses(apply_fn)
  print(f"UNet base {FLAGS.base_width}, depth {FLAGS.depth}: P = {p:,} parameters; "
        f"{size} px; K = {k}.", flush=True)
  block = 2
  warm = common.region_examples(block, size, 1)
  factored = projection_lib.Projection(FLAGS.logra_dim, logra.KIND)
  plan = logra.plan(loss_fn, params, jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape[1:], x.dtype), warm), factored, state)
  print(f"{plan}; working memory estimate {plan.bytes_per_example / 2**30:.2f} GiB per "
        "example", flush=True)

  def logra_rows(batch):
    return logra.block_rows(loss_fn, k, params, batch, factored, state, vectorize="loop")[0]

  def formed(batch):
    return grads_lib.block_grads(loss_fn, k, params, batch, "loop", state)[0]

  t0 = time.perf_counter()
  jax.block_until_ready(logra_rows(warm))
  logra_compile_s = time.perf_counter() - t0
  logra_peak = common.peak_rss_gib()  # LoGra alone so far
  t0 = time.perf_counter()
  g = formed(warm).block_until_ready()
  compile_s = time.perf_counter() - t0
  del g
  per_example, logra_per_example = [], []
  data = common.region_examples(FLAGS.examples, size, 2)
  for start in range(0, FLAGS.examples, block):
    batch = {key: x[start:start + block] for key, x in data.items()}
    t0 = time.perf_counter()
    jax.block_until_ready(logra_rows(batch))
    logra_per_example.append((time.perf_counter() - t0) / block)
    t0 = time.perf_counter()
    g = formed(batch).block_until_ready()
    per_example.append((time.perf_counter() - t0) / block)
  grad_s = statistics.median(per_example)
  logra_s = statistics.median(logra_per_example)
  print(f"gradients: {grad_s:.3g} s per example (median of {len(per_example)} blocks of "
        f"{block}; first block with compilation {compile_s:.1f} s); peak memory so far "
        f"{common.peak_rss_gib():.1f} GiB", flush=True)
  print(f"LoGra rows (d = {FLAGS.logra_dim}, width {plan.width}): {logra_s:.3g} s per "
        f"example, projection included (blocks interleaved with the gradients'; first "
        f"block with compilation {logra_compile_s:.1f} s); peak memory after LoGra alone "
        f"{logra_peak:.1f} GiB", flush=True)

  rows = g  # [block * K, P], real gradients
  projections = {}
  for kind in ("countsketch", "srht"):
    proj = projection_lib.Projection(FLAGS.dim, kind)
    proj(rows).block_until_ready()
    projections[kind] = (common.median_seconds(lambda proj=proj, rows=rows: proj(rows), 3)
                         / rows.shape[0])
  chunk = projection_lib.Projection(FLAGS.dim, "dense", chunk_columns=FLAGS.chunk)
  part = rows[:, :FLAGS.chunk]
  chunk(part).block_until_ready()
  projections["dense"] = (common.median_seconds(lambda: chunk(part), 3) / rows.shape[0]
                          * -(-p // FLAGS.chunk))
  del rows, g
  for kind, s in projections.items():
    print(f"projection {kind} to d = {FLAGS.dim}: {1e3 * s:.0f} ms per row "
          f"({100 * k * s / grad_s:.1f}% of an example's gradients)"
          + (" (from one chunk)" if kind == "dense" else ""), flush=True)

  layers = _factored_vs_formed(size, FLAGS.base_width, FLAGS.depth, FLAGS.factor_dim)
  for layer in layers:
    print(f"level {layer['level']} ({layer['side']} px, {layer['channels']} channels, "
          f"3x3 conv): forming its per-example gradient from patches {layer['formed_ms']:.1f} "
          f"ms; factored projection to {FLAGS.factor_dim}x{FLAGS.factor_dim} "
          f"{layer['factored_ms']:.1f} ms (patches {layer['patches_ms']:.1f} ms)", flush=True)

  builds = _builds(loss_fn, params, state, size, projection_lib.Projection(FLAGS.dim),
                   factored) if FLAGS.build_examples else {}

  n, c = FLAGS.train_slices, FLAGS.checkpoints
  choice = "countsketch"
  build = common.store_extrapolation(grad_s + k * projections[choice], n, c, k, p,
                                     projection_lib.Projection(FLAGS.dim, choice))
  build_s, store_bytes = build["seconds"], build["bytes"]
  logra_build_s = n * c * logra_s
  logra_bytes = n * c * k * plan.width * 4
  budget = int(FLAGS.budget_gib * 2**30)
  exact = core.plan_influence(n, None, k, p, c, memory_budget_bytes=budget,
                              seconds_per_example=grad_s)
  projected = core.plan_influence(n, None, k, p, c, memory_budget_bytes=budget,
                                  projection=projection_lib.Projection(FLAGS.dim),
                                  seconds_per_example=grad_s + k * projections[choice])
  peak = common.peak_rss_gib()
  print(f"\nExtrapolated to {n} slices x {c} checkpoints on this CPU:")
  print(f"- store build ({choice}, d = {FLAGS.dim}): {build_s / 3600:.3g} h, "
        f"{store_bytes / 2**30:.2f} GiB on disk ({k * FLAGS.dim * 4 / 1e3:.0f} kB per slice "
        f"and checkpoint, against {k * p * 4 / 1e6:.0f} MB exact)")
  print(f"- store build (LoGra, d = {FLAGS.logra_dim}, width {plan.width}): "
        f"{logra_build_s / 3600:.3g} h ({build_s / logra_build_s:.2f}x faster), "
        f"{logra_bytes / 2**30:.2f} GiB on disk; memory: one slice's forward and K backward "
        f"passes at a time (estimate {plan.bytes_per_example / 2**30:.2f} GiB), "
        f"{logra_peak:.1f} GiB peak for the whole process")
  print(f"- exact train-influence under {FLAGS.budget_gib:g} GiB: {exact}")
  print(f"- projected train-influence under {FLAGS.budget_gib:g} GiB: {projected}")
  store_block = max(1, 2**30 // (k * p * 4))
  print(f"- peak resident memory of this benchmark: {peak:.1f} GiB (one block of {block} "
        f"examples' raw gradients is {block * k * p * 4 / 2**30:.2f} GiB); build_store's "
        f"default 1 GiB budget holds blocks of {store_block} slices; the store's "
        f"train-influence then holds {n * k * FLAGS.dim * 4 / 2**20:.0f} MiB of projected "
        "rows per checkpoint")
  load = list(os.getloadavg())
  print(f"- load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(json.dumps({
        "parameters": p, "image_size": size, "seconds_per_example": grad_s,
        "projection_seconds_per_row": projections, "dim": FLAGS.dim, "layers": layers,
        "store_build_hours": build_s / 3600, "store_gib": store_bytes / 2**30,
        "exact_plan": str(exact), "exact_hours": exact.seconds / 3600,
        "exact_passes": exact.gradient_passes, "projected_plan": str(projected),
        "peak_gib": peak, "load": load, "logra_dim": FLAGS.logra_dim,
        "logra_width": plan.width, "logra_seconds_per_example": logra_s,
        "logra_store_build_hours": logra_build_s / 3600, "logra_peak_gib": logra_peak,
        "logra_bytes_per_example": plan.bytes_per_example, "builds": builds},
        indent=1))


if __name__ == "__main__":
  app.run(main)
