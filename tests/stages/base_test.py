"""Tests of the stage contract's plumbing: parts, manifests, reuse, the atomic writer."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from tracin_jax import outputs
from tracin_jax.data.slices import SliceSet
from tracin_jax.stages import base


def _tiny_sets():
  images = np.zeros((2, 4, 4, 4), np.float32)
  labels = np.zeros((2, 4, 4), np.int32)
  return (SliceSet(images, labels, np.array(["a", "b"]), np.array([0, 0], np.int32)),
          SliceSet(images[:1], labels[:1], np.array(["c"]), np.array([0], np.int32)))


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  value: int = 1


@dataclasses.dataclass
class ToyResult:
  total: int
  manifest: base.Manifest


class ToyStage(base.StageBase):
  """Writes value * 10 into toy/out.json; counts its runs."""

  name = "toy"
  config_cls = ToyConfig
  needs = ()
  runs = 0

  def fingerprint(self, context):
    return base.inputs_key({"value": self.config.value, "data": context.data_fingerprint()})

  def run(self, context):
    type(self).runs += 1
    out = context.stage_dir(self.name)
    outputs.write_json(out / "out.json", {"total": self.config.value * 10})
    manifest = self.manifest()
    manifest.file("toy/out.json", "the value times ten, as a toy output")
    manifest.headline["total"] = self.config.value * 10
    return ToyResult(self.config.value * 10, manifest)

  def load(self, context):
    total = json.loads((context.workdir / "toy" / "out.json").read_text())["total"]
    return ToyResult(total, base.Manifest.from_record(
        base.read_manifest(context.workdir, self.name)))


def test_run_stage_writes_the_manifest_then_reuses_until_settings_change(tmp_path):
  train, val = _tiny_sets()
  context = base.Context(tmp_path, train, val, data_name="toy data", synthetic=True)
  ToyStage.runs = 0
  result = base.run_stage(ToyStage(ToyConfig(2)), context)
  assert result.total == 20 and ToyStage.runs == 1
  manifest = json.loads((tmp_path / "toy" / "manifest.json").read_text())
  assert manifest["settings"] == {"value": 2} and manifest["synthetic"] is True
  assert manifest["data"] == "toy data" and manifest["headline"] == {"total": 20}
  assert manifest["files"] == [{"path": "toy/out.json",
                                "description": "the value times ten, as a toy output",
                                **outputs.file_checksum(tmp_path / "toy" / "out.json")}]
  assert set(manifest["versions"]) >= {"python", "jax", "flax", "numpy", "tracin_jax"}

  again = base.run_stage(ToyStage(ToyConfig(2)), base.Context(tmp_path, train, val))
  assert again.total == 20 and ToyStage.runs == 1  # reused, not run
  (tmp_path / "toy" / "out.json").unlink()  # a listed file missing: not finished
  base.run_stage(ToyStage(ToyConfig(2)), base.Context(tmp_path, train, val))
  assert ToyStage.runs == 2
  changed = base.run_stage(ToyStage(ToyConfig(3)), base.Context(tmp_path, train, val))
  assert changed.total == 30 and ToyStage.runs == 3


def test_a_manifest_listing_a_missing_file_is_refused(tmp_path):
  train, val = _tiny_sets()
  context = base.Context(tmp_path, train, val)
  manifest = base.Manifest("toy", fingerprint="x")
  manifest.file("toy/never_written.json", "a file the stage did not write")
  with pytest.raises(base.StageError, match="never_written"):
    base.write_manifest(context, manifest, 1.0)


def test_data_fingerprint_covers_images_labels_and_ids():
  train, val = _tiny_sets()
  key = base.Context("w", train, val).data_fingerprint()
  images = train.images.copy()
  images[0, 0, 0, 0] = 1.0
  other = SliceSet(images, train.labels, train.case_ids, train.slice_indices)
  assert base.Context("w", other, val).data_fingerprint() != key
  renamed = SliceSet(train.images, train.labels, np.array(["a", "z"]), train.slice_indices)
  assert base.Context("w", renamed, val).data_fingerprint() != key
  assert base.Context("w", train, val).data_fingerprint() == key


def test_parts_are_saved_reused_and_a_change_of_inputs_is_named(tmp_path, caplog):
  calls = []

  def compute(v):
    calls.append(v)
    return np.full(3, v, np.float32)

  parts = base.Parts(tmp_path, {"threshold": 0.8, "data": "abc"}, what="toy")
  np.testing.assert_array_equal(parts.get("epoch1", lambda: compute(1)), [1, 1, 1])
  parts.save("job", {"removed": [1, 2]})
  again = base.Parts(tmp_path, {"threshold": 0.8, "data": "abc"}, what="toy")
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    np.testing.assert_array_equal(again.get("epoch1", lambda: compute(9)), [1, 1, 1])
  assert calls == [1] and "toy: epoch1 reused" in caplog.text
  assert again.load("job") == {"removed": [1, 2]} and again.load("missing") is None
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    changed = base.Parts(tmp_path, {"threshold": 0.5, "data": "abc"}, what="toy")
  assert "inputs changed" in caplog.text and "(threshold)" in caplog.text
  assert changed.dir != parts.dir and changed.load("epoch1") is None
  assert json.loads((changed.dir / "inputs.json").read_text())["threshold"] == 0.5


def test_atomic_path_leaves_the_old_file_on_an_error(tmp_path):
  path = tmp_path / "x.json"
  outputs.write_json(path, {"a": 1})
  with pytest.raises(RuntimeError):
    with outputs.atomic_path(path) as tmp:
      tmp.write_text("half")
      raise RuntimeError("interrupted")
  assert json.loads(path.read_text()) == {"a": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
  outputs.save_npz(tmp_path / "y.npz", a=np.arange(3))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "y.npz"]


def _flip_last_digit(path):
  """Changes a file's last digit (its JSON stays valid, its number wrong)."""
  text = path.read_text()
  i = max(text.rfind(d) for d in "0123456789")
  path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])


