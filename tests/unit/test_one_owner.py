"""The scheduler is the only writer of a model's state, its runner's fields and the lease.

Read from the source with ``ast``: a write to a runner field (``runner.state = ...``,
``runner.progress = ...``, ``runner.died.set()``) anywhere but ``scheduler/scheduler.py``
fails this test, as does a state write or a lease grant/release outside ``Scheduler._move``
or a ``transition(`` call anywhere.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from sparkd.scheduler.runner import ModelRunner

PACKAGE = Path(__file__).resolve().parents[2] / "sparkd"
SCHEDULER = PACKAGE / "scheduler" / "scheduler.py"
RUNNER_FIELDS = {f.name for f in dataclasses.fields(ModelRunner)} - {"config", "spec"}
"""The mutable fields; ``config`` and ``spec`` change only with a reload, also in the scheduler."""


def sources() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def enclosing_functions(tree: ast.Module) -> dict[ast.AST, str]:
    """Each node -> the name of the innermost function that holds it."""
    owner: dict[ast.AST, str] = {}

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            owner[child] = name
            visit(child, name)

    visit(tree, "<module>")
    return owner


def written_attributes(tree: ast.Module) -> list[tuple[ast.Attribute, str]]:
    """(target, attribute) of every assignment to ``<not self>.<attribute>``, tuples unpacked."""
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        while targets:
            target = targets.pop()
            if isinstance(target, ast.Tuple):
                targets.extend(target.elts)
            elif isinstance(target, ast.Attribute) and not (isinstance(target.value, ast.Name) and target.value.id == "self"):
                found.append((target, target.attr))
    return found


def calls(tree: ast.Module) -> list[tuple[ast.Call, str, str]]:
    """(call, method, what it is called on) for every ``x.y.method(...)`` call."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            on = node.func.value
            found.append((node, node.func.attr, on.attr if isinstance(on, ast.Attribute) else getattr(on, "id", "")))
    return found


LEASE_CHANGES = ("grant", "hold_measured", "release")


def test_runner_fields_are_written_only_by_the_scheduler():
    offenders = []
    for path, tree in sources().items():
        for target, attribute in written_attributes(tree):
            if attribute in RUNNER_FIELDS and path != SCHEDULER:
                offenders.append(f"{path.relative_to(PACKAGE)}:{target.lineno} writes .{attribute}")
        for call, method, on in calls(tree):
            if on == "died" and method in ("set", "clear") and path != SCHEDULER:
                offenders.append(f"{path.relative_to(PACKAGE)}:{call.lineno} calls died.{method}()")
    assert offenders == []


def test_state_and_lease_change_only_in_the_one_moving_method():
    tree = sources()[SCHEDULER]
    owner = enclosing_functions(tree)
    state_writes = [owner[t] for t, attribute in written_attributes(tree) if attribute in ("state", "cause")]
    lease_changes = [owner[c] for c, method, on in calls(tree) if on == "lease" and method in LEASE_CHANGES]
    assert state_writes == ["_move", "_move"]  # state and cause, in one assignment
    assert sorted(lease_changes) == ["_move", "_move", "_move"]  # one grant, one measured hold, one release
    for path, other in sources().items():
        if path == SCHEDULER:
            continue
        assert not [c for c, method, on in calls(other) if on == "lease" and method in LEASE_CHANGES], path


def test_nothing_calls_a_transition_method():
    assert [
        f"{path.relative_to(PACKAGE)}:{call.lineno}"
        for path, tree in sources().items()
        for call, method, _ in calls(tree)
        if method in ("transition", "fail")
    ] == []
