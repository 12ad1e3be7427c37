"""Maps on preprocessed slices put back on the scan: the round trip, the affine, the guards."""

import nibabel
import numpy as np
import pytest
from brats_test import make_volumes
from brats_test import write_case
from scipy import ndimage

from tracin_jax.data import brats
from tracin_jax.data import constants
from tracin_jax.data import patient_space
from tracin_jax.data.slices import PreprocessRecord
from tracin_jax.data.slices import SliceSet

AFFINE = np.array([[-1.2, 0.0, 0.0, 30.0], [0.0, -0.9, 0.0, 250.0], [0.0, 0.0, 2.5, -8.0],
                   [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture
def case(tmp_path):
  """A case on an oblique-ish grid (its own affine), 48 x 48 x 24, with a seg."""
  volumes = make_volumes(seed=3)
  case_dir = write_case(tmp_path / "in", "BraTS19_X_1", volumes)
  for path in case_dir.iterdir():  # give every file the case's own affine
    image = nibabel.load(path)
    nibabel.Nifti1Image(np.asarray(image.dataobj), AFFINE).to_filename(path)
  return brats.case_files(case_dir), volumes


def _remapped(seg):
  return constants.remap_labels(seg)


def test_labels_go_back_exactly_without_a_resize(case):
  files, volumes = case
  config = brats.PreprocessConfig(num_slices=6, crop_size=32)
  slices = brats.load_case(files, config, slices="all")
  back = patient_space.to_volume(slices.labels, slices, kind="labels")
  truth = _remapped(volumes["seg"])
  x0, y0 = 8, 8  # the centre crop of 48 to 32
  np.testing.assert_array_equal(back[x0:x0 + 32, y0:y0 + 32], truth[x0:x0 + 32, y0:y0 + 32])
  assert not back[:x0].any() and not back[x0 + 32:].any()


def test_a_mask_resized_and_back_is_within_one_voxel(case):
  files, volumes = case
  config = brats.PreprocessConfig(num_slices=6, crop_size=32, image_size=16)  # halves
  slices = brats.load_case(files, config, slices="all")
  assert slices.images.shape[1:3] == (16, 16)
  back = patient_space.to_volume(slices.labels, slices, kind="labels")
  tumour = _remapped(volumes["seg"]) > 0
  plane = np.ones((3, 3, 1), bool)  # one voxel in-plane
  assert np.all(ndimage.binary_dilation(tumour, plane)[back > 0])
  assert np.all((back > 0)[ndimage.binary_erosion(tumour, plane)])
  assert 0.8 < (back > 0).sum() / tumour.sum() < 1.25


def test_a_map_constant_on_a_region_stays_that_constant():
  """The transpose of the area average keeps a map constant where its footprint is."""
  weights = patient_space._resample_weights(5, 13)  # pylint: disable=protected-access
  np.testing.assert_allclose(weights.sum(axis=1), 1.0)
  np.testing.assert_allclose(weights @ np.full(5, 0.7), 0.7)


def test_the_map_resampling_equals_the_plain_sum_over_both_axes():
  rng = np.random.default_rng(0)
  wx = patient_space._resample_weights(12, 32)  # pylint: disable=protected-access
  wy = patient_space._resample_weights(10, 27)  # pylint: disable=protected-access
  record = PreprocessRecord.of_case(1, volume_shape=(40, 30, 5), crop_box=(4, 2, 36, 29),
                                    affine=np.eye(4), layout="brats2019", source="/x/t1")
  slices = SliceSet(np.zeros((1, 12, 10, 4), np.float32), np.zeros((1, 12, 10), np.int32),
                    np.asarray(["c"]), np.asarray([3]), record)
  maps = rng.normal(size=(1, 12, 10, 3))
  volume = patient_space.to_volume(maps, slices)
  plain = np.einsum("ah,hwc,bw->abc", wx, maps[0], wy)
  np.testing.assert_allclose(volume[4:36, 2:29, 3], plain, rtol=1e-5, atol=1e-6)
  assert not volume[:, :, :3].any() and not volume[:4].any()


def test_the_written_volume_has_the_inputs_affine_and_lines_up(case, tmp_path):
  files, volumes = case
  slices = brats.load_case(files, brats.PreprocessConfig(crop_size=32, image_size=16),
                           slices=[10, 15, 17])
  back = patient_space.to_volume(slices.labels, slices, kind="labels")
  path = patient_space.write_nifti(back, slices, tmp_path / "out" / "seg.nii.gz",
                                   kind="labels", description="test")
  written = nibabel.load(path)
  source = nibabel.load(files.path("t1"))
  np.testing.assert_allclose(written.affine, source.affine)
  assert written.shape == source.shape
  data = np.asarray(written.dataobj)
  assert data.dtype == np.uint8
  np.testing.assert_array_equal(data, back)
  assert set(np.flatnonzero(data.any(axis=(0, 1)))) <= {10, 15, 17}  # only those slices


def test_a_map_is_written_as_float32_with_its_range(case, tmp_path):
  files, _ = case
  slices = brats.load_case(files, brats.PreprocessConfig(crop_size=32), slices=[12])
  maps = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(1, 32, 32)
  volume = patient_space.to_volume(maps, slices)
  path = patient_space.write_nifti(volume, slices, tmp_path / "out" / "map.nii.gz")
  written = nibabel.load(path)
  assert written.get_data_dtype() == np.float32
  np.testing.assert_allclose(np.asarray(written.dataobj)[8:40, 8:40, 12], maps[0])
  assert written.header["cal_max"] == pytest.approx(1.0)


def test_outputs_never_go_beside_the_inputs(case):
  files, _ = case
  slices = brats.load_case(files, brats.PreprocessConfig(crop_size=32), slices=[12])
  volume = patient_space.to_volume(slices.labels, slices, kind="labels")
  for target in (files.path("seg"), files.directory / "pred.nii.gz",
                 files.directory / "sub" / "pred.nii.gz"):
    with pytest.raises(patient_space.PatientSpaceError, match="case's own directory"):
      patient_space.write_nifti(volume, slices, target, kind="labels")


def test_slices_without_a_record_or_of_two_scans_are_refused(case, tmp_path):
  files, volumes = case
  slices = brats.load_case(files, brats.PreprocessConfig(crop_size=32), slices=[12])
  bare = slices.__class__(slices.images, slices.labels, slices.case_ids, slices.slice_indices)
  with pytest.raises(patient_space.PatientSpaceError, match="no preprocessing record"):
    patient_space.to_volume(bare.labels, bare)
  other = brats.load_case(brats.case_files(write_case(tmp_path / "in2", "BraTS19_Y_1",
                                                      volumes)),
                          brats.PreprocessConfig(crop_size=32), slices=[12])
  both = slices.concatenate([slices, other])
  with pytest.raises(patient_space.PatientSpaceError, match="from 2 scans"):
    patient_space.to_volume(both.labels, both)
  with pytest.raises(patient_space.PatientSpaceError, match="expected"):
    patient_space.to_volume(slices.labels[:, :8], slices)


def test_the_scan_is_read_again_as_the_slices_were(case):
  files, _ = case
  config = brats.PreprocessConfig(num_slices=4, crop_size=32, image_size=16)
  slices = brats.load_case(files, config)
  scan = patient_space.read_scan(slices)
  assert len(scan) == 24
  for a, z in enumerate(slices.slice_indices):
    np.testing.assert_array_equal(scan.images[int(z)], slices.images[a])
  assert patient_space.preprocess_of(slices).crop_size == 32
