"""The command line in this process: `tracin-jax run|explain`, its flagfiles by name, its
one-line errors with a pointer to what to run, and `--stages=all`."""

import importlib
import logging
import os
import pathlib
import re
import subprocess
import sys
import tomllib

from absl import logging as absl_logging
import pytest

from tracin_jax import experiment
from tracin_jax import explain as tracin_explain
from tracin_jax import stages as stages_lib
from tracin_jax.cli import __main__ as cli_main
from tracin_jax.cli import explain as explain_cli
from tracin_jax.cli import run as run_cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_logging():
  """The command sends the library's log to stdout and quiets absl; other tests' log
  captures need them as they were."""
  logger = logging.getLogger("tracin_jax")
  before = (list(logger.handlers), logger.propagate, logger.level,
            logging.getLogger("asyncio").level, absl_logging.get_verbosity())
  yield
  logger.handlers[:] = before[0]
  logger.propagate, logger.level = before[1], before[2]
  logging.getLogger("asyncio").setLevel(before[3])
  absl_logging.set_verbosity(before[4])


@pytest.fixture(name="runs")
def _runs(monkeypatch):
  """The stages each `experiment.run` of the command was asked for (nothing is run)."""
  calls = []
  monkeypatch.setattr(experiment, "run", lambda config, names, progress: calls.append(names))
  return calls


def test_stages_all_runs_every_stage_in_run_order(runs, tmp_path):
  assert run_cli.cli(["tracin-jax run", f"--workdir={tmp_path}", "--stages=all"]) == 0
  assert run_cli.cli(["tracin-jax run", f"--workdir={tmp_path}"]) == 0
  assert runs == [list(stages_lib.list_stages()), ["train", "influence", "interpret",
                                                   "saliency", "export"]]


def _one_line(capsys) -> str:
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: "), err
  return err.strip()


def test_no_arguments_says_what_to_run(capsys):
  assert run_cli.cli(["tracin-jax run"]) == 1
  assert _one_line(capsys) == ("error: --workdir: required (the run's directory); to run the "
                               "demo: tracin-jax run --flagfile=demo")
  assert explain_cli.cli(["python -m experiments.explain"]) == 1
  assert _one_line(capsys).endswith(
      "; e.g. python -m experiments.explain --flagfile=demo --image=<case>:<slice>")


def test_a_misspelt_flagfile_is_one_clean_line(capsys):
  for cli in (run_cli.cli, explain_cli.cli):
    assert cli(["tracin-jax", "--flagfile=nosuch.flags"]) == 1
    assert _one_line(capsys) == ("error: --flagfile=nosuch.flags: no such file (packaged "
                                 "flagfiles: demo, smoke, brats19_paper, demo3d, smoke3d)")


def test_the_packaged_flagfile_is_read_from_any_directory(runs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert run_cli.cli(["tracin-jax run", "--flagfile=smoke", "--stages=train"]) == 0
  assert runs == [["train"]]


def test_explain_checks_its_flags_before_reading_data(capsys, tmp_path, monkeypatch):
  def explain(*argv):
    assert explain_cli.cli(["tracin-jax explain", f"--workdir={tmp_path}", *argv]) == 1
    return _one_line(capsys)

  assert explain("--image=a:1").endswith(
      "no finished influence stage with its gradient store there; run it first: tracin-jax "
      "run with the same flags (e.g. tracin-jax run --flagfile=demo)")
  monkeypatch.setattr(tracin_explain, "has_store", lambda workdir: True)
  monkeypatch.setattr(explain_cli, "explain_images", lambda *a: pytest.fail("read the data"))
  assert explain().startswith("error: give exactly one of --image=<case>:<slice>,... ")
  assert explain("--image=a:1", "--nifti_case=d").startswith("error: give exactly one of")
  assert explain("--nifti_case=d") == ("error: --nifti_case=d: no such directory (a "
                                       "patient's case folder, holding its four modality "
                                       "files).")
  assert explain(f"--t1={tmp_path}").startswith("error: --t1ce, --t2, --flair: missing")
  assert explain("--image=a:1", "--slice=3").startswith("error: --slice: only with a "
                                                         "patient's scan")
  assert explain(f"--nifti_case={tmp_path}", "--slices=x").startswith(
      "error: --slices=x: all, centre, or axial indices")
  assert explain(f"--nifti_case={tmp_path}", "--explain_saliency=nope").startswith(
      "error: --explain_saliency: unknown nope")
  assert explain(f"--nifti_case={tmp_path}", "--with_truth").startswith(
      "error: --with_truth: only with --image")
  assert explain("--image=a:1", "stray").startswith("error: unexpected argument 'stray'")


def test_the_console_command_dispatches_run_and_explain(capsys, monkeypatch):
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  module, function = pyproject["project"]["scripts"]["tracin-jax"].split(":")
  main = getattr(importlib.import_module(module), function)
  assert main is cli_main.main
  assert main(["tracin-jax", "run", "--help"]) == 0
  assert capsys.readouterr().out == run_cli.usage()
  assert main(["tracin-jax", "explain", "-h"]) == 0
  assert capsys.readouterr().out == explain_cli.usage()
  calls = []
  monkeypatch.setattr(run_cli, "main", lambda argv: calls.append(("run", argv)) or 3)
  monkeypatch.setattr(explain_cli, "main", lambda argv: calls.append(("explain", argv)) or 4)
  assert main(["/usr/bin/tracin-jax", "run", "--flagfile=demo"]) == 3
  assert main(["x", "explain", "--image=a:1"], prog="python -m tracin_jax") == 4
  assert calls == [("run", ["tracin-jax run", "--flagfile=demo"]),
                   ("explain", ["python -m tracin_jax explain", "--image=a:1"])]


def test_the_console_commands_help_lists_the_subcommands_and_no_command_is_one_line(capsys):
  assert cli_main.main(["tracin-jax", "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: tracin-jax <command> [--flag=value ...]\n")
  assert re.search(r"^  run +Run the experiment's stages", out, re.M)
  assert re.search(r"^  explain +Explain new images", out, re.M)
  assert "tracin-jax run --flagfile=demo" in out
  assert cli_main.main(["tracin-jax"]) == 1
  assert _one_line(capsys) == ("error: give a command, run or explain; to run the demo: "
                               "tracin-jax run --flagfile=demo (tracin-jax --help lists the "
                               "commands)")
  assert cli_main.main(["tracin-jax", "train"]) == 1
  assert _one_line(capsys) == ("error: unknown command 'train'; the commands are run, "
                               "explain (tracin-jax --help)")


@pytest.mark.slow  # two processes, each importing JAX
def test_the_command_runs_from_another_directory(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")

  def command(*argv):
    return subprocess.run([sys.executable, "-m", "tracin_jax", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)

  # `python -m tracin_jax` dispatches to the run (its help and the console script's entry are
  # tested in process above), the packaged flagfile is found from here, and absl's app gets
  # as far as the run's checks.
  bad = command("run", "--flagfile=smoke", "--stages=foo")
  assert bad.returncode == 1
  assert bad.stderr.startswith("error: --stages: unknown foo; choose from train, ")
  assert bad.stderr.count("\n") == 1 and not list(tmp_path.iterdir())
