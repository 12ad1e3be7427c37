"""Saliency maps per second for each method of `tracin_jax.saliency`, in one run.

    PYTHONPATH=. python benchmarks/saliency.py --image_size=96 --base_width=8 --depth=3

The model is a randomly initialised UNet (`models.get_model("unet", ...)`, seed 0) seen
through `saliency.NnxModel`; the input a batch of `--batch` random images [N, S, S, 4] in
[-1, 1]; the target the sum of the NCR/NET logit over the predicted whole tumour
(`masked_class_sum(1, predicted_region("WT"))`), except for SmoothGrad's "max" (IES)
aggregation, whose cost is one backward pass per voxel of the mask per sample: it uses a
fixed `--ies_side` x `--ies_side` square. Method settings are the library's defaults (IG 50
steps, guided IG 200 steps, SmoothGrad 25 samples) unless the flags say otherwise. Each
method runs once (warm-up: compilation), then `--repeats` timed calls, the methods taking
turns (`benchmarks.common.time_saliency`); the table gives the median seconds per call and
maps per second (batch / median). The machine's load
average (`os.getloadavg()`) is printed before and after: the numbers are only comparable
at a similar load.
"""

from __future__ import annotations

import os

from absl import app, flags
import jax

from benchmarks import common
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


def main(argv):
  del argv
  size, n = FLAGS.image_size, FLAGS.batch
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
        f"{common.load_average()}")
  model = models.get_model("unet", base_width=FLAGS.base_width, depth=FLAGS.depth, seed=0)
  m = saliency.NnxModel(model)
  print(f"UNet base_width {FLAGS.base_width}, depth {FLAGS.depth}, "
        f"{models.count_params(m.params)} parameters; x [{n}, {size}, {size}, 4]")
  settings = common.SaliencySettings(
      layer=FLAGS.layer, ig_steps=FLAGS.ig_steps, gig_steps=FLAGS.gig_steps,
      samples=FLAGS.samples, ies_samples=FLAGS.ies_samples, ies_side=FLAGS.ies_side)
  x, target, ies_target = common.saliency_inputs(n, size, FLAGS.ies_side)
  methods = common.saliency_methods(m, x, target, ies_target, settings)

  rows, _ = common.time_saliency(
      {name: methods[name] for name in common.select(methods, FLAGS.methods)}, n,
      FLAGS.repeats)

  print()
  print("| method | warm-up s (compile + 1 call) | median s / call | maps / s |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['method']} | {r['warmup_seconds']:.2f} | {r['seconds']:.3f} | "
          f"{r['maps_per_second']:.2f} |")
  print(f"\n{common.load_average()}")


if __name__ == "__main__":
  app.run(main)
