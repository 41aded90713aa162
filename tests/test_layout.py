"""The house rules of docs/design.md section 2 that a reader can check mechanically."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

#: Functions allowed past MAX_LINES: they read as a list (a figure's panels, NetCDF attributes).
LONG_ALLOWED = {"plots.plot_occurrence", "occurrence.to_dataset"}
MAX_LINES = 80


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules ``name`` imports at import time (TYPE_CHECKING blocks aside)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {t for t in targets if t in known and t != name}
    return found


def test_the_package_has_no_import_cycle():
    trees = _modules()
    graph = {n: _imports(n, t, set(trees)) for n, t in trees.items()}
    # A package's __init__ re-exporting its submodules is not a cycle of the design.
    for n in graph:
        graph[n] = {m for m in graph[n] if not (n.startswith(m + ".") and m in graph)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m) :] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                key = f"{name.removeprefix('pipeline.')}.{node.name}"
                if n > MAX_LINES and key not in LONG_ALLOWED:
                    long.append(f"{key} ({n} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)


def test_the_code_cites_the_design_users_have():
    cites = [
        str(p.relative_to(PACKAGE.parent))
        for p in PACKAGE.rglob("*")
        if p.suffix in (".py", ".yaml") and "DESIGN.md" in p.read_text()
    ]
    assert not cites, f"cite docs/design.md, not DESIGN.md: {cites}"
    assert (PACKAGE.parent / "docs" / "design.md").is_file()
