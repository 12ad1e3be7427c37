"""The lds stage on the tests' tiny run, and its pure parts: global explainer statistics,
the recommendation and the table."""

import dataclasses
import json
import logging

import numpy as np
import pytest
import tiny_run

from tracin_jax import models
from tracin_jax import stages
from tracin_jax.checks import ceiling as ceiling_lib
from tracin_jax.checks import lds as lds_lib
from tracin_jax.checks import removal
from tracin_jax.settings import SettingsError
from tracin_jax.stages import lds as lds_stage
from tracin_jax.stages.influence import InfluenceConfig
from tracin_jax.stages.lds import LdsConfig

CONFIGS = {
    "train": tiny_run.CONFIG,
    "influence": InfluenceConfig(threshold=0.5, top_k=3, global_top=3, num_local_panels=1),
    # Every variant, the metagradient's on 1 region per class; the noise ceiling on the
    # first 3 of the 4 subsets.
    "lds": LdsConfig(num_subsets=4, removal_k=(2,), removal_regions_per_class=1,
                     removal_random=1, projection_dim=16, num_bootstrap=20,
                     removal_skip=("last_checkpoint", "more_checkpoints", "last_layer",
                                   "projected", "representation", "random"),
                     variants=tuple(lds_stage.VARIANTS), ceiling_subsets=3,
                     metagradient_regions_per_class=1),
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
                                        variants=("tracin", "random"), ceiling_subsets=3))
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    result = stages.run_stage(stages.get_stage("lds", configs["lds"]), _context(
        context.workdir, configs))
  assert "4 of 5 subsets' retrainings reused" in caplog.text
  assert "3 of 3 subsets' retrainings reused" in caplog.text  # the ceiling's, as they were
  assert caplog.text.count("retrained and measured") == 1
  assert "lds: scores tracin_epoch3 reused" in caplog.text
  assert list(result.summary["variants"]) == ["tracin", "random"]
  assert "removal" not in result.summary["variants"]["tracin"]


