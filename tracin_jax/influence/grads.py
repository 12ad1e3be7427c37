"""Per-example gradients of a K-output loss, with one forward pass per example.

A TracIn loss returns K numbers per example (for segmentation, one per class region). The K
gradients of one example share its forward pass: one `jax.vjp` per example, pulled back with
the K one-hot cotangents at once (`jax.vmap(vjp_fn)(jnp.eye(K))`). The examples of a block
are then either vectorised with `jax.vmap` (one compiled call per block: the fast path on
GPUs and TPUs) or looped over with one compiled batch-1 call each (the fast path on XLA:CPU
for convolutions, whose vmapped per-example filter gradients become grouped convolutions
that XLA:CPU runs slowly, though not for every model), either one call after the other
("loop") or one call per CPU core at a time ("threads"). All give the same gradients.
`vectorize="auto"` measures: the first time it meets a loss, parameter structure, example
shape and device, it compiles every path, times each on that block and keeps the fastest
for every later block (see `auto_choices`).

Why "threads": a batch-1 program is a chain of small operations, so XLA:CPU keeps about
one core busy with it (splitting each operation over the cores gains little and costs
synchronisation), and a jitted call dispatched while another runs waits for it. Calls
made from several Python threads do run at once, each on its own core; compiled without
XLA's intra-op threading (`xla_cpu_multi_thread_eigen=False`) they do not contend for the
cores either.

Gradients come out flattened, one row per (example, output) pair: `[B * K, P]`, rows
ordered example-major (row `b * K + k` is output k of example b), columns in
`jax.flatten_util.ravel_pytree` order, in at least float32.

The jitted functions here take `loss_fn` as a static argument, so one compiled function
serves every call with the same `loss_fn` object and the same shapes (every checkpoint,
every block, every call of `influence`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
import warnings
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax.types import Array, Batch, Example, LossFn, Params, State


def _bind(loss_fn: LossFn, example: Example, state: State) -> Callable[[Params], Array]:
  """params -> loss_fn(params, example[, state]): the state is passed only when given."""
  if state is None:
    return lambda p: loss_fn(p, example)
  return lambda p: loss_fn(p, example, state)


def num_outputs(loss_fn: LossFn, params: Params, example: Example,
                state: State = None) -> int:
  """The number K of losses that `loss_fn` returns for one example, without running it.

  Args:
    loss_fn: `loss_fn(params, example) -> [K]` or a scalar (K = 1).
    params: parameters (arrays or `jax.ShapeDtypeStruct`s).
    example: one example (arrays or `jax.ShapeDtypeStruct`s, no leading example axis).
    state: the model's non-parameter state, passed to `loss_fn` as a third argument when
      not None.

  Returns:
    K >= 1.

  Raises:
    ValueError: the loss is not a scalar nor a vector, or is empty, or not floating point.
  """
  out = jax.eval_shape(lambda p, ex, st: _bind(loss_fn, ex, st)(p), params, example, state)
  if not hasattr(out, "shape") or not hasattr(out, "dtype"):
    raise ValueError(
        f"loss_fn must return one array (a scalar or [K]), got {jax.tree.structure(out)}.")
  if out.ndim > 1:
    raise ValueError(
        f"loss_fn must return a scalar or a vector [K] per example, got shape {out.shape}. "
        "loss_fn takes ONE example (no leading example axis).")
  if out.ndim == 1 and out.shape[0] == 0:
    raise ValueError("loss_fn returned an empty vector [0]; it must return K >= 1 losses.")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(f"loss_fn must return floating-point losses, got dtype {out.dtype}.")
  return 1 if out.ndim == 0 else int(out.shape[0])


def parameter_count(params: Params) -> int:
  """P, the number of scalars in a parameter pytree."""
  return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))


def gradient_dtype(params: Params) -> np.dtype:
  """The dtype of raveled gradients: the parameters' promoted dtype, at least float32."""
  return np.dtype(jnp.promote_types(jnp.result_type(*jax.tree.leaves(params)), jnp.float32))


VECTORIZE = ("auto", "vmap", "loop", "threads")
PATHS = ("loop", "vmap", "threads")  # every path, in the order "auto" times them


