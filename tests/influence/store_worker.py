"""Builds and queries a tiny gradient store in a fresh process (for device counts, several
processes and kills that the test process itself cannot have).

    python store_worker.py STORE OUT [--mesh] [--distributed PORT INDEX COUNT] [--slow]
                                     [--logra]

Writes OUT (npz: the query's test-train scores, train-influence, self-influence) unless
`--slow`, which sleeps after every block so that a test can kill the build midway.
`--logra` builds LoGra rows (`Projection(32, "logra", seed=7)`) instead of CountSketch.
"""

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

import tiny_models as tm  # pylint: disable=g-import-not-at-top
from tracin_jax.influence import projection as projection_lib
from tracin_jax.influence import store as store_lib

N_TRAIN, N_TEST, BLOCK = 12, 3, 4


def checkpoints():
  return [(tm.conv_params(0), 0.1), (tm.conv_params(1), 0.05)]


def data():
  return tm.conv_data(20, N_TRAIN), tm.conv_data(21, N_TEST)


def projection(kind="countsketch"):
  return projection_lib.Projection(32, kind, seed=7)


def main(argv):
  store_dir, out = argv[1], argv[2]
  mesh = store_lib.example_mesh() if "--mesh" in argv else None
  if "--distributed" in argv:
    i = argv.index("--distributed")
    port, index, count = argv[i + 1], int(argv[i + 2]), int(argv[i + 3])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=count,
                               process_id=index)
  progress = (lambda _: time.sleep(0.5)) if "--slow" in argv else False
  train, test = data()
  store_lib.build_store(store_dir, tm.conv_loss, checkpoints(), train,
                        projection=projection("logra" if "--logra" in argv else
                                              "countsketch"),
                        batch_size=BLOCK, mesh=mesh,
                        vectorize="vmap", progress=progress)
  if "--distributed" in argv:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("gradient store built")
  store = store_lib.open_store(store_dir)
  np.savez(out, test=store.influence(tm.conv_loss, checkpoints(), test, mesh=mesh,
                                     vectorize="vmap"),
           train=store.train_influence(), self=store.self_influence(),
           devices=len(jax.local_devices()), processes=jax.process_count())


if __name__ == "__main__":
  main(sys.argv)