def _saved_soft_dice(directory, masks):
  """[R, M] soft Dice of the retrainings saved in one of the stage's retraining stores."""
  (key,) = [p.parent for p in directory.glob("*/inputs.json")]
  return np.stack([np.load(key / f"{lds_lib.subset_name(m)}.npy")[0] for m in masks], 1)


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_the_noise_ceiling_is_the_saved_retrainings_correlation(lds_run):
  context, result = lds_run
  config, saved = CONFIGS["lds"], result.summary
  masks = lds_lib.sample_subsets(len(context.train_set), config.num_subsets, config.fraction,
                                 config.seed)
  soft = _saved_soft_dice(context.workdir / "lds" / "retraining", masks)  # [R, 4]
  other = _saved_soft_dice(context.workdir / "lds" / "retraining_other_order", masks[:3])
  assert not np.allclose(soft[:, :3], other)  # another data order retrains otherwise
  expected = ceiling_lib.noise_ceiling(soft[:, :3].T, other.T, num_bootstrap=20)
  ceiling = saved["ceiling"]
  assert ceiling["num_subsets"] == 3 and ceiling["order_seed"] == 1
  for key in ("mean", "low", "high", "n_outputs"):
    assert ceiling[key] == pytest.approx(expected[key], abs=1e-12), key
  # Each row's fraction of it, on the same 3 subsets and its own regions.
  source = lds_stage._scores_source(context, context.need("influence"), config,
                                    lds_stage._depends(context, context.need("influence")),
                                    log=lambda _: None)
  regions = lds_stage.lds_regions(context.need("influence").presence_test)
  scored = lds_stage._score_variants(source, ["tracin", "renormalised"], regions, masks)
  for name in ("tracin", "renormalised"):
    fraction = ceiling_lib.lds_fraction(scored.predicted[name][:, :3], soft[:, :3].T, other.T,
                                        num_bootstrap=20)
    entry = saved["variants"][name]
    assert entry["ceiling_fraction"]["fraction"] == pytest.approx(fraction["fraction"])
    assert entry["ceiling_fraction"]["low"] == pytest.approx(fraction["low"])
    other_lds = lds_lib.lds(scored.predicted[name][:, :3], other, num_bootstrap=0)
    assert entry["lds_on_both"]["other_order"]["mean"] == pytest.approx(other_lds["mean"])
  table = lds_stage.table(saved)  # (the file: the last run's, maybe another test's)
  assert "LDS / ceiling" in table and "Noise ceiling of the LDS (the first 3 subsets" in table


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_the_metagradient_variant_is_run_metagradients_on_its_regions(lds_run):
  from tracin_jax.training import metagradient  # pylint: disable=g-import-not-at-top
  from tracin_jax.training.retrain import Retrainer  # pylint: disable=g-import-not-at-top

  context, result = lds_run
  inputs, saved = context.need("influence"), result.summary
  chosen = lds_stage.sampled_regions("metagradient", inputs.presence_test, CONFIGS["lds"])
  assert len(chosen) == len({i for _, i in chosen}) == inputs.presence_test.any(0).sum()
  # An equal soft Dice function (equal instances share the compiled replay), called directly.
  soft_dice = removal.RegionSoftDice(inputs.apply_fn, context.val_set, inputs.val_regions,
                                     chosen)
  retrainer = Retrainer(context.workdir, context.train_set)
  _, grads = metagradient.run_metagradients(retrainer, soft_dice)
  (part,) = (context.workdir / "lds" / "scores").glob("*/metagradient_1per_class_seed0.npy")
  np.testing.assert_array_equal(np.load(part), grads)
  assert grads.shape == (len(chosen), len(context.train_set)) and np.abs(grads).max() > 0
  # The function differentiated is the soft Dice the retrainings measure.
  model, _ = retrainer.start()
  measured = removal.evaluator(inputs.apply_fn, context.val_set, inputs.val_regions,
                               chosen)(model)[0]
  np.testing.assert_allclose(soft_dice(*models.functional(model)[1:]), measured, atol=1e-6)
  entry = saved["variants"]["metagradient"]
  names = inputs.class_names
  covered = [[context.val_set.ids[a][0], int(context.val_set.ids[a][1]), names[i]]
             for a, i in chosen]
  assert entry["regions"] == covered == saved["sampled_regions"]["metagradient"]
  assert entry["lds"]["n_outputs"] <= len(chosen) and "removal" not in entry
  assert entry["global_explainers"] is None and "minus_renormalised" in entry
  assert all(v["regions"] == "all" for n, v in saved["variants"].items() if n != "metagradient")
  # Every row's LDS on those regions, for a paired comparison; the metagradient's own is
  # its LDS.
  assert entry["lds_on_sampled"]["metagradient"]["mean"] == pytest.approx(entry["lds"]["mean"])
  assert "metagradient" in saved["variants"]["tracin"]["lds_on_sampled"]
  row = [line for line in lds_stage.table(saved).splitlines()
         if line.startswith("| `metagradient` |")]
  assert row and f"| {len(chosen)} sampled |" in row[0]


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_a_second_run_reuses_every_part(lds_run, caplog):
  context, result = lds_run
  stage = stages.get_stage("lds", CONFIGS["lds"])
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    again = stage.compute(context)  # past the stage's reuse: its parts are reused
  assert "retrained and measured" not in caplog.text
  assert " done in " not in caplog.text  # no scores computed
  assert "4 of 4 subsets' retrainings reused" in caplog.text
  assert "3 of 3 subsets' retrainings reused" in caplog.text
  assert "lds: scores metagradient_1per_class_seed0 reused" in caplog.text
  for name, entry in result.summary["variants"].items():
    assert again.summary["variants"][name]["lds"] == entry["lds"], name
  assert again.summary["ceiling"]["mean"] == result.summary["ceiling"]["mean"]


def test_new_settings_at_values_that_add_nothing_keep_the_fingerprint():
  plain = {f.name for f in dataclasses.fields(LdsConfig)} - {
      "ceiling_subsets", "ceiling_order_seed", "metagradient_regions_per_class"}
  settings = stages.get_stage("lds", LdsConfig(ceiling_subsets=0)).fingerprint_settings(None)
  assert set(settings) == plain and "metagradient" not in settings["variants"]
  assert "metagradient" not in LdsConfig().variants and "metagradient" in lds_stage.VARIANTS
  settings = stages.get_stage("lds", LdsConfig(variants=("tracin", "metagradient"))
                              ).fingerprint_settings(None)
  assert {"ceiling_subsets", "ceiling_order_seed", "metagradient_regions_per_class"} <= set(
      settings)


@pytest.mark.parametrize("config, flag", [
    (LdsConfig(ceiling_subsets=2, removal_k=(2,)), "--lds_ceiling_subsets=2"),
    (LdsConfig(num_subsets=2, removal_k=(2,)), "--lds_ceiling_subsets=20"),  # 2 subsets
])
def test_a_ceiling_on_fewer_than_3_subsets_is_refused_by_name(tmp_path, config, flag):
  with pytest.raises(SettingsError, match=flag):
    stages.get_stage("lds", config).check(_context(tmp_path))


def test_bad_new_settings_are_refused_by_name():
  from tracin_jax import settings  # pylint: disable=g-import-not-at-top

  for config, flag in [(LdsConfig(metagradient_regions_per_class=0),
                        "lds_metagradient_regions_per_class"),
                       (LdsConfig(ceiling_order_seed=-1), "lds_ceiling_order_seed"),
                       (LdsConfig(ceiling_subsets=-1), "lds_ceiling_subsets"),
                       (LdsConfig(variants=("trak",)), "lds_variants")]:
    with pytest.raises(SettingsError, match=flag):
      settings.check(config)


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
