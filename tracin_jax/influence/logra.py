"""LoGra: the store's gradient rows projected layer by layer, never forming a per-example
weight gradient (Choe et al. 2024, "What is Your Data Worth to GPT?").

A convolution or dense layer y = x W (a convolution: its input patches times the kernel)
has the per-example weight gradient G = X^T dY ([in, out]: X the layer's inputs or patches,
one row per output position, dY the loss's gradient at the layer's outputs). Projected by
a Kronecker matrix A kron B (A [in, d_in], B [out, d_out], Gaussian / sqrt of their width),
it is

    A^T G B = (X A)^T (dY B),

so it needs only the layer's inputs, which the forward pass has, and the gradients at its
outputs, which a backward pass *to the activations* gives: the weight gradient, the costly
part of a per-example gradient on XLA:CPU, is never computed. E[(A kron B)(A kron B)^T] = I,
so inner products (TracIn scores) are kept in expectation; a factor whose width equals its
side (d_in = in, or d_out = out) is the identity, exact on that side.

How the factors are captured. The loss is traced once (`jax.make_jaxpr`) for one example's
shapes; every parameter array whose only use is the kernel of a `conv_general_dilated`
(any strides, padding, dilations and layout; one feature group) or one operand of a
`dot_general` (no batch dimensions on it) is a captured layer. The loss is then
re-evaluated from its jaxpr with a zero "probe" added to each captured layer's output and
the layer's other operand recorded: the gradient with respect to the probes is dY, and X A
is the same convolution (or product) applied to the recorded input with A in place of the
kernel. This works for any JAX model, Flax NNX (our UNets: `nnx.Conv`, the transposed
convolution written as a product in `models.layers.Upsample`, the 1x1 head) or not; calls
to `jax.jit`-ed functions are looked into.

Everything else is the *rest*: the parameters that no captured layer holds (GroupNorm
scales and offsets, biases, and any kernel used another way, e.g. twice or inside a
`custom_vjp`). Their formed gradient (cheap: for norms and biases it is a sum over
positions) is kept exact when it is small (at most a quarter of the width) and projected
by CountSketch otherwise, as `Projection` does for whole rows.

The row of an example's output k is [vec(A_1^T G_1 B_1), ..., vec(A_L^T G_L B_L), rest],
the layers in the parameters' `jax.tree.flatten` order, each vec row-major over
(d_in, d_out): the projection of the formed gradient by a block-diagonal matrix of
Kronecker blocks (and the rest's block). `Projection(dim, "logra", seed)` names it; the
per-layer sizes follow from `dim` and the layers' shapes alone (`allocate`), so the query
side draws the same projection from the same model, and the store records them.

Sizes. The width goes to the layers by their output positions (`allocate`): on the demo's
UNet the four full-resolution convolutions hold 84% of the gradient's squared norm with 2%
of its parameters, and a layer's projection error grows with its norm. A layer no larger
than its share is kept exact. Each layer's rows are formed the cheapest of three ways
(`Layer.mode`), an exact convolution from its shifted inputs, never its patches.

Measured (2-core CPU, load 3-4 from other work; `benchmarks/projection_quality.py` and
`benchmarks/store_scale.py`): on the demo, d = 4096 ranks the training regions as
CountSketch at 4096 does (Spearman 0.996 against exact TracIn) and d = 16384 as exact
(1.000); the demo's store builds 1.55x faster (37.5 s against 58.2 s), its rows 1.25x per
example: its K backward passes alone take 55% of a formed gradient's time, and its narrow
full-resolution layers cost about as much either way. The paper's UNet (31 M parameters,
192 px): 1.65 s per slice against 4.65 s plus CountSketch's 0.24 s, 3.0x (2.3x in an
earlier run at a higher load), one slice's intermediates at a time (1.3 GiB peak for the
whole process).

Used through `store.build_store(..., projection=Projection(dim, "logra"))`; `plan` and
`block_rows` are the pieces.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Sequence

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np

from tracin_jax.influence import core
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import projection as projection_lib
from tracin_jax.types import Array, Batch, Example, LossFn, Params, State

KIND = projection_lib.LOGRA
# The rest's gradient is kept exact up to this share of the width, else projected to
# REST_SHARE of it.
REST_EXACT_FRACTION = 0.25
REST_SHARE = 0.125
_CALLS = ("jit", "pjit", "closed_call", "core_call")  # call primitives looked into


class NotCapturable(ValueError):
  """The loss has no layer whose factors can be captured (see the module docstring)."""


# ----------------------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True)
class Layer:
  """A captured layer: one parameter array used as a convolution kernel or a dense weight.

  Attributes:
    name: the parameter's path (`jax.tree_util.keystr`).
    leaf: its index among `jax.tree.leaves(params)`.
    op: "conv" or "dense".
    shape: the weight's shape.
    in_axes: the weight's axes that meet the inputs (a kernel's spatial and input-feature
      axes, a dense weight's contracted axes, in the order they pair with the input's).
    out_axes: the weight's output axes.
    positions: output positions per example (rows of X and dY).
    in_dim, out_dim: d_in and d_out of its factors.
    mode: how its rows are formed, the cheapest in multiply-adds (`costs`), all equal to
      A^T X^T dY B: "both" (X A)^T (dY B); "inputs" ((X A)^T dY) B; "patches"
      A^T (X^T (dY B)). X A is the layer's own operation with A in place of its weight;
      X^T (dY B) is, for a convolution, one product per kernel offset of the shifted input
      with dY B, so its patches are never formed (a convolution whose input side is exact,
      d_in = in, always comes this way).
  """

  name: str
  leaf: int
  op: str
  shape: tuple[int, ...]
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  positions: int
  in_dim: int = 0
  out_dim: int = 0
  mode: str = "both"

  @property
  def in_features(self) -> int:
    return math.prod(self.shape[i] for i in self.in_axes)

  @property
  def out_features(self) -> int:
    return math.prod(self.shape[i] for i in self.out_axes)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def width(self) -> int:
    return self.in_dim * self.out_dim

  def costs(self, k: int, in_dim: int, out_dim: int) -> dict[str, int | float]:
    """Multiply-adds per example of each mode (see `mode`) for K = k outputs and these
    widths; a mode that cannot form these rows costs infinity."""
    pos, a, c = self.positions, self.in_features, self.out_features
    if in_dim < a:
      left = pos * a * in_dim
    else:  # X A = X: free for a dense layer, a convolution's patches are never formed
      left = 0 if self.op == "dense" else math.inf
    right = k * pos * c * out_dim if out_dim < c else 0
    return {"both": left + right + k * pos * in_dim * out_dim,
            "inputs": left + k * pos * in_dim * c + (k * in_dim * c * out_dim
                                                     if out_dim < c else 0),
            "patches": right + k * pos * a * out_dim + (k * a * out_dim * in_dim
                                                        if in_dim < a else 0)}

  def gradient_matrix(self, grad: Array) -> Array:
    """The weight's gradient [*shape] as the matrix G [in_features, out_features] whose
    Kronecker projection the layer's rows are."""
    return jnp.reshape(jnp.transpose(grad, (*self.in_axes, *self.out_axes)),
                       (self.in_features, self.out_features))

  def kernel(self, a: Array) -> Array:
    """A [in_features, in_dim] laid out as the weight is, with the output axes replaced by
    one axis of in_dim (and ones): the layer's own operation with it computes X A."""
    shape = [self.shape[i] for i in self.in_axes] + [self.in_dim] + [1] * (
        len(self.out_axes) - 1)
    order = (*self.in_axes, *self.out_axes)
    return jnp.transpose(jnp.reshape(a, shape), np.argsort(order))


