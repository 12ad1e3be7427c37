"""Per-example, per-class gradient throughput of the demo UNet against its compute bound.

    PYTHONPATH=. python benchmarks/per_example_grads.py --sizes=64,96 --examples=16 --repeats=3

For each image size it times, on the same N random images and their K = 3 region losses
(`make_region_losses`, regions from `predict_regions` at a low threshold so none is empty):

* naive: `jax.jit(jax.vmap(jax.grad(loss_k)))` once per class k (K forward passes per
  example);
* loop: one jitted `jax.grad(loss_k)` call per example and class (N x K calls);
* library: `grads.block_grads(..., vectorize="auto")`, what `influence` runs (the path it
  measured fastest is printed);
* bound: (1 + 2K) x the batched forward pass of the N images (one forward, and per class a
  backward of about twice its cost), the target's yardstick;
* bound_b1: the same with the faster of the batched forward and N batch-1 forwards. On
  XLA:CPU the batched forward of a UNet is often slower per image than batch-1 calls, so
  `bound` is not a true lower bound there and a method can beat it.

Each method is warmed up (compiled) once, then timed `--repeats` times, the methods taking
turns so that a busy spell on a shared machine hits all of them; the table gives
medians in examples x classes per second. "fraction of the bound" is bound time / library
time (100% reaches the bound). All methods return raveled gradients [N * K, P]; the
library's are checked against the naive ones (largest relative error of a row).
"""

from __future__ import annotations

import functools

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from tracin_jax import models
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import segmentation

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["64", "96"], "Image sizes (pixels, square, divisible by 8).")
flags.DEFINE_integer("examples", 16, "Examples N per timed call.")
flags.DEFINE_integer("repeats", 3, "Timed repeats after the warm-up; medians are reported.")
flags.DEFINE_integer("base_width", 8, "UNet base width (the demo's: 8).")
flags.DEFINE_integer("depth", 3, "UNet depth (the demo's: 3).")
flags.DEFINE_float("threshold", 0.3, "Region threshold for `predict_regions`.")
flags.DEFINE_list("methods", ["naive", "loop", "library"], "Methods to time.")
flags.DEFINE_integer("seed", 0, "Seed for the images, targets and parameters.")


