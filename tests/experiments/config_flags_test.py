"""Flags derived from the configs: one per setting, the old names kept, bad values named."""

import dataclasses
import pathlib
import tomllib

import pytest
from absl import flags

from tracin_jax.cli import config_flags
from tracin_jax import experiment
from tracin_jax import settings
from tracin_jax import stages as stages_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The flag names of the command line before flags were derived from the configs; the
# flagfiles and the README use them.
OLD_FLAGS = """workdir data_dir synthetic_cases synthetic_seed cache_dir groups num_slices
slice_center crop_size image_size val_fraction num_val split_seed skip_bad_cases model
base_width depth norm batch_size adam_epochs sgd_epochs adam_learning_rate weight_decay
sgd_learning_rate augment seed threshold checkpoint_epochs max_checkpoints top_k global_top
global_fraction num_local_panels memory_budget_mb fi_threshold num_scatter_features
regions_per_class num_removed num_random validate_seed retrain_from_epoch
randomisation_examples""".split()


def _parse(*argv):
  fv = flags.FlagValues()
  holder = config_flags.define_flags(experiment.ExperimentConfig, fv)
  fv(["prog", *argv])
  return holder.value()


def test_every_setting_has_one_flag_with_help_and_the_old_names_remain():
  leaves = list(settings.leaves(experiment.ExperimentConfig))
  names = [leaf.flag for leaf in leaves]
  assert len(names) == len(set(names))
  assert set(OLD_FLAGS) <= set(names)
  for leaf in leaves:
    assert leaf.help.endswith((".", ")")), leaf.path
  assert {"background_bias", "eval_batch_size", "influence_block_size",
          "interpret_batch_size"} <= set(names)


def test_defaults_build_the_default_config():
  assert dataclasses.replace(_parse("--workdir=w"), workdir=None) == \
      experiment.ExperimentConfig()


def test_flags_reach_every_level_of_the_config():
  config = _parse("--workdir=w", "--model=resunet", "--image_size=64", "--groups=HGG,LGG",
                  "--checkpoint_epochs=9,10", "--validate_seed=3", "--seed=5",
                  "--influence_block_size=16", "--noaugment", "--background_bias=2.5")
  assert config.train.model.name == "resunet"
  assert config.data.preprocess.image_size == 64
  assert config.data.preprocess.groups == ("HGG", "LGG")
  assert config.influence.checkpoint_epochs == (9, 10)
  assert config.validate.seed == 3 and config.train.seed == 5
  assert config.influence.block_size == 16 and config.train.augment is False
  assert config.train.model.background_bias == 2.5


@pytest.mark.parametrize("argv, message", [
    (["--image_size=7"], "--image_size=7: must be >= 8"),
    (["--threshold=1.5"], "--threshold=1.5: must be strictly between 0 and 1"),
    (["--threshold=-0.5"], "--threshold=-0.5"),
    (["--memory_budget_mb=0"], "--memory_budget_mb=0: must be >= 1"),
    (["--sgd_epochs=0"], "--sgd_epochs=0"),
    (["--model=foo"], "--model=foo: must be one of"),
    (["--num_slices=0"], "--num_slices=0"),
    (["--groups=XYZ"], "--groups=XYZ: must be one of HGG, LGG"),
    (["--batch_size=-1"], "--batch_size=-1"),
    (["--checkpoint_epochs=a"], "--checkpoint_epochs=a: every item must be an integer"),
])
def test_a_bad_value_names_its_flag_and_the_allowed_range(argv, message):
  with pytest.raises(settings.SettingsError) as e:
    _parse("--workdir=w", *argv)
  assert message in str(e.value)


def test_a_misspelled_flag_is_an_error_naming_it():
  with pytest.raises(flags.UnrecognizedFlagError, match="trheshold"):
    _parse("--workdir=w", "--trheshold=0.5")


def test_a_flagfile_gives_the_config_and_stages_a_notebook_can_use():
  config, names = config_flags.from_flagfile(experiment.ExperimentConfig, "demo",
                                             "--workdir=elsewhere")
  assert names == ["train", "influence", "interpret", "saliency", "export"]
  assert config.saliency.instance_samples == 4  # the demo's cheaper instance SmoothGrad
  assert config.workdir == "elsewhere" and config.data.preprocess.image_size == 96
  assert config.train.model.base_width == 8 and config.train.sgd_epochs == 4