def auto_paths() -> tuple[str, ...]:
  """The paths `vectorize="auto"` measures on the default device: all of `PATHS` on a CPU
  with several cores, "loop" and "vmap" elsewhere ("threads" runs batch-1 calls side by
  side on the host's cores; an accelerator gains nothing from it)."""
  if jax.devices()[0].platform == "cpu" and _num_workers() > 1:
    return PATHS
  return ("loop", "vmap")


def _num_workers() -> int:
  """The CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def check_vectorize(vectorize: str) -> str:
  """Returns `vectorize` if it names a path or "auto".

  Raises:
    ValueError: naming the argument and the choices.
  """
  if vectorize not in VECTORIZE:
    raise ValueError(f"vectorize must be one of {VECTORIZE}, got {vectorize!r}.")
  return vectorize


@dataclasses.dataclass(frozen=True)
class AutoChoice:
  """What `vectorize="auto"` measured for one loss, parameter structure, example shape and
  device, and chose.

  Attributes:
    path: the chosen path (one of `auto_paths()`), the fastest measured.
    seconds: {path: seconds for the measured block, compilation excluded}.
    block_size: examples in the measured block.
    device: the device the block ran on.
  """

  path: str
  seconds: dict[str, float]
  block_size: int
  device: str

  def __str__(self) -> str:
    times = ", ".join(f"{p} {1e3 * t / self.block_size:.1f}" for p, t in self.seconds.items())
    return (f"{self.path} (ms per example on a block of {self.block_size} on {self.device}: "
            f"{times})")


_AUTO: dict[tuple, AutoChoice] = {}


def _auto_key(loss_fn: LossFn, k: int, params: Params, batch: Batch, state: State) -> tuple:
  """(loss, K, structures, shapes and dtypes of the parameters, state and one example,
  device): what decides which path is fastest, except the block size."""

  def avals(tree, drop_leading=False):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x)[1 if drop_leading else 0:], np.dtype(x.dtype))
                          for x in leaves)

  device = jax.devices()[0]
  return (loss_fn, k, avals(params), avals(state), avals(batch, drop_leading=True),
          device.platform, device.device_kind)


def auto_choices() -> list[AutoChoice]:
  """What `vectorize="auto"` has measured and chosen so far in this process."""
  return list(_AUTO.values())


def auto_choice(loss_fn: LossFn, k: int, params: Params, batch: Batch,
                state: State = None) -> AutoChoice | None:
  """The measured choice for this loss, structure, example shape and device, or None."""
  return _AUTO.get(_auto_key(loss_fn, k, params, batch, state))


def _measure(loss_fn, k, params, batch, state) -> tuple[AutoChoice, tuple[Array, Array]]:
  """Compiles every path, times each on `batch`, records the fastest; returns it and the
  gradients of the block that path computed (so that "auto" gives exactly the scores of
  the path it chose)."""
  seconds, results = {}, {}
  n = jax.tree.leaves(batch)[0].shape[0]
  for path in auto_paths():
    # Compile, and run the batch-1 programs once: their first run, and the first join of
    # a block's rows, cost a one-off fraction of a second that would go to the first path.
    if path == "vmap":
      _vmap_grads.lower(loss_fn, k, params, batch, state).compile()  # cached by jit
    elif path == "loop":
      g, finite = _one_grads(loss_fn, k, params, next(_examples(batch)), state)
      jax.block_until_ready((jnp.concatenate([g] * n), jnp.stack([finite] * n)))
    else:
      compiled, p, examples, st = _compile_one(_one_grads_single_threaded, loss_fn, k, params,
                                               batch, state)
      jax.block_until_ready(compiled(p, examples[0], st))
    start = time.perf_counter()
    results[path] = jax.block_until_ready(_block_grads(loss_fn, k, params, batch, path, state))
    seconds[path] = time.perf_counter() - start
  device = jax.devices()[0]
  choice = AutoChoice(min(seconds, key=seconds.get), seconds,
                      jax.tree.leaves(batch)[0].shape[0], f"{device.platform}:{device.device_kind}")
  _AUTO[_auto_key(loss_fn, k, params, batch, state)] = choice
  return choice, results[choice.path]


def resolve_vectorize(loss_fn: LossFn, k: int, params: Params, batch: Batch,
                      vectorize: str = "auto", state: State = None) -> str:
  """The path that `block_grads` runs for this block: `vectorize` itself, or for "auto" the
  measured choice (measuring it now, on `batch`, if this is the first such block)."""
  if check_vectorize(vectorize) != "auto":
    return vectorize
  choice = auto_choice(loss_fn, k, params, batch, state) or _measure(
      loss_fn, k, params, batch, state)[0]
  return choice.path


def _ravel_rows(tree, rows: int) -> Array:
  """Leaves with a leading axis of `rows` -> [rows, P] in `ravel_pytree` leaf order, in at
  least float32."""
  leaves = jax.tree.leaves(tree)
  dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
  return jnp.concatenate([jnp.reshape(x, (rows, -1)).astype(dtype) for x in leaves], axis=1)


def example_grads(loss_fn: LossFn, k: int, params: Params, example: Example,
                  state: State = None) -> Array:
  """The K loss gradients of one example from one forward pass.

  Args:
    loss_fn: `loss_fn(params, example) -> [K]` (or a scalar when k == 1).
    k: K, the number of outputs (see `num_outputs`).
    params: the parameters theta.
    example: one example.
    state: non-parameter state passed to `loss_fn` (None: `loss_fn(params, example)`).

  Returns:
    [K, P]: row j is grad_theta loss_j(theta, example), raveled, in at least float32.
  """
  loss = _bind(loss_fn, example, state)
  out, vjp_fn = jax.vjp(lambda p: jnp.reshape(loss(p), (k,)), params)
  (grads,) = jax.vmap(vjp_fn)(jnp.eye(k, dtype=out.dtype))
  return _ravel_rows(grads, k)


@functools.partial(jax.jit, static_argnames=("loss_fn", "k"))
def _vmap_grads(loss_fn, k, params, batch, state):
  g = jax.vmap(lambda ex: example_grads(loss_fn, k, params, ex, state))(batch)  # [B, K, P]
  finite = jnp.all(jnp.isfinite(g), axis=(1, 2))
  return jnp.reshape(g, (-1, g.shape[-1])), finite


def _one_grads_impl(loss_fn, k, params, example, state):
  g = example_grads(loss_fn, k, params, example, state)  # [K, P]
  return g, jnp.all(jnp.isfinite(g))


_one_grads = jax.jit(_one_grads_impl, static_argnames=("loss_fn", "k"))
# The same program without XLA's intra-op threading, for "threads": one core per call.
_SINGLE_THREADED = {"xla_cpu_multi_thread_eigen": False}
_one_grads_single_threaded = jax.jit(_one_grads_impl, static_argnames=("loss_fn", "k"),
                                     compiler_options=_SINGLE_THREADED)


@functools.partial(jax.jit, static_argnames=("loss_fn", "k"))
def _vmap_squared_norms(loss_fn, k, params, batch, state):
  g = jax.vmap(lambda ex: example_grads(loss_fn, k, params, ex, state))(batch)  # [B, K, P]
  return jnp.sum(jnp.square(g), axis=-1)


def _one_squared_norms_impl(loss_fn, k, params, example, state):
  return jnp.sum(jnp.square(example_grads(loss_fn, k, params, example, state)), axis=-1)


_one_squared_norms = jax.jit(_one_squared_norms_impl, static_argnames=("loss_fn", "k"))
_one_squared_norms_single_threaded = jax.jit(
    _one_squared_norms_impl, static_argnames=("loss_fn", "k"), compiler_options=_SINGLE_THREADED)


def _examples(batch: Batch) -> Iterator[Example]:
  n = jax.tree.leaves(batch)[0].shape[0]
  for i in range(n):
    yield jax.tree.map(lambda x: x[i], batch)


def _compile_one(jitted, loss_fn, k, params, batch, state):
  """(`jitted` compiled for one example of `batch`, and params, examples, state on the
  device), as `_side_by_side` runs them: compiled the first time, from jit's cache after."""
  params, state = jax.device_put((params, state))
  examples = [jax.device_put(ex) for ex in _examples(batch)]
  return jitted.lower(loss_fn, k, params, examples[0], state).compile(), params, examples, state


