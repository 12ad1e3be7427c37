"""SliceSet's preprocessing record, and spread_over_cases: one example per case first, then
the rest in order."""

import dataclasses

import numpy as np
import pytest

from tracin_jax.data.slices import PreprocessRecord
from tracin_jax.data.slices import SliceSet
from tracin_jax.data.slices import fingerprint
from tracin_jax.data.slices import spread_over_cases


def test_one_per_case_while_other_cases_remain_then_the_rest_in_order():
  cases = ["a", "a", "b", "b", "c"]
  assert spread_over_cases([0, 1, 2, 3, 4], cases, 3) == [0, 2, 4]
  assert spread_over_cases([0, 1, 2, 3, 4], cases, 5) == [0, 2, 4, 1, 3]
  assert spread_over_cases([1, 0, 3], cases, 2, chosen=[4]) == [4, 1]
  assert spread_over_cases([0, 1], cases, 9) == [0, 1]
  assert spread_over_cases([0, 1], cases, 0) == []


def _set(case, n, z0=0, record=True):
  """n slices of one case, with a record (volume 24 x 20 x 12, box 2..22 x 0..20)."""
  rng = np.random.default_rng(len(case))
  rec = PreprocessRecord.of_case(
      n, volume_shape=(24, 20, 12), crop_box=(2, 0, 22, 20), affine=np.diag([-1, -1, 2, 1]),
      layout="brats2021", source=f"/data/{case}/{case}_t1.nii.gz") if record else None
  return SliceSet(rng.uniform(-1, 1, (n, 8, 8, 4)).astype(np.float32),
                  rng.integers(0, 4, (n, 8, 8)).astype(np.int32), np.asarray([case] * n),
                  np.arange(z0, z0 + n, dtype=np.int32), rec)


def test_record_types_and_shapes_are_checked():
  rec = _set("a", 3).record
  assert rec.volume_shape.dtype == np.int32 and rec.crop_box.dtype == np.int32
  assert rec.affine.dtype == np.float64 and rec.affine.shape == (3, 4, 4)
  assert rec.layout.tolist() == ["brats2021"] * 3
  with pytest.raises(ValueError, match="crop_box has shape"):
    PreprocessRecord(rec.volume_shape, rec.crop_box[:, :3], rec.affine, rec.layout, rec.source)
  with pytest.raises(ValueError, match="record has 3 entries"):
    s = _set("a", 2)
    SliceSet(s.images, s.labels, s.case_ids, s.slice_indices, rec)


def test_record_follows_subset_select_and_concatenate():
  both = SliceSet.concatenate([_set("a", 2), _set("bb", 3, z0=5)])
  assert both.record.source.tolist() == ["/data/a/a_t1.nii.gz"] * 2 + [
      "/data/bb/bb_t1.nii.gz"] * 3
  part = both.subset([4, 0])
  assert part.record.source.tolist() == ["/data/bb/bb_t1.nii.gz", "/data/a/a_t1.nii.gz"]
  assert both.select_cases(["bb"]).record.source.tolist() == ["/data/bb/bb_t1.nii.gz"] * 3
  assert both.subset(both.slice_indices > 5).record.crop_box.shape == (2, 4)
  assert SliceSet.concatenate([_set("a", 2), _set("c", 1, record=False)]).record is None


def test_record_survives_save_and_load_and_old_files_load_without(tmp_path):
  s = SliceSet.concatenate([_set("a", 2), _set("bb", 3, z0=5)])
  s.save(tmp_path / "s.npz")
  back = SliceSet.load(tmp_path / "s.npz")
  for name in ("volume_shape", "crop_box", "affine", "layout", "source"):
    np.testing.assert_array_equal(getattr(back.record, name), getattr(s.record, name))
  with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
    old = {k: f[k] for k in ("images", "labels", "case_ids", "slice_indices")}
  np.savez(tmp_path / "old.npz", **old)
  assert SliceSet.load(tmp_path / "old.npz").record is None
  np.savez(tmp_path / "part.npz", **old, record_layout=s.record.layout)
  with pytest.raises(ValueError, match="record_affine"):
    SliceSet.load(tmp_path / "part.npz")


def test_fingerprint_does_not_hash_the_record():
  with_record = _set("a", 3)
  without = dataclasses.replace(with_record, record=None)
  other = dataclasses.replace(with_record, record=PreprocessRecord.of_case(
      3, volume_shape=(1, 1, 1), crop_box=(0, 0, 1, 1), affine=np.eye(4), layout="files",
      source="/x"))
  assert fingerprint(with_record) == fingerprint(without) == fingerprint(other)