def _examples(apply_fn, params, size: int, n: int, threshold: float, seed: int):
  """N random images [N, H, W, 4], random targets and predicted regions (all non-empty)."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, size, size, 4)).astype(np.float32)
  targets = rng.integers(0, 4, size=(n, size, size)).astype(np.int32)
  regions = segmentation.predict_regions(apply_fn, params, images, threshold)
  presence = segmentation.region_presence(regions)
  if not presence.all():  # an untrained model may miss a class: fall back to random masks
    regions = rng.random(size=regions.shape) < 0.3
  return {"image": jnp.asarray(images), "target": jnp.asarray(targets),
          "region": jnp.asarray(regions)}


def _methods(loss_fn, apply_fn, k: int):
  """The timed functions: name -> fn(params, batch) -> [N * K, P] (or the logits)."""

  def class_loss(params, example, j):
    return loss_fn(params, example)[j]

  def ravel(tree, rows):
    return jnp.concatenate([jnp.reshape(x, (rows, -1)) for x in jax.tree.leaves(tree)], axis=1)

  loop_one = jax.jit(lambda p, example, j: ravel(jax.grad(class_loss)(p, example, j), 1))
  forward = jax.jit(lambda p, images: apply_fn(p, images))

  def forward_loop(params, batch):  # batch-1 forwards: on XLA:CPU often faster per image
    images = batch["image"]
    return [forward(params, images[i:i + 1]) for i in range(images.shape[0])]

  def loop(params, batch):
    n = jax.tree.leaves(batch)[0].shape[0]
    rows = [loop_one(params, jax.tree.map(lambda x: x[i], batch), j)
            for i in range(n) for j in range(k)]
    return jnp.concatenate(rows, axis=0)

  def library(params, batch):
    return grads_lib.block_grads(loss_fn, k, params, batch, vectorize="auto")[0]

  return {"naive": common.naive_grads(loss_fn, k), "loop": loop, "library": library,
          "forward": lambda params, batch: forward(params, batch["image"]),
          "forward_loop": forward_loop}


def main(argv):
  del argv
  model = models.get_model("unet", base_width=FLAGS.base_width, depth=FLAGS.depth,
                           seed=FLAGS.seed)
  apply_fn, params, _ = models.functional(model)
  loss_fn = segmentation.make_region_losses(apply_fn)
  p = grads_lib.parameter_count(params)
  n = FLAGS.examples
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.local_device_count()} device(s); unet base_width={FLAGS.base_width} "
        f"depth={FLAGS.depth}, P={p}, N={n}, repeats={FLAGS.repeats}")
  rows = []
  for size in map(int, FLAGS.sizes):
    batch = _examples(apply_fn, params, size, n, FLAGS.threshold, FLAGS.seed)
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)
    k = grads_lib.num_outputs(loss_fn, params, example)
    fns = _methods(loss_fn, apply_fn, k)
    names = ["forward", "forward_loop", *FLAGS.methods]
    timings = common.time_in_turns(
        {name: functools.partial(fns[name], params, batch) for name in names}, FLAGS.repeats,
        log=lambda name, s, size=size: print(f"  {size} px {name:12s} warm-up {s:.1f} s",
                                             flush=True))
    seconds = dict(timings.seconds)
    if "library" in seconds:
      print(f"  {size} px vectorize='auto' took {grads_lib.auto_choices()[-1]}")
    print(f"  {size} px medians: " + ", ".join(f"{m} {s:.3f} s" for m, s in seconds.items()))
    if "library" in seconds and "naive" in seconds:  # the same gradients, to float tolerance
      # Loose: at 96 px both float32 paths differ from a float64 reference by about 1e-3
      # (relative, whole matrix) for this untrained model; at 64 px by about 1e-7.
      a, b = np.asarray(timings.results["library"]), np.asarray(timings.results["naive"])
      row = np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1))
      error = np.linalg.norm(a - b) / np.linalg.norm(b)
      print(f"  {size} px library vs naive: relative error {error:.1e} "
            f"(largest of a row {row:.1e})")
      assert error < 1e-2, error
    seconds["bound"] = (1 + 2 * k) * seconds["forward"]
    seconds["bound_b1"] = (1 + 2 * k) * min(seconds["forward"], seconds["forward_loop"])
    rows.append((size, k, seconds))

  methods = [m for m in ("naive", "loop", "library") if m in FLAGS.methods] + [
      "bound", "bound_b1"]
  print()
  print("| image | N x K | " + " | ".join(f"{m} (ex x cls / s)" for m in methods)
        + " | library / naive | fraction of the bound | of bound_b1 |")
  print("|---" * (len(methods) + 5) + "|")
  for size, k, s in rows:
    rate = {m: n * k / s[m] for m in methods if m in s}
    speedup = s["naive"] / s["library"] if "naive" in s and "library" in s else float("nan")
    fraction = s["bound"] / s["library"] if "library" in s else float("nan")
    fraction_b1 = s["bound_b1"] / s["library"] if "library" in s else float("nan")
    print(f"| {size} px | {n} x {k} | " + " | ".join(f"{rate[m]:.1f}" for m in methods)
          + f" | {speedup:.2f}x | {fraction:.0%} | {fraction_b1:.0%} |")
  print()
  print("Seconds (medians): " + "; ".join(
      f"{size} px: " + ", ".join(
          f"{m} {s[m]:.3f}" for m in ["forward", "forward_loop", *methods] if m in s)
      for size, _, s in rows))


if __name__ == "__main__":
  app.run(main)
