"""Tests for tracin_jax.data.brats on tiny NIfTI cohorts written to tmp_path."""

import os
import pathlib

import nibabel
import numpy as np
import pytest

from tracin_jax.data import brats
from tracin_jax.data import constants

SHAPE = (48, 48, 24)
BRAIN = (slice(6, 42), slice(8, 40), slice(4, 20))  # z 4..19: brain centre of mass 11.5
TUMOUR = (slice(16, 30), slice(14, 28), slice(14, 20))  # z 14..19: tumour centre 16.5
CONFIG = brats.PreprocessConfig(num_slices=6, crop_size=32)


def make_volumes(seed=0, shape=SHAPE, brain=BRAIN, tumour=TUMOUR):
  """Four modalities (zero outside a box brain) and a seg with labels {0, 1, 2, 4}."""
  rng = np.random.default_rng(seed)
  volumes = {}
  for k, m in enumerate(constants.MODALITIES):
    v = np.zeros(shape, np.float32)
    v[brain] = rng.uniform(100.0, 200.0, size=v[brain].shape) * (k + 1)
    v[tumour] += 150.0
    volumes[m] = v
  seg = np.zeros(shape, np.uint8)
  seg[tumour] = 2  # edema
  core = tuple(slice(s.start + 2, s.stop - 2) for s in tumour[:2]) + (tumour[2],)
  seg[core] = 4  # enhancing
  inner = tuple(slice(s.start + 4, s.stop - 4) for s in tumour[:2]) + (tumour[2],)
  seg[inner] = 1  # necrosis
  volumes[constants.SEG_SUFFIX] = seg
  return volumes


def write_case(root, case_id, volumes=None, group="HGG", ext=".nii.gz"):
  """Writes <root>/<group>/<case_id>/<case_id>_<kind><ext> for each volume."""
  volumes = make_volumes() if volumes is None else volumes
  case_dir = pathlib.Path(root) / group / case_id
  case_dir.mkdir(parents=True, exist_ok=True)
  for kind, data in volumes.items():
    nibabel.Nifti1Image(data, constants.BRATS_AFFINE).to_filename(
        case_dir / f"{case_id}_{kind}{ext}")
  return case_dir


def expected_channel(volume, zs, crop=32):
  """Plain re-statement of the normalisation for one modality, [len(zs), crop, crop]."""
  brain = np.zeros(SHAPE, bool)
  brain[BRAIN] = True
  lo, hi = np.percentile(volume[brain], [0.5, 99.5])
  out = np.clip(2 * (volume - lo) / (hi - lo) - 1, -1, 1)
  out[~brain] = -1
  x0, y0 = (SHAPE[0] - crop) // 2, (SHAPE[1] - crop) // 2
  return np.stack([out[x0:x0 + crop, y0:y0 + crop, z] for z in zs])


@pytest.fixture
def cohort(tmp_path):
  root = tmp_path / "brats"
  for i, case in enumerate(["BraTS19_A_1", "BraTS19_B_1", "BraTS19_C_1"]):
    write_case(root, case, make_volumes(seed=i))
  write_case(root, "BraTS19_L_1", make_volumes(seed=9), group="LGG")
  return root


def test_list_cases_hgg_by_default(cohort):
  cases = brats.list_cases(cohort)
  assert [c.case_id for c in cases] == ["BraTS19_A_1", "BraTS19_B_1", "BraTS19_C_1"]
  assert set(cases[0].files) == set(constants.MODALITIES) | {"seg"}
  both = brats.list_cases(cohort, ("HGG", "LGG"))
  assert [c.group for c in both] == ["HGG"] * 3 + ["LGG"]


def test_load_values_labels_and_ids(cohort):
  slices, skipped = brats.load_cases(cohort, CONFIG, progress=False)
  assert skipped == []
  assert slices.images.shape == (18, 32, 32, 4) and slices.images.dtype == np.float32
  assert slices.labels.shape == (18, 32, 32) and slices.labels.dtype == np.int32
  # Labels remapped: 4 -> 3, all four classes present, no 4 left.
  assert set(np.unique(slices.labels)) == {0, 1, 2, 3}
  # Ids: each case's slices are consecutive around the brain centre (z 4..19 -> 9..14).
  assert slices.cases == ["BraTS19_A_1", "BraTS19_B_1", "BraTS19_C_1"]
  assert slices.ids[:6] == [("BraTS19_A_1", z) for z in range(9, 15)]
  np.testing.assert_array_equal(slices.slice_indices, np.tile(np.arange(9, 15), 3))
  # Values: in [-1, 1], background exactly -1, and equal to the plain computation.
  assert slices.images.min() == -1.0 and slices.images.max() == 1.0
  raw = make_volumes(seed=1)
  got = slices.select_cases(["BraTS19_B_1"])
  for k, m in enumerate(constants.MODALITIES):
    np.testing.assert_allclose(
        got.images[..., k], expected_channel(raw[m], range(9, 15)), atol=1e-5)
  background = np.ones(SHAPE, bool)
  background[BRAIN] = False
  assert np.all(got.images[background[8:40, 8:40, 9:15].transpose(2, 0, 1)] == -1.0)
  expected_labels = constants.remap_labels(raw["seg"][8:40, 8:40, 9:15]).transpose(2, 0, 1)
  np.testing.assert_array_equal(got.labels, expected_labels)