def _side_by_side(jitted, loss_fn: LossFn, k: int, params: Params, batch: Batch,
                  state: State) -> list:
  """[jitted(loss_fn, k, params, example, state) for each example of `batch`], up to one
  call per CPU core at a time.

  The program is compiled (or taken from jit's cache) and the arrays are placed on the
  device here, in the calling thread, so that the worker threads only run it: JAX's
  configuration contexts (`jax.enable_x64`, ...) are per thread. Each call runs to
  completion in its own thread (`block_until_ready`): that is what lets XLA:CPU run the
  calls at once.
  """
  compiled, params, examples, state = _compile_one(jitted, loss_fn, k, params, batch, state)
  run = lambda ex: jax.block_until_ready(compiled(params, ex, state))
  workers = min(_num_workers(), len(examples))
  if workers <= 1:
    return [run(ex) for ex in examples]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(run, examples))


def block_grads(loss_fn: LossFn, k: int, params: Params, batch: Batch,
                vectorize: str = "vmap", state: State = None) -> tuple[Array, Array]:
  """Per-example gradients of a block of examples.

  Compiled once per (loss_fn, k, shapes): `loss_fn` is a static argument, hashed by
  identity, so keep one loss function object and reuse it. With `vectorize="auto"`, the
  first block of a loss, parameter structure, example shape and device is computed by
  every path, each compiled first and then timed; later blocks take the fastest
  (`auto_choices()` lists what was measured).

  Args:
    loss_fn: `loss_fn(params, example) -> [K]` (or a scalar when k == 1).
    k: K.
    params: the parameters theta.
    batch: B examples (leaves with a leading axis of B).
    vectorize: "vmap" (one compiled call for the block), "loop" (one compiled batch-1
      call per example; often faster for convolutions on XLA:CPU), "threads" (the same
      calls, compiled single-threaded, one per CPU core at a time), or "auto" (the
      fastest of `auto_paths()`, measured).
    state: non-parameter state passed to `loss_fn` (None: `loss_fn(params, example)`).

  Returns:
    grads: [B * K, P], row b * K + j = grad loss_j(theta, example b).
    finite: [B] bool, whether all K gradients of example b are finite.

  Raises:
    ValueError: an unknown `vectorize`.
  """
  if check_vectorize(vectorize) == "auto":
    if auto_choice(loss_fn, k, params, batch, state) is None:
      return _measure(loss_fn, k, params, batch, state)[1]
    vectorize = auto_choice(loss_fn, k, params, batch, state).path
  return _block_grads(loss_fn, k, params, batch, vectorize, state)


