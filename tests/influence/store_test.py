"""The gradient store: round trip, queries equal `influence`, resume, refusal, sharding."""

import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.influence import influence, self_influence
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import projection as projection_lib
from tracin_jax.influence import store as store_lib
import digests
import store_worker as worker
import tiny_models as tm

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(worker.__file__)


def _mlp():
  ckpts = [(tm.mlp_params(0, jnp.float64), 0.1), (tm.mlp_params(1, jnp.float64), 0.03)]
  return ckpts, tm.mlp_data(10, 7, np.float64), tm.mlp_data(11, 4, np.float64)


def _files(path):
  """Relative path -> SHA-256 of every .npy file under path (a short diff where they differ)."""
  return {p.relative_to(path): digests.digest(p.read_bytes()) for p in sorted(path.rglob("*.npy"))}


def test_round_trip_holds_the_per_example_gradients(x64, tmp_path):
  ckpts, train, _ = _mlp()
  store = store_lib.build_store(tmp_path / "s", tm.mlp_loss, ckpts, train, batch_size=3,
                                example_ids=[f"ex{i}" for i in range(7)],
                                checkpoint_names=["e1", "e2"], fingerprint="model-a")
  assert store.num_blocks == 3 and store.is_complete()
  reopened = store_lib.open_store(tmp_path / "s")
  assert reopened.meta["example_ids"][2] == "ex2"
  assert [c["name"] for c in reopened.meta["checkpoints"]] == ["e1", "e2"]
  for t, (params, _) in enumerate(ckpts):
    expect = np.asarray(grads_lib.per_example_grads(tm.mlp_loss, params, train, "vmap"))
    np.testing.assert_allclose(reopened.rows(t), expect.reshape(-1, expect.shape[-1]),
                               rtol=1e-12, atol=1e-14)
  assert store.nbytes() >= 2 * 7 * 3 * store.width * 8


@pytest.mark.parametrize("normalize,projection", [
    (False, None), (True, None), (False, projection_lib.Projection(16, "countsketch", 3)),
    (True, projection_lib.Projection(16, "dense", 1, chunk_columns=20))])