@pytest.mark.parametrize("tumour_z, expected_start", [
    (slice(14, 20), 14),  # tumour centre 16.5 -> 14..19
    (slice(20, 24), 18),  # centre 21.5 would give 19..24; clipped to the volume: 18..23
])
def test_tumour_centre(tmp_path, tumour_z, expected_start):
  tumour = TUMOUR[:2] + (tumour_z,)
  brain = BRAIN[:2] + (slice(4, 24),)
  write_case(tmp_path, "T", make_volumes(brain=brain, tumour=tumour))
  config = brats.PreprocessConfig(num_slices=6, crop_size=32, slice_center="tumour")
  slices, _ = brats.load_cases(tmp_path, config, progress=False)
  np.testing.assert_array_equal(slices.slice_indices, np.arange(expected_start,
                                                                expected_start + 6))


def test_nii_and_nii_gz_give_the_same_slices(tmp_path):
  write_case(tmp_path / "gz", "X", ext=".nii.gz")
  write_case(tmp_path / "plain", "X", ext=".nii")
  a, _ = brats.load_cases(tmp_path / "gz", CONFIG, progress=False)
  b, _ = brats.load_cases(tmp_path / "plain", CONFIG, progress=False)
  assert str(brats.list_cases(tmp_path / "plain")[0].files["t1"]).endswith("_t1.nii")
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)


def test_resize_area_images_nearest_labels(tmp_path):
  write_case(tmp_path, "X")
  full, _ = brats.load_cases(tmp_path, CONFIG, progress=False)
  small, _ = brats.load_cases(
      tmp_path, brats.PreprocessConfig(num_slices=6, crop_size=32, image_size=16),
      progress=False)
  blocks = full.images.reshape(6, 16, 2, 16, 2, 4).mean(axis=(2, 4))
  np.testing.assert_allclose(small.images, blocks, atol=1e-6)
  np.testing.assert_array_equal(small.labels, full.labels[:, 1::2, 1::2])
  # A size that does not divide (32 -> 20): each output pixel is the overlap-weighted mean
  # of its footprint [1.6 i, 1.6 (i + 1)) on each axis, here written as a plain loop.
  odd, _ = brats.load_cases(
      tmp_path, brats.PreprocessConfig(num_slices=6, crop_size=32, image_size=20),
      progress=False)
  assert odd.images.shape == (6, 20, 20, 4)
  weights = np.zeros((20, 32))
  for i in range(20):
    for p in range(32):
      weights[i, p] = max(0.0, min(1.6 * (i + 1), p + 1) - max(1.6 * i, p))
  weights /= weights.sum(axis=1, keepdims=True)
  expected = np.einsum("ip,npqc,jq->nijc", weights, full.images, weights)
  np.testing.assert_allclose(odd.images, expected, atol=1e-5)
  nearest = ((np.arange(20) + 0.5) * 1.6).astype(int)  # the pixel under each centre
  np.testing.assert_array_equal(odd.labels, full.labels[:, nearest][:, :, nearest])


def _missing_t2(case_dir):
  (case_dir / f"{case_dir.name}_t2.nii.gz").unlink()
  return "t2", f"{case_dir.name}_t2.nii.gz"


def _flair_shape(case_dir):
  write_case(case_dir.parent.parent, case_dir.name,
             {"flair": np.ones((48, 48, 20), np.float32)})
  return "shape", f"{case_dir.name}_flair.nii.gz"


def _bad_labels(case_dir):
  seg = make_volumes()["seg"]
  seg[20, 20, 10] = 3
  write_case(case_dir.parent.parent, case_dir.name, {"seg": seg})
  return "labels [0, 1, 2, 3, 4]", f"{case_dir.name}_seg.nii.gz"


def _nan_voxel(case_dir):
  t1ce = make_volumes()["t1ce"]
  t1ce[20, 20, 10] = np.nan
  t1ce[21, 20, 10] = np.inf
  write_case(case_dir.parent.parent, case_dir.name, {"t1ce": t1ce})
  return "2 NaN or infinite", f"{case_dir.name}_t1ce.nii.gz"


