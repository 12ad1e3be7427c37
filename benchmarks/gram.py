"""Achieved FLOP/s of the TracIn Gram blocks against a large square matmul, in one run.

    PYTHONPATH=. python benchmarks/gram.py --block_sizes=16,32,64 --repeats=5

`gram.gram_block(rows, cols, learning_rate)` multiplies two blocks of raveled per-example
gradients, rows [B * K, P] and cols [B * K, P], into [B * K, B * K]: 2 * (B K)^2 * P FLOPs.
P is the parameter count of the demo UNet (base width 8, depth 3; `--base_widths` adds
others) and K = 3 region losses. The reference is a square float32 matmul of size
`--matmul_size` (2048: 2 * 2048^3 FLOPs) timed in turn with each block shape, so that the
ratio depends little on how busy a shared machine is at the time. Medians of `--repeats`
timed calls after a warm-up.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from tracin_jax import models
from tracin_jax.influence import gram as gram_lib
from tracin_jax.influence import grads as grads_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("block_sizes", ["16", "32", "64"], "Examples B per Gram block side.")
flags.DEFINE_list("base_widths", ["8"], "UNet base widths whose P is used (demo: 8).")
flags.DEFINE_integer("depth", 3, "UNet depth (the demo's: 3).")
flags.DEFINE_integer("classes", 3, "K, losses per example.")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square reference matmul.")
flags.DEFINE_integer("repeats", 5, "Timed repeats after the warm-up; medians are reported.")


def _median_seconds(fns, repeats: int) -> list[float]:
  """Runs each fn once (warm-up), then all `repeats` times, taking turns (so that a busy
  spell on a shared machine hits all of them); the median wall time of each."""
  for fn in fns:
    jax.block_until_ready(fn())
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, t in zip(fns, times):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      t.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def main(argv):
  del argv
  key = jax.random.key(0)
  m = FLAGS.matmul_size
  a = jax.random.normal(key, (m, m), jnp.float32)
  b = jax.random.normal(jax.random.fold_in(key, 1), (m, m), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}")

  rows = []
  for width in map(int, FLAGS.base_widths):
    model = models.get_model("unet", base_width=width, depth=FLAGS.depth)
    p = grads_lib.parameter_count(models.functional(model)[1])
    for block in map(int, FLAGS.block_sizes):
      r = block * FLAGS.classes
      g_rows = jax.random.normal(jax.random.fold_in(key, 2), (r, p), jnp.float32)
      g_cols = jax.random.normal(jax.random.fold_in(key, 3), (r, p), jnp.float32)
      seconds, matmul_seconds = _median_seconds(
          [lambda x=g_rows, y=g_cols: gram_lib.gram_block(x, y, 0.01), lambda: matmul(a, b)],
          FLAGS.repeats)
      flops, reference = 2 * r * r * p / seconds, 2 * m**3 / matmul_seconds
      rows.append((width, p, block, r, seconds, flops, reference))
      print(f"  base_width {width}, P={p}, B={block}: {seconds * 1e3:.1f} ms, "
            f"{flops / 1e9:.1f} GFLOP/s; matmul {reference / 1e9:.1f} GFLOP/s", flush=True)
      del g_rows, g_cols

  print()
  print(f"| model P | block (B x K) | rows x cols x P | median ms | GFLOP/s "
        f"| {m}^3 matmul GFLOP/s | of the matmul |")
  print("|---|---|---|---|---|---|---|")
  for width, p, block, r, seconds, flops, reference in rows:
    print(f"| {p} (base {width}) | {block} x {FLAGS.classes} | {r} x {r} x {p} "
          f"| {seconds * 1e3:.1f} | {flops / 1e9:.1f} | {reference / 1e9:.1f} "
          f"| {flops / reference:.0%} |")


if __name__ == "__main__":
  app.run(main)
