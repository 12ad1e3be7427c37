"""Property-based tests (Hypothesis) of the loader and of `influence`'s argument checks, and a
fuzz of NIfTI headers and gzip streams, at a small, seeded, bounded budget.

The property in every case: the input is either accepted with sound outputs, or refused with
the project's error (`BratsDataError` for data; ValueError or TypeError for `influence`)
whose message is one line naming the file or the argument; never another exception.
"""

import gzip
import pathlib
import shutil

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

import tiny_brats
import tracin_jax
from tracin_jax.data import brats

# Seeded (derandomized) and bounded: the same examples in CI every time, in seconds.
BOUNDED = hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                              suppress_health_check=list(hypothesis.HealthCheck),
                              database=None)
CONFIG = brats.PreprocessConfig(num_slices=2, crop_size=16, image_size=None)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
  """One tiny case, written once; each example damages a copy of it."""
  return tiny_brats.make_tiny_brats(tmp_path_factory.mktemp("template"), num_cases=1)


def _fresh(template, tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("case")
  shutil.copytree(template, root, dirs_exist_ok=True)
  return root


def _load(root: pathlib.Path):
  case = brats.list_cases(root)[0]
  notes = []
  slices = brats.load_case(case, CONFIG, notes=notes)
  assert slices.images.shape == (2, 16, 16, 4) and slices.images.dtype == np.float32
  assert np.isfinite(slices.images).all()
  assert slices.images.min() >= -1.0 and slices.images.max() <= 1.0
  assert set(np.unique(slices.labels)) <= {0, 1, 2, 3}
  return slices, notes


def _refused_or_sound(root: pathlib.Path, name: str) -> None:
  try:
    _load(root)
  except brats.BratsDataError as e:
    message = str(e)
    assert "\n" not in message and name in message, message


# ----------------------------------------------------------------------------- the loader


@BOUNDED
@hypothesis.given(
    dtype=st.sampled_from(["int16", "uint8", "float32", "float64", "int32"]),
    scale=st.sampled_from([0.0, 1e-30, 1.0, 1e4, 1e30, 1e300]),
    offset=st.floats(-1e3, 1e3, allow_nan=False),
    special=st.sampled_from([None, "nan", "inf", "zero"]))
def test_any_voxel_values_load_soundly_or_are_refused(template, tmp_path_factory, dtype, scale,
                                                       offset, special):
  root = _fresh(template, tmp_path_factory)
  path = tiny_brats.case_path(root, 0, "flair")
  data = tiny_brats.make_case(0, 0)["flair"].astype(np.float64) * scale + offset
  if special == "nan":
    data[8, 8, 3] = np.nan
  elif special == "inf":
    data[8, 8, 3] = np.inf
  elif special == "zero":
    data[:] = 0
  if np.dtype(dtype).kind in "iu":
    info = np.iinfo(dtype)
    data = np.clip(np.nan_to_num(data), info.min, info.max)
  with np.errstate(over="ignore", invalid="ignore"):
    stored = data.astype(dtype)
  tiny_brats.write_volume(path, stored)
  # Refused exactly when a stored value is not finite or overflows float32.
  bad = stored.dtype.kind == "f" and (
      not np.isfinite(stored).all() or np.abs(stored).max() > np.finfo(np.float32).max)
  try:
    _, notes = _load(root)
  except brats.BratsDataError as e:
    assert "\n" not in str(e) and "BraTS19_TINY_0001_flair" in str(e)
    assert bad, str(e)
    return
  assert not bad
  if not np.any(stored):
    assert any("zero everywhere" in n for n in notes)


@BOUNDED
@hypothesis.given(labels=st.lists(st.integers(-2, 9), min_size=1, max_size=4))
def test_labels_outside_brats_are_refused_naming_the_seg_file(template, tmp_path_factory,
                                                              labels):
  root = _fresh(template, tmp_path_factory)
  path = tiny_brats.case_path(root, 0, "seg")
  seg = tiny_brats.make_case(0, 0)["seg"].astype(np.int16)
  seg.reshape(-1)[:len(labels)] = labels
  tiny_brats.write_volume(path, seg)
  if set(labels) <= {0, 1, 2, 4}:
    _load(root)
  else:
    with pytest.raises(brats.BratsDataError, match="BraTS19_TINY_0001_seg"):
      _load(root)


# ----------------------------------------------------------------------------- the fuzz


@BOUNDED
@hypothesis.given(edits=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)),
                                 min_size=1, max_size=8))
