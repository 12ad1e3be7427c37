"""The checks are library code: nothing in tracin_jax.checks imports a stage, at module level
or inside a function, and importing every checks module loads no stage."""

import ast
import pathlib
import subprocess
import sys

import tracin_jax

CHECKS = pathlib.Path(tracin_jax.__file__).parent / "checks"
MODULES = sorted(p.stem for p in CHECKS.glob("*.py") if p.stem != "__init__")


def _imported(path: pathlib.Path) -> list[str]:
  """Every module an import statement of the file names, wherever the statement is."""
  names = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  return names


def test_no_checks_module_imports_a_stage():
  assert {"stats", "lds", "removal"} <= set(MODULES)
  for path in CHECKS.glob("*.py"):
    stages = [n for n in _imported(path)
              if n == "tracin_jax.stages" or n.startswith("tracin_jax.stages.")]
    assert not stages, f"{path.name} imports {stages}"


def test_the_import_scan_sees_imports_inside_functions(tmp_path):
  sample = tmp_path / "sample.py"
  sample.write_text("def f():\n  from tracin_jax import stages\n  return stages\n")
  assert "tracin_jax.stages" in _imported(sample)


def test_importing_the_checks_loads_no_stage():
  code = ("import sys\n"
          + "".join(f"import tracin_jax.checks.{m}\n" for m in MODULES)
          + "print(sorted(m for m in sys.modules if m.startswith('tracin_jax.stages')))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, timeout=300)
  assert out.stdout.strip() == "[]", out.stdout
