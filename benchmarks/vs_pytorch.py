"""TracIn scores of a UNet in tracin_jax against what a PyTorch user would run instead.

    pip install -e ".[bench]"   # CPU torch and captum
    PYTHONPATH=. python benchmarks/vs_pytorch.py                       # demo and large models
    PYTHONPATH=. python benchmarks/vs_pytorch.py --quick               # tiny, seconds

For each model (`--models`: "demo" is the demo's UNet, base width 8, depth 3, GroupNorm,
96 px; "large" is base 16, depth 4, 128 px; "nonorm" is base 16, depth 3, 96 px without
normalisation, the convolutions then with biases; "volume" is a 3D UNet, base 8, depth 2, on
16^3-voxel volumes, 3x3x3 convolutions; "volume_stacked" the same model with
`conv3d="stacked"`, its 3x3x3 convolutions computed as 2D ones over depth-stacked channels,
against the same PyTorch network) it builds the Flax model, writes the same
network in PyTorch (the same layers: 3x3 convolutions, GroupNorm with the same groups and
epsilon, ReLU, 2x2 max pooling, 2x2 stride-2 transposed convolutions, a 1x1 head), copies
the weights over and checks that the logits agree. Both frameworks then compute the same
TracIn scores

    scores[a, i, b, j] = sum_t eta_t grad loss_j(theta_t; train b) . grad loss_i(theta_t; test a)

for `--train` train and `--test` test images (random images in [-1, 1], random targets,
random region masks covering about 30% of the pixels), the K = 3 region losses of
`tracin_jax.influence.segmentation.make_region_losses` (1 - soft Dice of class j inside
region j) and `--checkpoints` checkpoints (the model's weights, then perturbed copies), by:

* tracin_jax: `influence(loss_fn, checkpoints, train, test, vectorize=...)` for every
  choice of `vectorize` ("auto" is the default; the line under the table says which path
  it measured fastest and took);
* jax naive: `jax.jit(jax.vmap(jax.grad(loss_j)))` once per class j (K forward passes per
  example), then the Gram products: what a JAX user writes first;
* torch.func: `vmap(jacrev(loss))` over the examples (one forward per example shared by
  its K losses, as in tracin_jax), then the Gram products (`torch.func` is PyTorch's
  documented way to per-example gradients);
* PyTorch loop: per example one forward and K `torch.autograd.grad` calls
  (`retain_graph`), then the Gram products;
* Captum TracInCP: `captum.influence.TracInCP(...).influence(test)` as its documentation
  describes it: checkpoints saved with `torch.save(state_dict)` and loaded by a
  `checkpoints_load_func` returning eta_t, `loss_fn` a per-example loss (reduction
  "none", the default `sample_wise_grads_per_batch=False`). TracInCP wants one scalar loss
  per example, so every (example, class) pair becomes one item of its data set (the class
  index an input of a wrapper module that returns that class's loss): K forward and K
  backward passes per example. Captum computes per-example gradients by one backward pass
  through the whole batch per example, so its cost grows with the batch; `--captum_batch`
  (default 1, its fastest here) sets it;
* Captum hook mode: the same with `sample_wise_grads_per_batch=True` (a summed loss and
  per-sample gradients from layer hooks). It supports only Conv2d and Linear layers and
  gives no gradient, without a warning, for GroupNorm and ConvTranspose2d parameters: its
  "error" column shows what that costs;
* bounds: (1 + 2K) x the batched forward pass of all train and test images, per checkpoint
  (one forward, and per class a backward of about twice its cost), in each framework.

Each method runs once to compile or warm up, then `--repeats` times, the methods taking
turns so that a busy spell on a shared machine hits all of them; the table gives medians.
"error" is max |scores - reference| / max |reference| with tracin_jax's plain loop path as
the reference (float32 throughout; near ReLU kinks float32 gradients differ at about 1e-3
whatever the method). The load average is printed before and after.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from tracin_jax import models
from tracin_jax import params as params_lib
from tracin_jax.influence import core
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import segmentation

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["demo", "large"], "Models to run: demo, large, nonorm, volume "
                  "(a 3D UNet on 16^3 volumes; the Captum methods are left out there), "
                  "volume_stacked (the same, conv3d='stacked').")
flags.DEFINE_integer("train", 32, "Train images.")
flags.DEFINE_integer("test", 8, "Test images.")
flags.DEFINE_integer("checkpoints", 2, "TracIn checkpoints.")
flags.DEFINE_integer("repeats", 3, "Timed repeats after the warm-up; medians are reported.")
flags.DEFINE_list("methods", None, "Methods to time (default: all); see METHODS.")
flags.DEFINE_integer("captum_batch", 1, "Batch size of Captum's train data loader.")
flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: the number of CPUs).")
flags.DEFINE_bool("quick", False, "Tiny model and data, one repeat: checks that every method "
                  "runs and agrees, in seconds.")
flags.DEFINE_integer("seed", 0, "Seed for the weights, images, targets and regions.")

MODEL_CONFIGS = {
    "demo": dict(base_width=8, depth=3, size=96, norm="group"),
    "large": dict(base_width=16, depth=4, size=128, norm="group"),
    "nonorm": dict(base_width=16, depth=3, size=96, norm="none"),
    "quick": dict(base_width=4, depth=2, size=16, norm="group"),
    # A 3D UNet (3x3x3 convolutions, 2x2x2 pooling and up-convolutions) on 16^3 volumes.
    "volume": dict(base_width=8, depth=2, size=16, norm="group", spatial_dims=3),
    "volume_stacked": dict(base_width=8, depth=2, size=16, norm="group", spatial_dims=3,
                           conv3d="stacked"),
}
# What works on volumes: Captum's TracInCP takes one module's input as a batch of 2D items
# here, and its hook mode knows only Conv2d and Linear layers.
VOLUME_METHODS = ("tracin_jax", "tracin_jax_loop", "tracin_jax_vmap", "tracin_jax_threads",
                  "jax_naive", "torch_func", "torch_loop", "jax_bound", "torch_bound")
K = common.K  # region losses per example (the tumour classes)
NORM_GROUPS = 8  # the UNet's default: GroupNorm with gcd(width, 8) groups
SMOOTH = segmentation.DEFAULT_SMOOTH


# ----------------------------------------------------------------------------- PyTorch


def torch_unet(base_width: int, depth: int, norm: str, num_classes: int = 4,
               in_channels: int = 4, spatial_dims: int = 2):
  """The Flax `models.UNet` ("unet" variant) written in PyTorch, NCHW (NCDHW in 3D)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
  conv_transpose = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]
  max_pool = {2: nn.functional.max_pool2d, 3: nn.functional.max_pool3d}[spatial_dims]

  class Block(nn.Module):

    def __init__(self, c_in, c_out):
      super().__init__()
      bias = norm == "none"
      self.conv1 = conv(c_in, c_out, 3, padding=1, bias=bias)
      self.conv2 = conv(c_out, c_out, 3, padding=1, bias=bias)
      if norm == "group":
        groups = math.gcd(c_out, NORM_GROUPS)
        self.norm1 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
      else:
        self.norm1 = self.norm2 = nn.Identity()

    def forward(self, x):
      x = torch.relu(self.norm1(self.conv1(x)))
      return torch.relu(self.norm2(self.conv2(x)))

  class UNet(nn.Module):

    def __init__(self):
      super().__init__()
      widths = [base_width * 2**level for level in range(depth + 1)]
      self.encoder = nn.ModuleList(
          [Block(a, b) for a, b in zip([in_channels, *widths[:depth - 1]], widths[:depth])])
      self.bottleneck = Block(widths[depth - 1], widths[depth])
      levels = list(reversed(range(depth)))
      self.up = nn.ModuleList(
          [conv_transpose(widths[i + 1], widths[i], 2, stride=2) for i in levels])
      self.decoder = nn.ModuleList([Block(2 * widths[i], widths[i]) for i in levels[:-1]])
      self.last_hidden = Block(2 * widths[0], widths[0])
      self.head = conv(widths[0], num_classes, 1)

    def forward(self, x):
      skips = []
      for block in self.encoder:
        x = block(x)
        skips.append(x)
        x = max_pool(x, 2)
      x = self.bottleneck(x)
      for i, (up, block) in enumerate(zip(self.up, [*self.decoder, self.last_hidden])):
        x = up(x)
        x = block(torch.cat([skips[-1 - i], x], dim=1))
      return self.head(x)

  return UNet()