def test_queries_equal_influence_without_a_store(x64, tmp_path, normalize, projection):
  ckpts, train, test = _mlp()
  kwargs = dict(normalize=normalize, projection=projection)
  store = store_lib.build_store(tmp_path / "s", tm.mlp_loss, ckpts, train, batch_size=3,
                                **kwargs)
  np.testing.assert_allclose(store.influence(tm.mlp_loss, ckpts, test),
                             influence(tm.mlp_loss, ckpts, train, test, **kwargs),
                             rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(store.train_influence(),
                             influence(tm.mlp_loss, ckpts, train, **kwargs),
                             rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(store.self_influence(),
                             self_influence(tm.mlp_loss, ckpts, train, **kwargs),
                             rtol=1e-10, atol=1e-12)


def test_layer_selection_is_recorded_and_applied(x64, tmp_path):
  ckpts, train, test = _mlp()
  store = store_lib.build_store(tmp_path / "s", tm.mlp_loss, ckpts, train, params_filter="w2")
  assert store.width == 6 * 3 and store.meta["params_filter"] == ["w2"]
  np.testing.assert_allclose(store.influence(tm.mlp_loss, ckpts, test),
                             influence(tm.mlp_loss, ckpts, train, test, params_filter="w2"),
                             rtol=1e-10)


def test_a_store_built_from_something_else_is_refused_by_name(x64, tmp_path):
  ckpts, train, test = _mlp()
  store_lib.build_store(tmp_path / "s", tm.mlp_loss, ckpts, train,
                        projection=projection_lib.Projection(8, seed=1))
  with pytest.raises(store_lib.StoreMismatch, match="projection"):
    store_lib.build_store(tmp_path / "s", tm.mlp_loss, ckpts, train,
                          projection=projection_lib.Projection(8, seed=2))
  other = [(tm.mlp_params(5, jnp.float64), 0.1), ckpts[1]]
  with pytest.raises(store_lib.StoreMismatch, match="checkpoint 0 params_fingerprint"):
    store_lib.build_store(tmp_path / "s", tm.mlp_loss, other, train,
                          projection=projection_lib.Projection(8, seed=1))
  store = store_lib.open_store(tmp_path / "s")
  with pytest.raises(store_lib.StoreMismatch, match=r"checkpoint 0 \(0\): other weights"):
    store.influence(tm.mlp_loss, other, test)
  with pytest.raises(store_lib.StoreMismatch, match="learning rate"):
    store.influence(tm.mlp_loss, [ckpts[0], (ckpts[1][0], 0.5)], test)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="not a gradient store"):
    store_lib.build_store(tmp_path / "other", tm.mlp_loss, ckpts, train)
  assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
  with pytest.raises(FileNotFoundError, match="no gradient store"):
    store_lib.open_store(tmp_path / "missing")


def _build_interrupted_after_three_blocks(path, ckpts, train) -> None:
  calls = []

  def stop_after_three_blocks(info):
    calls.append(info)
    if len(calls) == 3:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    store_lib.build_store(path, tm.mlp_loss, ckpts, train, batch_size=2,
                          progress=stop_after_three_blocks)


def test_interrupted_build_resumes_at_the_first_missing_block(x64, tmp_path):
  ckpts, train, test = _mlp()
  whole = store_lib.build_store(tmp_path / "whole", tm.mlp_loss, ckpts, train, batch_size=2)
  _build_interrupted_after_three_blocks(tmp_path / "cut", ckpts, train)
  cut = store_lib.open_store(tmp_path / "cut")
  assert len(cut.missing_blocks()) == 8 - 3
  with pytest.raises(ValueError, match="incomplete"):
    cut.influence(tm.mlp_loss, ckpts, test)
  resumed = store_lib.build_store(tmp_path / "cut", tm.mlp_loss, ckpts, train, batch_size=2)
  assert resumed.last_build.blocks_reused == 3 and resumed.last_build.blocks_built == 5
  assert _files(tmp_path / "cut") == _files(tmp_path / "whole")
  assert whole.last_build.blocks_built == 8


def test_a_resumed_build_reports_each_checkpoints_own_remaining_examples(x64, tmp_path):
  ckpts, train, _ = _mlp()
  _build_interrupted_after_three_blocks(tmp_path / "cut", ckpts, train)
  seen = []
  store_lib.build_store(tmp_path / "cut", tm.mlp_loss, ckpts, train, batch_size=2,
                        progress=seen.append)
  # Checkpoint 0 kept its blocks 0-2 (6 examples): only its last block (1 example) is left.
  assert [(p.checkpoint, p.checkpoint_examples_done, p.checkpoint_examples_total)
          for p in seen] == [(1, 1, 1), (2, 2, 7), (2, 4, 7), (2, 6, 7), (2, 7, 7)]
  assert seen[-1].examples_done == seen[-1].examples_total == 8


def test_process_shares_together_make_the_whole_store(x64, tmp_path):
  ckpts, train, _ = _mlp()
  store_lib.build_store(tmp_path / "whole", tm.mlp_loss, ckpts, train, batch_size=2)
  for index in (1, 0):
    part = store_lib.build_store(tmp_path / "parts", tm.mlp_loss, ckpts, train, batch_size=2,
                                 process_index=index, process_count=2)
    assert part.is_complete() == (index == 0)
  assert _files(tmp_path / "parts") == _files(tmp_path / "whole")


def test_processes_starting_one_build_at_once_all_go_on(x64, tmp_path, monkeypatch):
  ckpts, train, _ = _mlp()
  store_lib.build_store(tmp_path / "whole", tm.mlp_loss, ckpts, train, batch_size=2)
  # A share starting while another process's store.json is still under its temporary name.
  (tmp_path / "parts").mkdir()
  (tmp_path / "parts" / "store.tmp999-1.json").write_text("{")
  # Two shares that both found no store.json write it at the same moment.
  meet, write_json = threading.Barrier(2, timeout=60), store_lib.outputs.write_json

  def write_together(*args, **kwargs):
    meet.wait()
    write_json(*args, **kwargs)

  monkeypatch.setattr(store_lib.outputs, "write_json", write_together)
  errors = []

  def share(index):
    try:
      with jax.enable_x64(True):  # thread-local, as the x64 fixture's
        store_lib.build_store(tmp_path / "parts", tm.mlp_loss, ckpts, train,
                              batch_size=2, process_index=index, process_count=2)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=share, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  (tmp_path / "parts" / "store.tmp999-1.json").unlink()
  assert _files(tmp_path / "parts") == _files(tmp_path / "whole")
  assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == sorted(
      p.name for p in (tmp_path / "whole").iterdir())


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)
  env.pop("XLA_FLAGS", None)
  env.update(extra)
  return env


