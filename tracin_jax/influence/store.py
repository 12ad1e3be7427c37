"""A training set's per-example gradients on disk: train once, index once, query many.

    store = build_store("runs/x/store", loss_fn, checkpoints, train,
                        projection=tracin_jax.Projection(4096))
    scores = store.influence(loss_fn, checkpoints, test)  # [n_test, K, n_train, K]
    store.train_influence(); store.self_influence()

`influence` recomputes every training gradient at every checkpoint for every call; a store
computes them once. For each checkpoint it keeps the K gradient rows of every training
example, exact (P numbers each) or projected (`projection.dim` numbers each; see
`projection`), optionally unit-normalised (renormalised TracIn). A query then computes only
the test examples' gradients and multiplies them with the stored rows.

Layout of a store directory:

* `store.json`: what the rows are (example ids, checkpoint names, learning rates and
  parameter fingerprints, the model's fingerprint, K, P, the row width and dtype, the
  projection's kind, size and seed, normalisation, layer selection, block size);
* `checkpoint-<t>/block-<b>.npy`: the rows of block b ([m * K, width], example-major, the
  last block ragged), one plain `.npy` file per block, read memory-mapped;
* `<file>.sha256` beside `store.json` and each block: its SHA-256 and size, written before
  it is renamed into place (`outputs.atomic_path`). A block is checked when it is first
  read in a process (hashing costs about 1 s per GB on 2 cores), and a resumed build checks
  the blocks it keeps, building a damaged one again; a query that meets a damaged block
  refuses, naming it.

Each block is written whole to a temporary name and renamed, so a block file that exists is
complete: an interrupted build continues at the first missing block, and two processes (or
hosts sharing a file system) build disjoint blocks without coordination beyond
`jax.distributed`'s process index. Plain `.npy` files need no dependency, are read in place
by numpy (`mmap_mode="r"`), and match the access pattern (whole blocks, in order); gradient
rows are incompressible floats, so chunked, compressed formats (Zarr, TensorStore) would add
machinery without saving bytes.

A store is bound to what it was built from: opening it with other weights, learning rates,
data size or settings raises `StoreMismatch` naming the differing entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracin_jax import errors
from tracin_jax import outputs
from tracin_jax import progress as progress_lib
from tracin_jax.influence import arguments
from tracin_jax.influence import core
from tracin_jax.influence import data as data_lib
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import gram as gram_lib
from tracin_jax.influence import logra
from tracin_jax.influence import projection as projection_lib
from tracin_jax.types import Checkpoints, LossFn

STORE_FILE = "store.json"
# Another process's store.json on its way into place (`outputs.atomic_path(unique=True)`),
# and its checksum, which is written first (or on its way).
_META_TMP = re.compile(r"store\.(tmp\d+-\d+\.json|json\.sha256|json\.tmp\d+-\d+\.sha256)")
FORMAT_VERSION = 1

logger = logging.getLogger("tracin_jax")


class StoreMismatch(errors.UserError, ValueError):
  """A store on disk was built from other weights, data or settings."""


def params_fingerprint(params) -> str:
  """A short hash of a parameter pytree's structure, shapes, dtypes and values."""
  digest = hashlib.sha256()
  leaves, treedef = jax.tree.flatten(params)
  digest.update(str(treedef).encode())
  for leaf in leaves:
    leaf = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()[:16]


def _describe_filter(params_filter) -> Any:
  if params_filter is None:
    return None
  if isinstance(params_filter, str):
    return [params_filter]
  if callable(params_filter):
    raise TypeError("A gradient store records its layer selection by name: give "
                    "params_filter as a path prefix or a list of prefixes, not a function.")
  return [str(p) for p in params_filter]


