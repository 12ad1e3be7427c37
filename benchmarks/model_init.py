"""Building a model from scratch: the draws of `tracin_jax.draws` against Flax's own, in one run.

    PYTHONPATH=. python benchmarks/model_init.py --base_width=8 --depth=3

A model is built eagerly, and JAX compiles one random draw per parameter shape the first
time it meets it. Each measurement runs in a fresh process (no compiled draw left over):
the wall time of `models.get_model(..., rngs=nnx.Rngs(seed))` with the library's
initialisation, and with Flax's `lecun_normal` put back (the same values: the script
checks they are equal). The two kinds of process take turns, `--repeats` times each, so a
busy spell on a shared machine hits both; medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "unet", "Model name (tracin_jax.models.list_models()).")
flags.DEFINE_integer("base_width", 8, "Base width (the demo's: 8).")
flags.DEFINE_integer("depth", 3, "Depth (the demo's: 3).")
flags.DEFINE_integer("repeats", 3, "Fresh processes per variant; medians are reported.")

_CHILD = r"""
import json, sys, time
import jax, numpy as np
from flax import nnx
from tracin_jax import draws, models
name, width, depth, flax_init = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
if flax_init:
  draws.lecun_normal = nnx.initializers.lecun_normal
start = time.perf_counter()
model = models.get_model(name, base_width=width, depth=depth, rngs=nnx.Rngs(0))
params = jax.block_until_ready(nnx.state(model, nnx.Param))
seconds = time.perf_counter() - start
digest = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(params)))
print(json.dumps({"seconds": seconds, "digest": digest,
                  "shapes": len({np.shape(x) for x in jax.tree.leaves(params)})}))
"""


def _build(flax_init: bool) -> dict:
  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
  out = subprocess.run(
      [sys.executable, "-c", _CHILD, FLAGS.model, str(FLAGS.base_width), str(FLAGS.depth),
       "1" if flax_init else "0"], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  ours, theirs = [], []
  for _ in range(FLAGS.repeats):
    ours.append(_build(False))
    theirs.append(_build(True))
  if {r["digest"] for r in ours} != {r["digest"] for r in theirs}:
    raise SystemExit("the two initialisations gave different parameters")
  a = statistics.median(r["seconds"] for r in ours)
  b = statistics.median(r["seconds"] for r in theirs)
  print(f"{FLAGS.model} base width {FLAGS.base_width}, depth {FLAGS.depth}: "
        f"{ours[0]['shapes']} parameter shapes; load {os.getloadavg()[0]:.1f}")
  print(f"  Flax's lecun_normal:             {b:6.2f} s (median of {FLAGS.repeats})")
  print(f"  tracin_jax.draws (same values):  {a:6.2f} s, {b / a:.1f}x faster")


if __name__ == "__main__":
  app.run(main)
