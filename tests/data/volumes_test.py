"""Tests for tracin_jax.data.volumes (and the pipeline in 3D) on tiny NIfTI cases."""

import logging

import layouts_test
import nibabel
import numpy as np
import pytest
from brats_test import CONFIG
from brats_test import make_volumes
from brats_test import write_case
from pipeline_test import class_of_image
from scipy import ndimage

from tracin_jax.data import brats
from tracin_jax.data import layouts
from tracin_jax.data import pipeline
from tracin_jax.data import volumes

# An oblique-ish grid: voxels of 1.2 x 0.9 x 2.5 mm (57.6 x 43.2 x 60 mm in all).
AFFINE = np.array([[-1.2, 0.0, 0.0, 30.0], [0.0, -0.9, 0.0, 250.0], [0.0, 0.0, 2.5, -8.0],
                   [0.0, 0.0, 0.0, 1.0]])
# At 2 mm that grid is 28.8 x 21.6 x 30 voxels: the box crops z (D) and y (W), pads x (H).
OBLIQUE = volumes.VolumeConfig(spacing=2.0, size=(16, 32, 16))
CUBE = np.ones((3, 3, 3), bool)  # one voxel in every direction


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  """A 1 mm case (48 x 48 x 24, brats_test's volumes)."""
  volumes_ = make_volumes(seed=0)
  return brats.case_files(write_case(tmp_path_factory.mktemp("mm"), "BraTS19_A_1",
                                     volumes_)), volumes_


@pytest.fixture(scope="module")
def oblique(tmp_path_factory):
  """The same volumes on the AFFINE grid."""
  volumes_ = make_volumes(seed=3)
  case_dir = write_case(tmp_path_factory.mktemp("in") / "brats", "BraTS19_X_1", volumes_)
  for path in case_dir.iterdir():
    nibabel.Nifti1Image(np.asarray(nibabel.load(path).dataobj), AFFINE).to_filename(path)
  return brats.case_files(case_dir), volumes_


@pytest.mark.parametrize("spacing", [None, 1.0])
def test_without_resampling_the_volume_is_the_slices(case, spacing):
  """The same normalisation, label mapping and box as the slice path, slice for slice."""
  files, _ = case
  box = volumes.load_case(files, volumes.VolumeConfig(spacing=spacing, size=(6, 32, 32)))
  slices = brats.load_case(files, CONFIG)  # 6 slices around the brain, centre crop 32
  assert box.images.shape == (1, 6, 32, 32, 4) and box.images.dtype == np.float32
  assert box.labels.shape == (1, 6, 32, 32) and box.labels.dtype == np.int32
  np.testing.assert_array_equal(box.images[0], slices.images)
  np.testing.assert_array_equal(box.labels[0], slices.labels)
  assert (box.labels == 3).any()  # BraTS label 4 became class 3
  np.testing.assert_array_equal(box.record.origin[0], [8, 8, slices.slice_indices[0]])
  whole = volumes.load_case(files, volumes.VolumeConfig(spacing=spacing, size=None))
  every = brats.load_case(files, brats.PreprocessConfig(crop_size=None), slices="all")
  np.testing.assert_array_equal(whole.images[0], every.images)
  np.testing.assert_array_equal(whole.labels[0], every.labels)
  # The sample's voxel (d, h, w) is the source voxel (x0 + h, y0 + w, z0 + d) in the world.
  d, h, w = 2, 5, 7
  np.testing.assert_allclose(box.record.sample_affine(0) @ [d, h, w, 1],
                             slices.record.affine[0] @ [8 + h, 8 + w, 9 + d, 1])


def test_resampling_is_trilinear_and_nearest_on_the_records_grid(oblique):
  """Images: scipy's trilinear interpolation of the normalised volume at the sample voxels'
  centres (background -1 outside); labels: the source voxel holding each centre."""
  files, raw = oblique
  sample = volumes.load_case(files, OBLIQUE)
  record = sample.record
  np.testing.assert_allclose(record.step[0], 2.0 / np.array([1.2, 0.9, 2.5]))
  read = brats.read_case(files)
  normalised = [brats.normalise(v, read.brain, np.arange(24)) for v in read.volumes]
  # The record's meaning: voxel i's centre is at origin + (i + 0.5) * step - 0.5.
  positions = [record.origin[0, a] + (np.arange(n) + 0.5) * record.step[0, a] - 0.5
               for a, n in enumerate((32, 16, 16))]
  coords = np.stack(np.meshgrid(*positions, indexing="ij"))  # [3, x, y, z]
  for c, channel in enumerate(normalised):
    expected = ndimage.map_coordinates(channel.astype(np.float64), coords, order=1,
                                       mode="grid-constant", cval=-1.0)
    np.testing.assert_allclose(sample.images[0, ..., c], expected.transpose(2, 0, 1),
                               atol=1e-5)
  classes = layouts.to_classes(raw["seg"], layouts.get_layout("brats2019"))
  index = [np.floor(p + 0.5).astype(int) for p in positions]
  inside = [(i >= 0) & (i < n) for i, n in zip(index, classes.shape)]
  expected = np.zeros((32, 16, 16), np.int32)
  expected[np.ix_(*inside)] = classes[np.ix_(*[i[k] for i, k in zip(index, inside)])]
  np.testing.assert_array_equal(sample.labels[0], expected.transpose(2, 0, 1))
  assert (sample.images[0][:, [0, -1]] == -1).all()  # x padded on both sides: background


