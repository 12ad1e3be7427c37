"""The package's layers: knowledge runs one way, from the stages down to the library.

Every import in every module is read from its source (function-level imports included), so
an import that would only run on some path is caught too.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tracin_jax"
# The layers above the library: the command line (`cli`, also `python -m tracin_jax`), the
# orchestration (`experiment`) and the stages it runs.
TOP = ("tracin_jax.__main__", "tracin_jax.cli", "tracin_jax.experiment", "tracin_jax.stages")


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every import in the file, wherever it stands; `from a import b`
  gives both `a` and `a.b` (b may be a module)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against the module's package
        base = module_name(path).split(".")
        base = base[:len(base) - node.level + (path.name == "__init__.py")]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      found.append((node.lineno, module))
      found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
  return found


def within(name: str, layer: str) -> bool:
  return name == layer or name.startswith(layer + ".")


LIBRARY = sorted(p for p in PACKAGE.rglob("*.py")
                 if not any(within(module_name(p), top) for top in TOP))


def test_the_walk_finds_imports_inside_functions(tmp_path):
  source = tmp_path / "probe.py"
  source.write_text("def f():\n  from tracin_jax.stages import base\n  import tracin_jax.stages\n")
  assert [m for _, m in imported(source)] == [
      "tracin_jax.stages", "tracin_jax.stages.base", "tracin_jax.stages"]


def test_the_library_is_everything_below_the_stages():
  names = {module_name(p) for p in LIBRARY}
  assert {"tracin_jax.rundir", "tracin_jax.report", "tracin_jax.explain",
          "tracin_jax.influence.core"} <= names
  assert not any(within(n, "tracin_jax.stages") for n in names)


@pytest.mark.parametrize("path", LIBRARY, ids=module_name)
def test_no_library_module_imports_a_stage_or_the_experiment(path):
  upward = [f"line {line}: {name}" for line, name in imported(path)
            if any(within(name, top) for top in TOP)]
  assert not upward, f"{module_name(path)} imports from above the library: {upward}"


def test_the_run_directory_sits_at_the_bottom():
  """`rundir` is what writers and readers share: it needs nothing of the package but the
  atomic file writes of `outputs`."""
  ours = {name for _, name in imported(PACKAGE / "rundir.py") if within(name, "tracin_jax")}
  assert ours <= {"tracin_jax", "tracin_jax.outputs"}, ours


# The opening of a script run in a fresh process where the layers above the library cannot
# be imported (an import of one raises ImportError).
WITHOUT_THE_STAGES = """
import importlib, importlib.abc, re, sys
class NoStages(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if re.match(r"tracin_jax[.](stages|experiment)([.]|$)", name):
      raise ImportError(f"{name} may not be imported from below the stages")
sys.meta_path.insert(0, NoStages())
"""
_IMPORT_ALL_WITHOUT_THE_STAGES = WITHOUT_THE_STAGES + """
for name in sys.argv[1:]:
  importlib.import_module(name)
"""


@pytest.mark.slow  # a fresh process importing JAX, Flax and the whole library
def test_every_library_module_imports_with_the_stages_unimportable():
  """The same in a fresh process, at import time: each module below the stages imports
  with `tracin_jax.stages` and `tracin_jax.experiment` made unimportable."""
  names = [module_name(p) for p in LIBRARY if p.name != "__main__.py"]
  run = subprocess.run([sys.executable, "-c", _IMPORT_ALL_WITHOUT_THE_STAGES, *names],
                       capture_output=True, text=True, timeout=300, check=False,
                       cwd=PACKAGE.parent)
  assert run.returncode == 0, run.stderr[-3000:]


def test_no_function_of_the_stage_layer_is_longer_than_60_lines():
  """A stage reads as named steps (compute, then write), not as one long run."""
  long = []
  for path in sorted((PACKAGE / "stages").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > 60:
          long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
  assert not long, long