@dataclasses.dataclass(frozen=True, eq=False)
class _Site:
  """Where a layer's operation sits in the traced loss."""

  path: tuple[int, ...]  # equation indices, through looked-into calls
  weight_operand: int  # 0 or 1
  out_shape: tuple[int, ...]
  out_dtype: Any
  out_order: tuple[int, ...] | None  # conv: the output's axes as (N, spatial..., C)
  weight_first: bool  # dense: the weight's free axes come first in the output


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """How one loss's rows are formed: its captured layers with their sizes, and the rest.

  Hashed by identity: `plan` returns one object per loss, parameter structure, example
  shape and projection, so that one compiled function serves every block and checkpoint.

  Attributes:
    layers: the captured layers, in leaf order, with their d_in and d_out.
    rest_dim: the rest block's width (rest_size when it is kept exact).
    dim: the projection's dim the sizes were allocated from.
    traced: the loss traced for one example (`capture`): its jaxpr, where each layer's
      operation sits in it, and the other parameters; read through the properties below.
  """

  layers: tuple[Layer, ...]
  rest_dim: int
  dim: int
  traced: "_Capture" = dataclasses.field(repr=False)

  @property
  def rest(self) -> tuple[int, ...]:
    """Leaf indices of the parameters that are not captured layers."""
    return self.traced.rest

  @property
  def rest_names(self) -> tuple[str, ...]:
    """Their paths."""
    return self.traced.rest_names

  @property
  def rest_size(self) -> int:
    """Their number of scalars."""
    return self.traced.rest_size

  @property
  def num_outputs(self) -> int:
    """K."""
    return self.traced.num_outputs

  @property
  def width(self) -> int:
    """Numbers per row: sum of d_in x d_out over the layers, plus the rest's."""
    return sum(layer.width for layer in self.layers) + self.rest_dim

  @property
  def rest_exact(self) -> bool:
    return self.rest_dim == self.rest_size

  @property
  def bytes_per_example(self) -> int:
    """An estimate of one example's working memory (forward pass, K backward passes to the
    activations, rows): every intermediate of the traced loss, once. XLA's own count of the
    compiled program's temporaries was 0.67 of it for the paper's UNet at 192 px (0.43 of
    0.64 GB) and 0.98 for the demo's (20.4 of 20.8 MB): fused elementwise intermediates
    are never held, while each backward pass holds about one more set of activations."""
    return self.traced.activation_bytes

  def describe(self) -> dict:
    """What the rows are, for a store's metadata: each layer's (path, d_in, d_out), the
    rest's size and width."""
    return {"layers": [[layer.name, layer.in_dim, layer.out_dim] for layer in self.layers],
            "rest_size": self.rest_size, "rest_dim": self.rest_dim, "width": self.width}

  def __str__(self) -> str:
    exact = sum(1 for layer in self.layers
                if layer.in_dim == layer.in_features and layer.out_dim == layer.out_features)
    return (f"LoGra: {len(self.layers)} layers captured ({sum(l.size for l in self.layers):,} "
            f"parameters; {exact} of them kept exact), the rest {self.rest_size:,} parameters "
            f"{'exact' if self.rest_exact else f'projected to {self.rest_dim}'}; "
            f"{self.width} numbers per row")


