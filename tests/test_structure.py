"""The import map: every room imports only from the floors below it (parsed, not imported)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "budgetdraft"

# room -> rooms it may import from (besides itself). A room is a subpackage or a root module.
ALLOWED = {
    "cpu_kernels": set(),
    "models": {"cpu_kernels"},
    "sparsity": {"models"},
    "verification": set(),
    "data": set(),
    "pruning": {"models"},
    "drafters": {"models", "pruning"},
    "parallel": {"models"},
    "decoding": {"models", "sparsity", "verification", "parallel"},
    "specprefill": {"models", "sparsity"},
    "training": {"models", "sparsity", "drafters", "parallel"},
    "evaluation": {"models", "sparsity", "verification", "data", "drafters", "decoding",
                   "specprefill", "parallel"},
    "generation": {"models", "decoding", "drafters", "specprefill"},
    "launch": {"models", "parallel"},
}


def _room(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE).with_suffix("").parts
  return parts[0]


def _imports(path: pathlib.Path):
  """(module, imported names) of every absolute import in a file."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from ((alias.name, ()) for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node.module, tuple(alias.name for alias in node.names)


def _sources():
  return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_never_run_back_up(path):
  room = _room(path)
  assert room in ALLOWED, f"new room {room}: give it a floor in ALLOWED (and the README table)"
  for module, names in _imports(path):
    if module == "budgetdraft":  # `from budgetdraft import drafters`
      targets = set(names)
    elif module.startswith("budgetdraft."):
      targets = {module.split(".")[1]}
    else:
      continue
    for target in targets - {room}:
      assert target in ALLOWED[room], f"{path.name} ({room}) imports {target}"
    if targets - {room}:
      private = [name for name in names if name.startswith("_")]
      assert not private, f"{path.name} imports private names {private} from {module}"


def test_pallas_kernels_import_nothing_from_budgetdraft():
  for path in (ROOT / "pallas_kernels").rglob("*.py"):
    assert not any(module.startswith("budgetdraft") for module, _ in _imports(path)), path


def test_experiments_hold_no_functions_but_main():
  """Entry points parse their config, call the library and write results: no logic of their own."""
  for path in (ROOT / "experiments").glob("*.py"):
    functions = [node.name for node in ast.parse(path.read_text()).body
                 if isinstance(node, ast.FunctionDef)]
    assert functions == ["main"], (path.name, functions)
