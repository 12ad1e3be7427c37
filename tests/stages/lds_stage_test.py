"""The lds stage on the tests' tiny run, and its pure parts: global explainer statistics,
the recommendation and the table."""

import json
import logging

import numpy as np
import pytest
import tiny_run

from tracin_jax import stages
from tracin_jax.stages import lds as lds_stage
from tracin_jax.stages.influence import InfluenceConfig
from tracin_jax.stages.lds import LdsConfig

CONFIGS = {
    "train": tiny_run.CONFIG,
    "influence": InfluenceConfig(threshold=0.5, top_k=3, global_top=3, num_local_panels=1),
    "lds": LdsConfig(num_subsets=4, removal_k=(2,), removal_regions_per_class=1,
                     removal_random=1, projection_dim=16, num_bootstrap=20,
                     removal_skip=("last_checkpoint", "more_checkpoints", "last_layer",
                                   "projected", "representation", "random")),
}


def _context(workdir, configs=CONFIGS):
  return stages.Context(workdir, tiny_run.TRAIN, tiny_run.VAL, data_name="tiny test set",
                        configs=configs, progress=False)


@pytest.fixture(scope="module")
def lds_run(full_run):
  """The train (finished: reused), influence and lds stages on the tiny run: (context, the
  lds result). The influence settings are those of stages_test, which then reuses them."""
  context = _context(full_run[0])
  for name in ("train", "influence"):
    stages.run_stage(stages.get_stage(name, CONFIGS[name]), context)
  return context, stages.run_stage(stages.get_stage("lds", CONFIGS["lds"]), context)


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_every_variant_is_scored_on_the_same_retrainings(lds_run):
  context, result = lds_run
  saved = json.loads((context.workdir / "lds" / "lds.json").read_text())
  assert list(saved["variants"]) == list(lds_stage.VARIANTS)
  assert saved["influence_stage_variant"] == "tracin" and saved["equals_influence_stage"]
  assert saved["deviation_from_influence_stage"] <= 1e-4
  assert saved["num_subsets"] == 4 and saved["subset_size"] == 6
  for name, entry in saved["variants"].items():
    assert -1 <= entry["lds"]["mean"] <= 1 and entry["lds"]["n_subsets"] == 4, name
    assert entry["seconds"] >= 0
    assert ("minus_tracin" in entry) == (name != "tracin")
    # The removal test ran for the variants not skipped, on 1 region per class, with
    # proponents and opponents compared with the shared random set.
    tested = name in ("tracin", "renormalised")
    assert ("removal" in entry) == tested
    if tested:
      assert entry["removal"]["2"]["dice_change"]["proponents"]["n"] == len(
          saved["removal_regions"])
  assert result.recommended == saved["recommended"] in lds_stage.VARIANTS
  retrained = context.workdir / "lds" / "retraining"
  assert len(list(retrained.glob("*/subset_*.npy"))) == 4
  manifest = stages.read_manifest(context.workdir, "lds")
  assert [f["path"] for f in manifest["figures"]][0] == "lds/lds.png"
  assert any("local_tracin_" in f["path"] for f in manifest["figures"])
  assert "| `renormalised` |" in (context.workdir / "lds" / "lds_table.md").read_text()
  loaded = stages.get_stage("lds", CONFIGS["lds"]).load(context)
  assert loaded.summary == saved and loaded.recommended == result.recommended


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_more_subsets_retrain_only_the_new_ones(lds_run, caplog):
  context, _ = lds_run
  configs = dict(CONFIGS, lds=LdsConfig(num_subsets=5, removal_k=(), num_bootstrap=0,
                                        variants=("tracin", "random")))
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    result = stages.run_stage(stages.get_stage("lds", configs["lds"]), _context(
        context.workdir, configs))
  assert "4 of 5 subsets' retrainings reused" in caplog.text
  assert caplog.text.count("retrained and measured") == 1
  assert "lds: scores tracin_epoch3 reused" in caplog.text
  assert list(result.summary["variants"]) == ["tracin", "random"]
  assert "removal" not in result.summary["variants"]["tracin"]


def test_global_explainer_stats_count_the_share_of_top_proponents_and_sizes():
  # 2 classes, 4 validation images, 5 training images: train region (b=0, j=1) is every
  # validation region's top proponent, so it is the one global explainer (top 1).
  rng = np.random.default_rng(0)
  blocks = rng.normal(size=(2, 4, 10))
  blocks[:, :, 1 * 5 + 0] = 10.0
  blocks[1, 3] = np.nan  # an absent validation region
  regions = np.zeros((5, 6, 6, 2), bool)
  regions[0, :2, :1, 1] = True  # the global explainer's region: 2 pixels
  regions[1:, :, :3, :] = True  # the others: 18 pixels
  stats = lds_stage.global_explainer_stats(blocks, regions, top=1, min_fraction=0.5)
  assert stats["count"] == 1 and stats["columns"] == [5]
  assert stats["share_top"] == 1.0
  assert stats["median_size"] == 2 and stats["median_size_rest"] == 18


def test_recommend_needs_a_clearly_positive_difference_from_tracin():
  def entry(mean, low):
    return {"lds": {"mean": mean}, "minus_tracin": {"mean": mean - 0.1, "low": low}}

  summary = {"tracin": {"lds": {"mean": 0.1}}, "a": entry(0.3, -0.01), "b": entry(0.2, 0.02),
             "c": entry(0.25, 0.05), "random": entry(0.9, 0.5)}
  assert lds_stage.recommend(summary) == "c"  # a's interval includes 0; random never counts
  assert lds_stage.recommend({"tracin": summary["tracin"], "a": summary["a"]}) == "tracin"


def test_the_influence_stage_is_checked_against_the_variant_it_computed():
  variant = lds_stage.influence_stage_variant
  assert variant(None) == variant(InfluenceConfig()) == "tracin"
  assert variant(InfluenceConfig(normalize=True)) == "renormalised"
  assert variant(InfluenceConfig(params_filter=("head",))) is None