def is_logra(projection) -> bool:
  """Whether `projection` is a `Projection` of kind "logra"."""
  return isinstance(projection, projection_lib.Projection) and projection.kind == KIND


# ----------------------------------------------------------------------------- tracing


def _inner(eqn):
  """The jaxpr of a call equation, as (jaxpr, consts)."""
  closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if hasattr(closed, "consts"):
    return closed.jaxpr, list(closed.consts)
  return closed, []


def _is_call(eqn) -> bool:
  return eqn.primitive.name in _CALLS and (
      "jaxpr" in eqn.params or "call_jaxpr" in eqn.params)


def _nbytes(aval) -> int:
  shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
  if shape is None or dtype is None:
    return 0
  try:
    return math.prod(shape) * np.dtype(dtype).itemsize
  except TypeError:  # extended dtypes (keys)
    return 0


def _walk(jaxpr, tracked: dict, path: tuple, uses: dict) -> int:
  """Records in `uses[leaf]` every use of the tracked variables (var -> leaf index) in
  `jaxpr`, looking into calls; returns the bytes of the jaxpr's intermediates."""
  total = 0
  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    ins = [(pos, tracked[v]) for pos, v in enumerate(eqn.invars)
           if isinstance(v, jex_core.Var) and v in tracked]
    if _is_call(eqn):
      inner, _ = _inner(eqn)
      inner_tracked = {inner.invars[pos]: leaf for pos, leaf in ins}
      total += _walk(inner, inner_tracked, here, uses)
      continue
    total += sum(_nbytes(v.aval) for v in eqn.outvars)
    for pos, leaf in ins:
      uses.setdefault(leaf, []).append(_use(eqn, pos, here, ins))
  for v in jaxpr.outvars:
    if isinstance(v, jex_core.Var) and v in tracked:
      uses.setdefault(tracked[v], []).append(None)
  return total


def _use(eqn, pos: int, path: tuple, ins) -> tuple | None:
  """(op, site, in_axes, out_axes) if this use of a weight is a capturable layer, else
  None."""
  if len(ins) != 1:  # the weight meets another parameter (or itself)
    return None
  name, params = eqn.primitive.name, eqn.params
  out = eqn.outvars[0].aval
  weight = eqn.invars[pos].aval
  if name == "conv_general_dilated" and pos == 1:
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
      return None
    numbers = params["dimension_numbers"]
    o_axis = numbers.rhs_spec[0]
    in_axes = tuple(a for a in range(weight.ndim) if a != o_axis)
    spec = numbers.out_spec
    site = _Site(path, pos, tuple(out.shape), out.dtype, (spec[0], *spec[2:], spec[1]), False)
    return "conv", site, in_axes, (o_axis,)
  if name == "dot_general":
    (contract, batch) = params["dimension_numbers"]
    if batch[pos]:
      return None
    in_axes = tuple(contract[pos])
    out_axes = tuple(a for a in range(weight.ndim) if a not in in_axes)
    if not out_axes:
      return None
    site = _Site(path, pos, tuple(out.shape), out.dtype, None, pos == 0)
    return "dense", site, in_axes, out_axes
  return None


@dataclasses.dataclass(frozen=True, eq=False)
class _Capture:
  """A traced loss: its jaxpr, the capturable layers (sizes not yet allocated), the rest."""

  jaxpr: Any
  consts: tuple
  layers: tuple[Layer, ...]
  sites: tuple[_Site, ...]
  rest: tuple[int, ...]
  rest_names: tuple[str, ...]
  rest_size: int
  num_outputs: int
  activation_bytes: int


def _bind(loss_fn: LossFn, params, example, state):
  out = loss_fn(params, example) if state is None else loss_fn(params, example, state)
  return jnp.reshape(out, (-1,))