def _block_grads(loss_fn, k, params, batch, path: str, state):
  if path == "vmap":
    return _vmap_grads(loss_fn, k, params, batch, state)
  if path == "threads":
    gs, fs = zip(*_side_by_side(_one_grads_single_threaded, loss_fn, k, params, batch, state))
  else:
    gs, fs = zip(*(_one_grads(loss_fn, k, params, ex, state) for ex in _examples(batch)))
  return jnp.concatenate(gs, axis=0), jnp.stack(fs)


class NonFinite:
  """Collects the examples whose gradients are not finite and warns once per checkpoint.

  Usage: `add` the `finite` flags of every block `block_grads` computes for a checkpoint,
  then `warn` once that checkpoint is done. The flags stay on the device until `warn`
  reads them, so collecting them never waits for a block.
  """

  def __init__(self):
    self._flags = []  # (data name, first example index, finite [B] on device, n valid)

  def add(self, name: str, first: int, finite: Array, n_valid: int) -> None:
    """Records a block's flags.

    Args:
      name: the data the block is from ("train", "test"), for the message.
      first: the index of the block's first example in those data.
      finite: [B] bool, as `block_grads` returns it.
      n_valid: the block's real examples (the first `n_valid` flags count).
    """
    self._flags.append((name, first, finite, n_valid))

  def warn(self, checkpoint: int, stacklevel: int = 2) -> None:
    """Warns if any recorded example's gradients were not finite, and forgets the flags.

    Args:
      checkpoint: the checkpoint's index, for the message.
      stacklevel: as `warnings.warn`'s, counted from the caller of this method (2: the
        warning names the line that called the caller).

    Warns:
      RuntimeWarning: naming how many examples of each data set, and the first five.
    """
    bad = {}
    for name, first, finite, n_valid in self._flags:
      idx = np.flatnonzero(~np.asarray(finite)[:n_valid]) + first
      bad.setdefault(name, set()).update(idx.tolist())
    self._flags = []
    parts = [f"{len(v)} {name} examples (first {sorted(v)[:5]})"
             for name, v in bad.items() if v]
    if parts:
      warnings.warn(
          f"tracin: checkpoint {checkpoint} has non-finite gradients for "
          f"{' and '.join(parts)}; their scores are not finite.", RuntimeWarning,
          stacklevel=stacklevel + 1)