def _run_worker(store_dir, out, *args, env=None, timeout=240):
  proc = subprocess.run([sys.executable, str(WORKER), str(store_dir), str(out), *args],
                        cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                        timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return np.load(out)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  path = tmp_path_factory.mktemp("one_device")
  return path, _run_worker(path / "store", path / "scores.npz")


@pytest.mark.slow  # worker processes
def test_four_devices_give_the_scores_of_one(one_device, tmp_path):
  path, expect = one_device
  got = _run_worker(tmp_path / "store", tmp_path / "scores.npz", "--mesh",
                    env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  assert int(got["devices"]) == 4 and int(expect["devices"]) == 1
  for key in ("test", "train", "self"):
    np.testing.assert_allclose(got[key], expect[key], rtol=2e-5, atol=1e-6)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # worker processes
def test_two_processes_give_the_scores_of_one(one_device, tmp_path):
  _, expect = one_device
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "store"),
                             str(tmp_path / f"scores{i}.npz"), "--distributed", port, str(i),
                             "2"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
  for i in range(2):
    got = np.load(tmp_path / f"scores{i}.npz")
    assert int(got["processes"]) == 2
    for key in ("test", "train", "self"):
      np.testing.assert_allclose(got[key], expect[key], rtol=2e-5, atol=1e-6)
  # Each process built its own half of the blocks.
  assert len(list((tmp_path / "store").rglob("block-?????.npy"))) == 2 * 3


@pytest.mark.slow  # worker processes
def test_killed_build_resumes_to_the_same_store(one_device, tmp_path):
  path, expect = one_device
  proc = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "store"),
                           str(tmp_path / "unused.npz"), "--slow"], cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 200
  while time.time() < deadline and len(list((tmp_path / "store").rglob("block-?????.npy"))) < 2:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  built = len(list((tmp_path / "store").rglob("block-?????.npy")))
  assert 2 <= built < 6, built
  got = _run_worker(tmp_path / "store", tmp_path / "scores.npz")
  assert _files(tmp_path / "store") == _files(path / "store")
  np.testing.assert_array_equal(got["test"], expect["test"])


def test_the_memory_budget_bounds_a_block_of_raw_gradients(x64, tmp_path):
  ckpts, train, _ = _mlp()
  per_example = 3 * store_lib.grads_lib.parameter_count(ckpts[0][0]) * 8
  store = store_lib.build_store(tmp_path / "s", tm.mlp_loss, ckpts, train,
                                projection=projection_lib.Projection(4),
                                memory_budget_bytes=2 * per_example + 1)
  assert store.block_size == 2 and store.num_blocks == 4
  with pytest.raises(ValueError, match="cannot hold one example"):
    store_lib.build_store(tmp_path / "t", tm.mlp_loss, ckpts, train,
                          memory_budget_bytes=per_example - 1)


def _flip_byte(path, offset=-5):
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x01
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_block_is_refused_by_queries_and_built_again_by_a_build(
    x64, tmp_path, caplog, damage):
  ckpts, train, test = _mlp()
  build = lambda: store_lib.build_store(tmp_path / "s", tm.mlp_loss, ckpts, train,
                                        batch_size=3)
  store = build()
  want = store.influence(tm.mlp_loss, ckpts, test), store.train_influence()
  files = _files(tmp_path / "s")
  block = tmp_path / "s" / "checkpoint-1" / "block-00001.npy"
  if damage == "flip":
    before = np.load(block)
    _flip_byte(block)  # one bit of a gradient: numpy reads it without a word
    assert not np.array_equal(np.load(block), before)
  else:
    block.write_bytes(block.read_bytes()[:-8])
  reopened = store_lib.open_store(tmp_path / "s")
  for query in (lambda: reopened.influence(tm.mlp_loss, ckpts, test), reopened.train_influence,
                reopened.self_influence, lambda: reopened.rows(1)):
    with pytest.raises(store_lib.outputs.DamagedFile,
                       match=rf"^{block}: .*; run build_store again to rebuild it\.$"):
      query()
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    rebuilt = build()
  assert (rebuilt.last_build.blocks_built, rebuilt.last_build.blocks_reused) == (1, 5)
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and warned[0].startswith(f"gradient store: {block}: ")
  assert _files(tmp_path / "s") == files  # the block as it was written
  np.testing.assert_array_equal(rebuilt.influence(tm.mlp_loss, ckpts, test), want[0])
  np.testing.assert_array_equal(rebuilt.train_influence(), want[1])


def test_a_damaged_store_json_is_named_and_an_old_store_is_accepted(x64, tmp_path, caplog):
  ckpts, train, _ = _mlp()
  store = store_lib.build_store(tmp_path / "s", tm.mlp_loss, ckpts, train, batch_size=3)
  want = store.self_influence()
  meta = tmp_path / "s" / store_lib.STORE_FILE
  good = meta.read_text()
  meta.write_text(good.replace('"learning_rate": 0.1', '"learning_rate": 0.2'))
  with pytest.raises(store_lib.outputs.DamagedFile, match=rf"^{meta}: its bytes differ .*; "
                     r"delete the store to rebuild it\.$"):
    store_lib.open_store(tmp_path / "s")
  meta.write_text(good)
  for sidecar in (tmp_path / "s").rglob("*.sha256"):  # as a store built before checksums
    sidecar.unlink()
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    np.testing.assert_array_equal(store_lib.open_store(tmp_path / "s").self_influence(), want)
  assert "written before checksums" in caplog.text
  assert len(list((tmp_path / "s").rglob("*.sha256"))) == 1 + 2 * 3  # recorded now
