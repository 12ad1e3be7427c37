r"""Bad inputs a new user might give, each run at the smallest size and its outcome classified.

    python tests/reliability/bad_inputs.py [--only NAME,...] [--jobs 2] [-v]

runs every case below through the command line (`python -m experiments.run`, one process
per case, on the tiny data set of `tiny_brats.py`; library cases call `tracin_jax.influence`
in this process) and prints one line per case and the count per outcome:

  one-line   exit status 1, one line on stderr, `error: ...`, naming the culprit (a flag,
             file, case, epoch or argument); or, where a warning or a skip is the right
             answer, exit status 0 and a line naming the case; or a recovery that works
  traceback  a Python traceback whose last line names the culprit
  unclear    an error that does not name the culprit, or a traceback that does not
  silent     exit status 0 where the input should have been refused or named
  poisoned   exit status 0 and earlier results overwritten, mixed with others or non-finite

and, separately, `left`: cases that left files behind in a workdir that they should not have
touched. The test module (`bad_inputs_test.py`) runs the same cases and asserts `one-line`
and nothing left.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_brats  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The tiny run: 6 cases of 16 x 16 x 6, 4 slices each (16 train, 8 validation slices), a
# 2-level UNet of width 4, 1 Adam + 2 SGD epochs; TracIn over epochs 2 and 3 (regions at
# p > 0.5: the tiny model is not confident enough for the paper's 0.8).
BASE_FLAGS = (
    "--crop_size=16", "--num_slices=4", "--num_val=2", "--model=unet", "--base_width=4",
    "--depth=2", "--background_bias=0", "--batch_size=4", "--eval_batch_size=8",
    "--adam_epochs=1", "--sgd_epochs=2", "--adam_learning_rate=1e-2", "--sgd_learning_rate=0.05",
    "--threshold=0.5", "--num_local_panels=0", "--noprogress")
OUTCOMES = ("one-line", "traceback", "unclear", "silent", "poisoned")


@dataclasses.dataclass
class Result:
  """What one command did."""

  rc: int
  stdout: str
  stderr: str
  seconds: float = 0.0


@dataclasses.dataclass
class Env:
  """One case's sandbox: its own directory, the shared tiny data and trained run."""

  tmp: pathlib.Path
  data: pathlib.Path
  run_dir: pathlib.Path
  runner: Callable[..., Result]
  workdir: pathlib.Path = None
  data_dir: pathlib.Path | None = None
  cache: pathlib.Path = None
  unprivileged: bool = False

  def __post_init__(self):
    self.workdir = self.tmp / "w"
    self.data_dir = self.data
    self.cache = self.tmp / "cache"

  def own_data(self) -> pathlib.Path:
    """A private copy of the tiny data, to damage."""
    self.data_dir = self.tmp / "data"
    shutil.copytree(self.data, self.data_dir)
    return self.data_dir

  def own_run(self) -> pathlib.Path:
    """A private copy of the trained tiny run (train and influence finished), as workdir."""
    shutil.copytree(self.run_dir, self.workdir, symlinks=True)
    return self.workdir

  def argv(self, extra=(), stages="train") -> list[str]:
    out = [f"--workdir={self.workdir}", f"--cache_dir={self.cache}", f"--stages={stages}",
           *BASE_FLAGS]
    if self.data_dir is not None:
      out.append(f"--data_dir={self.data_dir}")
    return out + list(extra)

  def cli(self, extra=(), stages="train") -> Result:
    return self.runner(self.argv(extra, stages), unprivileged=self.unprivileged)


@dataclasses.dataclass
class Case:
  """A bad input.

  Attributes:
    name: short name.
    culprit: strings the message must contain (case-insensitive), e.g. ("--image_size",).
    args: flags added to the tiny run's.
    stages: --stages.
    setup: prepares the sandbox (damages data, copies the run); may return more flags.
    expect: "error" (refused), "warn" (accepted, with a line naming the culprit) or "ok" (a
      recovery: exit 0, and `check` passes).
    check: after the command, returns a problem with the results ("poisoned: ...") or None.
    library: instead of the command line, a function of the sandbox that returns a Result.
    unprivileged: run as an ordinary user (permission cases; as root nothing is unreadable).
    keeps_workdir: the case starts from an existing run (so its files may stay).
  """

  name: str
  culprit: tuple[str, ...]
  args: tuple[str, ...] = ()
  stages: str = "train"
  setup: Callable[[Env], Any] | None = None
  expect: str = "error"
  check: Callable[[Env, Result], str | None] | None = None
  library: Callable[[Env], Result] | None = None
  unprivileged: bool = False
  group: str = "flags"


# ----------------------------------------------------------------------------- helpers