def torch_state_dict(params) -> dict[str, np.ndarray]:
  """Flax UNet parameters -> the PyTorch UNet's state dict (numpy arrays)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = params_lib.path_name(path).split("/")
    keys = keys[:-1] if keys[-1] == "value" else keys  # nnx.Param's array
    x = np.asarray(leaf)
    *module, name = keys
    if name == "kernel":
      name = "weight"
      # conv [*window, in, out] -> [out, in, *window]; transposed conv [in, *2s, out] ->
      # [in, out, *2s] (2D and 3D)
      r = x.ndim
      x = (x.transpose(0, r - 1, *range(1, r - 1)) if module[0] == "up" else
           x.transpose(r - 1, r - 2, *range(r - 2)))
    elif name == "scale":
      name = "weight"
    out[".".join([*module, name])] = np.ascontiguousarray(x)
  return out


def torch_region_losses(logits, target, region):
  """The region losses for one example: logits [C, *spatial], target [*spatial] int64,
  region [C-1, *spatial] float -> [C-1] (as `make_region_losses`)."""
  import torch  # pylint: disable=g-import-not-at-top

  probs = torch.softmax(logits, dim=0)[1:]
  space = tuple(range(1, logits.ndim))
  classes = torch.arange(1, logits.shape[0], device=logits.device).reshape(-1, *[1] * len(space))
  y = (target[None] == classes).to(probs.dtype)
  intersection = (region * probs * y).sum(dim=space)
  denominator = (region * probs).sum(dim=space) + (region * y).sum(dim=space)
  return 1.0 - 2.0 * intersection / (denominator + SMOOTH)


# ----------------------------------------------------------------------------- methods


class Setup:
  """One model, its checkpoints in both frameworks, the data."""

  def __init__(self, name: str, n_train: int, n_test: int, n_checkpoints: int, seed: int):
    import torch  # pylint: disable=g-import-not-at-top

    config = MODEL_CONFIGS[name]
    self.name, self.config = name, config
    dims = config.get("spatial_dims", 2)
    model = models.get_model("unet", base_width=config["base_width"], depth=config["depth"],
                             norm=config["norm"], spatial_dims=dims, seed=seed,
                             **({"conv3d": config["conv3d"]} if "conv3d" in config else {}))
    self.apply_fn, params, _ = models.functional(model)
    self.loss_fn = segmentation.make_region_losses(self.apply_fn)
    self.p = grads_lib.parameter_count(params)
    rng = np.random.default_rng(seed)
    self.checkpoints = common.perturbed_checkpoints(params, n_checkpoints, rng)
    space = (config["size"],) * dims

    def data(n):
      return {"image": rng.uniform(-1, 1, (n, *space, 4)).astype(np.float32),
              "target": rng.integers(0, 4, (n, *space)).astype(np.int32),
              "region": rng.random((n, *space, K)) < 0.3}

    self.train, self.test = data(n_train), data(n_test)
    self.net = torch_unet(config["base_width"], config["depth"], config["norm"],
                          spatial_dims=dims).eval()
    first = (0, dims + 1, *range(1, dims + 1))  # channels-last -> channels-first
    self.torch_checkpoints = [
        ({k: torch.tensor(v) for k, v in torch_state_dict(p).items()}, lr)
        for p, lr in self.checkpoints]
    self.net.load_state_dict(self.torch_checkpoints[0][0])

    def to_torch(d):
      return {"image": torch.from_numpy(d["image"].transpose(first).copy()),
              "target": torch.from_numpy(d["target"].astype(np.int64)),
              "region": torch.from_numpy(d["region"].transpose(first).astype(np.float32))}

    self.torch_train, self.torch_test = to_torch(self.train), to_torch(self.test)
    self.tmpdir = tempfile.TemporaryDirectory()

  def check_logits(self) -> float:
    """Largest |logit difference| between the frameworks, relative to the largest logit."""
    import torch  # pylint: disable=g-import-not-at-top

    images = self.test["image"]
    ours = np.asarray(self.apply_fn(self.checkpoints[0][0], jnp.asarray(images)))
    with torch.no_grad():
      theirs = self.net(self.torch_test["image"]).numpy()
      theirs = np.moveaxis(theirs, 1, -1)
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


def tracin_jax_method(s: Setup, vectorize: str):
  return lambda: core.influence(s.loss_fn, s.checkpoints, s.train, s.test, vectorize=vectorize)


def jax_naive_method(s: Setup):
  """K x jit(vmap(grad(loss_j))) (`common.naive_grads`), then the Gram products (float32
  matmuls)."""
  grads = common.naive_grads(s.loss_fn, K)

  def run():
    parts = []
    for params, lr in s.checkpoints:
      parts.append((grads(params, s.test), grads(params, s.train), lr))
    return common.gram_scores([(np.asarray(a), np.asarray(b), lr) for a, b, lr in parts],
                              len(s.test["image"]), len(s.train["image"]))

  return run


def _flat_rows(grads_dict, rows):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.cat([g.reshape(rows, -1) for g in grads_dict.values()], dim=1)


def torch_func_method(s: Setup):
  import torch  # pylint: disable=g-import-not-at-top
  from torch.func import functional_call, jacrev, vmap  # pylint: disable=g-import-not-at-top

  net = s.net

  def loss(params, image, target, region):
    logits = functional_call(net, params, (image[None],))[0]
    return torch_region_losses(logits, target, region)

  per_example = vmap(jacrev(loss), in_dims=(None, 0, 0, 0))

  def grads(params, d):
    g = per_example(params, d["image"], d["target"], d["region"])  # {name: [N, K, ...]}
    return _flat_rows(g, d["image"].shape[0] * K)

  def run():
    with torch.no_grad():
      parts = [(grads(p, s.torch_test), grads(p, s.torch_train), lr)
               for p, lr in s.torch_checkpoints]
    return common.gram_scores(parts, len(s.test["image"]), len(s.train["image"]))

  return run


def torch_loop_method(s: Setup):
  import torch  # pylint: disable=g-import-not-at-top

  net = s.net
  params = list(net.parameters())

  def grads(d):
    rows = []
    for b in range(d["image"].shape[0]):
      losses = torch_region_losses(net(d["image"][b:b + 1])[0], d["target"][b],
                                   d["region"][b])
      for j in range(K):
        g = torch.autograd.grad(losses[j], params, retain_graph=j < K - 1)
        rows.append(torch.cat([x.reshape(-1) for x in g]))
    return torch.stack(rows)

  def run():
    parts = []
    for state, lr in s.torch_checkpoints:
      net.load_state_dict(state)
      parts.append((grads(s.torch_test), grads(s.torch_train), lr))
    net.load_state_dict(s.torch_checkpoints[0][0])
    with torch.no_grad():
      return common.gram_scores(parts, len(s.test["image"]), len(s.train["image"]))

  return run


def captum_method(s: Setup, hooks: bool):
  """Captum's TracInCP; every (example, class) pair is one item (see the module docstring)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from torch.utils.data import TensorDataset  # pylint: disable=g-import-not-at-top
  from captum.influence import TracInCP  # pylint: disable=g-import-not-at-top

  class ClassLoss(nn.Module):
    """(image, target, region, class) -> that class's region loss, [B]."""

    def __init__(self, net):
      super().__init__()
      self.net = net

    def forward(self, image, target, region, cls):
      logits = self.net(image)
      losses = torch.stack([torch_region_losses(l, t, r)
                            for l, t, r in zip(logits, target, region)])  # [B, K]
      return losses.gather(1, cls[:, None])[:, 0]

  class SumLoss(nn.Module):
    reduction = "sum"

    def forward(self, out, labels):
      del labels
      return out.sum()

  def items(d):
    n = d["image"].shape[0]
    rep = lambda x: x.repeat_interleave(K, dim=0)  # example-major, class-minor
    return (rep(d["image"]), rep(d["target"]), rep(d["region"]),
            torch.arange(K).repeat(n), torch.zeros(n * K))

  paths = []
  for t, (state, lr) in enumerate(s.torch_checkpoints):
    path = os.path.join(s.tmpdir.name, f"checkpoint{t}.pt")
    torch.save({"model": state, "learning_rate": lr}, path)
    paths.append(path)

  def load(model, path):
    checkpoint = torch.load(path)
    model.net.load_state_dict(checkpoint["model"])
    return checkpoint["learning_rate"]

  wrapper = ClassLoss(s.net)
  train_items = TensorDataset(*items(s.torch_train))
  loss_fn = SumLoss() if hooks else (lambda out, labels: out)  # per-example: no reduction
  batch = len(train_items) if hooks else FLAGS.captum_batch
  tracin = TracInCP(wrapper, train_items, paths, checkpoints_load_func=load, loss_fn=loss_fn,
                    batch_size=batch, sample_wise_grads_per_batch=hooks)
  test_items = items(s.torch_test)

  def run():
    scores = tracin.influence(test_items)  # [n_test K, n_train K]
    s.net.load_state_dict(s.torch_checkpoints[0][0])
    return np.asarray(scores.detach().numpy(), np.float32).reshape(
        len(s.test["image"]), K, len(s.train["image"]), K)

  return run


