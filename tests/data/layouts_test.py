"""The BraTS layouts since 2019, unlabelled cases, chosen slices and the preprocessing record,
on tiny hand-made volumes (24 x 20 x 12) written to tmp_path."""

import dataclasses

import brats_test
import nibabel
import numpy as np
import pytest

from tracin_jax.data import brats
from tracin_jax.data import constants
from tracin_jax.data import layouts

SHAPE = (24, 20, 12)
BRAIN = (slice(2, 22), slice(3, 18), slice(1, 11))  # z 1..10: brain centre 5.5
TUMOUR = (slice(8, 16), slice(7, 14), slice(4, 9))
# Not the identity, so that a record carrying it is told from a default.
AFFINE = np.array([[-1.5, 0.0, 0.0, 30.0], [0.0, -1.0, 0.0, 19.0], [0.0, 0.0, 2.0, -5.0],
                   [0.0, 0.0, 0.0, 1.0]])
CONFIG = brats.PreprocessConfig(num_slices=4, crop_size=16)
CASE_IDS = {
    "brats2019": "BraTS19_TCIA01_{:03d}_1",
    "brats2020": "BraTS20_Training_{:03d}",
    "brats2021": "BraTS2021_{:05d}",
    "brats2023": "BraTS-GLI-{:05d}-000",
}


def make_volumes(seed=0):
  """The four modalities (int16, as the releases store them, zero outside a box brain) and
  a seg in BraTS 2019 labels, with a necrotic core."""
  volumes = {kind: np.round(v).astype(np.int16) if kind != constants.SEG_SUFFIX else v
             for kind, v in brats_test.make_volumes(seed, SHAPE, BRAIN, TUMOUR).items()}
  volumes[constants.SEG_SUFFIX][11:13, 10:11, 5:8] = 1
  return volumes