def _store_settings(loss_fn, checkpoints, train_data, *, projection, normalize, params_filter,
                    block_size, example_ids, checkpoint_names, fingerprint) -> dict:
  restricted, ckpts = arguments.check_arguments(loss_fn, checkpoints, 1, params_filter)
  k, _, dtype = arguments.gradient_layout(restricted, ckpts[0], train_data)
  p = grads_lib.parameter_count(ckpts[0].params)
  names = (list(checkpoint_names) if checkpoint_names is not None
           else [str(t) for t in range(len(ckpts))])
  if len(names) != len(ckpts):
    raise ValueError(f"checkpoint_names has {len(names)} names for {len(ckpts)} checkpoints.")
  ids = (list(example_ids) if example_ids is not None else list(range(train_data.n)))
  if len(ids) != train_data.n:
    raise ValueError(f"example_ids has {len(ids)} ids for {train_data.n} training examples.")
  full = arguments.check_checkpoints(checkpoints)
  width, factored = (p if projection is None else int(projection.dim)), {}
  if logra.is_logra(projection):  # its rows: the plan's width, its layers recorded
    plan = logra.plan(restricted, ckpts[0].params, train_data.spec.example(), projection,
                      ckpts[0].state)
    width, factored = plan.width, {"logra": plan.describe()}
  return {
      "format_version": FORMAT_VERSION,
      "model_fingerprint": fingerprint,
      "num_examples": train_data.n,
      "example_shapes": {path: list(shape) for path, shape in
                         zip(train_data.spec.paths, train_data.spec.shapes)},
      "num_outputs": k,
      "num_parameters": p,
      "width": width,
      "dtype": str(np.dtype(dtype)),
      "projection": None if projection is None else projection.describe(),
      "normalize": bool(normalize),
      "params_filter": _describe_filter(params_filter),
      "block_size": int(block_size),
      "example_ids": [i if isinstance(i, (int, str)) else str(i) for i in
                      (x.item() if hasattr(x, "item") else x for x in ids)],
      "checkpoints": [{"name": str(name), "learning_rate": float(c.learning_rate),
                       "params_fingerprint": params_fingerprint(c.params)}
                      for name, c in zip(names, full)],
      **factored,
  }


def _differences(found: dict, wanted: dict) -> list[str]:
  out = []
  for key in sorted(set(found) | set(wanted)):
    a, b = found.get(key), wanted.get(key)
    if a != b:
      if key == "checkpoints" and isinstance(a, list) and isinstance(b, list):
        for t, (x, y) in enumerate(zip(a, b)):
          for field in sorted(set(x) | set(y)):
            if x.get(field) != y.get(field):
              out.append(f"checkpoint {t} {field}: store has {x.get(field)!r}, "
                         f"given {y.get(field)!r}")
        if len(a) != len(b):
          out.append(f"checkpoints: store has {len(a)}, given {len(b)}")
      elif key == "example_ids":
        out.append("example_ids differ")
      else:
        out.append(f"{key}: store has {a!r}, given {b!r}")
  return out


def _block_path(root: pathlib.Path, t: int, b: int) -> pathlib.Path:
  return root / f"checkpoint-{t}" / f"block-{b:05d}.npy"


@dataclasses.dataclass(frozen=True)
class BuildReport:
  """What a `build_store` call did.

  Attributes:
    blocks_built: block files this call wrote.
    blocks_reused: block files found complete and kept.
    seconds: wall time of the call.
  """

  blocks_built: int
  blocks_reused: int
  seconds: float