def _truncated_gz(case_dir):
  path = case_dir / f"{case_dir.name}_t1.nii.gz"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  return "corrupt or truncated", path.name


def _truncated_nii(case_dir):
  path = case_dir / f"{case_dir.name}_flair.nii"
  nibabel.Nifti1Image(make_volumes()["flair"], np.eye(4)).to_filename(path)
  (case_dir / f"{case_dir.name}_flair.nii.gz").unlink()
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 1000])
  return "corrupt or truncated", path.name


def _garbage(case_dir):
  path = case_dir / f"{case_dir.name}_seg.nii.gz"
  path.write_bytes(np.random.default_rng(0).bytes(4000))
  return "corrupt or truncated", path.name


BAD_CASES = {
    "missing_modality": _missing_t2,
    "shape_mismatch": _flair_shape,
    "labels_outside_brats": _bad_labels,
    "nan_inf": _nan_voxel,
    "truncated_gz": _truncated_gz,
    "truncated_nii": _truncated_nii,
    "garbage": _garbage,
}


@pytest.mark.parametrize("make_bad", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_case_error_names_case_and_file(cohort, make_bad):
  what, filename = make_bad(cohort / "HGG" / "BraTS19_B_1")
  with pytest.raises(brats.BratsDataError) as info:
    brats.load_cases(cohort, CONFIG, progress=False)
  message = str(info.value)
  assert "BraTS19_B_1" in message and filename in message and what in message


@pytest.mark.parametrize("make_bad", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_skip_bad_skips_only_the_bad_case(cohort, make_bad):
  make_bad(cohort / "HGG" / "BraTS19_B_1")
  slices, skipped = brats.load_cases(cohort, CONFIG, skip_bad=True, progress=False)
  assert slices.cases == ["BraTS19_A_1", "BraTS19_C_1"]
  assert [case for case, _ in skipped] == ["BraTS19_B_1"]
  assert "BraTS19_B_1" in skipped[0][1]


def test_skip_bad_with_no_good_case_raises(tmp_path):
  case_dir = write_case(tmp_path, "only")
  _missing_t2(case_dir)
  with pytest.raises(brats.BratsDataError, match="None of the 1 cases"):
    brats.load_cases(tmp_path, CONFIG, skip_bad=True, progress=False)


def test_crop_larger_than_volume_names_case(tmp_path):
  write_case(tmp_path, "small")
  with pytest.raises(brats.BratsDataError, match=r"case small: in-plane size 48x48 .*crop_size=64"):
    brats.load_cases(tmp_path, brats.PreprocessConfig(crop_size=64), progress=False)


def test_directory_errors(tmp_path):
  with pytest.raises(brats.BratsDataError, match="does not exist"):
    brats.list_cases(tmp_path / "nowhere")
  with pytest.raises(brats.BratsDataError, match="has no HGG/ directory"):
    brats.list_cases(tmp_path)
  (tmp_path / "HGG").mkdir()
  with pytest.raises(brats.BratsDataError, match="No BraTS cases found"):
    brats.load_cases(tmp_path, CONFIG, progress=False)


def test_config_validation():
  with pytest.raises(ValueError, match="slice_center"):
    brats.PreprocessConfig(slice_center="tumor")
  with pytest.raises(ValueError, match="groups"):
    brats.PreprocessConfig(groups=("XGG",))
  assert brats.PreprocessConfig(groups="LGG").groups == ("LGG",)


def test_split_by_patient_seeded():
  ids = [f"case{i:03d}" for i in range(259)]
  train, val = brats.split_cases(np.repeat(ids, 10))  # slices: each id ten times
  assert (len(train), len(val)) == (207, 52)
  assert not set(train) & set(val) and sorted(train + val) == ids
  assert brats.split_cases(ids[::-1]) == (train, val)  # order does not matter
  assert brats.split_cases(ids, seed=1) != (train, val)
  assert brats.split_cases(ids, num_val=3)[1] == brats.split_cases(ids, num_val=3)[1]
  assert len(brats.split_cases(ids, num_val=3)[1]) == 3
  with pytest.raises(ValueError, match="num_val"):
    brats.split_cases(ids, num_val=300)


def test_split_of_a_slice_set_keeps_patients_whole(cohort):
  slices, _ = brats.load_cases(cohort, CONFIG, progress=False)
  train, val = brats.split_cases(slices.case_ids, num_val=1, seed=3)
  a, b = slices.select_cases(train), slices.select_cases(val)
  assert len(a) + len(b) == len(slices) and len(b) == CONFIG.num_slices
  assert not set(a.cases) & set(b.cases)


def test_cache_hit_reads_no_nifti_and_changes_miss(cohort, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  first, _ = brats.load_cached(cohort, CONFIG, cache, progress=False)
  assert len(list(cache.glob("brats_*.npz"))) == 1
  assert not [p for p in cache.iterdir() if "tmp" in p.name]

  def no_read(*args, **kwargs):
    raise AssertionError("nibabel.load called on a cache hit")

  monkeypatch.setattr(nibabel, "load", no_read)
  second, skipped = brats.load_cached(cohort, CONFIG, cache, progress=False)
  assert skipped == []
  np.testing.assert_array_equal(second.images, first.images)
  np.testing.assert_array_equal(second.labels, first.labels)
  assert second.ids == first.ids

  # A changed config, or a changed file, misses (and so reads NIfTI again).
  with pytest.raises(AssertionError, match="cache hit"):
    brats.load_cached(cohort, brats.PreprocessConfig(num_slices=4, crop_size=32), cache,
                      progress=False)
  seg = cohort / "HGG" / "BraTS19_A_1" / "BraTS19_A_1_seg.nii.gz"
  stat = seg.stat()
  os.utime(seg, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  with pytest.raises(AssertionError, match="cache hit"):
    brats.load_cached(cohort, CONFIG, cache, progress=False)


def test_cache_follows_symlinked_cases(tmp_path, monkeypatch):
  write_case(tmp_path / "store", "X")
  (tmp_path / "brats" / "HGG").mkdir(parents=True)
  (tmp_path / "brats" / "HGG" / "X").symlink_to(tmp_path / "store" / "HGG" / "X")
  first, _ = brats.load_cached(tmp_path / "brats", CONFIG, tmp_path / "cache", progress=False)
  monkeypatch.setattr(nibabel, "load", None)
  second, _ = brats.load_cached(tmp_path / "brats", CONFIG, tmp_path / "cache", progress=False)
  np.testing.assert_array_equal(first.images, second.images)


def test_cache_keeps_skipped_cases(cohort, tmp_path, monkeypatch):
  _missing_t2(cohort / "HGG" / "BraTS19_C_1")
  cache = tmp_path / "cache"
  with pytest.raises(brats.BratsDataError):
    brats.load_cached(cohort, CONFIG, cache, progress=False)
  _, skipped = brats.load_cached(cohort, CONFIG, cache, skip_bad=True, progress=False)
  monkeypatch.setattr(nibabel, "load", None)
  slices, cached_skipped = brats.load_cached(cohort, CONFIG, cache, skip_bad=True,
                                             progress=False)
  assert cached_skipped == skipped and skipped[0][0] == "BraTS19_C_1"
  assert slices.cases == ["BraTS19_A_1", "BraTS19_B_1"]


@pytest.fixture(scope="module")
def synthetic_cohort(tmp_path_factory):
  synthetic = pytest.importorskip("tracin_jax.data.synthetic")
  if not hasattr(synthetic, "generate_cohort"):
    pytest.skip("tracin_jax.data.synthetic.generate_cohort is not there yet")
  root = tmp_path_factory.mktemp("synthetic")
  synthetic.generate_cohort(root, 2, 0, workers=1)  # in this process: no spawned imports
  return root


def test_synthetic_cohort_loads(synthetic_cohort):
  config = brats.PreprocessConfig(image_size=96)
  slices, skipped = brats.load_cases(synthetic_cohort, config, progress=False)
  cases = brats.list_cases(synthetic_cohort)
  assert skipped == [] and len(cases) == 2
  assert slices.cases == [c.case_id for c in cases]
  assert slices.images.shape == (20, 96, 96, 4)
  assert slices.images.min() == -1.0 and slices.images.max() <= 1.0
  assert set(np.unique(slices.labels)) <= {0, 1, 2, 3}
  assert (slices.images == -1.0).all(axis=-1).any()  # background around the brain
  for case in slices.cases:
    z = slices.select_cases([case]).slice_indices
    np.testing.assert_array_equal(np.diff(z), 1)
  # Labels: the raw seg's kept slices, centre-cropped 240 -> 192, nearest 192 -> 96, 4 -> 3.
  raw = np.asarray(nibabel.load(cases[0].files["seg"]).dataobj)
  first = slices.select_cases([cases[0].case_id])
  expected = raw[24:216, 24:216][1::2, 1::2][:, :, first.slice_indices].transpose(2, 0, 1)
  np.testing.assert_array_equal(first.labels, constants.remap_labels(expected))
  assert (expected == 4).any() == (first.labels == 3).any()