def write(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  nibabel.Nifti1Image(data, AFFINE).to_filename(path)


def write_case(root, layout, index, volumes=None, ext=".nii.gz", drop=()):
  """Writes case `index` in that layout's naming (2023: ET relabelled 3); returns its dir."""
  volumes = make_volumes(index) if volumes is None else volumes
  spec = layouts.get_layout(layout)
  case_id = CASE_IDS[layout].format(index)
  case_dir = root / ("HGG" if spec.grouped else "") / case_id
  for kind, data in volumes.items():
    if kind in drop:
      continue
    if kind == constants.SEG_SUFFIX and layout == "brats2023":
      data = np.where(data == 4, 3, data).astype(np.uint8)
    write(case_dir / spec.file_name(case_id, kind, ext), data)
  return case_dir


def write_cohort(root, layout, num=2, **kwargs):
  for i in range(num):
    write_case(root, layout, i + 1, **kwargs)
  return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The 2019 cohort's slices."""
  root = write_cohort(tmp_path_factory.mktemp("brats2019"), "brats2019")
  return brats.load_cases(root, CONFIG, progress=False)[0]


@pytest.mark.parametrize("layout", ["brats2020", "brats2021", "brats2023"])
def test_each_layout_loads_to_the_same_slices_as_2019(tmp_path, reference, layout):
  root = write_cohort(tmp_path, layout)
  assert brats.detect_layout(root) == layout
  cases = brats.list_cases(root, ("HGG", "LGG"))  # groups do not apply
  assert [c.case_id for c in cases] == [CASE_IDS[layout].format(i) for i in (1, 2)]
  assert {c.layout for c in cases} == {layout} and {c.group for c in cases} == {""}
  assert set(cases[0].files) == set(layouts.KINDS)
  slices, skipped = brats.load_cases(root, CONFIG, progress=False)
  assert skipped == []
  np.testing.assert_array_equal(slices.images, reference.images)
  np.testing.assert_array_equal(slices.labels, reference.labels)
  np.testing.assert_array_equal(slices.slice_indices, reference.slice_indices)
  assert (slices.labels == 3).any()  # ET: label 4, or 3 in 2023, is class 3
  assert slices.record.layout.tolist() == [layout] * len(slices)
  np.testing.assert_array_equal(slices.record.crop_box, reference.record.crop_box)


def test_detect_layout_names_each_and_refuses_a_folder_of_none(tmp_path):
  for layout in CASE_IDS:
    write_case(tmp_path / layout, layout, 1)
    assert layouts.detect_layout(tmp_path / layout) == layout
  other = tmp_path / "other"
  for name in ("scans", "patient_7"):
    (other / name).mkdir(parents=True)
  (other / "readme.txt").write_text("x")
  with pytest.raises(brats.BratsDataError) as info:
    brats.list_cases(other)
  message = str(info.value)
  assert "\n" not in message and str(other) in message
  for layout in CASE_IDS:
    assert layout in message and layouts.get_layout(layout).example in message
  assert "patient_7/, readme.txt, scans/" in message
  with pytest.raises(brats.BratsDataError, match="; it is empty"):
    brats.detect_layout(other / "scans")
  # A 2019 group folder given as the root, and a release's folder one level down: hints.
  write_case(tmp_path / "flat", "brats2019", 1)
  with pytest.raises(brats.BratsDataError, match="BraTS 2019 case folders belong in HGG/"):
    brats.detect_layout(tmp_path / "flat" / "HGG")
  wrapper = tmp_path / "download"
  write_case(wrapper / "BraTS2021_Training_Data", "brats2021", 1)
  with pytest.raises(brats.BratsDataError, match="looks like a brats2021 root"):
    brats.detect_layout(wrapper)


def test_a_case_folder_of_any_layout_is_recognised_from_its_files(tmp_path):
  for layout in CASE_IDS:
    case_dir = write_case(tmp_path / layout, layout, 3)
    case = brats.case_files(case_dir)
    assert case.layout == layout and set(case.files) == set(layouts.KINDS)
    assert case.group == ("HGG" if layout == "brats2019" else "")
  # Named by no pattern: the files' suffixes still tell 2023 from the others.
  renamed = write_case(tmp_path / "x", "brats2023", 4).rename(tmp_path / "patient")
  assert brats.case_files(renamed).layout == "brats2023"


def test_2020_irregular_seg_name_is_read_with_a_note(tmp_path, reference):
  case_dir = write_cohort(tmp_path, "brats2020") / "BraTS20_Training_001"
  (case_dir / "BraTS20_Training_001_seg.nii.gz").rename(case_dir / "W39_1998.09.19_Segm.nii.gz")
  notes = []
  case = brats.list_cases(tmp_path)[0]
  slices = brats.load_case(case, CONFIG, notes=notes)
  np.testing.assert_array_equal(slices.labels, reference.labels[:4])
  assert len(notes) == 1 and "W39_1998.09.19_Segm.nii.gz" in notes[0]
  assert "BraTS20_Training_001" in notes[0]
  # A second such file: no longer the only other one, so the case has no seg.
  write(case_dir / "brain_mask.nii.gz", make_volumes()["seg"])
  with pytest.raises(brats.BratsDataError, match="missing seg file"):
    brats.load_case(brats.case_files(case_dir), CONFIG)


def test_uncompressed_and_upper_case_names_are_read(tmp_path, reference):
  root = write_cohort(tmp_path, "brats2021", ext=".nii")
  case_dir = root / "BraTS2021_00002"
  (case_dir / "BraTS2021_00002_flair.nii").rename(case_dir / "BraTS2021_00002_FLAIR.nii")
  cases = brats.list_cases(root)
  assert cases[1].files["flair"].name == "BraTS2021_00002_FLAIR.nii"
  slices, _ = brats.load_cases(root, CONFIG, progress=False)
  np.testing.assert_array_equal(slices.images, reference.images)


@pytest.mark.parametrize("layout, filename", [
    ("brats2023", "BraTS-GLI-00002-000-t2f.nii.gz"),
    ("brats2020", "BraTS20_Training_002_flair.nii.gz"),
])
def test_a_case_missing_its_flair_names_the_file_and_can_be_skipped(tmp_path, layout, filename):
  write_case(tmp_path, layout, 1)
  write_case(tmp_path, layout, 2, drop=("flair",))
  with pytest.raises(brats.BratsDataError) as info:
    brats.load_cases(tmp_path, CONFIG, progress=False)
  assert "missing flair file" in str(info.value) and filename in str(info.value)
  slices, skipped = brats.load_cases(tmp_path, CONFIG, skip_bad=True, progress=False)
  assert slices.cases == [CASE_IDS[layout].format(1)]
  assert [c for c, _ in skipped] == [CASE_IDS[layout].format(2)]


def test_a_foreign_case_folder_in_a_root_is_a_case_of_the_roots_layout(tmp_path):
  write_cohort(tmp_path, "brats2021")
  write_case(tmp_path, "brats2023", 9)
  assert brats.detect_layout(tmp_path) == "brats2021"
  with pytest.raises(brats.BratsDataError, match="case BraTS-GLI-00009-000: missing t1 file"):
    brats.load_cases(tmp_path, CONFIG, progress=False)


def test_two_files_of_one_kind_the_exact_name_wins_else_both_are_named(tmp_path):
  case_dir = write_case(tmp_path, "brats2021", 1)
  write(case_dir / "copy_t2.nii.gz", make_volumes()["t2"])
  notes = []
  brats.load_case(brats.case_files(case_dir), CONFIG, notes=notes)
  assert notes == [f"case BraTS2021_00001: t2 file {case_dir}/BraTS2021_00001_t2.nii.gz used, "
                   f"of BraTS2021_00001_t2.nii.gz, copy_t2.nii.gz in {case_dir}."]
  (case_dir / "BraTS2021_00001_t2.nii.gz").rename(case_dir / "old_t2.nii.gz")
  with pytest.raises(brats.BratsDataError, match=r"2 t2 files .*\(copy_t2.nii.gz, "
                     r"old_t2.nii.gz\); keep one") as info:
    brats.load_case(brats.case_files(case_dir), CONFIG)
  assert "\n" not in str(info.value)


def test_labels_are_checked_against_the_layouts_set(tmp_path):
  volumes = make_volumes()  # ET is 4: no 2023 label
  case_dir = tmp_path / "BraTS-GLI-00001-000"
  for kind, data in volumes.items():
    write(case_dir / layouts.BRATS2023.file_name(case_dir.name, kind), data)
  with pytest.raises(brats.BratsDataError,
                     match=r"has labels \[0, 1, 2, 4\]; expected a subset of \[0, 1, 2, 3\]"):
    brats.load_case(brats.case_files(case_dir), CONFIG)


def test_to_layout_labels_inverts_each_layouts_mapping():
  for name, layout in layouts.LAYOUTS.items():
    labels = np.asarray(layout.labels)
    classes = layouts.to_classes(labels, name)
    np.testing.assert_array_equal(classes, [0, 1, 2, 3])
    np.testing.assert_array_equal(layouts.to_layout_labels(classes, name), labels)
    grid = np.random.default_rng(0).integers(0, 4, (3, 5))
    np.testing.assert_array_equal(layouts.to_classes(layouts.to_layout_labels(grid, layout),
                                                     layout), grid)
  seg = make_volumes()["seg"]
  np.testing.assert_array_equal(layouts.to_classes(seg, "brats2019"),
                                constants.remap_labels(seg))
  np.testing.assert_array_equal(layouts.to_layout_labels([3], "brats2021"), [4])
  np.testing.assert_array_equal(layouts.to_layout_labels([3], "brats2023"), [3])
  with pytest.raises(ValueError, match=r"classes \[4\]"):
    layouts.to_layout_labels([0, 4], "brats2023")
  with pytest.raises(ValueError, match=r"labels \[3\] are not brats2019"):
    layouts.to_classes([3], "brats2019")
  with pytest.raises(ValueError, match="unknown BraTS layout"):
    layouts.get_layout("brats2018")


def test_an_unlabelled_case_loads_with_labels_minus_one(tmp_path):
  case_dir = write_case(tmp_path, "brats2021", 1, drop=("seg",))
  case = brats.case_files(case_dir)
  with pytest.raises(brats.BratsDataError, match="missing seg file .*BraTS2021_00001_seg"):
    brats.load_case(case, CONFIG)
  notes = []
  tumour = dataclasses.replace(CONFIG, slice_center="tumour")
  slices = brats.load_case(case, tumour, notes=notes, require_labels=False)
  assert slices.labels.shape == (4, 16, 16) and (slices.labels == -1).all()
  np.testing.assert_array_equal(slices.slice_indices, [4, 5, 6, 7])  # the brain's centre
  assert any("no seg file" in n and "centred on the brain" in n for n in notes)
  # The images are those of the labelled case.
  labelled = brats.load_case(brats.case_files(write_case(tmp_path / "l", "brats2021", 1)),
                             CONFIG)
  np.testing.assert_array_equal(slices.images, labelled.images)


def test_all_slices_chosen_slices_and_an_index_outside_the_volume(tmp_path):
  case = brats.case_files(write_case(tmp_path, "brats2023", 1))
  every = brats.load_case(case, CONFIG, slices="all")
  assert len(every) == SHAPE[2] and every.images.shape == (12, 16, 16, 4)
  np.testing.assert_array_equal(every.slice_indices, np.arange(12))
  chosen = brats.load_case(case, CONFIG, slices=[11, 0, 5])
  np.testing.assert_array_equal(chosen.slice_indices, [11, 0, 5])
  np.testing.assert_array_equal(chosen.images, every.images[[11, 0, 5]])
  np.testing.assert_array_equal(chosen.labels, every.labels[[11, 0, 5]])
  # Normalised on the whole brain: the default's slices are the same slices of "all".
  default = brats.load_case(case, CONFIG)
  np.testing.assert_array_equal(default.images, every.images[default.slice_indices])
  with pytest.raises(brats.BratsDataError, match=r"slice index 12 is outside its volume's 12 "
                     "axial slices"):
    brats.load_case(case, CONFIG, slices=[3, 12])
  with pytest.raises(ValueError, match="slices"):
    brats.load_case(case, CONFIG, slices="middle")


def test_the_record_of_a_cropped_and_resized_case(tmp_path):
  case_dir = write_case(tmp_path, "brats2021", 1)
  case = brats.case_files(case_dir)
  config = brats.PreprocessConfig(num_slices=3, crop_size=16, image_size=8)
  slices = brats.load_case(case, config)
  record = slices.record
  assert len(record) == 3
  np.testing.assert_array_equal(record.volume_shape, [SHAPE] * 3)
  x0, y0 = (24 - 16) // 2, (20 - 16) // 2
  np.testing.assert_array_equal(record.crop_box, [(x0, y0, x0 + 16, y0 + 16)] * 3)
  np.testing.assert_array_equal(record.affine, [AFFINE] * 3)
  assert record.layout.tolist() == ["brats2021"] * 3
  assert record.source.tolist() == [str(case_dir.absolute() / "BraTS2021_00001_t1.nii.gz")] * 3
  # The box is where the image comes from: the full plane's box, area-averaged 16 -> 8.
  full = brats.load_case(case, brats.PreprocessConfig(num_slices=3, crop_size=None))
  np.testing.assert_array_equal(full.record.crop_box, [(0, 0, 24, 20)] * 3)
  box = full.images[:, x0:x0 + 16, y0:y0 + 16]
  np.testing.assert_allclose(slices.images, box.reshape(3, 8, 2, 8, 2, 4).mean(axis=(2, 4)),
                             atol=1e-6)
  np.testing.assert_array_equal(slices.labels, full.labels[:, x0 + 1:x0 + 16:2, y0 + 1:y0 + 16:2])


def test_case_from_files_loads_as_the_folder_and_takes_a_layout(tmp_path, reference):
  case_dir = write_case(tmp_path, "brats2019", 1)
  paths = [case_dir / f"{case_dir.name}_{kind}.nii.gz" for kind in layouts.KINDS]
  case = brats.case_from_files(*paths)
  assert case.case_id == case_dir.name and case.layout == "files"
  slices = brats.load_case(case, CONFIG)
  np.testing.assert_array_equal(slices.images, reference.images[:4])
  np.testing.assert_array_equal(slices.labels, reference.labels[:4])
  assert slices.record.layout.tolist() == ["files"] * 4
  unlabelled = brats.case_from_files(*paths[:4], case_id="p7")
  assert (brats.load_case(unlabelled, CONFIG, require_labels=False).labels == -1).all()
  # The seg holds label 4, not a 2023 label.
  with pytest.raises(brats.BratsDataError, match=r"expected a subset of \[0, 1, 2, 3\]"):
    brats.load_case(brats.case_from_files(*paths, layout="brats2023"), CONFIG)
  with pytest.raises(brats.BratsDataError, match=r"flair file .*nowhere.nii does not exist"):
    brats.case_from_files(*paths[:3], tmp_path / "nowhere.nii")
  assert layouts.case_id_from_file("BraTS-GLI-00000-000-t1n.nii.gz") == "BraTS-GLI-00000-000"


def test_the_record_survives_the_cache_and_the_layout_is_in_the_key(tmp_path, monkeypatch):
  root = write_cohort(tmp_path / "data", "brats2023")
  cache = tmp_path / "cache"
  first, _ = brats.load_cached(root, CONFIG, cache, progress=False)
  monkeypatch.setattr(nibabel, "load", None)  # a hit reads no NIfTI
  second, _ = brats.load_cached(root, CONFIG, cache, progress=False)
  for name in ("volume_shape", "crop_box", "affine", "layout", "source"):
    np.testing.assert_array_equal(getattr(second.record, name), getattr(first.record, name))
  cases = brats.list_cases(root)
  other = [dataclasses.replace(c, layout="brats2021") for c in cases]
  assert brats.cache_key(cases, root, CONFIG) != brats.cache_key(other, root, CONFIG)


@pytest.mark.parametrize("layout", ["brats2020", "brats2023"])
def test_the_synthetic_cohort_written_in_a_later_layout_loads_to_the_same_slices(
    tmp_path, reference, layout):
  """`write_in_layout` renames a 2019-layout cohort's cases and files and relabels 2023's ET
  (4 -> 3): loaded, the same images, labels and slices as the cohort it came from."""
  from tracin_jax.data.synthetic import cohort  # pylint: disable=g-import-not-at-top

  source = write_cohort(tmp_path / "brats2019", "brats2019")
  dirs = cohort.write_in_layout(source, tmp_path / layout, layout)
  assert [d.name for d in dirs] == [cohort.LAYOUT_CASE_NAMES[layout].format(n=n)
                                    for n in (1, 2)]
  assert brats.detect_layout(tmp_path / layout) == layout
  seg = next(p for p in dirs[0].iterdir() if "seg" in p.name)
  assert set(np.unique(np.asarray(nibabel.load(seg).dataobj))) == (
      {0, 1, 2, 3} if layout == "brats2023" else {0, 1, 2, 4})
  loaded, _ = brats.load_cases(tmp_path / layout, CONFIG, progress=False)
  for name in ("images", "labels", "slice_indices"):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(reference, name))
  with pytest.raises(ValueError, match="layout must be one of"):
    cohort.write_in_layout(source, tmp_path / "x", "brats2019")