def _tree_digest(path: pathlib.Path) -> dict[str, str]:
  """Relative path -> sha256 of every file under path."""
  out = {}
  if not path.exists():
    return out
  for p in sorted(path.rglob("*")):
    if p.is_file() and not p.is_symlink():
      out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def _ckpt_file(workdir: pathlib.Path, epoch: int) -> pathlib.Path:
  """The largest data file of the model item of a checkpoint (Orbax: model/**/d/*)."""
  files = [p for p in (workdir / "checkpoints" / str(epoch) / "model").rglob("*")
           if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path, offset_fraction=0.5, count=64) -> None:
  data = bytearray(path.read_bytes())
  start = int(len(data) * offset_fraction)
  for i in range(start, min(start + count, len(data))):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _scores_finite_and_equal(env: Env, _: Result) -> str | None:
  out = env.workdir / "influence"
  ref = env.run_dir / "influence"
  for name in ("train_influence.npz", "test_influence.npz"):
    if not (out / name).exists():
      return f"lost: {name} is gone"
    with np.load(out / name) as f, np.load(ref / name) as g:
      # Recomputed scores may differ in the last bits (threaded reductions); NaN where
      # regions are absent must match exactly.
      if not np.allclose(f["scores"], g["scores"], rtol=1e-4, atol=1e-7, equal_nan=True):
        return f"poisoned: {name} differs from the uncorrupted run's"
  return None


def _set_nii(path: pathlib.Path, data: np.ndarray, affine=tiny_brats.AFFINE) -> None:
  tiny_brats.write_volume(path, data, affine)


def _t2(env: Env, index: int = 1) -> pathlib.Path:
  return tiny_brats.case_path(env.data_dir, index, "t2")


def _huge_header(env: Env) -> None:
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  path = _t2(env)
  img = nib.load(str(path))
  hdr = img.header.copy()
  hdr.set_data_shape((30000, 30000, 30000))
  raw = hdr.binaryblock + b"\0" * 4 + np.asarray(img.dataobj).tobytes()
  with gzip.open(path, "wb") as f:
    f.write(raw)


def _float64_extreme(env: Env) -> None:
  path = _t2(env)
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  data = np.asarray(nib.load(str(path)).dataobj).astype(np.float64) * 1e297
  _set_nii(path, data)


def _bare_run(env: Env) -> None:
  """The trained run as an interruption after epoch 1 would leave it."""
  w = env.own_run()
  for p in ("checkpoints/2", "checkpoints/3"):
    shutil.rmtree(w / p)
  for p in ("metrics.json", "training_curves.png"):
    (w / p).unlink()
  shutil.rmtree(w / "train")
  shutil.rmtree(w / "influence")


def _other_cohort(env: Env) -> None:
  _bare_run(env)
  env.data_dir = tiny_brats.make_tiny_brats(env.tmp / "other", seed=1)


def _chmod(path: pathlib.Path, mode: int) -> None:
  path.chmod(mode)


def _unreadable_case(env: Env) -> None:
  env.own_data()
  _open_up(env)
  _chmod(tiny_brats.case_path(env.data_dir, 1, "t1").parent, 0o000)


def _unreadable_file(env: Env) -> None:
  env.own_data()
  _open_up(env)
  _chmod(_t2(env), 0o000)


def _open_up(env: Env) -> None:
  """Lets an unprivileged user write the sandbox (the workdir and cache live in it)."""
  env.tmp.chmod(0o777)
  for p in env.tmp.rglob("*"):
    if not p.is_symlink():
      p.chmod(0o777 if p.is_dir() else 0o666)


def _corrupt_ckpt(env: Env) -> None:
  _flip(_ckpt_file(env.own_run(), 2))


def _truncate_ckpt(env: Env) -> None:
  path = _ckpt_file(env.own_run(), 2)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _empty_ckpt(env: Env) -> None:
  _ckpt_file(env.own_run(), 2).write_bytes(b"")


def _no_metadata(env: Env) -> None:
  shutil.rmtree(env.own_run() / "checkpoints" / "2" / "metadata")


def _metadata_file(workdir: pathlib.Path, epoch: int) -> pathlib.Path:
  return workdir / "checkpoints" / str(epoch) / "metadata" / "metadata"


def _no_learning_rate(env: Env) -> None:
  path = _metadata_file(env.own_run(), 2)
  meta = json.loads(path.read_text())
  meta.pop("learning_rate")
  path.write_text(json.dumps(meta))


def _corrupt_then_restore(env: Env) -> None:
  path = _ckpt_file(env.own_run(), 2)
  good = path.read_bytes()
  _flip(path)
  shutil.rmtree(env.workdir / "influence")
  env.cli(stages="train,influence")
  path.write_bytes(good)


def _fail_then_correct(env: Env) -> None:
  env.cli(["--adam_learning_rate=1e30"])