def test_labels_to_2mm_and_back_are_within_one_voxel(tmp_path):
  raw = make_volumes(seed=2, tumour=(slice(15, 29), slice(13, 27), slice(13, 19)))  # odd
  files = brats.case_files(write_case(tmp_path, "BraTS19_R_1", raw))
  sample = volumes.load_case(files, volumes.VolumeConfig(spacing=2.0, size=None))
  assert sample.labels.shape == (1, 12, 24, 24)
  back = volumes.to_volume(sample.labels[0], sample, kind="labels")
  truth = layouts.to_classes(raw["seg"], layouts.get_layout("brats2019"))
  assert back.shape == truth.shape and not np.array_equal(back, truth)
  for c in range(4):
    assert np.all(ndimage.binary_dilation(truth == c, CUBE)[back == c]), c
    assert np.all((back == c)[ndimage.binary_erosion(truth == c, CUBE)]), c


def _off_centre_case(root):
  """A brain box x 2..22, y 24..46, z 8..20 of a 48 x 48 x 24 volume (centre of mass
  (11.5, 34.5, 13.5)), a tumour inside it."""
  return brats.case_files(write_case(root, "BraTS19_O_1", make_volumes(
      seed=1, brain=(slice(2, 22), slice(24, 46), slice(8, 20)),
      tumour=(slice(6, 18), slice(28, 40), slice(10, 18)))))


def test_the_fixed_size_box_is_centred_on_the_brain_and_padded(tmp_path):
  files = _off_centre_case(tmp_path)
  sample = volumes.load_case(files, volumes.VolumeConfig(spacing=None, size=(32, 16, 16)))
  # In-plane the box crops around the brain's centre; along z (32 > 24) it holds the whole
  # volume, centred on the brain: two slices of background before and six after.
  np.testing.assert_array_equal(sample.record.origin[0], [4, 27, -2])
  image, label = sample.images[0], sample.labels[0]
  outside = np.r_[0:2, 26:32]
  assert (image[outside] == -1).all() and (label[outside] == 0).all()
  brain = (image > -1).any(axis=-1)
  np.testing.assert_allclose(volumes.centre_of_mass(brain.transpose(1, 2, 0)),
                             [7.5, 7.5, 15.5], atol=0.5)
  # At 2 mm, 8 voxels a side: the brain's centre within one voxel of the box's.
  small = volumes.load_case(files, volumes.VolumeConfig(spacing=2.0, size=(8, 8, 8)))
  brain = (small.images[0] > -1).any(axis=-1)
  np.testing.assert_allclose(volumes.centre_of_mass(brain.transpose(1, 2, 0)),
                             [3.5, 3.5, 3.5], atol=1.0)
  assert small.images.shape == (1, 8, 8, 8, 4)
  # A box centred on the brain that would leave the volume is shifted back inside it.
  wide = volumes.load_case(files, volumes.VolumeConfig(spacing=None, size=(8, 16, 32)))
  np.testing.assert_array_equal(wide.record.origin[0], [4, 16, 10])  # y: 19 -> 48 - 32


@pytest.mark.parametrize("bad, word", [
    (dict(size=(8, 16)), "size"), (dict(size=(8, 0, 16)), "size"),
    (dict(spacing=0.0), "spacing"), (dict(spacing=float("nan")), "spacing"),
    (dict(spacing=True), "spacing"),
    (dict(groups=("XGG",)), "groups")])
def test_bad_settings_are_refused_naming_them(bad, word):
  with pytest.raises(ValueError, match=word):
    volumes.VolumeConfig(**bad)


