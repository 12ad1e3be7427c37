"""What TRAK and EK-FAC cost next to TracIn on a UNet, in the same run.

    PYTHONPATH=. python benchmarks/attribution_cost.py --size=32 --n_train=16 --n_test=4

One model (`--model`, `--base_width`, `--depth`, random initialisation), the region losses
(K = 3) on synthetic disk regions (`common.region_examples`), one checkpoint. Timed in
turns after one compiling call each (medians of `--repeats`):

* tracin: `influence` (exact gradients, one checkpoint);
* trak: `trak_influence` with one model, CountSketch to `--dim` and `--damping`;
* ekfac_fit: `ekfac_factors` on the train examples (empirical Fisher): two passes of
  per-example layer inputs and output gradients, one compiled call per example ("loop",
  the default on CPU); ekfac_fit_vmap: the same, one vmapped call per block;
* ekfac_scores: `ekfac_influence` with those factors (the test side preconditioned, the
  train side's gradients multiplied block by block).

Prints seconds, the ratio to tracin, the share of parameters EK-FAC preconditions, the
load (`os.getloadavg()`) and the peak memory.

Measured (2-core CPU; the command above, demo UNet base 8 depth 3, 121,276 parameters,
99.4% of them in EK-FAC's 18 layers), load 3.1-5.3 from other work: tracin 0.107 s, trak
1.14x, ekfac_fit 3.9x (0.42 s: two passes, each a forward and K backward passes per
example), ekfac_fit_vmap 4.2x, ekfac_scores 1.19x. The fit's statistics are summed on the
device: combining each example's ~90 arrays eagerly had made it 12x (1.29 s, load 5-5.6).
"""

from __future__ import annotations

import time

from absl import app, flags

from benchmarks import common
from tracin_jax.influence import core
from tracin_jax.influence import ekfac
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import projection as projection_lib
from tracin_jax.influence import segmentation
from tracin_jax.influence import trak
from tracin_jax.models import unet

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "unet", "Registered model name.")
flags.DEFINE_integer("base_width", 8, "UNet base width.")
flags.DEFINE_integer("depth", 3, "UNet depth.")
flags.DEFINE_integer("size", 32, "Image side in pixels.")
flags.DEFINE_integer("n_train", 16, "Train examples.")
flags.DEFINE_integer("n_test", 4, "Test examples.")
flags.DEFINE_integer("dim", 1024, "TRAK's projected dimension.")
flags.DEFINE_float("damping", 1e-3, "TRAK's damping.")
flags.DEFINE_integer("repeats", 3, "Timed rounds.")
flags.DEFINE_string("vectorize", "auto", "Per-example gradient path (see `influence`).")


def main(argv):
  del argv
  model = unet.get_model(FLAGS.model, base_width=FLAGS.base_width, depth=FLAGS.depth)
  apply_fn, params, _ = unet.functional(model)
  loss_fn = segmentation.make_region_losses(apply_fn)
  train = common.region_examples(FLAGS.n_train, FLAGS.size, seed=0)
  test = common.region_examples(FLAGS.n_test, FLAGS.size, seed=1)
  projection = projection_lib.Projection(FLAGS.dim, "countsketch", seed=0)
  start = time.perf_counter()
  fitted = ekfac.ekfac_factors(loss_fn, params, train, vectorize="loop")  # compiles
  first_fit = time.perf_counter() - start
  fns = {
      "tracin": lambda: core.influence(loss_fn, [(params, 1.0)], train, test,
                                       vectorize=FLAGS.vectorize),
      "trak": lambda: trak.trak_influence(loss_fn, [[params]], train, test,
                                          damping=FLAGS.damping, projection=projection,
                                          vectorize=FLAGS.vectorize),
      "ekfac_fit": lambda: ekfac.ekfac_factors(loss_fn, params, train,
                                               vectorize="loop").layers[0].eigenvalues,
      "ekfac_fit_vmap": lambda: ekfac.ekfac_factors(loss_fn, params, train,
                                                    vectorize="vmap").layers[0].eigenvalues,
      "ekfac_scores": lambda: ekfac.ekfac_influence(loss_fn, [(params, 1.0)], train, test,
                                                    factors=[fitted],
                                                    vectorize=FLAGS.vectorize),
  }
  timings = common.time_in_turns(fns, FLAGS.repeats)
  timings.warmup["ekfac_fit"] = first_fit
  total = grads_lib.parameter_count(params)
  covered = sum(lf.layer.size + (lf.layer.out_features if lf.bias else 0)
                for lf in fitted.layers)
  print(f"{FLAGS.model} base {FLAGS.base_width} depth {FLAGS.depth}: {total:,} parameters, "
        f"EK-FAC preconditions {covered:,} ({100 * covered / total:.1f}%) in "
        f"{len(fitted.layers)} layers; {FLAGS.size} px, {FLAGS.n_train} train x "
        f"{FLAGS.n_test} test examples, K = {common.K}")
  print("| method | s (median of {}) | x tracin | first call s |".format(FLAGS.repeats))
  print("|---|---|---|---|")
  base = timings.seconds["tracin"]
  for name, seconds in timings.seconds.items():
    print(f"| {name} | {seconds:.3f} | {seconds / base:.2f} | {timings.warmup[name]:.1f} |")
  print(f"{common.load_average()}; peak RSS {common.peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
  app.run(main)