class GradientStore:
  """An opened gradient store (see the module docstring); `open_store` or `build_store`."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    meta_path = self.path / STORE_FILE
    if not meta_path.is_file():
      raise FileNotFoundError(f"{meta_path}: no gradient store here (build one with "
                              "build_store).")
    self.meta = outputs.read_json(meta_path, hint="delete the store to rebuild it")
    if self.meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{meta_path}: format version {self.meta.get('format_version')!r}, "
                       f"this version of tracin_jax reads {FORMAT_VERSION}.")
    self.last_build: BuildReport | None = None

  # -- what it holds

  @property
  def num_examples(self) -> int:
    return self.meta["num_examples"]

  @property
  def num_outputs(self) -> int:
    return self.meta["num_outputs"]

  @property
  def width(self) -> int:
    return self.meta["width"]

  @property
  def block_size(self) -> int:
    return self.meta["block_size"]

  @property
  def num_blocks(self) -> int:
    return -(-self.num_examples // self.block_size)

  @property
  def learning_rates(self) -> list[float]:
    return [c["learning_rate"] for c in self.meta["checkpoints"]]

  @property
  def projection(self) -> projection_lib.Projection | None:
    spec = self.meta["projection"]
    return None if spec is None else projection_lib.Projection(
        spec["dim"], spec["kind"], spec["seed"],
        spec.get("chunk_columns", projection_lib.DEFAULT_CHUNK_COLUMNS))

  def missing_blocks(self) -> list[tuple[int, int]]:
    """(checkpoint, block) pairs whose file is not written yet."""
    return [(t, b) for t in range(len(self.learning_rates)) for b in range(self.num_blocks)
            if not _block_path(self.path, t, b).is_file()]

  def is_complete(self) -> bool:
    return not self.missing_blocks()

  def nbytes(self) -> int:
    """Bytes of the block files on disk."""
    return sum(f.stat().st_size for f in self.path.glob("checkpoint-*/block-?????.npy"))

  def block(self, t: int, b: int) -> np.ndarray:
    """Rows of block b at checkpoint t: [m * K, width], memory-mapped.

    Raises:
      outputs.DamagedFile: the block's file does not match the checksum written with it
        (checked once per process and version of the file; `build_store` rebuilds it).
    """
    path = _block_path(self.path, t, b)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: the store is incomplete (build it to the end first; "
                              f"{len(self.missing_blocks())} blocks missing).")
    return outputs.load_npy(path, mmap_mode="r", hint="run build_store again to rebuild it")

  def rows(self, t: int) -> np.ndarray:
    """All rows of checkpoint t, [n * K, width] (read into memory)."""
    return np.concatenate([self.block(t, b) for b in range(self.num_blocks)])

  def _check_complete(self):
    missing = self.missing_blocks()
    if missing:
      raise ValueError(f"{self.path}: the gradient store is incomplete ({len(missing)} of "
                       f"{len(self.learning_rates) * self.num_blocks} blocks missing, first "
                       f"checkpoint {missing[0][0]} block {missing[0][1]}); run build_store "
                       "again to finish it.")

  def check_checkpoints(self, checkpoints: Checkpoints) -> None:
    """Raises `StoreMismatch` unless `checkpoints` are the store's (weights and rates)."""
    given = arguments.check_checkpoints(checkpoints)
    stored = self.meta["checkpoints"]
    problems = []
    if len(given) != len(stored):
      problems.append(f"{len(given)} checkpoints given, the store has {len(stored)}")
    for t, (c, s) in enumerate(zip(given, stored)):
      if params_fingerprint(c.params) != s["params_fingerprint"]:
        problems.append(f"checkpoint {t} ({s['name']}): other weights")
      if float(c.learning_rate) != s["learning_rate"]:
        problems.append(f"checkpoint {t} ({s['name']}): learning rate {c.learning_rate} "
                        f"given, {s['learning_rate']} stored")
    if problems:
      raise StoreMismatch(f"{self.path} was built for other checkpoints: "
                          + "; ".join(problems) + ".")

  # -- queries

  def influence(self, loss_fn: LossFn, checkpoints: Checkpoints, test, *,
                batch_size: int | None = None, vectorize: str = "auto",
                mesh: jax.sharding.Mesh | None = None,
                progress: bool | Callable[[progress_lib.Progress], None] = False
                ) -> np.ndarray:
    """TracIn scores of new test examples against the stored training examples.

    Only the test examples' gradients are computed (with the store's layer selection,
    normalisation and projection); the training side is read from disk. Equal to
    `influence(loss_fn, checkpoints, train, test, ...)` with the same settings, up to the
    order of floating-point sums.

    Args:
      loss_fn: the loss the store was built with.
      checkpoints: the store's checkpoints (checked by fingerprint).
      test: test examples, in any form `influence` accepts.
      batch_size: test examples per gradient block.
      vectorize: see `influence`.
      mesh: a one-axis `jax.sharding.Mesh`: the stored rows are sharded over its devices
        along the example axis and each device multiplies its share (scores identical to
        one device up to float rounding).
      progress: as `influence`.

    Returns:
      [n_test, K, n_train, K].
    """
    self._check_complete()
    self.check_checkpoints(checkpoints)
    restricted, ckpts = arguments.check_arguments(loss_fn, checkpoints, 1,
                                                  self.meta["params_filter"])
    test_data = data_lib.Data(test, "test")
    k = self.num_outputs
    block = int(batch_size or gram_lib.DEFAULT_BATCH_SIZE)
    vectorize = grads_lib.check_vectorize(vectorize)
    reporter = progress_lib.Reporter(progress, len(ckpts), test_data.n * len(ckpts))
    projection, normalize = self.projection, self.meta["normalize"]
    if logra.is_logra(projection):
      found = logra.plan(restricted, ckpts[0].params, test_data.spec.example(), projection,
                         ckpts[0].state).describe()
      if found != self.meta.get("logra"):
        raise StoreMismatch(f"{self.path}: LoGra captures other layers or sizes from this "
                            "loss and these examples than the store's (its store.json "
                            "'logra' entry), so the test rows would be projected otherwise.")
    out = np.zeros((test_data.n * k, self.num_examples * k), np.dtype(self.meta["dtype"]))
    for t, ckpt in enumerate(ckpts):
      reporter.checkpoint(t, test_data.n)
      rows = []
      for _, batch, n_valid in test_data.blocks(block, 0, test_data.n_blocks(block)):
        g, _ = block_rows(restricted, k, ckpt, batch, projection=projection,
                          normalize=normalize, vectorize=vectorize, pad_to=block)
        rows.append(g)
        reporter.examples(n_valid)
      out += self._product(t, jnp.concatenate(rows), ckpt.learning_rate, mesh)
    return out.reshape(test_data.n, k, self.num_examples, k)

  def _product(self, t: int, rows, learning_rate: float, mesh) -> np.ndarray:
    """learning_rate * rows @ stored(t)^T, block by block or sharded over a mesh."""
    if mesh is not None:
      return np.asarray(sharded_gram(rows, self.rows(t), learning_rate, mesh))
    parts = [gram_lib.gram_block(rows, jnp.asarray(self.block(t, b)), float(learning_rate))
             for b in range(self.num_blocks)]
    return np.concatenate([np.asarray(p) for p in parts], axis=1)

  def train_influence(self, memory_budget_bytes: int = gram_lib.DEFAULT_MEMORY_BUDGET_BYTES
                      ) -> np.ndarray:
    """Train-influence [n, K, n, K] from the stored rows alone (no gradient is computed)."""
    self._check_complete()
    k, n = self.num_outputs, self.num_examples
    bytes_per_example = k * self.width * np.dtype(self.meta["dtype"]).itemsize
    plan = gram_lib.plan_blocks(n, n, bytes_per_example, max(memory_budget_bytes,
                                                             2 * self.block_size
                                                             * bytes_per_example),
                                self.block_size, symmetric=True)
    if plan.block_size != self.block_size:
      raise AssertionError("the plan must keep the store's blocks")
    out = np.zeros((n * k, n * k), np.dtype(self.meta["dtype"]))
    for t, learning_rate in enumerate(self.learning_rates):
      def blocks(start, stop, t=t):
        for b in range(start, stop):
          yield b, jnp.asarray(self.block(t, b))
      gram_lib.accumulate_gram(out, plan, k, blocks, blocks, learning_rate)
    return out.reshape(n, k, n, k)

  def self_influence(self) -> np.ndarray:
    """sum_t eta_t |stored row|^2 per example and output: [n, K]."""
    self._check_complete()
    k = self.num_outputs
    out = np.zeros((self.num_examples, k), np.float64)
    for t, learning_rate in enumerate(self.learning_rates):
      norms = np.concatenate([np.sum(np.square(self.block(t, b), dtype=np.float64), axis=1)
                              for b in range(self.num_blocks)])
      out += learning_rate * norms.reshape(-1, k)
    return out.astype(np.dtype(self.meta["dtype"]))


