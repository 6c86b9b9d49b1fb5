"""The tree's import rule, checked on the source: each layer imports only the
layers below it, nothing imports in a cycle, no module reaches for another
module's private names, and lab/node/ (shipped to nodes) is standard library
only and imports nothing from the rest of lab.

    cli -> core -> scenarios -> cluster -> providers -> images -> host -> model -> errors

lab/testing/ (test doubles) sits on top: only tests and bench import it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[2] / "lab"
LAYERS = ["errors", "model", "host", "images", "providers", "cluster", "scenarios", "core", "cli", "testing"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LAB.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) for every import, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    # Imports under `if TYPE_CHECKING:` are for annotations only: they never run.
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def sources() -> list[Path]:
    return sorted(LAB.rglob("*.py"))


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lab":
        return None
    if len(parts) == 1:
        return "errors"  # lab/__init__: the version only
    return parts[1] if parts[1] in LAYERS or parts[1] == "node" else "errors"


def lab_edges() -> dict[str, set[str]]:
    """module -> lab modules it imports (a name imported from a package counts as its submodule when one exists)."""
    modules = {module_name(path) for path in sources()}
    edges: dict[str, set[str]] = {}
    for path in sources():
        here = module_name(path)
        targets = edges.setdefault(here, set())
        for module, names, _ in imports_of(path):
            if not module.startswith("lab"):
                continue
            subs = [f"{module}.{name}" for name in names if f"{module}.{name}" in modules]
            targets.update(subs or [module])
        targets.discard(here)
    return edges


def test_every_layer_imports_only_layers_below_it():
    wrong = []
    for path in sources():
        here = module_name(path)
        mine = layer_of(here)
        if mine == "node":
            continue
        for module, _, line in imports_of(path):
            theirs = layer_of(module)
            if theirs is None:
                continue
            if theirs == "node":
                continue  # host code may read the node's constants and placement logic
            if LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{path.relative_to(LAB.parent)}:{line}: {mine} imports {module} ({theirs})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycles():
    edges = lab_edges()
    cycles = []
    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if target not in edges:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    # a package's __init__ importing its own submodules is not a cycle of design
    real = [c for c in cycles if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> ")[1:])
            or len({p for p in c.split(" -> ")}) > 2]
    assert not real, "import cycles:\n" + "\n".join(real)


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for path in sources():
        here = module_name(path)
        for module, names, line in imports_of(path):
            if not module.startswith("lab") or module == here:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"{path.relative_to(LAB.parent)}:{line}: {', '.join(private)} from {module}")
    assert not wrong, "private names used across modules:\n" + "\n".join(wrong)


NODE_FILES = sorted((LAB / "node").glob("*.py"))


@pytest.mark.parametrize("path", NODE_FILES, ids=lambda p: p.name)
def test_node_code_is_standard_library_only(path: Path):
    """lab/node/ is copied onto nodes, where only python3 exists: stdlib, and its own siblings."""
    siblings = {p.stem for p in NODE_FILES}
    for module, _, line in imports_of(path):
        top = module.split(".")[0]
        if module.startswith("lab.node"):
            continue  # a relative import of a sibling (the host's way of importing it)
        assert top in sys.stdlib_module_names or top in siblings or top == "__future__", \
            f"{path.name}:{line} imports {module}: nodes have only the standard library"


def test_test_files_have_unique_names():
    """pytest imports test files by their base name: two of one name in tests/unit and tests/real collide."""
    names = [p.name for p in (LAB.parent / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
