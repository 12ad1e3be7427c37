"""Which convolutions of a per-example gradient XLA:CPU hands to its fast library, and which
it keeps on its own convolution loop: read from the optimised HLO.

    PYTHONPATH=. python benchmarks/conv_hlo.py                      # demo and large UNets
    PYTHONPATH=. python benchmarks/conv_hlo.py --models=probe --out=/tmp/conv_hlo.json

For each model (`--models`: "demo", the demo's UNet, base width 8, depth 3, 96 px; "large",
base 16, depth 4, 128 px; "probe", a plain 5-layer network of 3x3 convolutions with widths
4-16-16-32-32-4 at 96 px, the smallest net that shows the pattern) it compiles the two
per-example gradient programs of `tracin_jax.influence.grads` for the K = 3 region losses:
"loop" (one example, `_one_grads`) and "vmap" (a block of `--block` examples,
`_vmap_grads`), takes `jax.jit(...).lower(...).compile().as_text()` and counts

* `__ynn_fusion`: custom fusions that XLA:CPU runs through YNNPACK (its fast convolution and
  matrix-product library);
* `convolution` instructions left to XLA's own loop, each classified: its input and output
  feature widths, `feature_group_count` (> 1: a grouped convolution, which is what a vmapped
  weight gradient becomes, one group per example) and whether its window covers the whole
  image (a weight gradient: the window is the activation map).

It measures no time: what it shows is why narrow layers and vmapped weight gradients are
slow on CPU (see `benchmarks/vs_pytorch.py` for the times). The table and, with `--out`, a
JSON of every count and every convolution left to XLA are printed with the jax version
and the backend; the counts are exact for one jax/XLA version and change with it.
"""

from __future__ import annotations

import json
import re
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from tracin_jax import models
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import segmentation

MODELS = {
    "demo": {"base_width": 8, "depth": 3, "size": 96},
    "large": {"base_width": 16, "depth": 4, "size": 128},
    "probe": {"widths": (4, 16, 16, 32, 32, 4), "size": 96},
}

_FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["demo", "large"], f"Any of {', '.join(MODELS)}.")
flags.DEFINE_integer("block", 8, "Examples per block of the vmap program.")
flags.DEFINE_string("out", None, "Where to write the JSON of counts (optional).")

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* ([\w-]+)\((.*)$")


def _probe_net(widths: tuple[int, ...]):
  """apply_fn(params, images [N, S, S, widths[0]]) -> logits [N, S, S, widths[-1]], params."""
  rng = np.random.default_rng(0)
  params = [
      {"w": jnp.asarray(rng.normal(0, (9 * a)**-0.5, (3, 3, a, b)), jnp.float32),
       "b": jnp.zeros((b,), jnp.float32)} for a, b in zip(widths[:-1], widths[1:])]

  def apply_fn(p, x):
    for i, layer in enumerate(p):
      x = jax.lax.conv_general_dilated(x, layer["w"], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + layer["b"]
      x = jax.nn.relu(x) if i < len(p) - 1 else x
    return x

  return apply_fn, params


def setup(name: str):
  """(loss_fn, params, example, batch) of a named model, with region examples."""
  config = MODELS[name]
  size = config["size"]
  if name == "probe":
    apply_fn, params = _probe_net(config["widths"])
  else:
    model = models.get_model("unet", base_width=config["base_width"], depth=config["depth"],
                             seed=0)
    apply_fn, params, _ = models.functional(model)
  loss_fn = segmentation.make_region_losses(apply_fn)
  data = common.region_examples(_FLAGS.block, size, seed=0)
  batch = jax.tree.map(jnp.asarray, data)
  example = jax.tree.map(lambda x: x[0], batch)
  return loss_fn, params, example, batch


def _computations(hlo: str) -> dict[str, list[tuple[str, list[int], str, str]]]:
  """HLO text -> {computation: [(instruction, shape, opcode, rest of the line)]}."""
  out, current = {}, None
  for line in hlo.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = out.setdefault(head.group(1), [])
      continue
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      name, dims, opcode, rest = m.groups()
      current.append((name, [int(d) for d in dims.split(",") if d], opcode, rest))
  return out


def _features(labels: str, shape: list[int]) -> int:
  """The feature width of an operand or output from its dim_labels part ("b01f" etc.)."""
  for letter in ("f", "o"):
    if letter in labels and len(labels) == len(shape):
      return shape[labels.index(letter)]
  return 0


def classify(hlo: str) -> dict:
  """Where the convolutions of optimised HLO text run: in a YNNPACK fusion or on XLA's own
  loop, with each convolution's shape.

  Returns:
    {"ynn_fusions": int (every `__ynn_fusion`, convolutions or not), "ynn_convolutions":
     int, "xla_convolutions": int,
     "xla_weight_gradients": int, "xla_narrow": int (forward or input gradients with an input
     or output width <= 16), "xla_grouped": int, "convolutions": [{"where": "ynn" |
     "xla", "kind": "weight gradient" | "forward or input gradient", "input_width",
     "output_width" (feature widths by dim_labels; for a weight gradient these are not the
     layer's), "window", "feature_group_count", "shape"}]}.
  """
  computations = _computations(hlo)
  ynn_bodies, ynn_fusions = set(), 0
  for instructions in computations.values():
    for _, _, opcode, rest in instructions:
      if opcode == "fusion" and "__ynn_fusion" in rest:
        ynn_fusions += 1
        ynn_bodies.update(re.findall(r"calls=%([\w.-]+)", rest))
  convs = []
  for computation, instructions in computations.items():
    shapes = {name: shape for name, shape, _, _ in instructions}
    for name, shape, opcode, rest in instructions:
      if opcode != "convolution":
        continue
      operands = re.findall(r"%([\w.-]+)", rest.split(")", 1)[0])
      labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
      lhs = shapes.get(operands[0], []) if operands else []
      window = re.search(r"window=\{size=([\dx]+)", rest)
      groups = re.search(r"feature_group_count=(\d+)", rest)
      window = [int(s) for s in window.group(1).split("x")] if window else []
      # A weight gradient convolves an activation with an output gradient: its window is
      # the whole feature map (larger than any kernel of ours); its widths are the groups'.
      kind = "weight gradient" if window and min(window) > 7 else "forward or input gradient"
      convs.append({
          "where": "ynn" if computation in ynn_bodies else "xla",
          "kind": kind,
          "input_width": _features(labels.group(1), lhs) if labels else 0,
          "output_width": _features(labels.group(3), shape) if labels else 0,
          "window": window,
          "feature_group_count": int(groups.group(1)) if groups else 1,
          "shape": shape,
      })
  xla = [c for c in convs if c["where"] == "xla"]
  weight = [c for c in xla if c["kind"] == "weight gradient"]
  return {
      "ynn_fusions": ynn_fusions,
      "ynn_convolutions": len(convs) - len(xla),
      "xla_convolutions": len(xla),
      "xla_weight_gradients": len(weight),
      "xla_narrow": sum(min(c["input_width"], c["output_width"]) <= 16
                        for c in xla if c not in weight),
      "xla_grouped": sum(c["feature_group_count"] > 1 for c in xla),
      "convolutions": convs,
  }


def compiled_text(path: str, loss_fn, params, example, batch) -> str:
  """The optimised HLO of the loop (one example) or vmap (one block) gradient program."""
  k = grads_lib.num_outputs(loss_fn, params, example)
  if path == "loop":
    lowered = grads_lib._one_grads.lower(loss_fn, k, params, example, None)  # pylint: disable=protected-access
  else:
    lowered = grads_lib._vmap_grads.lower(loss_fn, k, params, batch, None)  # pylint: disable=protected-access
  return lowered.compile().as_text()


def main(argv):
  del argv
  unknown = set(_FLAGS.models) - set(MODELS)
  if unknown:
    sys.exit(f"error: --models: unknown {sorted(unknown)}; expected any of {list(MODELS)}")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, load {common.load_average()}")
  results = {"jax": jax.__version__, "backend": jax.default_backend(), "block": _FLAGS.block,
             "models": {}}
  print("| model | program | YNNPACK fusions | convolutions in YNNPACK | on XLA's loop "
        "| of these: weight gradients | narrow (<= 16 wide) | grouped |")
  print("|---|---|---|---|---|---|---|---|")
  for name in _FLAGS.models:
    loss_fn, params, example, batch = setup(name)
    results["models"][name] = {}
    for path in ("loop", "vmap"):
      counts = classify(compiled_text(path, loss_fn, params, example, batch))
      results["models"][name][path] = counts
      print(f"| {name} | {path} | {counts['ynn_fusions']} | {counts['ynn_convolutions']} "
            f"| {counts['xla_convolutions']} | {counts['xla_weight_gradients']} "
            f"| {counts['xla_narrow']} | {counts['xla_grouped']} |", flush=True)
  print(f"load {common.load_average()}")
  if _FLAGS.out:
    with open(_FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)
    print(f"wrote {_FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
