"""Tests for tracin_jax.data.synthetic.cohort: one 3-case cohort is generated once per module."""

import json
import pathlib

import digests
import nibabel
import numpy as np
import pytest

from tracin_jax.data import constants
from tracin_jax.data import synthetic
from tracin_jax.data.synthetic import cohort as cohort_lib

NUM_CASES = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  """A 3-case cohort written by two worker processes."""
  root = tmp_path_factory.mktemp("synthetic") / "cohort"
  dirs = synthetic.generate_cohort(root, NUM_CASES, seed=0, workers=2, progress=False)
  return root, dirs


def load(case_dir):
  """kind -> (array, image) for the five files of a case."""
  out = {}
  for kind, path in synthetic.case_files(case_dir).items():
    img = nibabel.load(path)
    out[kind] = (np.asarray(img.dataobj), img)
  return out


@pytest.fixture(scope="module")
def volumes(cohort):
  return [load(d) for d in cohort[1]]


def brain_centre_slices(t1, num_slices=10):
  """The loader's default slab: num_slices slices around the brain's centre of mass in z."""
  profile = (t1 > 0).sum((0, 1))
  centre = (np.arange(len(profile)) * profile).sum() / profile.sum()
  start = int(round(centre - (num_slices - 1) / 2))
  return slice(start, start + num_slices)


def near_tumour(seg, margin=5):
  """[X, Y, Z] bool: the tumour's bounding box grown by margin voxels."""
  box = np.zeros(seg.shape, bool)
  where = np.nonzero(seg)
  box[tuple(slice(max(a.min() - margin, 0), a.max() + margin + 1) for a in where)] = True
  return box


def test_layout_and_record(cohort):
  root, dirs = cohort
  names = [f"BraTS19_SYN_{i:04d}" for i in range(1, NUM_CASES + 1)]
  assert dirs == [root / "HGG" / n for n in names]
  assert sorted(p.name for p in root.iterdir()) == ["HGG", "cohort.json"]
  assert sorted(p.name for p in (root / "HGG").iterdir()) == names
  for d in dirs:
    expected = sorted(f"{d.name}_{k}.nii.gz" for k in ("t1", "t1ce", "t2", "flair", "seg"))
    assert sorted(p.name for p in d.iterdir()) == expected
  record = json.loads((root / "cohort.json").read_text())
  assert record["synthetic"] is True
  assert record["generator"] == "tracin_jax.data.synthetic"
  assert record["version"] == synthetic.GENERATOR_VERSION
  assert (record["seed"], record["num_cases"]) == (0, NUM_CASES)
  assert [c["case"] for c in record["cases"]] == names
  assert all(c["synthetic"] and c["group"] == "HGG" for c in record["cases"])


def test_geometry_and_types(volumes):
  for case in volumes:
    for kind, (array, img) in case.items():
      assert array.shape == constants.VOLUME_SHAPE
      np.testing.assert_array_equal(img.affine, constants.BRATS_AFFINE)
      assert nibabel.aff2axcodes(img.affine) == ("L", "P", "S")
      np.testing.assert_array_equal(img.header.get_zooms(), (1.0, 1.0, 1.0))
      assert array.dtype == (np.uint8 if kind == "seg" else np.int16)
      assert b"SYNTHETIC" in img.header["descrip"].tobytes()
    supports = [case[m][0] > 0 for m in constants.MODALITIES]
    brain = np.logical_or.reduce(supports)
    assert 1.2e6 < brain.sum() < 2.2e6  # an adult brain, in mm^3
    for kind, support in zip(constants.MODALITIES, supports):
      assert case[kind][0].min() == 0 and case[kind][0].max() > 100
      assert support.sum() > 0.995 * brain.sum()  # one skull-stripped brain for all four
    # 0 outside the head: nothing within 10 voxels of the volume's sides.
    inner = np.zeros_like(brain)
    inner[10:-10, 10:-10, :] = True
    assert not brain[~inner].any()


def test_orientation_is_lps_storage(cohort, volumes):
  """Storage y runs anterior -> posterior: the cerebellum sits at high y in low slices."""
  record = json.loads((cohort[0] / "cohort.json").read_text())
  for meta, case in zip(record["cases"], volumes):
    brain = case["t1"][0] > 0
    y = np.arange(brain.shape[1])
    low = brain[:, :, :40].sum((0, 2))
    assert (y * low).sum() / low.sum() > (y * brain.sum((0, 2))).sum() / brain.sum() + 10
    # The recorded tumour centre is in storage voxels too.
    tumour = np.argwhere(case["seg"][0] > 0).mean(0)
    np.testing.assert_allclose(tumour, meta["tumour_centre_voxel"], atol=12)


def test_labels_and_central_slab(volumes):
  for case in volumes:
    seg = case["seg"][0]
    assert set(np.unique(seg)) <= {0, 1, 2, 4}
    assert {1, 2} <= set(np.unique(seg))
    assert not (seg > 0)[case["t1"][0] == 0].any()  # tumour only inside the brain
    slab = brain_centre_slices(case["t1"][0])
    assert seg[:, :, slab].any((0, 1)).sum() >= 8
    diameter = (6 * (seg > 0).sum() / np.pi)**(1 / 3)
    assert 25 < diameter < 80
  assert any((c["seg"][0] == 4).any() for c in volumes)