def _slice_cache(env: Env, damage: Callable[[pathlib.Path], None]) -> None:
  env.own_run()
  env.cli()  # builds the cache (the finished run is reused)
  for p in env.cache.rglob("*.npz"):
    damage(p)


def _corrupt_cache(env: Env) -> None:
  _slice_cache(env, _flip)


def _truncate_cache(env: Env) -> None:
  _slice_cache(env, lambda p: p.write_bytes(p.read_bytes()[:100]))


# Damaged files of a finished run: each is named in one line, and computed again where the
# run can (a stage's output, a saved part, a store block, the final metrics), or refused
# (what a later stage reads of an earlier one, the run record).


def _truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _change_text(path: pathlib.Path, old: str, new: str) -> None:
  """A change that leaves the file valid (JSON stays JSON) and its numbers wrong."""
  text = path.read_text()
  if old not in text:
    raise AssertionError(f"{old!r} is not in {path}")
  path.write_text(text.replace(old, new, 1))


def _influence_file(name: str) -> Callable[[Env], pathlib.Path]:
  return lambda env: env.workdir / "influence" / name


def _part(env: Env) -> pathlib.Path:
  return next((env.workdir / "influence" / "parts").glob("*/epoch2.npy"))


def _block(env: Env) -> pathlib.Path:
  return env.workdir / "influence" / "store" / "checkpoint-0" / "block-00000.npy"


def _damaged(path_fn: Callable[[Env], pathlib.Path], how: Callable[[pathlib.Path], None], *,
             unfinished: bool = False):
  """A copy of the run with the file `path_fn(env)` damaged by `how`; `unfinished`: the
  influence stage's manifest removed too, as an interrupted stage leaves it, so that the
  stage resumes from its saved parts and store."""
  def setup(env: Env):
    env.own_run()
    how(path_fn(env))
    if unfinished:
      (env.workdir / "influence" / "manifest.json").unlink()
  return setup


def _block_as_built(env: Env, res: Result) -> str | None:
  """The rebuilt store's first block is the one first built (up to the last bits), and the
  scores are the run's."""
  got = np.load(_block(env))
  want = np.load(env.run_dir / _block(env).relative_to(env.workdir))
  if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-7):
    return "poisoned: the rebuilt block differs from the one first built"
  return _scores_finite_and_equal(env, res)


def _metrics_as_before(env: Env, _: Result) -> str | None:
  got = json.loads((env.workdir / "metrics.json").read_text())
  want = json.loads((env.run_dir / "metrics.json").read_text())
  return None if got == want else "poisoned: metrics.json differs from the run's"


def _lib_query_store(env: Env) -> Result:
  from tracin_jax.influence import store as store_lib  # pylint: disable=g-import-not-at-top
  return _library(lambda: store_lib.open_store(env.workdir / "influence" / "store")
                  .self_influence())


