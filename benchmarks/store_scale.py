"""The gradient store at the paper's scale on this machine: time, bytes and memory.

    PYTHONPATH=. python benchmarks/store_scale.py                # about 10 minutes on 2 cores
    PYTHONPATH=. python benchmarks/store_scale.py --examples=4   # a quicker look

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
* the process's peak resident memory.

Then the extrapolation to the paper's 2,070 training slices x 5 checkpoints (store build
time and bytes), and the exact mode's plan under an 8 GiB budget (`plan_influence`): how many
gradient passes the budget forces, and the time at the measured speed.
"""

from __future__ import annotations

import json
import os
import pathlib
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
from tracin_jax.influence import projection as projection_lib
from tracin_jax.influence import segmentation

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
  t0 = time.perf_counter()
  g, _ = grads_lib.block_grads(loss_fn, k, params, warm, "loop", state)
  g.block_until_ready()
  compile_s = time.perf_counter() - t0
  del g
  per_example = []
  data = common.region_examples(FLAGS.examples, size, 2)
  for start in range(0, FLAGS.examples, block):
    batch = {key: x[start:start + block] for key, x in data.items()}
    t0 = time.perf_counter()
    g, _ = grads_lib.block_grads(loss_fn, k, params, batch, "loop", state)
    g.block_until_ready()
    per_example.append((time.perf_counter() - t0) / block)
  grad_s = statistics.median(per_example)
  print(f"gradients: {grad_s:.2f} s per example (median of {len(per_example)} blocks of "
        f"{block}; first block with compilation {compile_s:.1f} s); peak memory so far "
        f"{common.peak_rss_gib():.1f} GiB", flush=True)

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

  n, c = FLAGS.train_slices, FLAGS.checkpoints
  choice = "countsketch"
  build = common.store_extrapolation(grad_s + k * projections[choice], n, c, k, p,
                                     projection_lib.Projection(FLAGS.dim, choice))
  build_s, store_bytes = build["seconds"], build["bytes"]
  budget = int(FLAGS.budget_gib * 2**30)
  exact = core.plan_influence(n, None, k, p, c, memory_budget_bytes=budget,
                              seconds_per_example=grad_s)
  projected = core.plan_influence(n, None, k, p, c, memory_budget_bytes=budget,
                                  projection=projection_lib.Projection(FLAGS.dim),
                                  seconds_per_example=grad_s + k * projections[choice])
  peak = common.peak_rss_gib()
  print(f"\nExtrapolated to {n} slices x {c} checkpoints on this CPU:")
  print(f"- store build ({choice}, d = {FLAGS.dim}): {build_s / 3600:.1f} h, "
        f"{store_bytes / 2**30:.2f} GiB on disk ({k * FLAGS.dim * 4 / 1e3:.0f} kB per slice "
        f"and checkpoint, against {k * p * 4 / 1e6:.0f} MB exact)")
  print(f"- exact train-influence under {FLAGS.budget_gib:g} GiB: {exact}")
  print(f"- projected train-influence under {FLAGS.budget_gib:g} GiB: {projected}")
  store_block = max(1, 2**30 // (k * p * 4))
  print(f"- peak resident memory of this benchmark: {peak:.1f} GiB (one block of {block} "
        f"examples' raw gradients is {block * k * p * 4 / 2**30:.2f} GiB); build_store's "
        f"default 1 GiB budget holds blocks of {store_block} slices; the store's "
        f"train-influence then holds {n * k * FLAGS.dim * 4 / 2**20:.0f} MiB of projected "
        "rows per checkpoint")
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(json.dumps({
        "parameters": p, "image_size": size, "seconds_per_example": grad_s,
        "projection_seconds_per_row": projections, "dim": FLAGS.dim, "layers": layers,
        "store_build_hours": build_s / 3600, "store_gib": store_bytes / 2**30,
        "exact_plan": str(exact), "exact_hours": exact.seconds / 3600,
        "exact_passes": exact.gradient_passes, "projected_plan": str(projected),
        "peak_gib": peak, "load": list(os.getloadavg())}, indent=1))


if __name__ == "__main__":
  app.run(main)
