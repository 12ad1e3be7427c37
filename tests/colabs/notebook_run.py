"""Executing the notebooks in colabs/ and reading what they printed and drew."""

import pathlib

import nbformat
from nbclient import NotebookClient

COLABS = pathlib.Path(__file__).resolve().parents[2] / "colabs"


def code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def outputs_text(nb) -> str:
  """The text a notebook printed (streams and plain-text results)."""
  parts = []
  for c in code_cells(nb):
    for o in c.get("outputs", []):
      parts.append(o.get("text", "") or o.get("data", {}).get("text/plain", ""))
  return "".join(parts)


def images(nb) -> list[str]:
  """The PNG outputs of a notebook, base64."""
  return [o["data"]["image/png"] for c in code_cells(nb) for o in c.get("outputs", [])
          if "image/png" in o.get("data", {})]


def read(name: str):
  return nbformat.read(COLABS / name, as_version=4)


def check_stripped(name: str) -> None:
  """The committed notebook holds no outputs and no execution counts."""
  for i, c in enumerate(code_cells(read(name))):
    assert not c.get("outputs"), f"{name}: code cell {i} has outputs in git"
    assert c.get("execution_count") is None, f"{name}: code cell {i} has an execution count"


def execute(name: str, tmp_path, monkeypatch, run=None):
  """Executes colabs/<name> top to bottom in tmp_path (with the toy run, if given)."""
  if run is not None:
    workdir, cache = run
    monkeypatch.setenv("TRACIN_JAX_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("TRACIN_JAX_CACHE", str(cache))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = read(name)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  return nb