def jax_bound_method(s: Setup):
  forward = jax.jit(lambda p, x: s.apply_fn(p, x))
  images = jnp.asarray(np.concatenate([s.test["image"], s.train["image"]]))

  def run():
    for params, _ in s.checkpoints:
      jax.block_until_ready(forward(params, images))

  return run


def torch_bound_method(s: Setup):
  import torch  # pylint: disable=g-import-not-at-top

  images = torch.cat([s.torch_test["image"], s.torch_train["image"]])

  def run():
    with torch.no_grad():
      for _ in s.checkpoints:
        s.net(images)

  return run


METHODS = {
    # name: (label, factory); the tracin_jax paths come first, "tracin_jax" is the default.
    "tracin_jax": ("tracin_jax (default: vectorize=\"auto\")",
                   lambda s: tracin_jax_method(s, "auto")),
    **{f"tracin_jax_{v}": (f"tracin_jax vectorize=\"{v}\"",
                           lambda s, v=v: tracin_jax_method(s, v))
       for v in grads_lib.VECTORIZE if v != "auto"},
    "jax_naive": ("jax naive: jit(vmap(grad)) per class + matmul", jax_naive_method),
    "torch_func": ("torch.func vmap(jacrev) + matmul", torch_func_method),
    "torch_loop": ("plain PyTorch loop of autograd.grad", torch_loop_method),
    "captum": ("Captum TracInCP (one item per example and class)",
               lambda s: captum_method(s, hooks=False)),
    "captum_hooks": ("Captum TracInCP hook mode (sample_wise_grads_per_batch=True)",
                     lambda s: captum_method(s, hooks=True)),
    "jax_bound": ("bound: (1 + 2K) x batched forward, JAX", jax_bound_method),
    "torch_bound": ("bound: (1 + 2K) x batched forward, PyTorch", torch_bound_method),
}
BOUNDS = ("jax_bound", "torch_bound")