def blocky_volume(seed, size=16, block=4):
  """3D brother of pipeline_test.blocky_example: channel k is 1 where the class is k."""
  rng = np.random.default_rng(seed)
  classes = rng.integers(0, 4, size=(size // block,) * 3)
  label = np.kron(classes, np.ones((block,) * 3, int)).astype(np.int32)
  image = np.where(label[..., None] == np.arange(4), 1.0, -1.0).astype(np.float32)
  return image, label


ALL_AXES = ("superior_inferior", "left_right", "anterior_posterior")
ONLY_3D = {
    "elastic": pipeline.AugmentConfig(p_elastic=1.0, p_crop=0.0, p_mirror=0.0,
                                      elastic_sigma=0.05),
    "crop": pipeline.AugmentConfig(p_elastic=0.0, p_crop=1.0, p_mirror=0.0),
    "mirror": pipeline.AugmentConfig(p_elastic=0.0, p_crop=0.0, p_mirror=1.0,
                                     mirror_axes=ALL_AXES),
    "all": pipeline.AugmentConfig(p_elastic=1.0, p_crop=1.0, p_mirror=1.0,
                                  mirror_axes=ALL_AXES),
}


@pytest.mark.parametrize("name", ONLY_3D)
def test_3d_augmentation_moves_image_and_label_together(name):
  for seed in range(2):
    image, label = blocky_volume(seed)
    out_image, out_label = pipeline.augment_example(image, label, np.random.default_rng(seed),
                                                    ONLY_3D[name])
    assert out_image.shape == image.shape and out_label.shape == label.shape
    assert not np.array_equal(out_label, label)  # it did something
    decoded = class_of_image(out_image)
    known = decoded >= 0
    assert known.mean() > 0.5
    np.testing.assert_array_equal(out_label[known], decoded[known])


def test_3d_random_crop_translates_along_every_axis_within_max_shift():
  label = np.zeros((8, 16, 16), np.int32)
  label[3:5, 7:9, 7:9] = 3  # a 2-voxel cube near the centre
  image = np.where(label[..., None] == 3, 1.0, -1.0).astype(np.float32)
  shifts = []
  for seed in range(12):
    out_image, out_label = pipeline.random_crop(image, label, np.random.default_rng(seed),
                                                max_shift=0.25)  # 2, 4, 4 voxels
    np.testing.assert_array_equal(out_image[..., 0] == 1.0, out_label == 3)
    shifts.append(np.argwhere(out_label == 3).min(axis=0) - (3, 7, 7))
  shifts = np.array(shifts)
  assert (np.abs(shifts) <= (2, 4, 4)).all()
  assert all(len(set(shifts[:, a])) > 1 for a in range(3))  # D too, not only in-plane


def test_3d_mirror_flips_each_axis_and_left_right_is_h():
  image, label = blocky_volume(4)
  out_image, out_label = pipeline.augment_example(image, label, np.random.default_rng(0),
                                                  ONLY_3D["mirror"])
  np.testing.assert_array_equal(out_label, label[::-1, ::-1, ::-1])
  np.testing.assert_array_equal(out_image, image[::-1, ::-1, ::-1])
  flipped_image, flipped = pipeline.mirror(image, label)  # the default: left-right
  np.testing.assert_array_equal(flipped, label[:, ::-1])
  np.testing.assert_array_equal(flipped_image, image[:, ::-1])
  with pytest.raises(ValueError, match="superior_inferior"):
    pipeline.mirror(image[0], label[0], "superior_inferior")


def test_3d_displacement_is_the_cubic_spline_of_the_control_points():
  coarse = np.random.default_rng(0).normal(size=(3, 4, 4, 4))
  shape = (6, 9, 7)
  got = pipeline.smooth_displacement(shape, coarse)
  fine = np.meshgrid(*[np.linspace(0, 3, n) for n in shape], indexing="ij")
  for c in range(3):
    expected = ndimage.map_coordinates(coarse[c], fine, order=3, mode="nearest")
    np.testing.assert_allclose(got[c], expected, atol=1e-6)


def test_volume_batches_through_the_slices_pipeline(case):
  sample = volumes.load_case(case[0], volumes.VolumeConfig(spacing=2.0, size=(8, 16, 16)))
  two = volumes.VolumeSet.concatenate([sample, sample])
  batch = next(pipeline.train_batches(two, 2, seed=0, epoch=0, num_threads=1))
  assert batch["image"].shape == (2, 8, 16, 16, 4) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (2, 8, 16, 16) and batch["label"].dtype == np.int32
  evaluated = next(pipeline.eval_batches(two, 2))
  np.testing.assert_array_equal(evaluated["image"], two.images)


def test_the_cache_is_reused_and_a_damaged_entry_is_detected(tmp_path, monkeypatch, caplog):
  root, cache = tmp_path / "brats", tmp_path / "cache"
  for i, name in enumerate(["BraTS19_A_1", "BraTS19_B_1"]):
    write_case(root, name, make_volumes(seed=i))
  config = volumes.VolumeConfig(spacing=2.0, size=(8, 16, 16))
  cold, skipped = volumes.load_cached(root, config, cache, progress=False)
  assert skipped == [] and cold.cases == ["BraTS19_A_1", "BraTS19_B_1"]
  entry, = cache.glob("volumes_*.npz")
  assert (cache / (entry.name + ".sha256")).is_file()

  def no_read(*args, **kwargs):
    raise AssertionError("a cache hit read a NIfTI file")

  monkeypatch.setattr(nibabel, "load", no_read)
  hit, _ = volumes.load_cached(root, config, cache, progress=False)
  np.testing.assert_array_equal(hit.images, cold.images)
  np.testing.assert_array_equal(hit.record.origin, cold.record.origin)
  with pytest.raises(AssertionError, match="NIfTI"):  # another size is another entry
    volumes.load_cached(root, volumes.VolumeConfig(spacing=2.0, size=(8, 16, 8)), cache,
                        progress=False)
  monkeypatch.undo()
  data = bytearray(entry.read_bytes())
  data[len(data) // 2] ^= 0xFF  # one byte of the images
  entry.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING, logger="tracin_jax.data.volumes"):
    rebuilt, _ = volumes.load_cached(root, config, cache, progress=False)
  assert any("damaged" in r.getMessage() and entry.name in r.getMessage()
             and "SHA-256" in r.getMessage() for r in caplog.records)  # the checksum saw it
  np.testing.assert_array_equal(rebuilt.images, cold.images)
  volumes.VolumeSet.load(entry)  # sound again: its checksum matches


def test_the_back_mapping_writes_the_inputs_affine_and_shape(oblique, tmp_path):
  files, raw = oblique
  sample = volumes.load_case(files, OBLIQUE)
  labels = volumes.to_volume(sample.labels[0], sample, kind="labels")
  path = volumes.write_nifti(labels, sample, tmp_path / "out" / "labels.nii.gz",
                             kind="labels")
  written = nibabel.load(path)
  assert written.shape == (48, 48, 24)
  np.testing.assert_allclose(written.affine, AFFINE)
  truth = layouts.to_classes(raw["seg"], layouts.get_layout("brats2019")) > 0
  back = np.asarray(written.dataobj) > 0
  # A map of ones comes back as ones on the box's footprint, the fill elsewhere.
  ones = volumes.to_volume(np.ones(sample.labels.shape[1:]), sample, kind="map", fill=-2.0)
  box = ones == 1.0
  assert set(np.unique(ones)) == {-2.0, 1.0} and not box.all()
  assert not back[~box].any()
  overlap = 2 * (back & truth & box).sum() / ((back & box).sum() + (truth & box).sum())
  assert overlap > 0.8
  with pytest.raises(Exception, match="own directory"):  # never beside the inputs
    volumes.write_nifti(labels, sample, files.directory / "x.nii.gz", kind="labels")


LAYOUT_CONFIG = volumes.VolumeConfig(spacing=2.0, size=(4, 8, 8))


@pytest.fixture(scope="module")
def reference_2019(tmp_path_factory):
  root = layouts_test.write_cohort(tmp_path_factory.mktemp("v2019"), "brats2019", num=1)
  return volumes.load_cases(root, LAYOUT_CONFIG, progress=False)[0]


@pytest.mark.parametrize("layout", ["brats2020", "brats2021", "brats2023"])
def test_every_layout_gives_the_2019_volumes(tmp_path, reference_2019, layout):
  root = layouts_test.write_cohort(tmp_path, layout, num=1)
  got, skipped = volumes.load_cases(root, LAYOUT_CONFIG, progress=False)
  assert skipped == [] and got.record.layout.tolist() == [layout]
  np.testing.assert_array_equal(got.images, reference_2019.images)
  np.testing.assert_array_equal(got.labels, reference_2019.labels)
  assert {0, 2, 3} <= set(np.unique(got.labels))  # ET (2023's 3, else 4) is class 3


def test_a_case_without_seg_loads_unlabelled(tmp_path, reference_2019):
  case_dir = layouts_test.write_case(tmp_path, "brats2021", 1, drop=("seg",))
  files = brats.case_files(case_dir)
  with pytest.raises(brats.BratsDataError, match="seg"):
    volumes.load_case(files, LAYOUT_CONFIG)
  got = volumes.load_case(files, LAYOUT_CONFIG, require_labels=False)
  assert (got.labels == -1).all()
  np.testing.assert_array_equal(got.images, reference_2019.images)