def test_a_damaged_output_is_named_and_run_again_or_refused_where_needed(tmp_path, caplog,
                                                                        monkeypatch):
  monkeypatch.setitem(base._STAGES, "toy", ToyStage)  # pylint: disable=protected-access
  train, val = _tiny_sets()
  ToyStage.runs = 0
  base.run_stage(ToyStage(ToyConfig(2)), base.Context(tmp_path, train, val))
  out = tmp_path / "toy" / "out.json"
  _flip_last_digit(out)
  assert json.loads(out.read_text()) == {"total": 21}  # read blindly, a wrong number
  context = base.Context(tmp_path, train, val)
  context.configs["toy"] = ToyConfig(2)
  with pytest.raises(outputs.DamagedFile, match=rf"^{out}: its bytes differ .*; run the toy "
                     r"stage again\.$"):
    context.need("toy")  # a later stage's need: refused, naming the file
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    again = base.run_stage(ToyStage(ToyConfig(2)), base.Context(tmp_path, train, val))
  assert ToyStage.runs == 2 and again.total == 20  # run again, not reused
  warned = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and warned[0].getMessage().startswith(f"toy: {out}: its bytes")
  assert context.need("toy").total == 20


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("kind", ["npy", "json"])
def test_a_damaged_part_is_named_and_computed_again(tmp_path, caplog, kind, damage):
  value = (np.linspace(0, 1, 40, dtype=np.float32) if kind == "npy"
           else {"region_dice": [0.25, 0.75]})
  parts = base.Parts(tmp_path, {"run": "x"}, what="toy")
  parts.save("part", value)
  path = parts.dir / f"part.{kind}"
  data = bytearray(path.read_bytes())
  if damage == "flip":
    data[-3] ^= 0x01  # a bit of the last float (still an array), a byte of the JSON
  else:
    data = data[:len(data) // 2]
  path.write_bytes(bytes(data))
  calls = []
  again = base.Parts(tmp_path, {"run": "x"}, what="toy")
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    assert not again.has("part")
    got = again.get("part", lambda: calls.append(1) or value)
  assert calls == [1]
  if kind == "npy":
    np.testing.assert_array_equal(got, value)
  else:
    assert got == value
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and warned[0].startswith(f"toy: {path}: ")
  assert warned[0].endswith("; computing it again.")
  assert again.has("part") and outputs.verify(path)  # saved anew, with its checksum
