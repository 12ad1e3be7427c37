"""A 3D UNet's forward and backward pass on whole volumes, its 3x3x3 convolutions computed
directly and depth-stacked, against the 2D UNet on the same voxels as slices, in one run.

    PYTHONPATH=. python benchmarks/volume_model.py
    PYTHONPATH=. python benchmarks/volume_model.py --volume=24,32,32 --depth=2   # demo3d's

The models are randomly initialised (`models.get_model(name, ..., seed=0)`), GroupNorm,
`--base_width` and `--depth` (the demo's 8 and 3 by default). The 3D models
(`spatial_dims=3`) take `--batch` random volumes [N, D, H, W, 4]: "3D direct" computes each
3x3x3 convolution as one 3D `lax.conv_general_dilated`, "3D stacked" (`conv3d="stacked"`,
`models.layers.DepthStackedConv`) as one 2D convolution over the three depth-shifted copies
stacked as channels (the same model and parameters; their losses and gradients are compared
and the largest difference printed). The baseline, the 2D model of the same width and depth,
takes the same voxels as N * D slices [N * D, H, W, 4]. For each: the forward pass (logits)
and the forward and backward pass (the gradient of the mean cross-entropy against random
labels with respect to every parameter), each jitted. Each runs once to compile (the
warm-up, reported), then `--repeats` timed calls, all taking turns
(`benchmarks.common.time_in_turns`); medians, with the machine's load (`os.getloadavg()`)
before and after: the numbers are only comparable at a similar load. A 3D 3x3x3
convolution does 3 times the work of a 2D 3x3 one per voxel, so the ratio 3D / 2D would be
near 3 where the convolutions dominate.

Measured 2026-12-02 (2 cores, jax 0.10.2, load 3.4 before, 2.8 after), the defaults, before
the stacked form existed: 3D UNet (351,484 parameters) forward 0.56 s, forward and backward
1.75 s (first call, compilation included, 1.2 s and 5.0 s); the 2D UNet on the same 64
slices 0.094 s and 0.28 s: 3D / 2D 5.9x and 6.2x, not 3x: XLA:CPU runs 3D convolutions on
its own loop and 2D ones through its fast kernels. With both forms, 2026-12-02 (jax 0.10.2,
medians of 5 in turns): at the defaults (load 2.7 before, 4.4 after) forward and backward
3.50 s direct, 0.83 s stacked (4.2x), 2D 0.62 s; forward 4.1x; the losses equal, gradients
apart by at most 4.3e-3 of a leaf's largest entry (float32 sums over 262,144 voxels in
another order; in float64 the two forms agree to 1e-12, `tests/models/models_volume_test.py`).
At demo3d's size (`--volume=24,32,32 --depth=2`, load 2.1 before, 2.5 after) 0.661 s direct,
0.116 s stacked (5.7x), 2D 0.079 s; gradients apart by at most 1.7e-6.
"""

from __future__ import annotations

import os

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from tracin_jax import models

FLAGS = flags.FLAGS
flags.DEFINE_list("volume", ["32", "64", "64"], "Volume size D,H,W (each divisible by "
                  "2**depth).")
flags.DEFINE_integer("batch", 2, "Volumes per call N.")
flags.DEFINE_string("model", "unet", "Registered model.")
flags.DEFINE_integer("base_width", 8, "Base width.")
flags.DEFINE_integer("depth", 3, "Depth.")
flags.DEFINE_integer("repeats", 5, "Timed calls after the warm-up; medians are reported.")


def _steps(model):
  """(forward(params, x), value_and_grad(params, x, labels)), both jitted."""
  apply_fn, params, _ = models.functional(model)

  def loss(p, x, labels):
    log_p = jax.nn.log_softmax(apply_fn(p, x))
    return -jnp.mean(jnp.take_along_axis(log_p, labels[..., None], axis=-1))

  return params, jax.jit(apply_fn), jax.jit(jax.value_and_grad(loss))


def main(argv):
  del argv
  d, h, w = (int(s) for s in FLAGS.volume)
  n = FLAGS.batch
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
        f"{common.load_average()}")
  rng = np.random.default_rng(0)
  volumes = rng.uniform(-1, 1, (n, d, h, w, 4)).astype(np.float32)
  labels = rng.integers(0, 4, (n, d, h, w)).astype(np.int32)
  inputs = {3: (volumes, labels), 2: (volumes.reshape(n * d, h, w, 4), labels.reshape(-1, h, w))}
  fns = {}
  for rank, conv3d in ((3, "direct"), (3, "stacked"), (2, "direct")):
    model = models.get_model(FLAGS.model, base_width=FLAGS.base_width, depth=FLAGS.depth,
                             spatial_dims=rank, seed=0,
                             **({"conv3d": conv3d} if rank == 3 else {}))
    params, forward, value_and_grad = _steps(model)
    x, y = (jax.device_put(a) for a in inputs[rank])
    name = f"3D {conv3d}" if rank == 3 else "2D"
    print(f"{name} {FLAGS.model}: {models.count_params(params):,} parameters; "
          f"x {list(x.shape)}")
    fns[f"{name} forward"] = lambda f=forward, p=params, x=x: f(p, x)
    fns[f"{name} forward+backward"] = lambda f=value_and_grad, p=params, x=x, y=y: f(p, x, y)
  timings = common.time_in_turns(fns, FLAGS.repeats)
  print(f"{'':<30}{'compile+first s':>16}{'median s':>10}")
  for name in fns:
    print(f"{name:<30}{timings.warmup[name]:>16.2f}{timings.seconds[name]:>10.3f}")
  for what in ("forward", "forward+backward"):
    for conv3d in ("direct", "stacked"):
      ratio = timings.seconds[f"3D {conv3d} {what}"] / timings.seconds[f"2D {what}"]
      print(f"3D {conv3d} / 2D {what}: {ratio:.2f}x (the same voxels)")
    speedup = (timings.seconds[f"3D direct {what}"] / timings.seconds[f"3D stacked {what}"])
    print(f"3D stacked against direct, {what}: {speedup:.2f}x faster")
  (loss_d, grads_d), (loss_s, grads_s) = (timings.results[f"3D {c} forward+backward"]
                                          for c in ("direct", "stacked"))
  worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) /
                    max(float(np.max(np.abs(np.asarray(a)))), 1e-30))
              for a, b in zip(jax.tree.leaves(grads_d), jax.tree.leaves(grads_s)))
  print(f"3D loss direct {float(loss_d):.6f}, stacked {float(loss_s):.6f}; gradients differ "
        f"by at most {worst:.1e} of each leaf's largest; medians of {FLAGS.repeats}; "
        f"{common.load_average()}")

if __name__ == "__main__":
  app.run(main)
