"""Saliency maps per second for each method of `tracin_jax.saliency`, in one run.

    PYTHONPATH=. python benchmarks/saliency.py --image_size=96 --base_width=8 --depth=3

The model is a randomly initialised UNet (`models.get_model("unet", ...)`, seed 0) seen
through `saliency.NnxModel`; the input a batch of `--batch` random images [N, S, S, 4] in
[-1, 1]; the target the sum of the NCR/NET logit over the predicted whole tumour
(`masked_class_sum(1, predicted_region("WT"))`), except for SmoothGrad's "max" (IES)
aggregation, whose cost is one backward pass per voxel of the mask per sample: it uses a
fixed `--ies_side` x `--ies_side` square. Method settings are the library's defaults (IG 50
steps, guided IG 200 steps, SmoothGrad 25 samples) unless the flags say otherwise. Each
method runs once (warm-up: compilation), then `--repeats` timed calls; the table gives
the median seconds per call and maps per second (batch / median). The machine's load
average (`os.getloadavg()`) is printed before and after: the numbers are only comparable
at a similar load.
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax import models
from tracin_jax import saliency

FLAGS = flags.FLAGS
flags.DEFINE_integer("image_size", 96, "Image side S (divisible by 2**depth).")
flags.DEFINE_integer("base_width", 8, "UNet base width.")
flags.DEFINE_integer("depth", 3, "UNet depth.")
flags.DEFINE_integer("batch", 1, "Images per call N.")
flags.DEFINE_integer("repeats", 3, "Timed calls after the warm-up; medians are reported.")
flags.DEFINE_integer("ig_steps", 50, "Integrated-gradients steps.")
flags.DEFINE_integer("gig_steps", 200, "Guided-IG steps.")
flags.DEFINE_integer("samples", 25, "SmoothGrad samples.")
flags.DEFINE_integer("ies_samples", 5, "SmoothGrad samples for the 'max' (IES) aggregation.")
flags.DEFINE_integer("ies_side", 8, "Side of the square mask of the IES target.")
flags.DEFINE_string("layer", "bottleneck", "Layer of the Grad-CAM family.")
flags.DEFINE_list("methods", [], "Methods to run (default: all).")


def _load() -> str:
  return "load average %.2f %.2f %.2f" % os.getloadavg()


def _methods(m: saliency.NnxModel, x, target, ies_target):
  f, p = m.apply_fn, m.params
  layer = m.layer(FLAGS.layer)
  layers = m.layers()
  return {
      "vanilla_gradient": lambda: saliency.vanilla_gradient(f, p, x, target),
      "guided_backprop": lambda: saliency.guided_backprop(f, p, x, target),
      f"integrated_gradients ({FLAGS.ig_steps} steps)":
          lambda: saliency.integrated_gradients(f, p, x, target, steps=FLAGS.ig_steps),
      f"guided_integrated_gradients ({FLAGS.gig_steps} steps)":
          lambda: saliency.guided_integrated_gradients(f, p, x, target,
                                                       steps=FLAGS.gig_steps),
      f"smoothgrad mean_of_squares ({FLAGS.samples} samples)":
          lambda: saliency.smoothgrad(f, p, x, target, key=0, num_samples=FLAGS.samples),
      (f"smoothgrad max / IES ({FLAGS.ies_samples} samples, "
       f"{FLAGS.ies_side}x{FLAGS.ies_side} mask)"):
          lambda: saliency.smoothgrad(f, p, x, ies_target, key=0,
                                      num_samples=FLAGS.ies_samples, aggregation="max"),
      f"grad_cam ({FLAGS.layer})": lambda: saliency.grad_cam(f, p, x, target, layer=layer),
      f"grad_cam_plus_plus ({FLAGS.layer})":
          lambda: saliency.grad_cam_plus_plus(f, p, x, target, layer=layer),
      f"guided_grad_cam ({FLAGS.layer})":
          lambda: saliency.guided_grad_cam(f, p, x, target, layer=layer),
      f"information_flow ({len(layers)} blocks)":
          lambda: saliency.information_flow(f, p, x, target, layers=layers),
  }


def main(argv):
  del argv
  size, n = FLAGS.image_size, FLAGS.batch
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
        f"{_load()}")
  model = models.get_model("unet", base_width=FLAGS.base_width, depth=FLAGS.depth, seed=0)
  m = saliency.NnxModel(model)
  print(f"UNet base_width {FLAGS.base_width}, depth {FLAGS.depth}, "
        f"{models.count_params(m.params)} parameters; x [{n}, {size}, {size}, 4]")
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (n, size, size, 4)), jnp.float32)
  target = saliency.masked_class_sum(1, saliency.predicted_region("WT"))
  mask = np.zeros((n, size, size), np.float32)
  start = (size - FLAGS.ies_side) // 2
  mask[:, start:start + FLAGS.ies_side, start:start + FLAGS.ies_side] = 1.0
  ies_target = saliency.masked_class_sum(1, mask)

  rows = []
  for name, fn in _methods(m, x, target, ies_target).items():
    if FLAGS.methods and not any(name.startswith(k) for k in FLAGS.methods):
      continue
    start_time = time.perf_counter()
    jax.block_until_ready(fn())
    warmup = time.perf_counter() - start_time
    times = []
    for _ in range(FLAGS.repeats):
      start_time = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start_time)
    median = statistics.median(times)
    rows.append((name, warmup, median, n / median))
    print(f"  {name}: warm-up {warmup:.2f} s, median {median:.3f} s", flush=True)

  print()
  print("| method | warm-up s (compile + 1 call) | median s / call | maps / s |")
  print("|---|---|---|---|")
  for name, warmup, median, rate in rows:
    print(f"| {name} | {warmup:.2f} | {median:.3f} | {rate:.2f} |")
  print(f"\n{_load()}")


if __name__ == "__main__":
  app.run(main)
