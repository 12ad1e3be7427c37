"""The run directory's names and manifests, as writers and readers share them."""

import json
import logging

import numpy as np
import pytest

from tracin_jax import outputs
from tracin_jax import rundir


def test_file_names_of_a_slice_are_safe_and_name_the_class():
  assert rundir.slice_tag("BraTS19 / CBICA_A", 7) == "BraTS19-CBICA_A_z7"
  assert rundir.saliency_file("grid", "case 1", 3, "NCR/NET") == "grid_case-1_z3_NCR-NET.png"
  assert rundir.saliency_file("maps", "c", 3, suffix=".npz") == "maps_c_z3.npz"
  assert rundir.local_panel("c", 3) == "local_c_3.png"
  assert rundir.local_panel("c", 3, "tracin") == "local_tracin_c_3.png"


def test_a_written_manifest_reads_back_with_what_each_figure_shows(tmp_path):
  manifest = rundir.Manifest("saliency", {"k": 1}, "abc")
  manifest.file("saliency/maps.npz", "the maps")
  manifest.figure("saliency/grid_c_z3_ED.png", "a grid", kind=rundir.SALIENCY_GRID,
                  case="c", slice=3, **{"class": "ED"})
  manifest.figure("saliency/other.png", "another figure")
  record = {"stage": "saliency", "settings": manifest.settings, "fingerprint": "abc",
            "files": manifest.files, "figures": manifest.figures, "headline": {}}
  path = rundir.write_manifest(tmp_path, record)
  assert path == tmp_path / "saliency" / rundir.MANIFEST
  read = rundir.read_manifest(tmp_path, "saliency")
  assert read == json.loads(path.read_text())
  assert rundir.Manifest.from_record(read) == manifest
  assert rundir.saliency_grids(read) == {("c", 3, "ED"): manifest.figures[0]}
  assert rundir.saliency_grids(None) == {}


def test_unfinished_manifests_read_as_absent_and_broken_ones_are_named(tmp_path):
  assert rundir.read_manifest(tmp_path, "train") is None
  (tmp_path / "train").mkdir()
  (tmp_path / "train" / rundir.MANIFEST).write_text("{not json")
  with pytest.raises(outputs.DamagedFile, match=r"train/manifest\.json: not valid JSON .*"
                     "run the train stage again"):
    rundir.read_manifest(tmp_path, "train")
  (tmp_path / "train" / rundir.MANIFEST).unlink()
  rundir.write_manifest(tmp_path, {"stage": "lds"})
  rundir.write_manifest(tmp_path, {"stage": "influence"})
  assert [r["stage"] for r in rundir.read_manifests(tmp_path)] == ["influence", "lds"]


def test_the_stages_register_in_the_run_order_of_one_tuple():
  from tracin_jax import experiment  # pylint: disable=g-import-not-at-top
  from tracin_jax import stages  # pylint: disable=g-import-not-at-top

  assert stages.list_stages() == rundir.STAGES
  fields = [f.name for f in experiment.dataclasses.fields(experiment.ExperimentConfig)]
  assert fields == ["workdir", "memory_budget_mb", "data", *rundir.STAGES]
  config = experiment.ExperimentConfig()
  for name in rundir.STAGES:
    assert isinstance(getattr(config, name), stages.get_stage(name).config_cls)


def _written_stage(workdir):
  """A finished toy stage: `influence/scores.npz` and a figure, listed in its manifest."""
  out = workdir / "influence"
  out.mkdir()
  outputs.save_npz(out / "scores.npz", scores=np.arange(12.0))
  (out / "fig.png").write_bytes(b"\x89PNG not really")
  manifest = rundir.Manifest("influence")
  manifest.file("influence/scores.npz", "scores")
  manifest.file("influence/store", "a directory: its files carry their own checksums")
  manifest.figure("influence/fig.png", "a figure")
  (out / "store").mkdir()
  rundir.write_manifest(workdir, {"stage": "influence", "files": manifest.files,
                                  "figures": manifest.figures})
  return out


def test_a_manifest_lists_each_files_checksum_and_a_damaged_file_is_named(tmp_path):
  out = _written_stage(tmp_path)
  record = rundir.read_manifest(tmp_path, "influence")
  entries = {e["path"]: e for e in record["files"] + record["figures"]}
  assert entries["influence/scores.npz"]["sha256"] == outputs.file_checksum(
      out / "scores.npz")["sha256"]
  assert "sha256" not in entries["influence/store"]
  assert entries["influence/fig.png"]["size"] == len(b"\x89PNG not really")
  for damage in (lambda p: p.write_bytes(p.read_bytes()[:-1]),
                 lambda p: p.write_bytes(p.read_bytes()[:-1] + b"!")):
    good = (out / "scores.npz").read_bytes()
    damage(out / "scores.npz")
    with pytest.raises(outputs.DamagedFile, match=r"influence/scores\.npz: .*; run the "
                       r"influence stage again\.$"):
      rundir.read_manifest(tmp_path, "influence")
    (out / "scores.npz").write_bytes(good)
    assert rundir.read_manifest(tmp_path, "influence") == record
  text = (out / rundir.MANIFEST).read_text()
  (out / rundir.MANIFEST).write_text(text.replace("a figure", "A figure"))  # still JSON
  with pytest.raises(outputs.DamagedFile, match=r"influence/manifest\.json: its bytes differ"):
    rundir.read_manifest(tmp_path, "influence")


def test_a_manifest_written_before_checksums_is_accepted_and_recorded(tmp_path, caplog):
  out = _written_stage(tmp_path)
  record = json.loads((out / rundir.MANIFEST).read_text())
  for e in record["files"] + record["figures"]:
    for key in ("sha256", "size"):
      e.pop(key, None)
  (out / rundir.MANIFEST).write_text(json.dumps(record))  # as an earlier version wrote it
  outputs.checksum_path(out / rundir.MANIFEST).unlink()
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    read = rundir.read_manifest(tmp_path, "influence")
  assert "written before checksums" in caplog.text
  assert read["files"][0]["sha256"] == outputs.file_checksum(out / "scores.npz")["sha256"]
  assert rundir.read_manifest(tmp_path, "influence") == read  # recorded in it
  (out / "scores.npz").write_bytes(b"not the scores")
  with pytest.raises(outputs.DamagedFile, match="scores.npz"):
    rundir.read_manifest(tmp_path, "influence")
