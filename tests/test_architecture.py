"""The import graph of the library: runtime/ on the ground floor, no circles, tools outside.

Read from the source with ``ast`` (every import, including those inside functions),
so a change that breaks the layering fails here, not in a review.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("compile", "nnx_models")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
  """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (imports for annotations never run)."""
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
      yield from (n for orelse in node.orelse for n in [orelse, *_runtime_nodes(orelse)])
      continue
    yield node
    yield from _runtime_nodes(node)


def _import_nodes(path: pathlib.Path) -> list[tuple[str, list[str]]]:
  """``(module, [names])`` of every import in ``path`` (absolute module names; names empty for ``import x``)."""
  name = _module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = []
  for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [(alias.name, []) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
      module = ".".join([*base, node.module] if node.module else base)
      found.append((module, [alias.name for alias in node.names]))
  return found


def _imports(path: pathlib.Path) -> set[str]:
  """The modules ``path`` names in its imports: ``from x import y`` counts x, and x.y where that is a module."""
  return {m for module, names in _import_nodes(path) for m in (module, *(f"{module}.{n}" for n in names))}


MODULES = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
# Where a package's __init__ takes each name it re-exports from: importing the name imports that module.
DEFINED_IN = {
  f"{package}.{name}": module
  for package, path in MODULES.items()
  if path.name == "__init__.py"
  for module, names in _import_nodes(path)
  if module in MODULES
  for name in names
}


def _edges(name: str) -> set[str]:
  """The modules of ours that importing ``name`` imports, a package's names resolved to where they are defined."""
  edges = set()
  for module, names in _import_nodes(MODULES[name]):
    for each in [f"{module}.{n}" for n in names] or [module]:
      target = each if each in MODULES else DEFINED_IN.get(each, module)
      if target in MODULES and target != name:
        edges.add(target)
  return edges


GRAPH = {name: _edges(name) for name in MODULES}


def _reaches(start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for nxt in GRAPH[todo.pop()]:
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_the_graph_was_read():
  assert "compile.runtime._artifact" in MODULES and "compile._export" in MODULES
  assert "compile.runtime._program" in GRAPH["compile.runtime._artifact"]


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("compile.runtime")))
def test_runtime_imports_nothing_of_the_rest_of_compile(name):
  outside = {m for m in _imports(MODULES[name]) if m.split(".")[0] == "compile" and not m.startswith("compile.runtime")}
  assert outside == set(), f"{name} imports {sorted(outside)}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("compile")))
def test_compile_never_imports_nnx_models(name):
  assert not any(m.split(".")[0] == "nnx_models" for m in _imports(MODULES[name])), name


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("compile.spirv")))
def test_the_race_check_needs_no_jax_and_no_compiler(name):
  imported = _imports(MODULES[name])
  assert not {m for m in imported if m.split(".")[0] in ("jax", "jaxlib", "flax")}, name
  allowed = ("compile.spirv", "compile.runtime")
  assert not {m for m in imported if m.startswith("compile") and not m.startswith(allowed) and m != "compile"}, name


def test_the_compiler_uses_only_public_names_of_the_runtime():
  private = {
    (name, m)
    for name, path in MODULES.items()
    if name.startswith("compile") and not name.startswith("compile.runtime")
    for m in _imports(path)
    if m.startswith("compile.runtime._")
  }
  assert private == set()


def test_no_import_circles():
  circles = sorted(name for name in MODULES if name in _reaches(name))
  assert circles == [], f"modules on an import circle: {circles}"