def capture(loss_fn: LossFn, params: Params, example: Example, state: State = None
            ) -> _Capture:
  """Traces the loss for one example's shapes and finds its capturable layers.

  Args:
    loss_fn: `loss_fn(params, example[, state]) -> [K]` (or a scalar).
    params: parameters (arrays or `jax.ShapeDtypeStruct`s).
    example: one example (arrays or `jax.ShapeDtypeStruct`s).
    state: passed as the loss's third argument when not None.

  Returns:
    The capture (private fields; see `plan`).
  """
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [leaf for _, leaf in paths_leaves]
  names = [jax.tree_util.keystr(path) for path, _ in paths_leaves]

  def flat_loss(leaves, example, state):
    return _bind(loss_fn, jax.tree.unflatten(treedef, leaves), example, state)

  closed = jax.make_jaxpr(flat_loss)(leaves, example, state)
  jaxpr = closed.jaxpr
  tracked = {v: i for i, v in enumerate(jaxpr.invars[:len(leaves)])}
  uses: dict[int, list] = {}
  activation_bytes = _walk(jaxpr, tracked, (), uses)
  layers, sites, rest = [], [], []
  for i, leaf in enumerate(leaves):
    found = uses.get(i, [])
    if len(found) == 1 and found[0] is not None:
      op, site, in_axes, out_axes = found[0]
      shape = tuple(np.shape(leaf))
      out_features = math.prod(shape[a] for a in out_axes)
      positions = math.prod(site.out_shape) // out_features
      layers.append(Layer(names[i], i, op, shape, in_axes, out_axes, positions))
      sites.append(site)
    else:
      rest.append(i)
  k = int(math.prod(jaxpr.outvars[0].aval.shape))
  return _Capture(jaxpr, tuple(closed.consts), tuple(layers), tuple(sites), tuple(rest),
                  tuple(names[i] for i in rest),
                  sum(math.prod(np.shape(leaves[i])) for i in rest), k,
                  activation_bytes)


# ----------------------------------------------------------------------------- sizes