def block_squared_norms(loss_fn: LossFn, k: int, params: Params, batch: Batch,
                        vectorize: str = "vmap", state: State = None) -> Array:
  """|grad loss_j(theta, example b)|^2 for a block, never returning the gradients.

  Args: as `block_grads`.

  Returns:
    [B, K] squared Euclidean norms of the per-example, per-output gradients.
  """
  if check_vectorize(vectorize) == "auto":
    if auto_choice(loss_fn, k, params, batch, state) is None:  # measure on gradients
      g, _ = _measure(loss_fn, k, params, batch, state)[1]
      return jnp.sum(jnp.square(jnp.reshape(g, (-1, k, g.shape[-1]))), axis=-1)
    vectorize = auto_choice(loss_fn, k, params, batch, state).path
  if vectorize == "vmap":
    return _vmap_squared_norms(loss_fn, k, params, batch, state)
  if vectorize == "threads":
    return jnp.stack(_side_by_side(_one_squared_norms_single_threaded, loss_fn, k, params,
                                   batch, state))
  return jnp.stack([_one_squared_norms(loss_fn, k, params, ex, state)
                    for ex in _examples(batch)])


def per_example_grads(loss_fn: LossFn, params: Params, batch: Batch,
                      vectorize: str = "auto", state: State = None) -> Array:
  """Convenience: the per-example gradients of a batch as [B, K, P].

  Args:
    loss_fn: `loss_fn(params, example) -> [K]` or a scalar.
    params: the parameters.
    batch: B examples (leaves with a leading axis of B).
    vectorize: see `block_grads`.
    state: non-parameter state passed to `loss_fn` (None: `loss_fn(params, example)`).

  Returns:
    [B, K, P] gradients, raveled in `jax.flatten_util.ravel_pytree(params)` order.
  """
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      np.shape(x)[1:], jax.dtypes.canonicalize_dtype(x.dtype)), batch)
  k = num_outputs(loss_fn, params, example, state)
  g, _ = block_grads(loss_fn, k, params, batch, vectorize, state)
  return jnp.reshape(g, (-1, k, g.shape[-1]))


@functools.lru_cache(maxsize=None)
def _sharded_vmap_grads(loss_fn: LossFn, k: int, mesh: jax.sharding.Mesh):
  spec = jax.sharding.PartitionSpec
  axis = mesh.axis_names[0]

  def local(params, batch, state):  # one device's examples
    return _vmap_grads.__wrapped__(loss_fn, k, params, batch, state)

  # Explicit per-device programs (shard_map), not automatic partitioning: on XLA:CPU
  # (jax 0.10.2) a jit of vmapped convolution gradients whose examples are sharded over
  # devices returns wrong filter gradients, whereas each device's own vmap is exact.
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec(), spec(axis), spec()),
                               out_specs=(spec(axis), spec(axis)), check_vma=False))


def sharded_block_grads(loss_fn: LossFn, k: int, params: Params, batch: Batch,
                        mesh: jax.sharding.Mesh, state: State = None) -> tuple[Array, Array]:
  """`block_grads` with the block's examples split over a one-axis mesh's devices.

  Each device computes the vectorised gradients of its examples; the rows come back sharded
  over the example axis. A block whose size the devices do not divide is computed on one
  device (`block_grads`, "vmap").

  Args: as `block_grads`, with `mesh` a `jax.sharding.Mesh` with one axis.

  Returns:
    As `block_grads`.
  """
  if len(mesh.axis_names) != 1:
    raise ValueError(f"sharded_block_grads needs a mesh with one axis, got {mesh.axis_names}.")
  n = jax.tree.leaves(batch)[0].shape[0]
  if n % mesh.devices.size:
    return block_grads(loss_fn, k, params, batch, "vmap", state)
  return _sharded_vmap_grads(loss_fn, k, mesh)(params, batch, state)
