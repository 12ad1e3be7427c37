"""Files read back are checked against the checksum written with them (`tracin_jax.outputs`)."""

import json
import logging
import pickle

import numpy as np
import pytest

from tracin_jax import outputs


def flip(path, offset=None, mask=0xFF):
  """Changes one byte of the file at `path` (its middle by default), size kept."""
  data = bytearray(path.read_bytes())
  data[len(data) // 2 if offset is None else offset] ^= mask
  path.write_bytes(bytes(data))


def truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_a_json_file_reads_back_and_a_changed_byte_or_a_cut_is_named(tmp_path):
  path = tmp_path / "x.json"
  outputs.write_json(path, {"scores": [1.5, 2.5]}, checksum=True)
  assert json.loads(outputs.checksum_path(path).read_text()) == outputs.file_checksum(path)
  assert outputs.read_json(path) == {"scores": [1.5, 2.5]}
  assert outputs.verify(path) is True
  flip(path, offset=path.read_text().index("2.5"), mask=0x01)  # 3.5: valid, and wrong
  assert json.loads(path.read_text()) == {"scores": [1.5, 3.5]}
  with pytest.raises(outputs.DamagedFile, match=rf"^{path}: its bytes differ from the "
                     "SHA-256 written with it .*; rewrite it\\.$") as e:
    outputs.read_json(path, hint="rewrite it")
  assert e.value.path == path and "\n" not in str(e.value)
  assert str(pickle.loads(pickle.dumps(e.value))) == str(e.value)  # from a worker process
  outputs.write_json(path, {"scores": [1.5, 2.5]}, checksum=True)
  truncate(path)
  with pytest.raises(outputs.DamagedFile, match=r"x\.json: \d+ bytes where \d+ were written "
                     r"\(truncated or overwritten\)\.$"):
    outputs.read_json(path)


@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_an_array_reads_back_and_damage_is_named(tmp_path, mmap_mode):
  path = tmp_path / "rows.npy"
  rows = np.arange(60, dtype=np.float32).reshape(6, 10)
  outputs.save_npy(path, rows, checksum=True)
  np.testing.assert_array_equal(outputs.load_npy(path, mmap_mode=mmap_mode), rows)
  flip(path, offset=path.stat().st_size - 3)  # a byte of the last row
  assert np.load(path)[-1, -1] != rows[-1, -1]  # numpy alone reads it without a word
  with pytest.raises(outputs.DamagedFile, match="rows.npy: its bytes differ"):
    outputs.load_npy(path, mmap_mode=mmap_mode)
  outputs.save_npy(path, rows, checksum=True)
  truncate(path)
  with pytest.raises(outputs.DamagedFile, match="rows.npy: .* bytes where .* were written"):
    outputs.load_npy(path, mmap_mode=mmap_mode)


def test_a_file_written_before_checksums_is_accepted_recorded_and_said_once(tmp_path, caplog):
  for name in ("a.json", "b.json"):
    outputs.write_json(tmp_path / name, {"name": name})  # no checksum, as before
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    assert outputs.read_json(tmp_path / "a.json") == {"name": "a.json"}
    assert outputs.read_json(tmp_path / "b.json") == {"name": "b.json"}
  said = [r.getMessage() for r in caplog.records if "before checksums" in r.getMessage()]
  assert len(said) == 1 and str(tmp_path) in said[0]  # once for the directory
  assert outputs.verify(tmp_path / "a.json") is True  # recorded: checked from now on
  flip(tmp_path / "a.json", offset=3)
  with pytest.raises(outputs.DamagedFile, match="a.json: its bytes differ"):
    outputs.read_json(tmp_path / "a.json")


def test_an_unreadable_checksum_or_a_missing_file_is_named(tmp_path):
  path = tmp_path / "x.json"
  outputs.write_json(path, {}, checksum=True)
  outputs.checksum_path(path).write_text("{garbage")
  with pytest.raises(outputs.DamagedFile, match=r"x\.json: its checksum x\.json\.sha256 is "
                     "unreadable"):
    outputs.verify(path)
  outputs.remove(path)
  assert not path.exists() and not outputs.checksum_path(path).exists()
  with pytest.raises(FileNotFoundError, match="x.json"):
    outputs.verify(path)


def test_an_interrupted_write_leaves_neither_file_nor_checksum(tmp_path):
  path = tmp_path / "x.npy"
  with pytest.raises(RuntimeError):
    with outputs.atomic_path(path, checksum=True) as tmp:
      np.save(tmp, np.zeros(3))
      raise RuntimeError("interrupted")
  assert list(tmp_path.iterdir()) == []


def test_a_sound_file_is_hashed_once_unless_it_changed_just_now(tmp_path, monkeypatch):
  path = tmp_path / "x.npy"
  outputs.save_npy(path, np.zeros(1000), checksum=True)
  hashed = []
  real = outputs.file_checksum
  monkeypatch.setattr(outputs, "file_checksum", lambda p: hashed.append(p) or real(p))
  outputs.verify(path)
  outputs.verify(path)
  assert len(hashed) == 2  # written just now: its times may not show a change yet
  monkeypatch.setattr(outputs, "_RACY_NS", 0)  # as for a file written long enough ago
  outputs.verify(path)
  outputs.verify(path)
  assert len(hashed) == 3
  with open(path, "ab") as f:  # a change after it was found sound is found all the same
    f.write(b"\0")
  with pytest.raises(outputs.DamagedFile, match="bytes where"):
    outputs.verify(path)
  outputs.forget_verified()