def _file_at(path_fn: Callable[[Env], pathlib.Path], text="not a directory\n"):
  def setup(env: Env):
    path = path_fn(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return setup


def _damage(kind: str, how: Callable[[pathlib.Path], None], index: int = 1):
  def setup(env: Env):
    env.own_data()
    how(tiny_brats.case_path(env.data_dir, index, kind))
  return setup


def _rewrite(kind: str, fn: Callable[[np.ndarray], np.ndarray], affine=None, index: int = 1):
  def how(path):
    import nibabel as nib  # pylint: disable=g-import-not-at-top
    img = nib.load(str(path))
    _set_nii(path, fn(np.asarray(img.dataobj)),
             img.affine if affine is None else affine)
  return _damage(kind, how, index)


def _nan_voxel(a):
  a = a.astype(np.float32)
  a[8, 8, 3] = np.nan
  return a


def _label(a):
  a = a.copy()
  a[8, 8, 3] = 7
  return a


# ----------------------------------------------------------------------------- library cases


def _library(fn: Callable[[], Any]) -> Result:
  """Runs a library call; an exception becomes exit status 1 with its message."""
  out = io.StringIO()
  try:
    with contextlib.redirect_stderr(out):
      fn()
  except Exception as e:  # pylint: disable=broad-except
    import traceback  # pylint: disable=g-import-not-at-top
    msg = str(e).strip()
    one_line = msg and "\n" not in msg
    text = f"error: {msg}" if one_line else traceback.format_exc()
    return Result(1, "", out.getvalue() + text)
  return Result(0, "", out.getvalue())


def _linear():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import tracin_jax  # pylint: disable=g-import-not-at-top

  def loss_fn(params, example):
    return (jnp.dot(params["w"], example["x"]) - example["y"]) ** 2

  rng = np.random.default_rng(0)
  data = {"x": rng.normal(size=(10, 3)).astype(np.float32),
          "y": rng.normal(size=10).astype(np.float32)}
  ckpts = [({"w": np.ones(3, np.float32)}, 0.1), ({"w": np.full(3, 0.5, np.float32)}, 0.1)]
  return tracin_jax, loss_fn, data, ckpts


def _lib_batches_of(size: int) -> Callable[[Env], Result]:
  """A library case: `influence` given a Python list of batches of `size` examples."""

  def case(_: Env) -> Result:
    tj, loss_fn, data, ckpts = _linear()
    batches = [{k: v[i:i + size] for k, v in data.items()} for i in range(0, 10, size)]

    def call():
      got = tj.influence(loss_fn, ckpts, batches, progress=False)
      want = tj.influence(loss_fn, ckpts, data, progress=False)
      np.testing.assert_allclose(got, want, rtol=1e-5)
    return _library(call)
  return case


def _lib_generator(_: Env) -> Result:
  tj, loss_fn, data, ckpts = _linear()
  return _library(lambda: tj.influence(loss_fn, ckpts, (b for b in [data]), progress=False))


def _lib_no_checkpoints(_: Env) -> Result:
  tj, loss_fn, data, _ = _linear()
  return _library(lambda: tj.influence(loss_fn, [], data, progress=False))


def _lib_nan_rate(_: Env) -> Result:
  tj, loss_fn, data, ckpts = _linear()
  return _library(lambda: tj.influence(loss_fn, [(ckpts[0][0], float("nan"))], data,
                                       progress=False))


def _lib_ragged(_: Env) -> Result:
  tj, loss_fn, data, ckpts = _linear()
  bad = {"x": data["x"], "y": data["y"][:7]}
  return _library(lambda: tj.influence(loss_fn, ckpts, bad, progress=False))


def _lib_test_mismatch(_: Env) -> Result:
  tj, loss_fn, data, ckpts = _linear()
  test = {"x": data["x"][:, :2], "y": data["y"]}
  return _library(lambda: tj.influence(loss_fn, ckpts, data, test, progress=False))


# ----------------------------------------------------------------------------- the cases


def _cases() -> list[Case]:
  c = Case
  data, run, lib = "data", "run", "library"
  cases = [
      # Flags named in the issue.
      c("image_size_7", ("--image_size",), ("--image_size=7",)),
      c("threshold_1.5", ("--threshold",), ("--threshold=1.5",), "train,influence"),
      c("threshold_-0.5", ("--threshold",), ("--threshold=-0.5",), "train,influence"),
      c("checkpoint_epochs_9", ("--checkpoint_epochs",), ("--checkpoint_epochs=9",),
        "train,influence"),
      c("memory_budget_0", ("--memory_budget_mb",), ("--memory_budget_mb=0",)),
      c("memory_budget_-5", ("--memory_budget_mb",), ("--memory_budget_mb=-5",)),
      c("sgd_epochs_0", ("--sgd_epochs",), ("--sgd_epochs=0",)),
      c("num_val_10_of_6", ("--num_val",), ("--num_val=10",)),
      c("model_foo", ("--model",), ("--model=foo",)),
      c("num_slices_0", ("--num_slices",), ("--num_slices=0",)),
      c("groups_XYZ", ("--groups",), ("--groups=XYZ",)),
      c("workdir_is_file", ("--workdir",), setup=_file_at(lambda e: e.workdir)),
      c("workdir_read_only", ("--workdir",), setup=lambda e: (
          _open_up(e), e.workdir.mkdir(), e.workdir.chmod(0o555)), unprivileged=True),
      c("batch_size_0", ("--batch_size",), ("--batch_size=0",)),
      c("batch_size_-1", ("--batch_size",), ("--batch_size=-1",)),
      # More flags.
      c("image_size_18_depth_3", ("--image_size",), ("--image_size=18", "--depth=3")),
      c("crop_size_10_depth_2", ("--crop_size",), ("--crop_size=10",)),
      c("image_size_abc", ("--image_size",), ("--image_size=abc",)),
      c("stages_foo", ("--stages",), (), "train,foo"),
      c("num_val_all_cases", ("--num_val",), ("--num_val=6",)),
      c("data_dir_missing", ("nowhere",), ("--data_dir=/nonexistent/nowhere",)),
      c("data_dir_is_file", ("data_dir",), setup=lambda e: (
          _file_at(lambda e: e.tmp / "data_file")(e),
          setattr(e, "data_dir", e.tmp / "data_file"))),
      c("crop_larger_than_volume", ("crop_size",), ("--crop_size=32",)),
      c("num_slices_beyond_depth", ("num_slices",), ("--num_slices=100",)),
      c("val_fraction_1.5", ("--val_fraction",), ("--val_fraction=1.5",)),
      c("adam_learning_rate_negative", ("--adam_learning_rate",), ("--adam_learning_rate=-1",)),
      c("sgd_learning_rate_0", ("--sgd_learning_rate",), ("--sgd_learning_rate=0",)),
      c("checkpoint_epochs_0", ("--checkpoint_epochs",), ("--checkpoint_epochs=0",),
        "train,influence"),
      c("checkpoint_epochs_repeated", ("--checkpoint_epochs",), ("--checkpoint_epochs=2,2",),
        "train,influence"),
      c("top_k_0", ("--top_k",), ("--top_k=0",), "train,influence"),
      c("synthetic_cases_1", ("--synthetic_cases",), ("--synthetic_cases=1",),
        setup=lambda e: setattr(e, "data_dir", None)),
      c("cache_dir_is_file", ("--cache_dir",), setup=_file_at(lambda e: e.cache)),
      c("workdir_missing", ("--workdir",), setup=lambda e: setattr(e, "workdir", "")),
      c("positional_argument", ("stray",), ("stray",)),
      c("depth_0", ("--depth",), ("--depth=0",)),
      c("base_width_0", ("--base_width",), ("--base_width=0",)),
      c("global_fraction_2", ("--global_fraction",), ("--global_fraction=2",),
        "train,influence"),
      c("groups_LGG_absent", ("LGG",), ("--groups=LGG",)),
      c("influence_block_size_0", ("--influence_block_size",), ("--influence_block_size=0",),
        "train,influence"),
      c("max_checkpoints_0", ("--max_checkpoints",), ("--max_checkpoints=0",),
        "train,influence"),
      c("adam_epochs_-1", ("--adam_epochs",), ("--adam_epochs=-1",)),
      c("eval_batch_size_0", ("--eval_batch_size",), ("--eval_batch_size=0",)),
      c("slice_center_middle", ("--slice_center",), ("--slice_center=middle",)),
      c("influence_before_train", ("train",), (), "influence"),
      c("retrain_from_epoch_9", ("--retrain_from_epoch",), (
          "--retrain_from_epoch=9", "--num_removed=4", "--regions_per_class=1",
          "--num_random=1", "--randomisation_examples=4"), "train,influence,validate"),
      # Data.
      c("case_dir_unreadable", ("BraTS19_TINY_0002", "permission"), setup=_unreadable_case,
        unprivileged=True, group=data),
      c("case_dir_unreadable_skipped", ("BraTS19_TINY_0002", "permission"),
        ("--skip_bad_cases", "--num_val=1"), setup=_unreadable_case, unprivileged=True,
        expect="warn", group=data),
      c("file_unreadable", ("BraTS19_TINY_0002_t2", "permission"), setup=_unreadable_file,
        unprivileged=True, group=data),
      c("header_30000_cubed", ("BraTS19_TINY_0002_t2",), setup=lambda e: (
          e.own_data(), _huge_header(e)), group=data),
      c("header_30000_cubed_skipped", ("BraTS19_TINY_0002",), ("--skip_bad_cases",
                                                              "--num_val=1"),
        setup=lambda e: (e.own_data(), _huge_header(e)), expect="warn", group=data),
      c("modality_all_zero", ("BraTS19_TINY_0002", "t2"),
        setup=_rewrite("t2", np.zeros_like), expect="warn", group=data),
      c("seg_affine_differs", ("BraTS19_TINY_0002", "affine"),
        setup=_rewrite("seg", lambda a: a, affine=np.diag([1.0, 1.0, 2.0, 1.0])),
        expect="warn", group=data),
      c("voxels_1e300", ("BraTS19_TINY_0002",), setup=lambda e: (
          e.own_data(), _float64_extreme(e)), group=data),
      c("voxels_1e300_skipped", ("BraTS19_TINY_0002",), ("--skip_bad_cases", "--num_val=1"),
        setup=lambda e: (e.own_data(), _float64_extreme(e)), expect="warn", group=data),
      c("gzip_truncated", ("BraTS19_TINY_0002_t2",), setup=_damage(
          "t2", lambda p: p.write_bytes(p.read_bytes()[:200])), group=data),
      c("file_empty", ("BraTS19_TINY_0002_t2",), setup=_damage(
          "t2", lambda p: p.write_bytes(b"")), group=data),
      c("file_missing", ("BraTS19_TINY_0002_t2",), setup=_damage("t2", lambda p: p.unlink()),
        group=data),
      c("shape_mismatch", ("BraTS19_TINY_0002_t2",),
        setup=_rewrite("t2", lambda a: a[:, :, :5]), group=data),
      c("label_7", ("BraTS19_TINY_0002_seg",), setup=_rewrite("seg", _label), group=data),
      c("voxel_nan", ("BraTS19_TINY_0002_t2",), setup=_rewrite("t2", _nan_voxel), group=data),
      c("not_nifti", ("BraTS19_TINY_0002_t2",), setup=_damage(
          "t2", lambda p: p.write_bytes(gzip.compress(b"hello" * 100))), group=data),
      c("volume_4d", ("BraTS19_TINY_0002_t2",),
        setup=_rewrite("t2", lambda a: np.stack([a, a], -1)), group=data),
      c("slice_cache_corrupt", ("cache",), setup=_corrupt_cache, expect="warn", group=data),
      c("slice_cache_truncated", ("cache",), setup=_truncate_cache, expect="warn", group=data),
      c("group_dir_empty", ("HGG",), setup=lambda e: (
          setattr(e, "data_dir", e.tmp / "empty"), (e.tmp / "empty" / "HGG").mkdir(
              parents=True)), group=data),
      c("group_dir_is_file", ("HGG",), setup=lambda e: (
          setattr(e, "data_dir", e.tmp / "flat"),
          _file_at(lambda e: e.tmp / "flat" / "HGG")(e)), group=data),
      c("synthetic_cohort_record_garbage", ("cohort.json",), ("--synthetic_cases=6",),
        setup=lambda e: (setattr(e, "data_dir", None), _file_at(
            lambda e: e.cache / "synthetic_6cases_seed0" / "cohort.json", "{garbage")(e)),
        group=data),
      # A trained run.
      c("resume_on_other_data", ("data",), setup=_other_cohort, group=run),
      c("influence_other_split", ("split",), ("--split_seed=1",), "influence",
        setup=lambda e: e.own_run(), group=run),
      c("influence_other_image_size", ("image",), ("--crop_size=8",), "influence",
        setup=lambda e: e.own_run(), group=run),
      c("checkpoint_64_bytes_flipped", ("epoch 2",), (), "train,influence",
        setup=_corrupt_ckpt, check=_scores_finite_and_equal, group=run),
      c("checkpoint_truncated", ("epoch 2",), (), "train,influence", setup=_truncate_ckpt,
        group=run),
      c("checkpoint_emptied", ("epoch 2",), (), "train,influence", setup=_empty_ckpt,
        group=run),
      c("checkpoint_metadata_missing", ("epoch 2",), (), "train,influence",
        setup=_no_metadata, group=run),
      c("checkpoint_learning_rate_missing", ("epoch 2", "learning_rate"), (), "train,influence",
        setup=_no_learning_rate, group=run),
      c("checkpoint_restored_after_corruption", ("",), (), "train,influence",
        setup=_corrupt_then_restore, expect="ok", check=_scores_finite_and_equal, group=run),
      c("adam_checkpoints", ("--checkpoint_epochs", "adam"), ("--checkpoint_epochs=1",),
        "train,influence", setup=lambda e: e.own_run(), group=run),
      c("nan_loss", ("epoch 1", "BraTS19_TINY"), ("--adam_learning_rate=1e30",), group=run),
      c("correct_run_after_failed_run", ("",), (), setup=_fail_then_correct, expect="ok",
        group=run),
      c("train_again_other_seed", ("seed",), ("--seed=1",), setup=lambda e: e.own_run(),
        group=run),
      c("train_again_more_epochs", ("sgd_epochs",), ("--sgd_epochs=3",),
        setup=lambda e: e.own_run(), group=run),
      c("interpret_other_threshold", ("threshold",), ("--threshold=0.6",), "interpret",
        setup=lambda e: e.own_run(), group=run),
      c("run_record_garbage", ("train_config.json",), (), "train,influence",
        setup=lambda e: (e.own_run(), (e.workdir / "train_config.json").write_text("{x")),
        group=run),
      c("checkpoints_deleted", ("checkpoint",), (), "influence",
        setup=lambda e: (e.own_run(), shutil.rmtree(e.workdir / "checkpoints"),
                         shutil.rmtree(e.workdir / "influence")), group=run),
      c("checkpoints_is_file", ("checkpoints",), (),
        setup=_file_at(lambda e: e.workdir / "checkpoints"), group=run),
      # Damaged files of a finished run.
      c("influence_scores_byte_flipped", ("train_influence.npz", "influence stage"), (),
        "interpret", setup=_damaged(_influence_file("train_influence.npz"), _flip),
        group=run),
      c("influence_scores_byte_flipped_rerun", ("train_influence.npz",), (), "train,influence",
        setup=_damaged(_influence_file("train_influence.npz"), _flip), expect="warn",
        check=_scores_finite_and_equal, group=run),
      c("influence_manifest_number_changed", ("influence/manifest.json",), (), "interpret",
        setup=_damaged(_influence_file("manifest.json"), lambda p: _change_text(
            p, '"renormalised": false', '"renormalised": true ')), group=run),
      c("influence_part_truncated", ("epoch2.npy",), (), "train,influence",
        setup=_damaged(_part, _truncate, unfinished=True), expect="warn",
        check=_scores_finite_and_equal, group=run),
      c("influence_part_byte_flipped", ("epoch2.npy",), (), "train,influence",
        setup=_damaged(_part, lambda p: _flip(p, 0.9, 1), unfinished=True), expect="warn",
        check=_scores_finite_and_equal, group=run),
      c("store_block_byte_flipped", ("block-00000.npy",), (), "train,influence",
        setup=_damaged(_block, lambda p: _flip(p, 0.9, 1), unfinished=True), expect="warn",
        check=_block_as_built, group=run),
      c("store_block_queried", ("block-00000.npy", "build_store"),
        setup=_damaged(_block, lambda p: _flip(p, 0.9, 1)), library=_lib_query_store,
        group=run),
      c("store_record_rate_changed", ("store.json",), (), "train,influence",
        setup=_damaged(_influence_file("store/store.json"), lambda p: _change_text(
            p, '"learning_rate": ', '"learning_rate": 1'), unfinished=True),
        expect="warn", check=_block_as_built, group=run),
      c("metrics_truncated", ("metrics.json",), (), "train",
        setup=_damaged(lambda e: e.workdir / "metrics.json", _truncate), expect="warn",
        check=_metrics_as_before, group=run),
      c("run_record_seed_changed", ("train_config.json",), (), "train,influence",
        setup=_damaged(lambda e: e.workdir / "train_config.json", lambda p: _change_text(
            p, '"seed": 0', '"seed": 1')), group=run),
      # The library.
      c("list_of_batches", ("",), library=_lib_batches_of(4), expect="ok", group=lib),
      c("list_of_equal_batches", ("",), library=_lib_batches_of(5), expect="ok",
        group=lib),
      c("one_shot_generator", ("train", "iterator"), library=_lib_generator, group=lib),
      c("no_checkpoints", ("checkpoints",), library=_lib_no_checkpoints, group=lib),
      c("learning_rate_nan", ("learning_rate",), library=_lib_nan_rate, group=lib),
      c("leaves_ragged", ("['y']",), library=_lib_ragged, group=lib),
      c("test_structure_differs", ("test", "['x']"), library=_lib_test_mismatch, group=lib),
  ]
  return cases


CASES = _cases()


# ----------------------------------------------------------------------------- running


@functools.lru_cache(maxsize=None)
def unprivileged_problem(repo: pathlib.Path = ROOT) -> str | None:
  """Why the permission cases cannot run here, or None.

  As another user they run as that user, to whom a file without read permission is
  unreadable; as root (who reads anything) they run as `nobody`, who must be able to start
  this Python and import the project from `repo`: a checkout or virtual environment inside
  a private directory, such as a fresh `mktemp -d`, is out of its reach.
  """
  if os.geteuid() != 0:
    return None
  if not shutil.which("setpriv"):
    return "the permission cases need setpriv (util-linux) to run as nobody"
  probe = subprocess.run(
      ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
       "import experiments.run"], cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo),
                                                        HOME="/tmp"),
      capture_output=True, text=True, timeout=120, check=False)
  if probe.returncode != 0:
    last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
    return (f"user nobody cannot run {sys.executable} on {repo} (a private directory "
            f"above it?): {last}")
  return None