def _factor(target: int, in_features: int, out_features: int) -> tuple[int, int]:
  """(d_in, d_out) with d_in <= in, d_out <= out and d_in x d_out <= target, as square as
  the sides allow (a Kronecker projection's variance grows with 1 / min(d_in, d_out))."""
  side = max(1, math.isqrt(max(target, 1)))
  if side >= out_features:
    return min(in_features, max(1, target // out_features)), out_features
  if side >= in_features:
    return in_features, min(out_features, max(1, target // in_features))
  return side, min(out_features, max(1, target // side))


def allocate(dim: int, layers: Sequence[tuple[int, int, int]], rest_size: int
             ) -> tuple[list[tuple[int, int]], int]:
  """Splits a row of `dim` numbers over the layers and the rest.

  The rest is kept exact when rest_size <= REST_EXACT_FRACTION x dim, else gets
  REST_SHARE x dim numbers. The layers share what is left in proportion to their output
  positions (a weight gradient sums over its positions: in a UNet the few full-resolution
  layers hold most of the gradient's norm, and the projection error of a layer grows with
  its norm), except that a layer no larger than its share is kept exact (d_in x d_out = its
  size) and what it leaves goes to the others (water-filling); each share is then split
  into d_in x d_out as square as the layer's sides allow.

  Args:
    dim: the row's total width d.
    layers: (in_features, out_features, positions) of each layer.
    rest_size: scalars of the rest.

  Returns:
    ([(d_in, d_out) per layer], the rest's width); the widths sum to at most `dim`.

  Raises:
    ValueError: `dim` leaves fewer than one number per layer.
  """
  if rest_size <= REST_EXACT_FRACTION * dim:
    rest_dim = rest_size
  else:
    rest_dim = max(1, int(REST_SHARE * dim))
  budget = dim - rest_dim
  if layers and budget < len(layers):
    raise ValueError(f"Projection dim {dim} is too small for LoGra on {len(layers)} "
                     f"layers (and a rest of {rest_dim}); give at least "
                     f"{len(layers) + rest_dim}.")
  sizes = [a * b for a, b, _ in layers]
  weights = [max(1, pos) for _, _, pos in layers]
  targets = [0] * len(layers)
  open_ = set(range(len(layers)))
  left = budget
  while open_:
    total = sum(weights[i] for i in open_)
    shares = {i: left * weights[i] // total for i in open_}
    small = [i for i in open_ if sizes[i] <= shares[i]]
    if not small:
      for i in open_:
        targets[i] = max(1, shares[i])
      break
    for i in small:
      targets[i] = sizes[i]
      left -= sizes[i]
      open_.discard(i)
  return [_factor(t, a, b) for t, (a, b, _) in zip(targets, layers)], rest_dim


_PLANS: dict[tuple, Plan] = {}


def _avals(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), np.dtype(x.dtype)) for x in leaves)


def plan(loss_fn: LossFn, params: Params, example: Example,
         projection: projection_lib.Projection, state: State = None) -> Plan:
  """The LoGra plan of a loss: its captured layers, each layer's d_in x d_out, the rest.

  Made once per loss, parameter structure, state structure, example shape and projection
  (cached), so that every block and checkpoint shares one compiled function.

  Args:
    loss_fn: `loss_fn(params, example[, state]) -> [K]`.
    params: the parameters (arrays or `jax.ShapeDtypeStruct`s).
    example: one example (no leading example axis; arrays or `jax.ShapeDtypeStruct`s).
    projection: a `Projection` of kind "logra": its dim is the row's total width (at most),
      its seed draws the factors.
    state: the loss's third argument, or None.

  Returns:
    The plan.

  Raises:
    ValueError: `projection` is not of kind "logra", or its dim is too small.
    NotCapturable: no parameter of the loss is a capturable layer.
  """
  if not is_logra(projection):
    raise ValueError(f"plan needs a Projection of kind {KIND!r}, got {projection!r}.")
  key = (loss_fn, _avals(params), _avals(state), _avals(example), int(projection.dim))
  if key in _PLANS:
    return _PLANS[key]
  cap = capture(loss_fn, params, example, state)
  if not cap.layers:
    raise NotCapturable(
        "LoGra found no layer to capture in loss_fn: no parameter is used only as a "
        "convolution kernel or a dense weight (lax.conv_general_dilated, lax.dot_general). "
        "Use another Projection kind (countsketch, srht, dense), which projects the formed "
        "gradient.")
  dims, rest_dim = allocate(projection.dim, [(l.in_features, l.out_features, l.positions)
                                             for l in cap.layers], cap.rest_size)
  layers = []
  for layer, (a, b) in zip(cap.layers, dims):
    costs = layer.costs(cap.num_outputs, a, b)
    mode = min(costs, key=costs.get)
    layers.append(dataclasses.replace(layer, in_dim=a, out_dim=b, mode=mode))
  layers = tuple(layers)
  out = Plan(layers, rest_dim, int(projection.dim), cap)
  _PLANS[key] = out
  return out


# ----------------------------------------------------------------------------- factors


@functools.lru_cache(maxsize=8)
def _factor_values(plan_: Plan, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
  sizes = [(layer.in_features * layer.in_dim, layer.out_features * layer.out_dim)
           for layer in plan_.layers]
  draws = np.asarray(jax.random.normal(jax.random.key(seed), (sum(a + b for a, b in sizes),),
                                       jnp.float32))
  out, start = [], 0
  for layer, (na, nb) in zip(plan_.layers, sizes):
    a = draws[start:start + na].reshape(layer.in_features, layer.in_dim)
    b = draws[start + na:start + na + nb].reshape(layer.out_features, layer.out_dim)
    start += na + nb
    a = (np.eye(layer.in_features, dtype=np.float32) if layer.in_dim == layer.in_features
         else a / np.float32(math.sqrt(layer.in_dim)))
    b = (np.eye(layer.out_features, dtype=np.float32) if layer.out_dim == layer.out_features
         else b / np.float32(math.sqrt(layer.out_dim)))
    out.append((a, b))
  return tuple(out)


def factors(plan_: Plan, seed: int, dtype=np.float32) -> list[tuple[Array, Array]]:
  """Each layer's (A [in_features, d_in], B [out_features, d_out]): Gaussian / sqrt of the
  width, drawn from `seed` (one draw of all the plan's factors), or the identity where the
  width equals the side.

  The rows of layer l are vec(A^T G B) for G its `Layer.gradient_matrix`.
  """
  return [(jnp.asarray(a, dtype), jnp.asarray(b, dtype))
          for a, b in _factor_values(plan_, int(seed))]


# ----------------------------------------------------------------------------- rows


def _evaluate(jaxpr, consts, args, path, sites: dict, calls: set, probes, inputs: dict):
  """Evaluates `jaxpr` as `jax.core.eval_jaxpr` does, adding probes[l] to the output of
  layer l's operation and recording its other operand in inputs[l]."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  def write(v, value):
    if not isinstance(v, jex_core.DropVar):
      env[v] = value

  for v, value in zip(jaxpr.constvars, consts):
    write(v, value)
  for v, value in zip(jaxpr.invars, args):
    write(v, value)
  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    values = [read(v) for v in eqn.invars]
    if here in calls:
      inner, inner_consts = _inner(eqn)
      outs = _evaluate(inner, inner_consts, values, here, sites, calls, probes, inputs)
    else:
      bind_params = eqn.primitive.get_bind_params(eqn.params)
      subfuns = ()
      if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
        subfuns, bind_params = bind_params
      outs = eqn.primitive.bind(*subfuns, *values, **bind_params)
      if here in sites:
        layer, site = sites[here]
        inputs[layer] = values[1 - site.weight_operand]
        outs = outs + probes[layer]
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, value in zip(eqn.outvars, outs):
      write(v, value)
  return [read(v) for v in jaxpr.outvars]


def _bind_like(eqn, *operands):
  """`eqn`'s primitive with its parameters, applied to other operands."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
    subfuns, bind_params = bind_params
  return eqn.primitive.bind(*subfuns, *operands, **bind_params)


def _output_matrix(layer: Layer, site: _Site, y: Array, features: int) -> tuple[Array, str]:
  """A layer's output (its gradient, or X A) [*out_shape'] as a matrix and its axes: "pf"
  ([positions, features]) or "fp" (a product with its weight first, kept that way: no
  transpose), positions in the order of `_dense_input` and `_conv_patch_products`."""
  if layer.op == "conv":
    return jnp.reshape(jnp.transpose(y, site.out_order), (-1, features)), "pf"
  if site.weight_first:
    return jnp.reshape(y, (features, -1)), "fp"
  return jnp.reshape(y, (-1, features)), "pf"


def _dense_input(layer: Layer, site: _Site, eqn, x: Array) -> Array:
  """X [positions, in_features]: a dense layer's input, features in `in_axes` order."""
  contract = eqn.params["dimension_numbers"][0][1 - site.weight_operand]
  free = [a for a in range(x.ndim) if a not in contract]
  return jnp.reshape(jnp.transpose(x, (*free, *contract)), (-1, layer.in_features))


def _conv_patch_products(layer: Layer, eqn, x: Array, right: Array) -> Array:
  """X^T right [K, in_features, d] for a convolution's patches X, without forming them:
  one product per kernel offset of the shifted (padded, dilated, strided) input with
  right [K, positions, d], features in `in_axes` order."""
  params = eqn.params
  numbers = params["dimension_numbers"]
  lhs_spec, rhs_spec = numbers.lhs_spec, numbers.rhs_spec
  x = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # [N, spatial..., C]
  config = [(0, 0, 0), *[(lo, hi, d - 1) for (lo, hi), d in
                         zip(params["padding"], params["lhs_dilation"])], (0, 0, 0)]
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
  window = [layer.shape[a] for a in rhs_spec[2:]]
  strides, dilation = params["window_strides"], params["rhs_dilation"]
  sizes = [(x.shape[1 + d] - (w - 1) * r - 1) // s + 1
           for d, (w, r, s) in enumerate(zip(window, dilation, strides))]
  c = x.shape[-1]
  parts = []
  for offset in itertools.product(*[range(w) for w in window]):
    starts = [0, *[o * r for o, r in zip(offset, dilation)], 0]
    limits = [x.shape[0], *[b + (n - 1) * s + 1 for b, n, s in zip(starts[1:-1], sizes, strides)],
              c]
    shifted = jnp.reshape(jax.lax.slice(x, starts, limits, [1, *strides, 1]), (-1, c))
    parts.append(jnp.einsum("pc,kpo->kco", shifted, right,
                            precision=jax.lax.Precision.HIGHEST))
  k, d = right.shape[0], right.shape[-1]
  m = jnp.reshape(jnp.stack(parts, axis=1), (k, *window, c, d))
  # Axes 1..: the kernel's (spatial..., input feature) axes; put them in the kernel's own
  # axis order, which `in_axes` follows.
  order = np.argsort([*rhs_spec[2:], rhs_spec[1]])
  m = jnp.transpose(m, (0, *[1 + int(i) for i in order], m.ndim - 1))
  return jnp.reshape(m, (k, layer.in_features, d))


def _layer_rows(layer: Layer, site: _Site, eqn, x: Array, dy: Array, a: Array, b: Array
                ) -> Array:
  """Layer rows [K, d_in * d_out] from its input x and its output gradients dy [K, ...]."""
  k = dy.shape[0]
  hi = jax.lax.Precision.HIGHEST

  def einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=hi)

  dy_axes = _output_matrix(layer, site, dy[0], layer.out_features)[1]
  dy = jax.vmap(lambda g: _output_matrix(layer, site, g, layer.out_features)[0])(dy)
  dy_spec = "k" + dy_axes.replace("f", "o")  # [K, positions, out] or [K, out, positions]
  b = b.astype(dy.dtype)
  exact_out = layer.out_dim == layer.out_features

  def project_outputs():  # dY B, in dY's axes
    return dy if exact_out else einsum(f"{dy_spec},oq->{dy_spec.replace('o', 'q')}", dy, b)

  if layer.mode == "patches":
    right = project_outputs()
    if dy_axes == "fp":
      right = jnp.swapaxes(right, 1, 2)
    if layer.op == "conv":
      m = _conv_patch_products(layer, eqn, x, right)  # [K, in, d_out]
    else:
      m = einsum("pi,kpo->kio", _dense_input(layer, site, eqn, x), right)
    if layer.in_dim < layer.in_features:
      m = einsum("ia,kio->kao", a.astype(m.dtype), m)
    return jnp.reshape(m, (k, -1))
  if layer.in_dim == layer.in_features:  # a dense layer's exact input side: X A = X
    left, left_axes = _dense_input(layer, site, eqn, x), "pf"
    if dy_axes == "fp":
      left, left_axes = left.T, "fp"
  else:
    kernel = layer.kernel(a.astype(x.dtype))
    y = _bind_like(eqn, *((x, kernel) if site.weight_operand == 1 else (kernel, x)))
    left, left_axes = _output_matrix(layer, site, y, layer.in_dim)  # X A
  left_spec = left_axes.replace("f", "a")
  if layer.mode == "both":
    right = project_outputs()
    m = einsum(f"{left_spec},{dy_spec.replace('o', 'q')}->kaq", left, right)
  else:  # "inputs"
    m = einsum(f"{left_spec},{dy_spec}->kao", left, dy)
    if not exact_out:
      m = einsum("kao,oq->kaq", m, b)
  return jnp.reshape(m, (k, -1))


def layer_signals(traced: _Capture, leaves: Sequence[Array], example: Example,
                  state: State = None) -> tuple[Array, list, list, list]:
  """One example's captured layers' inputs and output gradients, from one forward pass and
  K pullbacks: what LoGra's rows (and EK-FAC's factors, `tracin_jax.influence.ekfac`) are
  formed from.

  Args:
    traced: `capture(loss_fn, ...)` (or a plan's `traced`).
    leaves: `jax.tree.leaves(params)`.
    example: one example.
    state: the loss's state, or None.

  Returns:
    out: [K] the losses.
    inputs: per captured layer, its operation's other operand (a dense layer's input, a
      convolution's input, as the traced loss holds them; see `dense_inputs`).
    output_grads: per captured layer, [K, *out_shape] the gradients of the K losses with
      respect to the layer operation's output (before any bias is added); see
      `output_grad_matrix`.
    rest_grads: per parameter of `traced.rest`, [K, *shape] its gradients.
  """
  k = traced.num_outputs
  sites = {site.path: (i, site) for i, site in enumerate(traced.sites)}
  calls = frozenset(site.path[:d] for site in traced.sites for d in range(1, len(site.path)))
  args_tail = [*jax.tree.leaves(example), *jax.tree.leaves(state)]

  def loss(rest_values, probes):
    values = list(leaves)
    for i, value in zip(traced.rest, rest_values):
      values[i] = value
    inputs = {}
    (out,) = _evaluate(traced.jaxpr, traced.consts, [*values, *args_tail], (), sites, calls,
                       probes, inputs)
    return jnp.reshape(out, (k,)), [inputs[i] for i in range(len(traced.layers))]

  rest_values = [leaves[i] for i in traced.rest]
  probes = [jnp.zeros(site.out_shape, site.out_dtype) for site in traced.sites]
  out, pullback, inputs = jax.vjp(loss, rest_values, probes, has_aux=True)
  rest_grads, probe_grads = jax.vmap(pullback)(jnp.eye(k, dtype=out.dtype))
  return out, inputs, list(probe_grads), list(rest_grads)


def layer_equation(traced: _Capture, i: int):
  """The jaxpr equation of captured layer i's operation (its parameters: strides, padding,
  dimension numbers)."""
  jaxpr, path = traced.jaxpr, traced.sites[i].path
  for depth, index in enumerate(path):
    eqn = jaxpr.eqns[index]
    if depth < len(path) - 1:
      jaxpr, _ = _inner(eqn)
  return eqn


def dense_inputs(traced: _Capture, i: int, x: Array) -> Array:
  """Captured dense layer i's input as X [positions, in_features], features in the
  weight's `in_axes` order, so that its weight gradient is X^T dY."""
  return _dense_input(traced.layers[i], traced.sites[i], layer_equation(traced, i), x)


def output_grad_matrix(traced: _Capture, i: int, dy: Array) -> Array:
  """Captured layer i's output gradients [K, *out_shape] as dY [K, positions,
  out_features], positions in the order of `dense_inputs` (a convolution's: its output
  positions, row-major over the spatial axes)."""
  layer, site = traced.layers[i], traced.sites[i]
  m = jax.vmap(lambda g: _output_matrix(layer, site, g, layer.out_features)[0])(dy)
  return jnp.swapaxes(m, 1, 2) if _output_matrix(layer, site, dy[0], 1)[1] == "fp" else m


def example_rows(plan_: Plan, leaves: Sequence[Array], factor_list, example: Example,
                 state: State = None) -> tuple[Array, Array]:
  """One example's LoGra rows, before the rest is projected.

  Args:
    plan_: the plan (from `plan`).
    leaves: `jax.tree.leaves(params)`.
    factor_list: `factors(plan_)`.
    example: one example.
    state: the loss's state, or None.

  Returns:
    layer_rows [K, sum of d_in x d_out]: row k is [vec(A_l^T G_lk B_l) for each layer l];
    rest [K, rest_size]: the rest's formed gradient, raveled in leaf order.
  """
  k = plan_.num_outputs
  out, inputs, probe_grads, rest_grads = layer_signals(plan_.traced, leaves, example, state)
  pieces = []
  for i, (layer, site) in enumerate(zip(plan_.layers, plan_.traced.sites)):
    a, b = factor_list[i]
    pieces.append(_layer_rows(layer, site, layer_equation(plan_.traced, i), inputs[i],
                              probe_grads[i], a, b))
  dtype = jnp.promote_types(out.dtype, jnp.float32)
  layer_rows = jnp.concatenate([p.astype(dtype) for p in pieces], axis=1)
  rest = (jnp.concatenate([jnp.reshape(g, (k, -1)).astype(dtype) for g in rest_grads], axis=1)
          if rest_grads else jnp.zeros((k, 0), dtype))
  return layer_rows, rest


@functools.partial(jax.jit, static_argnames=("plan_",))
def _vmap_rows(plan_, leaves, factor_list, batch, state):
  layer_rows, rest = jax.vmap(
      lambda ex: example_rows(plan_, leaves, factor_list, ex, state))(batch)
  finite = (jnp.all(jnp.isfinite(layer_rows), axis=(1, 2))
            & jnp.all(jnp.isfinite(rest), axis=(1, 2)))
  rows = layer_rows.shape[0] * layer_rows.shape[1]
  return (jnp.reshape(layer_rows, (rows, layer_rows.shape[-1])),
          jnp.reshape(rest, (rows, rest.shape[-1])), finite)


@functools.partial(jax.jit, static_argnames=("plan_",))
def _one_rows(plan_, leaves, factor_list, example, state):
  layer_rows, rest = example_rows(plan_, leaves, factor_list, example, state)
  return layer_rows, rest, jnp.all(jnp.isfinite(layer_rows)) & jnp.all(jnp.isfinite(rest))


def rest_projection(plan_: Plan, seed: int) -> projection_lib.Projection:
  """The CountSketch that projects the rest's formed gradient (when not kept exact)."""
  return projection_lib.Projection(plan_.rest_dim, "countsketch", seed)


def _pad(batch: Batch, size: int) -> Batch:
  """The block padded to `size` examples by repeating its last one."""
  n = jax.tree.leaves(batch)[0].shape[0]
  if n >= size:
    return batch
  return jax.tree.map(
      lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], size - n, 0)]),
      batch)


def resolve_vectorize(vectorize: str, mesh: jax.sharding.Mesh | None = None) -> str:
  """The path `block_rows` takes: "vmap" with a mesh or where asked, "loop" where asked,
  and for "auto" "loop" on CPU and "vmap" elsewhere.

  With no per-example weight gradient, a vectorised block is a plain batched forward and
  backward pass; on XLA:CPU the batch-1 loop was still as fast or faster (the demo UNet:
  26 against 29-37 ms CPU per example for blocks of 1 to 16; the paper's UNet: 2.1 s
  either way), and holds one example's intermediates instead of a block's.
  """
  vectorize = grads_lib.check_vectorize(vectorize)
  if mesh is not None:
    return "vmap"
  if vectorize == "auto":
    return "loop" if jax.default_backend() == "cpu" else "vmap"
  return vectorize


def block_rows(loss_fn: LossFn, k: int, params: Params, batch: Batch,
               projection: projection_lib.Projection, state: State = None, *,
               normalize: bool = False, vectorize: str = "auto",
               pad_to: int | None = None,
               mesh: jax.sharding.Mesh | None = None) -> tuple[Array, Array]:
  """The LoGra rows of a block of examples.

  Args:
    loss_fn: `loss_fn(params, example[, state]) -> [K]`.
    k: K.
    params: the parameters.
    batch: B examples (leaves with a leading axis of B).
    projection: a `Projection` of kind "logra".
    state: the loss's state, or None.
    normalize: divide each row by its norm (the projected row's: renormalised TracIn of
      the projected gradients, an estimate of the cosine of the exact ones).
    vectorize: "vmap" (one compiled call for the block), "loop" (one compiled batch-1 call
      per example) or "auto" (see `resolve_vectorize`).
    pad_to: with "vmap", pad a smaller block to this many examples (its last one repeated,
      the extra rows dropped), so that a ragged last block compiles no new program.
    mesh: a one-axis `jax.sharding.Mesh`: the block's examples are split over its devices
      (a block whose size they do not divide is computed on one device).

  Returns:
    rows [B * K, plan.width] (row b * K + j: output j of example b), finite [B] bool.

  Raises:
    ValueError: an unknown `vectorize`, or see `plan`.
  """
  vectorize = resolve_vectorize(vectorize, mesh)
  n = jax.tree.leaves(batch)[0].shape[0]
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), batch)
  plan_ = plan(loss_fn, params, example, projection, state)
  if plan_.num_outputs != k:
    raise ValueError(f"k = {k} given, the loss returns {plan_.num_outputs} outputs.")
  leaves = jax.tree.leaves(params)
  factor_list = factors(plan_, projection.seed, grads_lib.gradient_dtype(params))
  if vectorize == "loop":
    outs = [_one_rows(plan_, leaves, factor_list, jax.tree.map(lambda x, b=b: x[b], batch),
                      state) for b in range(n)]
    layer_rows = jnp.concatenate([o[0] for o in outs])
    rest = jnp.concatenate([o[1] for o in outs])
    finite = jnp.stack([o[2] for o in outs])
  else:
    padded = _pad(batch, pad_to) if pad_to else batch
    if mesh is not None and jax.tree.leaves(padded)[0].shape[0] % mesh.devices.size == 0:
      fn = _sharded_rows(plan_, mesh)
      layer_rows, rest, finite = fn(leaves, factor_list, padded, state)
    else:
      layer_rows, rest, finite = _vmap_rows(plan_, leaves, factor_list, padded, state)
    layer_rows, rest, finite = layer_rows[:n * k], rest[:n * k], finite[:n]
  if not plan_.rest_exact:
    rest = rest_projection(plan_, projection.seed)(rest)
  rows = jnp.concatenate([layer_rows, rest.astype(layer_rows.dtype)], axis=1)
  return (core.normalize_rows(rows) if normalize else rows), finite


@functools.lru_cache(maxsize=None)
def _sharded_rows(plan_: Plan, mesh: jax.sharding.Mesh):
  spec = jax.sharding.PartitionSpec
  axis = mesh.axis_names[0]

  def local(leaves, factor_list, batch, state):
    return _vmap_rows.__wrapped__(plan_, leaves, factor_list, batch, state)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec(), spec(), spec(axis), spec()),
                               out_specs=(spec(axis), spec(axis), spec(axis)),
                               check_vma=False))


__all__ = ["KIND", "Layer", "NotCapturable", "Plan", "allocate", "block_rows", "capture",
           "dense_inputs", "example_rows", "factors", "is_logra", "layer_equation",
           "layer_signals", "output_grad_matrix", "plan", "resolve_vectorize",
           "rest_projection"]