def test_the_packaged_flagfiles_are_named_by_name_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  demo = str(config_flags.CONFIGS / "demo.flags")
  for value in ("demo", "demo.flags", "experiments/configs/demo.flags"):  # and its former path
    assert config_flags.resolve_flagfile(value) == demo
  assert config_flags.resolve_flagfiles(["prog", "--flagfile", "smoke", "-flagfile=demo",
                                         "--", "--flagfile=nosuch"]) == [
      "prog", "--flagfile", str(config_flags.CONFIGS / "smoke.flags"), f"-flagfile={demo}",
      "--", "--flagfile=nosuch"]
  config, _ = config_flags.from_flagfile(experiment.ExperimentConfig, "smoke")
  assert config.workdir == "runs/smoke"  # relative to the current directory, as written
  # A file that exists is read as it is, even under a packaged flagfile's name.
  (tmp_path / "demo.flags").write_text("--workdir=mine\n")
  assert config_flags.from_flagfile(experiment.ExperimentConfig, "demo.flags")[0].workdir == \
      "mine"


def test_the_packaged_flagfiles_are_the_ones_listed_and_ship_with_the_package():
  assert sorted(config_flags.FLAGFILES) == sorted(
      p.stem for p in config_flags.CONFIGS.glob("*.flags"))
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "configs/*.flags" in pyproject["tool"]["setuptools"]["package-data"]["tracin_jax"]
  assert not (ROOT / "experiments" / "configs").exists()  # one copy of each


@pytest.mark.parametrize("value, what", [("nosuch.flags", "no such file"),
                                         ("demoo", "no such file"),
                                         ("elsewhere/demo.flags", "no such file"),
                                         (".", "is a directory, not a file")])
def test_a_misspelt_flagfile_is_one_line_listing_the_packaged_ones(value, what):
  with pytest.raises(settings.SettingsError) as e:
    config_flags.resolve_flagfile(value)
  assert str(e.value) == (f"--flagfile={value}: {what} (packaged flagfiles: demo, smoke, "
                          "brats19_paper, demo3d, smoke3d)")


def test_stages_all_is_every_stage_in_run_order():
  every = list(stages_lib.list_stages())
  assert config_flags.stage_names(["all"]) == every
  assert config_flags.stage_names(["lds", "all"]) == every
  assert config_flags.stage_names(["lds", "train"]) == ["train", "lds"]
  with pytest.raises(settings.SettingsError, match="unknown foo; choose from train, .*, or all"):
    config_flags.stage_names(["train", "foo"])


def test_without_stages_a_run_is_the_demos_chain_and_the_paper_flagfile_runs_it_too():
  fv = flags.FlagValues()
  stages, _ = config_flags.define_app_flags(fv)
  fv(["prog"])
  demo = config_flags.from_flagfile(experiment.ExperimentConfig, "demo")[1]
  assert stages.value == demo == list(config_flags.DEFAULT_STAGES)
  # Every stage but the checks by retraining (and the report, which every run writes).
  assert demo == [s for s in stages_lib.list_stages() if s not in ("validate", "lds", "report")]
  paper = config_flags.from_flagfile(experiment.ExperimentConfig, "brats19_paper")[1]
  assert paper == demo


def test_defaults_print_rounded_and_the_value_stays_exact():
  assert config_flags.format_default(52 / 259) == "0.2008 (52/259)"
  assert [config_flags.format_default(v) for v in (1e-4, 1e-5, 0.5, 3.0, None, (20, 80))] == [
      "0.0001", "1e-05", "0.5", "3.0", "unset", "20,80"]
  assert config_flags.format_default(0.123456789) == "0.1235"  # no simple fraction
  text = config_flags.help_text(experiment.ExperimentConfig)
  assert "  --val_fraction (default: 0.2008 (52/259))\n" in text
  fv = flags.FlagValues()
  holder = config_flags.define_flags(experiment.ExperimentConfig, fv)
  assert fv["val_fraction"].default_as_str == "'0.2008 (52/259)'"  # absl's --helpfull
  assert "0.20077" not in text and "0.20077" not in fv.get_help()
  fv(["prog", "--workdir=w"])
  assert holder.value().data.val_fraction == 52 / 259


def test_list_flags_take_any_of_their_choices():
  text = config_flags.help_text(experiment.ExperimentConfig)
  lists = [leaf for leaf in settings.leaves(experiment.ExperimentConfig)
           if config_flags._kind(leaf)[0] == "list"]  # pylint: disable=protected-access
  with_choices = [leaf for leaf in lists if leaf.field.metadata.get("choices")]
  assert {"groups", "saliency_methods", "lds_variants"} <= {leaf.flag for leaf in with_choices}
  for leaf in with_choices:
    entry = text.split(f"--{leaf.flag} (default:")[1].split("\n  --")[0]
    assert "Allowed: any of " in entry and "one of" not in entry, leaf.flag
  assert "Allowed: one of brain, tumour." in " ".join(text.split())  # a single value: one of
  assert "Allowed: each >= 1 (or unset)." in " ".join(text.split())  # --checkpoint_epochs
  stages = " ".join(config_flags.stages_help().split())
  assert ("any of train, influence, interpret, saliency, export, validate, lds, report, or "
          "all") in stages