def subprocess_runner(repo: pathlib.Path = ROOT, cache: pathlib.Path | None = None):
  """Runs `python -m experiments.run` in `repo`; as `nobody` when asked (and root)."""

  def run(argv, *, unprivileged=False) -> Result:
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu")
    if cache is not None:
      env["TRACIN_JAX_CACHE"] = str(cache)
    cmd = [sys.executable, "-m", "experiments.run", *argv]
    if unprivileged and os.geteuid() == 0:
      env["HOME"] = "/tmp"
      cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)

  return run


def inprocess_runner(repo: pathlib.Path = ROOT):
  """Runs `experiments.run.cli` in this process (compilations are shared between cases);
  unprivileged runs (as root) go to a subprocess."""
  from experiments import run as run_lib  # pylint: disable=g-import-not-at-top

  fallback = subprocess_runner(repo)

  def run(argv, *, unprivileged=False) -> Result:
    if unprivileged and os.geteuid() == 0:
      return fallback(argv, unprivileged=True)
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        rc = run_lib.cli(["experiments.run", *argv])
      except Exception:  # pylint: disable=broad-except  # a bug: shown as a traceback
        import traceback  # pylint: disable=g-import-not-at-top
        traceback.print_exc()
        rc = 1
    return Result(rc, out.getvalue(), err.getvalue(), time.perf_counter() - t0)

  return run


