"""Issue 15 acceptance b: the import graph of ``sparkd/`` has no cycle.

The graph is read with ``ast`` from the source, so every import counts: those under
``if TYPE_CHECKING:``, inside functions, and relative ones (``from ..config import X``).
A package's ``__init__`` is a node of its own; importing ``a.b.c`` is an edge to
``a.b.c`` only (that Python also runs ``a/__init__`` and ``a/b/__init__`` first adds
no edge: a parent package that imported its child would otherwise always be a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules_of(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package's ``__init__``)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def imported_names(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module name an import in ``tree`` may refer to, relative imports resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                names.add(submodule if submodule in known else source)
    return names


def import_graph(root: Path, package: str = "sparkd") -> dict[str, set[str]]:
    modules = modules_of(root, package)
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in modules.items():
        targets = set()
        for name in imported_names(ast.parse(path.read_text(), str(path)), module, is_package, known):
            while name and name not in known:  # `from pkg.mod import function` → pkg.mod
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_path_within(graph, component) for component in components]


def _path_within(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_sparkd_has_no_import_cycle():
    found = cycles(import_graph(ROOT))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_the_graph_holds_type_checking_relative_and_from_imports():
    graph = import_graph(ROOT)
    assert "sparkd.http.app" in graph["sparkd.daemon"]  # from .http.app import build_app
    assert "sparkd.scheduler.scheduler" in graph["sparkd.scheduler.status"]  # under TYPE_CHECKING
    assert "sparkd.config" in graph["sparkd.http.routing"]  # from ..config import Config (a package)
    assert "sparkd.config.keys" in graph["sparkd.http.auth"]  # from ..config.keys import ...


def test_no_route_module_imports_the_daemon():
    graph = import_graph(ROOT)
    offenders = sorted(module for module, targets in graph.items() if module.startswith("sparkd.http") and "sparkd.daemon" in targets)
    assert offenders == []


def test_a_cycle_through_type_checking_and_relative_imports_is_found(tmp_path: Path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .b import B\n")
    (package / "a.py").write_text("from .sub.b import B\n")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import C\nclass B: ...\n"
    )
    (package / "c.py").write_text("def f():\n    from pkg import a\n")
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    (package / "c.py").write_text("")
    assert cycles(import_graph(tmp_path, "pkg")) == []