@jax.jit
def _sharded_product(rows, stored, learning_rate):
  return learning_rate * jnp.matmul(rows, stored.T, precision=jax.lax.Precision.HIGHEST)


def sharded_gram(rows, stored: np.ndarray, learning_rate: float, mesh: jax.sharding.Mesh):
  """learning_rate * rows @ stored^T with `stored` sharded over the mesh's (one) axis along
  its rows (the example axis) and `rows` replicated: each device forms its columns.

  Args:
    rows: [R, w] (test) rows.
    stored: [N, w] stored rows; N is padded with zero rows to a multiple of the devices.
    learning_rate: eta_t.
    mesh: a `jax.sharding.Mesh` with one axis.

  Returns:
    [R, N], sharded over columns (numpy conversion gathers it).
  """
  if len(mesh.axis_names) != 1:
    raise ValueError(f"sharded_gram needs a mesh with one axis, got {mesh.axis_names}.")
  axis = mesh.axis_names[0]
  n, devices = stored.shape[0], mesh.devices.size
  padded = -(-n // devices) * devices
  if padded != n:
    stored = np.concatenate([stored, np.zeros((padded - n, stored.shape[1]), stored.dtype)])
  spec = jax.sharding.PartitionSpec
  stored = jax.device_put(stored, jax.sharding.NamedSharding(mesh, spec(axis, None)))
  rows = jax.device_put(rows, jax.sharding.NamedSharding(mesh, spec()))
  return _sharded_product(rows, stored, float(learning_rate))[:, :n]


def open_store(path: str | os.PathLike) -> GradientStore:
  """Opens a gradient store (complete or not) written by `build_store`."""
  return GradientStore(path)


def build_store(
    path: str | os.PathLike,
    loss_fn: LossFn,
    checkpoints: Checkpoints,
    train,
    *,
    projection: projection_lib.Projection | None = None,
    normalize: bool = False,
    params_filter: str | Sequence[str] | None = None,
    example_ids: Sequence[Any] | None = None,
    checkpoint_names: Sequence[str] | None = None,
    fingerprint: str | None = None,
    batch_size: int | None = None,
    memory_budget_bytes: int = gram_lib.DEFAULT_MEMORY_BUDGET_BYTES,
    vectorize: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool | Callable[[progress_lib.Progress], None] = False,
) -> GradientStore:
  """Computes and writes the per-checkpoint gradient rows of a training set (or finishes an
  interrupted build).

  Args:
    path: the store's directory (created; an existing store there is resumed if it was
      built from the same checkpoints, data size and settings, and refused otherwise).
    loss_fn: `loss_fn(params, example[, state]) -> [K]`, as for `influence`.
    checkpoints: (params, learning_rate) pairs or `tracin_jax.Checkpoint`s.
    train: the training examples, in any form `influence` accepts (read in order).
    projection: a `tracin_jax.Projection`, or None to store exact gradients (P numbers per
      row: check the size first, see `plan_store`). Of kind "logra", the rows are formed
      inside the model without forming any per-example gradient (`influence.logra`; at
      most `dim` numbers per row, the store's `width`).
    normalize: store unit-normalised rows (renormalised TracIn).
    params_filter: layer selection, as path prefixes (see `influence`).
    example_ids: one id per training example, recorded (default 0..n-1).
    checkpoint_names: one name per checkpoint (e.g. its epoch), recorded.
    fingerprint: the caller's fingerprint of the model and data, recorded and compared on
      resume.
    batch_size: examples per block (and per block file); default 64, lowered so that one
      block's raw gradients (block x K x P x itemsize, before projection) fit in
      `memory_budget_bytes` (at the paper's 31 M parameters, 2 slices per GiB).
    memory_budget_bytes: bytes of raw gradients of one block (default 1 GiB); for LoGra,
      of one example's intermediates (`logra.Plan.bytes_per_example`), times the block's
      examples when they are vectorised.
    vectorize: see `influence`.
    mesh: a one-axis `jax.sharding.Mesh` of local devices: each block's examples are split
      over its devices, each computing its share with the vectorised path
      (`grads.sharded_block_grads`).
    process_index, process_count: this process's share of the blocks (block b is built by
      process b mod process_count); default `jax.process_index()` and
      `jax.process_count()`, so that under `jax.distributed` every host builds its share.
      The store is complete when every process has finished.
    progress: True writes a progress line; a callable receives `influence`'s `Progress`.

  Returns:
    The opened store; its `last_build` says how many blocks this call built and reused.

  Raises:
    StoreMismatch: a store at `path` was built from something else (named).
  """
  start = time.perf_counter()
  arguments.check_transform(normalize, projection)
  restricted, ckpts = arguments.check_arguments(loss_fn, checkpoints, 1, params_filter)
  train_data = data_lib.Data(train, "train")
  if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
    raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
  _, raw_bytes, _ = arguments.gradient_layout(restricted, ckpts[0], train_data)
  what = "gradients (K x P x itemsize"
  if logra.is_logra(projection):  # no gradient is formed: its intermediates count
    raw_bytes = logra.plan(restricted, ckpts[0].params, train_data.spec.example(), projection,
                           ckpts[0].state).bytes_per_example
    what = "intermediates (LoGra's estimate"
  fit = int(memory_budget_bytes) // raw_bytes
  if fit and logra.is_logra(projection) and logra.resolve_vectorize(vectorize, mesh) == "loop":
    fit = train_data.n  # one example at a time: a block holds only its rows
  if fit < 1:
    raise ValueError(f"memory_budget_bytes={memory_budget_bytes} cannot hold one example's "
                     f"{what} = {raw_bytes} bytes); raise it.")
  block_size = min(int(batch_size or gram_lib.DEFAULT_BATCH_SIZE), train_data.n, fit)
  settings = _store_settings(loss_fn, checkpoints, train_data, projection=projection,
                             normalize=normalize, params_filter=params_filter,
                             block_size=block_size, example_ids=example_ids,
                             checkpoint_names=checkpoint_names, fingerprint=fingerprint)
  root = pathlib.Path(path)
  meta_path = root / STORE_FILE
  # Several processes may start one build at once (each its share of the blocks). Each one
  # that finds no store.json writes its settings under its own temporary name, the last
  # rename wins, and every process then checks the settings it finds against its own.
  if not meta_path.is_file():
    others = ([p for p in root.iterdir() if not _META_TMP.fullmatch(p.name)]
              if root.exists() else [])
    # Looked at after the listing: another process's store.json came before its blocks.
    if others and not meta_path.is_file():
      raise ValueError(f"{root} exists and is not a gradient store; give an empty or new "
                       "directory.")
    root.mkdir(parents=True, exist_ok=True)
    outputs.write_json(meta_path, settings, unique=True, checksum=True)
  store = open_store(root)
  problems = _differences(store.meta, settings)
  if problems:
    raise StoreMismatch(f"{root} holds a gradient store built from something else: "
                        + "; ".join(problems) + ". Use another directory, or delete this "
                        "one to rebuild it.")
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f"process_index must be in [0, {count}), got {index}.")

  k, vectorize = settings["num_outputs"], grads_lib.check_vectorize(vectorize)
  mine = [b for b in range(store.num_blocks) if b % count == index]
  todo = [(t, b) for t in range(len(ckpts)) for b in mine
          if not _block_sound(_block_path(root, t, b))]
  reused = len(mine) * len(ckpts) - len(todo)
  examples = sum(min(block_size, train_data.n - b * block_size) for _, b in todo)
  reporter = progress_lib.Reporter(progress, len(ckpts), examples)
  nonfinite = grads_lib.NonFinite()
  for t, ckpt in enumerate(ckpts):
    blocks = [b for tt, b in todo if tt == t]
    reporter.checkpoint(t, sum(min(block_size, train_data.n - b * block_size) for b in blocks))
    (root / f"checkpoint-{t}").mkdir(exist_ok=True)
    for run_start, run_stop in _runs(blocks):
      for b, batch, n_valid in train_data.blocks(block_size, run_start, run_stop):
        rows, finite = block_rows(restricted, k, ckpt, batch, projection=projection,
                                  normalize=normalize, vectorize=vectorize, mesh=mesh,
                                  pad_to=block_size)
        nonfinite.add("train", b * block_size, finite, n_valid)
        rows = np.asarray(rows)
        with outputs.atomic_path(_block_path(root, t, b), checksum=True) as tmp:
          with open(tmp, "wb") as f:
            np.save(f, rows)
        reporter.examples(n_valid)
    nonfinite.warn(t)
  store.last_build = BuildReport(len(todo), reused, time.perf_counter() - start)
  return store