def make_shared(base: pathlib.Path, runner) -> tuple[pathlib.Path, pathlib.Path]:
  """The tiny data and the trained tiny run (train and influence), made once."""
  data = tiny_brats.make_tiny_brats(base / "tiny_data")
  env = Env(base / "shared", data, base / "shared" / "w", runner)
  env.tmp.mkdir(parents=True, exist_ok=True)
  res = env.cli(stages="train,influence")
  if res.rc != 0:
    raise RuntimeError(f"the tiny run failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
  return data, env.workdir


def _mentions(text: str, culprit: tuple[str, ...]) -> bool:
  return all(c.lower() in text.lower() for c in culprit)


def classify(case: Case, env: Env, res: Result, before: dict[str, str]) -> tuple[str, bool, str]:
  """(outcome, left files behind, detail)."""
  err_lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
  last = err_lines[-1] if err_lines else ""
  traceback = "Traceback (most recent call last)" in res.stderr
  after = _tree_digest(pathlib.Path(env.workdir)) if env.workdir else {}
  left = case.expect == "error" and after != before
  problem = case.check(env, res) if case.check and res.rc == 0 else None
  if case.expect == "ok":
    if res.rc == 0:
      return ("poisoned" if problem else "one-line"), False, problem or ""
  elif case.expect == "warn":
    if res.rc == 0:
      ok = any(_mentions(ln, case.culprit) for ln in (res.stdout + res.stderr).splitlines())
      if ok and problem:
        return "poisoned", False, problem
      return ("one-line" if ok else "silent"), False, "" if ok else "no line names it"
  elif res.rc == 0:
    changed = [k for k in before if after.get(k) != before[k]]
    if problem or changed:
      return "poisoned", left, problem or f"changed {changed[:3]}"
    return "silent", left, ""
  if case.expect != "error":  # a sound input (or a recovery) refused
    return ("traceback" if traceback else "unclear"), left, "refused: " + last[:190]
  if traceback:
    return ("traceback" if _mentions(last, case.culprit) else "unclear"), left, last[:200]
  one = (res.rc == 1 and len(err_lines) == 1 and last.startswith("error: ")
         and _mentions(last, case.culprit))
  return ("one-line" if one else "unclear"), left, last[:200]


def run_case(case: Case, base: pathlib.Path, data: pathlib.Path, run_dir: pathlib.Path,
             runner) -> tuple[str, bool, str, Result]:
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{case.name}_", dir=base))
  env = Env(tmp, data, run_dir, runner, unprivileged=case.unprivileged)
  try:
    if case.setup:
      case.setup(env)
    before = _tree_digest(pathlib.Path(env.workdir)) if env.workdir else {}
    if case.library:
      res = case.library(env)
    else:
      res = env.cli(case.args, case.stages)
    outcome, left, detail = classify(case, env, res, before)
  finally:
    for p in [tmp, *tmp.rglob("*")]:  # undo chmods so the sandbox can be removed
      with contextlib.suppress(OSError):
        if not p.is_symlink():
          p.chmod(0o755 if p.is_dir() else 0o644)
  return outcome, left, detail, res


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated case names")
  parser.add_argument("--repo", default=str(ROOT), help="the checkout to test")
  parser.add_argument("--keep", action="store_true", help="keep the sandbox")
  parser.add_argument("-v", "--verbose", action="store_true", help="print each message")
  parser.add_argument("--inprocess", action="store_true",
                      help="run the command line in this process (faster; as the tests do)")
  args = parser.parse_args()
  cases = [c for c in CASES if not args.only or c.name in args.only.split(",")]
  base = pathlib.Path(tempfile.mkdtemp(prefix="bad_inputs_"))
  base.chmod(0o755)
  runner = (inprocess_runner(pathlib.Path(args.repo)) if args.inprocess else
            subprocess_runner(pathlib.Path(args.repo), base / "default_cache"))
  t0 = time.perf_counter()
  data, run_dir = make_shared(base, runner)
  print(f"tiny run ready in {time.perf_counter() - t0:.0f} s ({base})", flush=True)
  counts = {o: 0 for o in OUTCOMES}
  left_count = 0
  for case in cases:
    outcome, left, detail, res = run_case(case, base, data, run_dir, runner)
    counts[outcome] += 1
    left_count += left
    print(f"{outcome:9s} {'LEFT ' if left else ''}{case.group:7s} {case.name:38s} "
          f"rc={res.rc} {res.seconds:4.1f}s  {detail}", flush=True)
    if args.verbose and outcome != "one-line":
      print("    stdout:", res.stdout[-800:].replace("\n", "\n      "))
      print("    stderr:", res.stderr[-1500:].replace("\n", "\n      "))
  print(f"\n{len(cases)} bad inputs: " + ", ".join(f"{v} {k}" for k, v in counts.items())
        + f"; {left_count} left files behind. {time.perf_counter() - t0:.0f} s.")
  if not args.keep:
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
  main()
