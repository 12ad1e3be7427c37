"""No module of tracin_jax uses another module's private (leading underscore) names.

A name another module needs is public and documented where it lives (optax keeps shared
helpers public in small modules rather than reaching into another transform's privates).
The check walks each module's syntax tree for `alias._name`, where `alias` is bound by an
import of a tracin_jax module.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tracin_jax"

# Uses allowed for now, each to be made public where it lives; the list only shrinks.
KNOWN: set[tuple[str, str]] = set()


def _is_module(dotted: str) -> bool:
  path = ROOT.joinpath(*dotted.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _module_aliases(tree: ast.AST, module: str, is_package: bool) -> set[str]:
  """Names the module binds to tracin_jax modules by its imports (anywhere in it)."""
  aliases = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "tracin_jax":
          aliases.add(alias.asname or "tracin_jax")
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the module's package, up level - 1 packages
        parts = module.split(".")[:len(module.split(".")) - (0 if is_package else 1)]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      if base.split(".")[0] != "tracin_jax":
        continue
      for alias in node.names:
        if _is_module(f"{base}.{alias.name}"):
          aliases.add(alias.asname or alias.name)
  return aliases


def _root_name(node: ast.AST) -> str | None:
  while isinstance(node, ast.Attribute):
    node = node.value
  return node.id if isinstance(node, ast.Name) else None


def private_uses(source: str, module: str, is_package: bool = False) -> list[str]:
  """`alias.(...)._name` expressions of `source` whose root is an imported tracin_jax
  module, as written ("core._Data")."""
  tree = ast.parse(source)
  aliases = _module_aliases(tree, module, is_package)
  found = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and not node.attr.startswith("__") and _root_name(node.value) in aliases):
      found.append(ast.unparse(node))
  return found


def test_the_check_finds_a_private_use():
  source = ("from tracin_jax.influence import core\n"
            "from tracin_jax.influence import influence\n"
            "import tracin_jax.influence.store as store_lib\n"
            "def f(x):\n"
            "  from . import gram\n"
            "  return core._Data(x), influence._x, store_lib._runs, gram._Sink, x._y\n")
  # `influence` here is the function, not a module; `x` is no module at all.
  assert sorted(private_uses(source, "tracin_jax.influence.segmentation")) == [
      "core._Data", "gram._Sink", "store_lib._runs"]


def test_no_module_uses_another_modules_private_names():
  found = set()
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(ROOT)
    module = ".".join(rel.with_suffix("").parts)
    is_package = path.name == "__init__.py"
    if is_package:
      module = module.rsplit(".", 1)[0]
    for use in private_uses(path.read_text(), module, is_package):
      found.add((rel.as_posix(), use))
  new = sorted(found - KNOWN)
  assert not new, ("modules use other modules' private names (make the name public, with a "
                   f"docstring, where it lives): {new}")
  assert not KNOWN - found, f"no longer used, so no longer allowed: {sorted(KNOWN - found)}"
