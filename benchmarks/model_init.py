"""Building a model from scratch: drawn together (`models.get_model`) against the plain eager
construction it replaces, as it was and as it is, for every architecture and both seed
forms, in fresh processes.

    PYTHONPATH=. python benchmarks/model_init.py --base_width=8 --depth=3
    PYTHONPATH=. python benchmarks/model_init.py --base_width=64 --depth=4 --repeats=1
    PYTHONPATH=. python benchmarks/model_init.py --spatial_dims=3 --models=unet,resunet

A model built eagerly compiles one random draw per parameter shape the first time it meets
it; `models.get_model` records the draws, makes them in one compiled call and replays them
(`models.build`). Each measurement runs in a fresh process with JAX's compilation cache off
(nothing compiled is left over): the wall time (and the process's CPU time, which the load
of a shared machine inflates less) of

  before:   `get_model_cls(name)(..., rngs=streams)`, one draw at a time, each kernel drawn
            as the 2-D [fan_in, rest] (`jax.nn.initializers.lecun_normal`), as
            `tracin_jax.draws.lecun_normal` drew it until it drew vectors: what
            `get_model` did until it drew together;
  eager:    the same construction with today's `draws.lecun_normal` (vector draws);
  together: `get_model(name, ..., rngs=streams)`;

streams being `nnx.Rngs(0)` (form "rngs", threefry) or the RBG streams `seed=0` stands for
(form "seed"), made inside the timed span. The script checks that eager and together give
the same parameters, byte for byte, and says whether before's are the same too (with JAX
0.10 they are; with 0.12 the 2-D draws differ in a last bit, see `draws.lecun_normal`). The
kinds of process take turns, `--repeats` times each, so a busy spell on a shared machine
hits all; medians, with the load before and after.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "Models to build (default: all of list_models()).")
flags.DEFINE_list("forms", ["seed", "rngs"], "Seed forms: seed (seed=0, RBG streams) and "
                  "rngs (rngs=nnx.Rngs(0), threefry).")
flags.DEFINE_integer("base_width", 8, "Base width (the demo's: 8; the paper's: 64).")
flags.DEFINE_integer("depth", 3, "Depth (the demo's: 3; the paper's: 4).")
flags.DEFINE_integer("repeats", 3, "Fresh processes per variant; medians are reported.")
flags.DEFINE_integer("spatial_dims", 2, "2 (slices, 3x3 kernels) or 3 (volumes, 3x3x3).")

_CHILD = r"""
import hashlib, json, sys, time
wall0, cpu0 = time.perf_counter(), time.process_time()
import jax, numpy as np
from flax import nnx
from tracin_jax import models
imported = time.perf_counter() - wall0
name, width, depth, form, variant, spatial_dims = sys.argv[1:7]
kwargs = dict(base_width=int(width), depth=int(depth), spatial_dims=int(spatial_dims))
if variant == "before":
  import math
  from tracin_jax import draws
  lecun_2d = jax.nn.initializers.lecun_normal()

  def lecun_normal(in_axis=-2, out_axis=-1):
    def init(key, shape, dtype=np.float32):
      rows = draws.fan_in(shape, in_axis, out_axis)
      return lecun_2d(key, (rows, math.prod(shape) // rows), dtype).reshape(shape)
    return init

  draws.lecun_normal = lecun_normal
wall, cpu = time.perf_counter(), time.process_time()
rngs = nnx.Rngs(jax.random.key(0, impl="rbg")) if form == "seed" else nnx.Rngs(0)
if variant in ("before", "eager"):
  model = models.get_model_cls(name)(**kwargs, rngs=rngs)
else:
  model = models.get_model(name, **kwargs, rngs=rngs)
leaves = jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in leaves)).hexdigest()
print(json.dumps({"seconds": wall, "cpu": cpu, "import": imported, "digest": digest,
                  "params": models.count_params(model),
                  "sizes": len({x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))
                                if x.ndim >= 4})}))
"""

VARIANTS = ("before", "eager", "together")


def _build(name: str, form: str, variant: str) -> dict:
  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
  out = subprocess.run(
      [sys.executable, "-c", _CHILD, name, str(FLAGS.base_width), str(FLAGS.depth), form,
       variant, str(FLAGS.spatial_dims)], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  from tracin_jax import models  # pylint: disable=g-import-not-at-top
  names = FLAGS.models or models.list_models()
  load_before = os.getloadavg()
  print(f"{FLAGS.spatial_dims}D, base width {FLAGS.base_width}, depth {FLAGS.depth}; fresh "
        f"processes, no compilation cache; medians of {FLAGS.repeats}; load {load_before[0]:.1f} "
        f"(1-min average, {os.cpu_count()} cores)")
  print(f"{'model':<16}{'form':<6}{'params':>10}{'sizes':>7}  {'before s':>8}{'(cpu)':>7}  "
        f"{'eager s':>8}{'(cpu)':>7}  {'together s':>10}{'(cpu)':>7}  {'speed-up':>8}  "
        "before's values")
  for name in names:
    for form in FLAGS.forms:
      runs = {v: [] for v in VARIANTS}
      for _ in range(FLAGS.repeats):
        for variant in VARIANTS:
          runs[variant].append(_build(name, form, variant))
      digests = {v: {r["digest"] for r in rs} for v, rs in runs.items()}
      if len(digests["eager"] | digests["together"]) != 1:
        raise SystemExit(f"{name} ({form}): eager and together gave different parameters")
      same = "same" if digests["before"] == digests["together"] else "differ"
      med = {v: statistics.median(r["seconds"] for r in rs) for v, rs in runs.items()}
      cpu = {v: statistics.median(r["cpu"] for r in rs) for v, rs in runs.items()}
      first = runs["eager"][0]
      print(f"{name:<16}{form:<6}{first['params']:>10}{first['sizes']:>7}  "
            f"{med['before']:>8.2f}{cpu['before']:>7.2f}  {med['eager']:>8.2f}"
            f"{cpu['eager']:>7.2f}  {med['together']:>10.2f}{cpu['together']:>7.2f}  "
            f"{med['before'] / med['together']:>7.1f}x  {same}", flush=True)
  print(f"load after {os.getloadavg()[0]:.1f}. Eager and together: the same parameters, byte "
        "for byte, in every run; sizes: distinct kernel sizes (an eager draw is compiled per "
        "shape); speed-up: before / together")


if __name__ == "__main__":
  app.run(main)
