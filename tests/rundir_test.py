"""The run directory's names and manifests, as writers and readers share them."""

import json

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


def test_unfinished_or_broken_manifests_read_as_absent(tmp_path):
  assert rundir.read_manifest(tmp_path, "train") is None
  (tmp_path / "train").mkdir()
  (tmp_path / "train" / rundir.MANIFEST).write_text("{not json")
  assert rundir.read_manifest(tmp_path, "train") is None
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
