"""What checking a gradient store's blocks against their checksums costs its readers.

    PYTHONPATH=. python benchmarks/store_checksums.py                 # 1 GB store, ~2 minutes
    PYTHONPATH=. python benchmarks/store_checksums.py --examples=256  # a quicker look

Builds an exact store (no projection) of a linear model's gradients, `--examples` rows of
`--params` float32 numbers per checkpoint, then times each reader with the blocks checked
(each block hashed when first read, as a fresh process does), with them already checked in
this process (a second query), and with no check at all (the blocks read by `np.load`, the
baseline), alternating the three, median of `--repeats`. The blocks lie in the page cache
throughout (the store was just written), so what is measured is the hashing itself; a
store larger than memory is read from disk either way, once per query. Also the build with
and without the checksums written. Prints the ratios to the baseline and the load average
(`os.getloadavg()`) before and after: the numbers are comparable only within one run.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

from tracin_jax import outputs
from tracin_jax.influence import store as store_lib

flags.DEFINE_integer("examples", 1024, "Training examples (rows per checkpoint).")
flags.DEFINE_integer("params", 131072, "Parameters P (the row width of an exact store).")
flags.DEFINE_integer("checkpoints", 2, "Checkpoints.")
flags.DEFINE_integer("block_size", 64, "Examples per block file.")
flags.DEFINE_integer("test", 8, "Test examples of the `influence` query.")
flags.DEFINE_integer("repeats", 5, "Repeats of each measurement (median).")
flags.DEFINE_string("dir", None, "Where to build the store (default: a temporary directory).")
flags.DEFINE_string("out", None, "JSON file for the numbers (optional).")

FLAGS = flags.FLAGS


def _loss(params, example):
  return ((jnp.dot(params["w"], example["x"]) - example["y"]) ** 2)[None]  # K = 1


def _data(n: int, p: int, seed: int):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(n, p)).astype(np.float32),
          "y": rng.normal(size=n).astype(np.float32)}


def _load(text: str) -> str:
  return text + " load average %.2f %.2f %.2f" % os.getloadavg()


def _unchecked_load_npy(path, *, mmap_mode=None, hint=""):
  del hint
  return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)


def _time(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _readers(path: pathlib.Path, ckpts, test):
  store = store_lib.open_store(path)
  return {
      "rows (read every block)": lambda: [store.rows(t) for t in range(len(ckpts))],
      "self_influence": store.self_influence,
      f"influence ({FLAGS.test} test examples)": lambda: store.influence(_loss, ckpts, test),
  }


def _measure(path: pathlib.Path, ckpts, test) -> dict[str, dict[str, float]]:
  checked_load = outputs.load_npy
  results = {}
  for name, reader in _readers(path, ckpts, test).items():
    reader()  # compiles (the query's gradients), warms the page cache
    times = {"unchecked": [], "checked, first read": [], "checked, already": []}
    for _ in range(FLAGS.repeats):
      outputs.load_npy = _unchecked_load_npy
      times["unchecked"].append(_time(reader))
      outputs.load_npy = checked_load
      outputs.forget_verified()
      times["checked, first read"].append(_time(reader))
      times["checked, already"].append(_time(reader))
    results[name] = {k: statistics.median(v) for k, v in times.items()}
  outputs.load_npy = checked_load
  return results


def _build(path: pathlib.Path, ckpts, train, *, checksums: bool) -> float:
  shutil.rmtree(path, ignore_errors=True)
  real = outputs.file_checksum
  if not checksums:  # the sidecar is still written, with nothing hashed
    outputs.file_checksum = lambda p: {"sha256": "", "size": os.stat(p).st_size}
  try:
    return _time(functools.partial(store_lib.build_store, path, _loss, ckpts, train,
                                   batch_size=FLAGS.block_size,
                                   memory_budget_bytes=1 << 40))
  finally:
    outputs.file_checksum = real


def main(argv):
  del argv
  n, p = FLAGS.examples, FLAGS.params
  rng = np.random.default_rng(0)
  ckpts = [({"w": rng.normal(size=p).astype(np.float32)}, 0.01)
           for _ in range(FLAGS.checkpoints)]
  train, test = _data(n, p, 1), _data(FLAGS.test, p, 2)
  root = pathlib.Path(FLAGS.dir or tempfile.mkdtemp(prefix="store_checksums_"))
  path = root / "store"
  print(_load(f"{n} examples x {p} parameters x {FLAGS.checkpoints} checkpoints, "
              f"{n * p * 4 * FLAGS.checkpoints / 1e9:.2f} GB of blocks;"), flush=True)
  builds = {"unchecked": [], "checked": []}
  for _ in range(max(1, FLAGS.repeats // 2)):
    builds["unchecked"].append(_build(path, ckpts, train, checksums=False))
    builds["checked"].append(_build(path, ckpts, train, checksums=True))
  build = {k: statistics.median(v) for k, v in builds.items()}
  print(f"build: {build['unchecked']:.2f} s without hashing, {build['checked']:.2f} s with "
        f"({build['checked'] / build['unchecked']:.2f}x)", flush=True)
  results = _measure(path, ckpts, test)
  for name, t in results.items():
    base = t["unchecked"]
    print(f"{name}: {base:.3f} s unchecked; checked {t['checked, first read']:.3f} s on the "
          f"first read ({t['checked, first read'] / base:.2f}x), "
          f"{t['checked, already']:.3f} s once checked ({t['checked, already'] / base:.2f}x)")
  print(_load("after:"))
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(json.dumps({
        "examples": n, "params": p, "checkpoints": FLAGS.checkpoints,
        "bytes": store_lib.open_store(path).nbytes(), "build_seconds": build,
        "read_seconds": results, "load": list(os.getloadavg())}, indent=1))
  if not FLAGS.dir:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