def test_fuzzed_nifti_headers_load_soundly_or_are_refused(template, tmp_path_factory, edits):
  root = _fresh(template, tmp_path_factory)
  path = tiny_brats.case_path(root, 0, "t2")
  raw = bytearray(gzip.decompress(path.read_bytes()))
  for offset, value in edits:  # the 348-byte header and the 4-byte extension flag
    raw[offset] = value
  path.write_bytes(gzip.compress(bytes(raw)))
  _refused_or_sound(root, "BraTS19_TINY_0001_t2")


@BOUNDED
@hypothesis.given(cut=st.floats(0.0, 1.0), flips=st.lists(st.floats(0.0, 1.0), max_size=4),
                  garbage=st.binary(max_size=64))
def test_fuzzed_gzip_streams_load_soundly_or_are_refused(template, tmp_path_factory, cut,
                                                         flips, garbage):
  root = _fresh(template, tmp_path_factory)
  path = tiny_brats.case_path(root, 0, "t1ce")
  raw = bytearray(path.read_bytes())
  for where in flips:
    raw[int(where * (len(raw) - 1))] ^= 0x5A
  raw = raw[:max(1, int(cut * len(raw)))] + garbage
  path.write_bytes(bytes(raw))
  _refused_or_sound(root, "BraTS19_TINY_0001_t1ce")


# ----------------------------------------------------------------------------- influence


def _loss(params, example):
  return (params["w"] @ example["x"] - example["y"]) ** 2


def _data(n, d=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(n, d)).astype(np.float32),
          "y": rng.normal(size=n).astype(np.float32)}


def _checkpoints(rates):
  return [({"w": np.full(3, 0.5 + t, np.float32)}, r) for t, r in enumerate(rates)]


@BOUNDED
@hypothesis.given(rates=st.lists(st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-3, 3),
    st.booleans(), st.text(max_size=3), st.none()), min_size=0, max_size=3))
def test_influence_checks_learning_rates(rates):
  try:
    scores = tracin_jax.influence(_loss, _checkpoints(rates), _data(4), progress=False)
  except (ValueError, TypeError) as e:
    assert "\n" not in str(e)
    assert "checkpoint" in str(e)
    assert not rates or any(isinstance(r, (bool, str, type(None))) or not np.isfinite(r)
                            for r in rates)
    return
  assert rates and all(np.isfinite(float(r)) for r in rates)
  assert scores.shape == (4, 1, 4, 1)


@BOUNDED
@hypothesis.given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
                  as_list=st.booleans(), ragged=st.booleans())
def test_influence_reads_batches_in_any_form_the_same(sizes, as_list, ragged):
  data = _data(sum(sizes))
  batches, start = [], 0
  for s in sizes:
    batches.append({k: v[start:start + s] for k, v in data.items()})
    start += s
  if ragged:
    batches[-1] = {"x": batches[-1]["x"], "y": batches[-1]["y"][:-1]}
  given = batches if as_list else (lambda: iter(batches))
  ckpts = _checkpoints([0.1, 0.2])
  if ragged:
    with pytest.raises(ValueError, match=r"train batch \d+: leaves disagree") as e:
      tracin_jax.influence(_loss, ckpts, given, progress=False)
    assert "\n" not in str(e.value)
    return
  np.testing.assert_allclose(tracin_jax.influence(_loss, ckpts, given, progress=False),
                             tracin_jax.influence(_loss, ckpts, data, progress=False),
                             rtol=1e-5, atol=1e-6)