def run_model(name: str, method_names: list[str], n_train: int, n_test: int,
              n_checkpoints: int, repeats: int, seed: int) -> None:
  s = Setup(name, n_train, n_test, n_checkpoints, seed)
  c = s.config
  if c.get("spatial_dims", 2) == 3:
    method_names = [m for m in method_names if m in VOLUME_METHODS]
  size = "^".join([str(c["size"]), str(c.get("spatial_dims", 2))])
  print(f"\n## {name}: unet base_width={c['base_width']} depth={c['depth']} norm={c['norm']}, "
        f"{size} px, P={s.p}; {n_train} train x {n_test} test images, K={K}, "
        f"{n_checkpoints} checkpoints; medians of {repeats}", flush=True)
  logit_error = s.check_logits()
  print(f"logits: PyTorch vs Flax, max relative difference {logit_error:.1e}", flush=True)
  assert logit_error < 1e-4, logit_error
  fns = {m: METHODS[m][1](s) for m in method_names}
  timings = common.time_in_turns(
      fns, repeats, log=lambda m, seconds: print(f"  {m:16s} warm-up {seconds:7.2f} s",
                                                 flush=True))
  results, seconds = timings.results, dict(timings.seconds)
  for m in BOUNDS:
    if m in seconds:
      seconds[m] *= 1 + 2 * K
  reference = core.influence(s.loss_fn, s.checkpoints, s.train, s.test, vectorize="loop")
  scale = np.abs(reference).max()
  base = seconds.get("tracin_jax")
  print("\n| method | seconds (grads + Gram) | relative to tracin_jax | error |")
  print("|---|---|---|---|")
  for m in fns:
    error = ("" if m in BOUNDS else
             f"{np.abs(results[m] - reference).max() / scale:.1e}")
    relative = f"{seconds[m] / base:.2f}" if base else ""
    print(f"| {METHODS[m][0]} | {seconds[m]:.2f} | {relative} | {error} |")
  choices = grads_lib.auto_choices()  # the last one measured is this model's
  print(f"\nvectorize=\"auto\" took {choices[-1] if choices else 'n/a'}; "
        f"{common.load_average()}", flush=True)
  for m in fns:
    if m not in BOUNDS and m != "captum_hooks":
      error = np.abs(results[m] - reference).max() / scale
      assert error < 1e-2, (m, error)


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(FLAGS.threads or os.cpu_count())
  if FLAGS.quick:
    names, n_train, n_test, n_ckpt, repeats = ["quick"], 4, 2, 2, 1
  else:
    names, n_train, n_test, n_ckpt, repeats = (
        FLAGS.models, FLAGS.train, FLAGS.test, FLAGS.checkpoints, FLAGS.repeats)
  method_names = FLAGS.methods or list(METHODS)
  unknown = [m for m in [*names, *method_names] if m not in MODEL_CONFIGS and m not in METHODS]
  if unknown:
    raise app.UsageError(f"unknown model or method {unknown}; models {list(MODEL_CONFIGS)}, "
                         f"methods {list(METHODS)}")
  import captum  # pylint: disable=g-import-not-at-top
  print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} CPUs; "
        f"{common.load_average()}")
  print(f"python {sys.version.split()[0]}, jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), captum "
        f"{captum.__version__}")
  for name in names:
    run_model(name, method_names, n_train, n_test, n_ckpt, repeats, FLAGS.seed)
  print(f"\nend: {common.load_average()}")


if __name__ == "__main__":
  app.run(main)
