"""EK-FAC influence (George et al. 2018; Grosse et al. 2023) for any JAX model's dense and
convolution layers.

    factors = ekfac_factors(loss_fn, params, fit_data)            # once per model
    scores = ekfac_influence(loss_fn, [(params, 1.0)], train, test)  # [n_test, K, n_train, K]

    scores[a, i, b, j] = sum_t eta_t sum_l < P_l(grad_l loss_i(theta_t; test a)),
                                             grad_l loss_j(theta_t; train b) >

where, for each supported layer l (kernel W_l and, if it has one, its bias), P_l is the
inverse of the layer's eigenvalue-corrected Kronecker-factored Fisher plus a damping:

* A = E[a a^T] over the layer's input patches a (a dense layer's input; a convolution's
  patch in the kernel's (spatial..., c_in) order, `projection.conv_patches`), a 1 appended
  for the bias; S = E[g g^T] over the gradients g of the Fisher's loss with respect to the
  layer's pre-activation outputs; both averaged over examples, outputs and positions.
* Eigendecompositions A = Q_A diag Q_A^T and S = Q_S diag Q_S^T. Only their eigenvectors
  are used: the eigenvalues are the corrected ones, Lambda = the mean over examples of the
  sum over the Fisher's outputs of (Q_A^T G Q_S)^2 (elementwise), G the layer's
  per-example gradient as a matrix [in + 1, out] (the kernel's gradient as
  `logra.Layer.gradient_matrix` lays it out, the bias's as its last row: the transpose of
  the papers' [out, in + 1]). So the scale of A and S does not matter.
* P(G) = Q_A ((Q_A^T G Q_S) / (Lambda + damping)) Q_S^T; the damping defaults to
  0.1 x the mean of the layer's Lambda (Kronfluence's default).

The Fisher so approximated is, per layer, the mean over the fitting examples of the sum
over the Fisher's outputs (the K losses, or a Fisher function's M outputs) of
vec(G) vec(G)^T: for a vector output the Gauss-Newton matrix. Where it has exactly the
Kronecker structure (a dense layer whose output gradients do not depend on its inputs, as
in least squares) EK-FAC is exact (tested). It is a mean, not a sum, as in Kronfluence:
for a model trained on the n fitting examples with the summed loss, the first-order change
of a test loss when train example b is removed is scores / n.

Which layers. Layers are found as LoGra finds them (`tracin_jax.influence.logra.capture`:
a parameter used once, as a `conv_general_dilated` kernel of any rank, strides, padding
and dilation, with one feature group, or as a `dot_general` weight); a Flax NNX
`nnx.Linear` (kernel [in, out]) or `nnx.Conv` (kernel [*window, in, out]) is one. A layer's
bias is the parameter at the same path with "kernel" replaced by "bias" (NNX's naming), of
shape [out], checked on every fitting example to be added to the layer's outputs (its
gradient the sum over positions of the output gradients; otherwise it is left out, with a
warning). Every other parameter (GroupNorm scales and offsets, a weight used twice, biases
of another shape, such as the UNet's `Upsample` bias added after its depth-to-space) is
left out of the scores: `Factors.left_out` names them.

Two Fishers. `fisher="empirical"`: the gradients of the loss's own K outputs at the data's
labels (each output one sample). The true Fisher: a callable `fisher_fn(params, example,
key) -> [M]` (or a scalar) whose gradients, with labels sampled from the model (`key` a
seeded PRNG key per example), are the Fisher's samples; `sampled_cross_entropy(apply_fn)`
is the one for segmentation models (per-pixel softmax cross-entropy, masked). Any other
curvature with this form can be given the same way; for instance a regression's output
itself, whose gradients give the Gauss-Newton matrix.

Why not kfac-jax (`pip download kfac-jax` works here, 0.0.8): it estimates the factors for
its optimiser from registered layer and loss tags matched in a batch's graph (its 2-D
`register_conv2d`, no 1-D or 3-D), keeps no eigenvalue correction, and adds distrax and
dm-tree as dependencies; the capture this library already has for LoGra gives the inputs
and output gradients of every layer of any rank, per example, for any loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.influence import arguments
from tracin_jax.influence import data as data_lib
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import gram as gram_lib
from tracin_jax.influence import logra
from tracin_jax.influence import projection as projection_lib
from tracin_jax.types import ApplyFn, Array, Checkpoints, Example, LossFn, Params

DEFAULT_DAMPING_FRACTION = 0.1  # of the mean corrected eigenvalue, per layer (Kronfluence)
FISHERS = ("empirical",)
_HI = jax.lax.Precision.HIGHEST


class FisherFn(Protocol):
  """The loss whose gradients are the Fisher's samples: `fisher_fn(params, example, key)
  -> [M]` (or a scalar), `key` a PRNG key (uint32 [2]) drawn per example from the seed."""

  def __call__(self, params: Params, example: Example, key: Array) -> Array:
    ...


# ----------------------------------------------------------------------------- fisher losses


def sampled_cross_entropy(apply_fn: ApplyFn, *, image_key: str = "image",
                          mask_key: str | None = None) -> FisherFn:
  """The true Fisher's loss for a segmentation model: labels sampled per pixel.

  Args:
    apply_fn: `apply_fn(params, images [N, *spatial, C_in]) -> logits [N, *spatial, C]`.
    image_key: the example's image entry ([*spatial, C_in]).
    mask_key: an example entry [*spatial] (bool or float weights) of the pixels counted,
      or None for every pixel.

  Returns:
    `fisher_fn(params, example, key) -> scalar`: - sum over pixels of mask x log
    softmax(logits)[y], y ~ Categorical(softmax(logits)) drawn per pixel from `key`, the
    logits held fixed for the draw; its gradients are samples of the model's Fisher.
  """

  def fisher_fn(params, example, key):
    logits = apply_fn(params, example[image_key][None])[0]
    labels = jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None],
                                axis=-1)[..., 0]
    mask = 1.0 if mask_key is None else jnp.asarray(example[mask_key], log_p.dtype)
    return -jnp.sum(mask * log_p)

  return fisher_fn


@dataclasses.dataclass(frozen=True)
class _Empirical:
  """The loss itself, with the key as an unused third argument (the capture's state)."""

  loss_fn: LossFn

  def __call__(self, params, example, key):
    del key
    return jnp.reshape(self.loss_fn(params, example), (-1,))


@dataclasses.dataclass(frozen=True)
class _Sampled:
  fisher_fn: Callable

  def __call__(self, params, example, key):
    return jnp.reshape(self.fisher_fn(params, example, key), (-1,))


# ----------------------------------------------------------------------------- factors


@dataclasses.dataclass(frozen=True)
class LayerFactors:
  """One layer's EK-FAC factors.

  Attributes:
    name: the kernel's path (`jax.tree_util.keystr`).
    bias: the bias's path, or None.
    layer: the captured layer (`logra.Layer`: shape, in and out axes).
    a: [in (+ 1), in (+ 1)] E[a a^T] over input patches (the 1 for the bias last).
    s: [out, out] E[g g^T] over output gradients.
    q_a, q_s: their eigenvectors (columns).
    eigenvalues: [in (+ 1), out] the corrected eigenvalues: the mean over examples of the
      sum over the Fisher's outputs of (Q_A^T G Q_S)^2.
  """

  name: str
  bias: str | None
  layer: logra.Layer
  bias_leaf: int | None
  a: np.ndarray
  s: np.ndarray
  q_a: np.ndarray
  q_s: np.ndarray
  eigenvalues: np.ndarray

  def damping(self, damping: float | None) -> float:
    """The damping added to the eigenvalues: `damping`, or 0.1 x their mean for None."""
    if damping is None:
      return DEFAULT_DAMPING_FRACTION * float(np.mean(self.eigenvalues))
    return float(damping)


@dataclasses.dataclass(frozen=True)
class Factors:
  """A model's EK-FAC factors.

  Attributes:
    layers: the supported layers' factors, in the parameters' leaf order.
    left_out: paths of the parameters that are not preconditioned (not in the scores).
    fisher: "empirical", or the Fisher function's name.
    num_examples: fitting examples.
  """

  layers: tuple[LayerFactors, ...]
  left_out: tuple[str, ...]
  fisher: str
  num_examples: int


@dataclasses.dataclass(frozen=True)
class _Spec:
  """What the jitted passes need to know of the layers (static)."""

  traced: Any  # logra's capture, hashed by identity
  bias: tuple[int | None, ...]  # per layer, its bias's index in `traced.rest`, or None


def _conv_inputs(traced, i: int, x: Array) -> Array:
  """A captured convolution's input patches [N x positions, in_features], features in the
  kernel's `in_axes` order, positions as `logra.output_grad_matrix` orders them."""
  layer = traced.layers[i]
  eqn = logra.layer_equation(traced, i)
  params = eqn.params
  numbers = params["dimension_numbers"]
  lhs_spec, rhs_spec = numbers.lhs_spec, numbers.rhs_spec
  x = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # [N, spatial..., C]
  window = tuple(layer.shape[a] for a in rhs_spec[2:])
  patches = jax.vmap(lambda v: projection_lib.conv_patches(
      v, window, tuple(params["padding"]), strides=params["window_strides"],
      lhs_dilation=params["lhs_dilation"], rhs_dilation=params["rhs_dilation"]))(x)
  c = x.shape[-1]
  patches = jnp.reshape(patches, (-1, *window, c))
  order = np.argsort([*rhs_spec[2:], rhs_spec[1]])  # to the kernel's own axis order
  patches = jnp.transpose(patches, (0, *[1 + int(j) for j in order]))
  return jnp.reshape(patches, (-1, layer.in_features))


def _layer_data(spec: _Spec, leaves, example, key, with_gaps: bool = False):
  """Per layer (X [positions, in (+ 1)], dY [M, positions, out]) of one example; with
  `with_gaps`, also per layer the largest |bias gradient - sum over positions of dY| and
  the largest |bias gradient| (0, 0 for a layer without a bias)."""
  traced = spec.traced
  _, inputs, output_grads, rest_grads = logra.layer_signals(traced, leaves, example, key)
  out, gaps = [], []
  for i, layer in enumerate(traced.layers):
    if layer.op == "conv":
      x = _conv_inputs(traced, i, inputs[i])
    else:
      x = logra.dense_inputs(traced, i, inputs[i])
    dy = logra.output_grad_matrix(traced, i, output_grads[i])
    x = x.astype(dy.dtype)
    if spec.bias[i] is not None:
      x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
      bias_grad = jnp.reshape(rest_grads[spec.bias[i]], (dy.shape[0], -1))
      gaps.append((jnp.max(jnp.abs(bias_grad - jnp.sum(dy, axis=1))),
                   jnp.max(jnp.abs(bias_grad))))
    else:
      gaps.append((jnp.zeros((), dy.dtype), jnp.zeros((), dy.dtype)))
    out.append((x, dy))
  return (out, gaps) if with_gaps else out


def _keys(seed: int, first: int, n: int) -> Array:
  """One PRNG key (uint32 [2]) per example, from the seed and the example's index."""
  return _fold_in(jax.random.PRNGKey(seed), np.arange(first, first + n, dtype=np.uint32))


_fold_in = jax.jit(jax.vmap(jax.random.fold_in, (None, 0)))


def _statistics(spec, leaves, batch, keys, bases):
  """A block's sums of X^T X and dY^T dY per layer, its largest bias gaps (see
  `_layer_data`), and its sums of (Q_A^T G Q_S)^2 in the given bases.

  Both passes run it (`_accumulate`, one program): the first for A and S (with identity
  bases, its third result unused), the second for the corrected eigenvalues (its first
  results unused); the two small products per position it adds cost little next to the
  forward and backward passes.
  """
  def one(example, key):
    layer_data, gaps = _layer_data(spec, leaves, example, key, with_gaps=True)
    covariances, eigen = [], []
    for (x, dy), (q_a, q_s) in zip(layer_data, bases):
      covariances.append((jnp.matmul(x.T, x, precision=_HI),
                          jnp.einsum("mpo,mpq->oq", dy, dy, precision=_HI)))
      g = jnp.einsum("pi,mpo->mio", x, dy, precision=_HI)  # [M, in (+ 1), out]
      rotated = jnp.einsum("ia,mij,jb->mab", q_a, g, q_s, precision=_HI)
      eigen.append(jnp.sum(jnp.square(rotated), axis=0))
    return covariances, gaps, eigen
  covariances, gaps, eigen = jax.vmap(one)(batch, keys)
  total = lambda tree: jax.tree.map(lambda v: jnp.sum(v, axis=0), tree)
  return total(covariances), jax.tree.map(lambda v: jnp.max(v, axis=0), gaps), total(eigen)


@functools.partial(jax.jit, static_argnames=("spec",))
def _accumulate(spec, leaves, batch, keys, bases, total):
  """`total` with a block's `_statistics` added (sums add, gaps take the larger), on the
  device: one call per block (or example), nothing combined eagerly."""
  sums, gaps, eigen = _statistics(spec, leaves, batch, keys, bases)
  sums_t, gaps_t, eigen_t = total
  add = lambda t, v: t + v.astype(t.dtype)
  return (jax.tree.map(add, sums_t, sums),
          jax.tree.map(lambda t, v: jnp.maximum(t, v.astype(t.dtype)), gaps_t, gaps),
          jax.tree.map(add, eigen_t, eigen))


def _zeros(spec, dtype) -> tuple:
  """`_accumulate`'s starting total: per layer A [in (+ 1)]^2 and S [out, out], the two
  gaps, the eigenvalue sums [in (+ 1), out]; all zeros of `dtype`."""
  sums, gaps, eigen = [], [], []
  for layer, bias in zip(spec.traced.layers, spec.bias):
    a, c = layer.in_features + (bias is not None), layer.out_features
    sums.append((jnp.zeros((a, a), dtype), jnp.zeros((c, c), dtype)))
    gaps.append((jnp.zeros((), dtype), jnp.zeros((), dtype)))
    eigen.append(jnp.zeros((a, c), dtype))
  return sums, gaps, eigen


def _fisher_loss(loss_fn: LossFn, fisher) -> tuple[Callable, str]:
  if isinstance(fisher, str):
    if fisher not in FISHERS:
      raise ValueError(f"fisher must be 'empirical' or a callable fisher_fn(params, example, "
                       f"key) (e.g. sampled_cross_entropy(apply_fn)), got {fisher!r}.")
    if not callable(loss_fn):
      raise TypeError(f"loss_fn must be callable for the empirical Fisher, got "
                      f"{type(loss_fn).__name__}.")
    return _Empirical(loss_fn), "empirical"
  if not callable(fisher):
    raise TypeError(f"fisher must be 'empirical' or a callable, got {type(fisher).__name__}.")
  return _Sampled(fisher), getattr(fisher, "__name__", type(fisher).__name__)


_CAPTURES: dict[tuple, Any] = {}


def _avals(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), np.dtype(x.dtype)) for x in leaves)


def _capture(fisher_loss, params, example, key):
  """`logra.capture`, once per Fisher loss, parameter structure and example shape: the
  same capture object keys the jitted passes, so that they compile once."""
  cache_key = (fisher_loss, _avals(params), _avals(example))
  if cache_key not in _CAPTURES:
    _CAPTURES[cache_key] = logra.capture(fisher_loss, params, example, key)
  return _CAPTURES[cache_key]


def _bias_leaves(names: list[str], leaves, traced) -> list[int | None]:
  """Per captured layer, the leaf index of its bias (the path with "kernel" replaced by
  "bias", of shape [out] and not itself a layer), or None."""
  index = {name: i for i, name in enumerate(names)}
  rest = set(traced.rest)
  out = []
  for layer in traced.layers:
    head, found, tail = layer.name.rpartition("kernel")
    j = index.get(head + "bias" + tail) if found else None
    ok = j is not None and j in rest and tuple(np.shape(leaves[j])) == (layer.out_features,)
    out.append(j if ok else None)
  return out


def ekfac_factors(loss_fn: LossFn, params: Params, data, *,
                  fisher: str | FisherFn = "empirical", seed: int = 0,
                  batch_size: int | None = None, vectorize: str = "auto") -> Factors:
  """Fits the EK-FAC factors of a model's dense and convolution layers (see the module
  docstring for the formulas and the layers covered).

  Two passes over `data`: A and S (then their eigenvectors), then the corrected
  eigenvalues; each block's per-example statistics under one `jit`, summed on the device.

  Args:
    loss_fn: `loss_fn(params, example) -> [K]` (a scalar counts as K = 1); not used (may
      be None) when `fisher` is a function.
    params: the model's parameters (a pytree).
    data: the fitting examples, in any form `influence` takes (a pytree with a leading
      example axis, a list of batches, a callable returning an iterator of batches).
    fisher: "empirical" (the loss's own gradients), or `fisher_fn(params, example, key) ->
      [M]` whose gradients are the Fisher's samples (the true Fisher:
      `sampled_cross_entropy(apply_fn)`).
    seed: the seed of the per-example keys given to `fisher_fn` (example i gets
      `fold_in(PRNGKey(seed), i)`, whatever the blocks).
    batch_size: examples per block (None: `gram.DEFAULT_BATCH_SIZE`).
    vectorize: "vmap" (one compiled call per block), "loop" (one compiled batch-1 call per
      example, summed) or "auto" ("loop" on CPU, "vmap" elsewhere, as
      `logra.resolve_vectorize`); the same factors up to the order of additions.

  Returns:
    The factors.

  Raises:
    ValueError / TypeError: a loss that is not callable, an unknown `fisher`, a seed or
      batch size that is not an integer, or a model with no dense or convolution layer.
  """
  fisher_loss, fisher_name = _fisher_loss(loss_fn, fisher)
  seed = _check_int(seed, "seed")
  block_size = _check_batch_size(batch_size)
  vectorize = logra.resolve_vectorize(vectorize)
  if vectorize == "threads":
    vectorize = "loop"
  data = data_lib.Data(data, "data")
  paths_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  leaves = [leaf for _, leaf in paths_leaves]
  names = [jax.tree_util.keystr(path) for path, _ in paths_leaves]
  key0 = _keys(seed, 0, 1)[0]
  traced = _capture(fisher_loss, params, data.spec.example(), key0)
  if not traced.layers:
    raise ValueError("ekfac: no dense or convolution layer found in the model (no parameter "
                     "is used only as a lax.dot_general weight or lax.conv_general_dilated "
                     "kernel); EK-FAC has nothing to precondition.")
  candidates = _bias_leaves(names, leaves, traced)
  spec = _Spec(traced, tuple(None if j is None else traced.rest.index(j) for j in candidates))
  m = traced.num_outputs
  block_size = min(block_size, data.n)

  def statistics(spec_, bases):
    total = None
    for index, block, n_valid in data.blocks(block_size, 0, data.n_blocks(block_size)):
      keys = _keys(seed, index * block_size, n_valid)
      if vectorize == "vmap":
        parts = [(block, keys)]
      else:
        parts = ((jax.tree.map(lambda v, b=b: v[b:b + 1], block), keys[b:b + 1])
                 for b in range(n_valid))
      for batch, batch_keys in parts:
        if total is None:
          total = _zeros(spec_, dtype)
        total = _accumulate(spec_, leaves, batch, batch_keys, bases, total)
    return total

  dtype = grads_lib.gradient_dtype(params)
  identities = [(jnp.eye(layer.in_features + (j is not None), dtype=dtype),
                 jnp.eye(layer.out_features, dtype=dtype))
                for layer, j in zip(traced.layers, candidates)]
  covariances, gaps, _ = statistics(spec, identities)
  covariances = list(covariances)
  # A bias is kept where its gradient is the sum over positions of the layer's output
  # gradients (a bias added to the outputs) on every fitting example; otherwise it is left
  # out and its row and column of A dropped (A's other entries do not depend on it).
  bias_leaves = []
  for i, (j, (gap, scale)) in enumerate(zip(candidates, gaps)):
    if j is not None and float(gap) > 1e-4 * max(float(scale), 1e-30):
      warnings.warn(f"ekfac: {traced.layers[i].name}'s bias is not added to its outputs; it "
                    "is left out of the scores.", RuntimeWarning, stacklevel=2)
      a_sum, s_sum = covariances[i]
      covariances[i] = (a_sum[:-1, :-1], s_sum)
      j = None
    bias_leaves.append(j)
  spec = _Spec(traced, tuple(None if j is None else traced.rest.index(j) for j in bias_leaves))
  bases, moments = [], []
  for layer, (a_sum, s_sum) in zip(traced.layers, covariances):
    a = np.asarray(a_sum) / (data.n * layer.positions)
    s = np.asarray(s_sum) / (data.n * m * layer.positions)
    _, q_a = np.linalg.eigh(a)
    _, q_s = np.linalg.eigh(s)
    moments.append((a, s))
    bases.append((q_a, q_s))
  _, _, eigen_sums = statistics(spec, [(jnp.asarray(q_a, dtype), jnp.asarray(q_s, dtype))
                                       for q_a, q_s in bases])
  layers = []
  for i, layer in enumerate(traced.layers):
    j = bias_leaves[i]
    layers.append(LayerFactors(
        layer.name, None if j is None else names[j], layer, j, moments[i][0], moments[i][1],
        bases[i][0], bases[i][1], np.asarray(eigen_sums[i]) / data.n))
  covered = {layer.leaf for layer in traced.layers} | {j for j in bias_leaves if j is not None}
  left_out = tuple(name for i, name in enumerate(names) if i not in covered)
  return Factors(tuple(layers), left_out, fisher_name, data.n)


# ----------------------------------------------------------------------------- preconditioning


def _layout(factors: Factors, params: Params) -> tuple:
  """Per supported layer (its `logra.Layer`, the kernel's and the bias's column ranges in
  raveled rows, or None): hashable, a static argument of the jitted products below."""
  sizes = [math.prod(np.shape(x)) for x in jax.tree.leaves(params)]
  offsets = [0, *np.cumsum(sizes).tolist()]
  span = lambda leaf: (int(offsets[leaf]), int(offsets[leaf + 1]))
  return tuple((lf.layer, span(lf.layer.leaf),
                None if lf.bias_leaf is None else span(lf.bias_leaf)) for lf in factors.layers)


def _matrices(layout: tuple, rows: Array) -> list[Array]:
  out = []
  for layer, (start, stop), bias in layout:
    g = jax.vmap(layer.gradient_matrix)(jnp.reshape(rows[:, start:stop], (-1, *layer.shape)))
    if bias is not None:
      g = jnp.concatenate([g, rows[:, None, bias[0]:bias[1]]], axis=1)
    out.append(g)
  return out


@functools.partial(jax.jit, static_argnames=("layout",))
def _precondition(layout, bases, scales, rows):
  out = []
  for g, (q_a, q_s), scale in zip(_matrices(layout, rows), bases, scales):
    rotated = jnp.einsum("ia,rij,jb->rab", q_a, g, q_s, precision=_HI) / scale
    back = jnp.einsum("ia,rab,jb->rij", q_a, rotated, q_s, precision=_HI)
    out.append(jnp.reshape(back, (back.shape[0], -1)))
  return jnp.concatenate(out, axis=1)


@functools.partial(jax.jit, static_argnames=("layout",))
def _plain(layout, rows):
  return jnp.concatenate([jnp.reshape(g, (g.shape[0], -1)) for g in _matrices(layout, rows)],
                         axis=1)


def layer_matrices(factors: Factors, params: Params, rows: Array) -> list[Array]:
  """Raveled gradient rows [R, P] (`grads.block_grads`' layout) as each supported layer's
  matrices [R, in (+ 1), out]: the kernel's `gradient_matrix`, the bias as the last row."""
  return _matrices(_layout(factors, params), jnp.asarray(rows))


def precondition(factors: Factors, params: Params, rows: Array,
                 damping: float | None = None) -> Array:
  """EK-FAC's inverse damped Fisher applied to gradient rows, layer by layer.

  Args:
    factors: from `ekfac_factors`.
    params: the parameters the rows are gradients of (for the layout).
    rows: [R, P] raveled gradients.
    damping: added to every corrected eigenvalue; None: 0.1 x each layer's mean.

  Returns:
    [R, D]: the preconditioned layer matrices Q_A ((Q_A^T G Q_S) / (Lambda + damping))
    Q_S^T, flattened and concatenated (D = sum over layers of (in + 1) x out); `rows_of`
    gives the plain gradients in the same layout, so that influence = preconditioned @
    plain^T.
  """
  rows = jnp.asarray(rows)
  bases = [(jnp.asarray(lf.q_a, rows.dtype), jnp.asarray(lf.q_s, rows.dtype))
           for lf in factors.layers]
  scales = [jnp.asarray(lf.eigenvalues + lf.damping(damping), rows.dtype)
            for lf in factors.layers]
  return _precondition(_layout(factors, params), bases, scales, rows)


def rows_of(factors: Factors, params: Params, rows: Array) -> Array:
  """The gradient rows [R, P] restricted to the supported layers, [R, D] in `precondition`'s
  layout."""
  return _plain(_layout(factors, params), jnp.asarray(rows))


def _check_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer, got {value!r}.")
  return int(value)


def _check_batch_size(batch_size) -> int:
  if batch_size is None:
    return gram_lib.DEFAULT_BATCH_SIZE
  if _check_int(batch_size, "batch_size") < 1:
    raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
  return int(batch_size)


def _check_damping(damping) -> float | None:
  if damping is None:
    return None
  value = float(damping) if isinstance(damping, (int, float, np.floating, np.integer)) \
      and not isinstance(damping, bool) else math.nan
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"damping must be a finite number >= 0 or None, got {damping!r}.")
  return value


def ekfac_influence(loss_fn: LossFn, checkpoints: Checkpoints, train, test, *,
                    fit=None, fisher: str | FisherFn = "empirical",
                    damping: float | None = None, seed: int = 0,
                    batch_size: int | None = None, vectorize: str = "auto",
                    factors: Sequence[Factors] | None = None) -> np.ndarray:
  """EK-FAC influence between test and train examples, per pair of losses.

  scores[a, i, b, j] = sum_t eta_t < P_t(grad loss_i(theta_t; test a)),
                                     grad loss_j(theta_t; train b) >
  over the supported layers (see the module docstring), P_t fitted at theta_t. With one
  checkpoint and eta = 1, the influence function of the final model. Positive: a
  proponent (its removal raises the test loss, to first order by scores / n_fit).

  The test side's preconditioned gradients are held ([n_test x K, D]); the train side's
  are computed block by block with `grads.block_grads` and multiplied as they come.

  Args:
    loss_fn: `loss_fn(params, example) -> [K]` (a scalar counts as K = 1).
    checkpoints: (params, learning_rate) pairs (`[(params, 1.0)]` for the final model).
    train, test: examples in any form `influence` takes.
    fit: the examples the factors are fitted on (None: `train`).
    fisher, seed: as `ekfac_factors`.
    damping: a number >= 0 added to every corrected eigenvalue, or None for 0.1 x each
      layer's mean.
    batch_size: examples per block.
    vectorize: as `influence` ("auto", "vmap", "loop", "threads") for the gradients; the
      fit takes "vmap" or "loop" ("threads" runs as "loop"; see `ekfac_factors`).
    factors: already fitted factors, one per checkpoint (then `fit`, `fisher` and `seed`
      are not used).

  Returns:
    numpy [n_test, K, n_train, K] in the gradients' dtype.

  Raises:
    ValueError / TypeError: bad checkpoints (or ones with a state), a negative or
      non-finite damping, `factors` of another length than the checkpoints, or as
      `ekfac_factors`.
  """
  loss_fn, checkpoints = arguments.check_arguments(loss_fn, checkpoints, 1)
  if any(ckpt.state is not None for ckpt in checkpoints):
    raise ValueError("checkpoints: ekfac_influence takes (params, learning_rate) pairs; bind "
                     "a model's state into loss_fn (functools.partial).")
  damping = _check_damping(damping)
  block_size = _check_batch_size(batch_size)
  vectorize = grads_lib.check_vectorize(vectorize)
  if factors is not None and len(factors) != len(checkpoints):
    raise ValueError(f"factors: {len(factors)} given for {len(checkpoints)} checkpoints.")
  train_data, test_data = data_lib.Data(train, "train"), data_lib.Data(test, "test")
  data_lib.check_same_spec(test_data.spec, train_data.spec, "test", "train")
  k = grads_lib.num_outputs(loss_fn, checkpoints[0].params, train_data.spec.example())
  out = None
  for t, ckpt in enumerate(checkpoints):
    params = ckpt.params
    fitted = factors[t] if factors is not None else ekfac_factors(
        loss_fn, params, train if fit is None else fit, fisher=fisher, seed=seed,
        batch_size=batch_size, vectorize=vectorize)

    def rows(data):
      size = min(block_size, data.n)
      for _, block, _ in data.blocks(size, 0, data.n_blocks(size)):
        yield grads_lib.block_grads(loss_fn, k, params, block, vectorize)[0]

    test_rows = jnp.concatenate([precondition(fitted, params, g, damping)
                                 for g in rows(test_data)])
    parts = [np.asarray(jnp.matmul(test_rows, rows_of(fitted, params, g).T, precision=_HI))
             for g in rows(train_data)]
    term = ckpt.learning_rate * np.concatenate(parts, axis=1)
    out = term if out is None else out + term
  return out.reshape(test_data.n, k, train_data.n, k)


__all__ = ["DEFAULT_DAMPING_FRACTION", "Factors", "FisherFn", "LayerFactors",
           "ekfac_factors", "ekfac_influence", "layer_matrices", "precondition", "rows_of",
           "sampled_cross_entropy"]