def _block_sound(path: pathlib.Path) -> bool:
  """Whether a block file is there and matches its checksum; a damaged one is named in a
  warning and removed, to be built again."""
  if not path.is_file():
    return False
  try:
    outputs.verify(path)
  except outputs.DamagedFile as e:
    logger.warning(f"gradient store: {e.path}: {e.problem}; building it again.")
    outputs.remove(path)
    return False
  return True


def block_rows(loss_fn: LossFn, k: int, checkpoint, batch, *,
               projection: projection_lib.Projection | None, normalize: bool,
               vectorize: str, mesh: jax.sharding.Mesh | None = None,
               pad_to: int | None = None):
  """A block's rows as a store keeps them, and which examples' are finite.

  The formed per-example gradients, normalised and projected (`core.transform_rows`), or
  for a "logra" projection the rows formed inside the model (`logra.block_rows`; `pad_to`
  pads a ragged block to one compiled shape there).

  Returns:
    rows [B * K, width], finite [B] bool.
  """
  if logra.is_logra(projection):
    return logra.block_rows(loss_fn, k, checkpoint.params, batch, projection,
                            checkpoint.state, normalize=normalize, vectorize=vectorize,
                            pad_to=pad_to, mesh=mesh)
  if mesh is None:
    g, finite = grads_lib.block_grads(loss_fn, k, checkpoint.params, batch, vectorize,
                                      checkpoint.state)
  else:
    g, finite = grads_lib.sharded_block_grads(loss_fn, k, checkpoint.params, batch, mesh,
                                              checkpoint.state)
  return core.transform_rows(g, normalize, projection), finite


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
  """Consecutive runs [start, stop) of sorted block indices."""
  runs = []
  for b in blocks:
    if runs and runs[-1][1] == b:
      runs[-1] = (runs[-1][0], b + 1)
    else:
      runs.append((b, b + 1))
  return runs


def example_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A one-axis mesh ("examples") over `devices` (default: this process's devices)."""
  devices = list(jax.local_devices() if devices is None else devices)
  return jax.sharding.Mesh(np.array(devices), ("examples",))


def plan_store(num_examples: int, num_outputs: int, num_parameters: int,
               num_checkpoints: int, projection: projection_lib.Projection | None = None,
               itemsize: int = 4) -> dict:
  """Bytes a store will take on disk, before building it.

  Returns:
    {"bytes_per_example", "bytes_per_checkpoint", "bytes"}.
  """
  width = num_parameters if projection is None else projection.dim
  per_example = num_outputs * width * itemsize
  return {"bytes_per_example": per_example,
          "bytes_per_checkpoint": per_example * num_examples,
          "bytes": per_example * num_examples * num_checkpoints}


__all__ = ["BuildReport", "GradientStore", "StoreMismatch", "block_rows", "build_store",
           "example_mesh", "open_store", "params_fingerprint", "plan_store", "sharded_gram"]
