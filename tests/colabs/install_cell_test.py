"""The first code cell of every notebook: installs from a clone in Colab, nothing elsewhere."""

import importlib.util
import pathlib
import subprocess
import sys
import types

import pytest
from notebook_run import COLABS, code_cells, read

NOTEBOOKS = sorted(p.name for p in COLABS.glob("*.ipynb"))
URL = "https://example.org/copy-of/tracin_jax.git"


def test_every_notebook_is_tested():
  tests = pathlib.Path(__file__).parent
  assert NOTEBOOKS and all((tests / f"{n[:-len('.ipynb')]}_test.py").exists() for n in NOTEBOOKS)


def _run_cell(name, monkeypatch, tmp_path, *, colab, installed, url=""):
  """Executes the notebook's first code cell; returns the commands it ran."""
  source = code_cells(read(name))[0].source
  assert 'REPO_URL = ""' in source, "the cell names REPO_URL for the user to set"
  source = source.replace('REPO_URL = ""', f"REPO_URL = {url!r}")
  calls = []
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(list(cmd)))
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: (
      real_find_spec(n, *a) if n != "tracin_jax" or installed else None))
  if colab:
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  else:
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
  exec(compile(source, name, "exec"), {})  # pylint: disable=exec-used
  return calls


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_first_cell_clones_and_installs_in_colab(name, monkeypatch, tmp_path):
  calls = _run_cell(name, monkeypatch, tmp_path, colab=True, installed=False, url=URL)
  assert calls == [["git", "clone", "--depth=1", URL, "tracin_jax_repo"],
                   [sys.executable, "-m", "pip", "install", "-q", "-e", "tracin_jax_repo"]]
  assert sys.path[0] == str(tmp_path / "tracin_jax_repo")  # importable without a restart


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_first_cell_asks_for_the_url(name, monkeypatch, tmp_path):
  with pytest.raises(ValueError, match="REPO_URL"):
    _run_cell(name, monkeypatch, tmp_path, colab=True, installed=False)


@pytest.mark.parametrize("name", NOTEBOOKS)
@pytest.mark.parametrize("colab,installed", [(False, False), (False, True), (True, True)])
def test_first_cell_does_nothing_outside_colab_or_once_installed(name, colab, installed,
                                                                  monkeypatch, tmp_path):
  assert _run_cell(name, monkeypatch, tmp_path, colab=colab, installed=installed) == []