def test_contrasts_follow_the_physics(volumes):
  for case in volumes:
    seg = case["seg"][0]
    t1ce, t2, flair = (case[k][0].astype(np.float64) for k in ("t1ce", "t2", "flair"))
    normal = (case["t1"][0] > 0) & ~near_tumour(seg)
    # White matter is the brightest normal tissue on T1Gd, GM on FLAIR, CSF on T2.
    if (seg == 4).any():
      assert t1ce[seg == 4].mean() > 1.1 * np.percentile(t1ce[normal], 90)
      assert t1ce[seg == 4].mean() > 1.3 * t1ce[seg == 2].mean()
    assert t1ce[seg == 1].mean() < 0.9 * t1ce[seg == 2].mean()  # NCR dark on T1Gd
    assert flair[seg == 2].mean() > 1.1 * np.median(flair[normal])  # ED bright on FLAIR
    csf = normal & (t2 > np.percentile(t2[normal], 98))
    assert flair[csf].mean() < 0.5 * np.median(flair[normal])  # FLAIR nulls CSF


def test_same_seed_same_bytes_whatever_the_workers(cohort, tmp_path):
  case = synthetic.synthesize_case(1, seed=0)  # here, not in a worker
  synthetic.write_case(case, tmp_path)
  for kind, path in synthetic.case_files(cohort[1][1]).items():
    digests.assert_same_file(tmp_path / path.name, path, kind)


def test_other_seed_and_other_case_differ(volumes):
  other = synthetic.synthesize_case(0, seed=1)
  assert not np.array_equal(other.images["t1"], volumes[0]["t1"][0])
  assert not np.array_equal(other.seg, volumes[0]["seg"][0])
  # No two patients share a brain: the skull-stripped masks differ.
  a, b = (v["t1"][0] > 0 for v in volumes[:2])
  dice = 2 * (a & b).sum() / (a.sum() + b.sum())
  assert dice < 0.97


def test_refuses_a_foreign_directory(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not empty"):
    synthetic.generate_cohort(tmp_path, 2, progress=False)
  assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
  assert (tmp_path / "notes.txt").read_text() == "mine"
  with pytest.raises(NotADirectoryError):
    synthetic.ensure_cohort(tmp_path / "notes.txt", 2, progress=False)


def test_refuses_a_cohort_with_other_settings(cohort):
  root = cohort[0]
  before = (root / "cohort.json").read_bytes()
  with pytest.raises(FileExistsError, match="seed=0"):
    synthetic.ensure_cohort(root, NUM_CASES, seed=1, progress=False)
  with pytest.raises(FileExistsError, match="num_cases=3"):
    synthetic.generate_cohort(root, NUM_CASES + 1, seed=0, progress=False)
  assert (root / "cohort.json").read_bytes() == before


def _mtimes(root):
  return {p: p.stat().st_mtime_ns for p in pathlib.Path(root).rglob("*")}


def test_ensure_cohort_reuses_without_rewriting(cohort):
  root, dirs = cohort
  before = _mtimes(root)
  assert synthetic.ensure_cohort(root, NUM_CASES, seed=0, progress=False) == root
  assert synthetic.generate_cohort(root, NUM_CASES, seed=0, progress=False) == dirs
  assert _mtimes(root) == before


def _tiny_case(index, seed=0, *, lgg_fraction=0.0, maps=None):
  """A stand-in for synthesize_case: right names and shapes, no anatomy (fast)."""
  del maps
  images = {m: np.zeros(constants.VOLUME_SHAPE, np.int16) for m in constants.MODALITIES}
  seg = np.zeros(constants.VOLUME_SHAPE, np.uint8)
  seg[index, seed] = 1
  name = synthetic.case_name(index)
  group = "LGG" if lgg_fraction == 1.0 else "HGG"
  return synthetic.Case(name, group, images, seg, {"case": name, "group": group,
                                                    "synthetic": True})


def test_interrupted_generation_resumes(tmp_path, monkeypatch):
  root = tmp_path / "cohort"

  def fail_on_third(index, *args, **kwargs):
    if index == 2:
      raise KeyboardInterrupt
    return _tiny_case(index, *args, **kwargs)

  monkeypatch.setattr(cohort_lib, "synthesize_case", fail_on_third)
  with pytest.raises(KeyboardInterrupt):
    synthetic.generate_cohort(root, 4, seed=5, workers=1, progress=False)
  assert not (root / "cohort.json").exists()  # does not look complete
  assert (root / synthetic.PARTIAL_FILE).exists()
  done = _mtimes(root / "HGG")
  assert sorted(p.name for p in (root / "HGG").iterdir()) == [
      "BraTS19_SYN_0001", "BraTS19_SYN_0002"]
  with pytest.raises(FileExistsError, match="seed=5"):  # still ours, with other settings
    synthetic.generate_cohort(root, 4, seed=6, workers=1, progress=False)

  made = []
  def record(index, *args, **kwargs):
    made.append(index)
    return _tiny_case(index, *args, **kwargs)

  monkeypatch.setattr(cohort_lib, "synthesize_case", record)
  assert synthetic.ensure_cohort(root, 4, seed=5, workers=1, progress=False) == root
  assert made == [2, 3]  # finished cases are kept, not remade
  assert {p: t for p, t in _mtimes(root / "HGG").items() if p in done} == done
  assert not (root / synthetic.PARTIAL_FILE).exists()
  record_ = json.loads((root / "cohort.json").read_text())
  assert [c["case"] for c in record_["cases"]] == [synthetic.case_name(i) for i in range(4)]
  assert sorted(p.name for p in root.iterdir()) == ["HGG", "cohort.json"]


def test_lgg_cases_go_to_lgg(tmp_path, monkeypatch):
  monkeypatch.setattr(cohort_lib, "synthesize_case", _tiny_case)
  dirs = synthetic.generate_cohort(tmp_path, 2, lgg_fraction=1.0, workers=1, progress=False)
  assert dirs == [tmp_path / "LGG" / synthetic.case_name(i) for i in range(2)]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["LGG", "cohort.json"]
