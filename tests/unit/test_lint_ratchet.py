"""The static checks' configuration in pyproject.toml only ever gets stricter (issue 15).

tests/run-all.sh fails on any ruff or mypy finding; what keeps that meaningful is
checked here: mypy stays strict over sparkd/ and the test fakes, no module of sparkd
is excluded from either tool (the temporary exclusion list of issue 15 is gone and
stays gone), ruff keeps its complexity limit and rule set, and every silenced check
in sparkd/ names its code and says why.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
TYPE_CHECKED_FAKES = ("tests/fake_runtime.py", "tests/fake_lifecycle.py")
"""Test fakes that stand in for sparkd's Protocols: mypy checks them against those."""

NOQA = re.compile(r"#\s*noqa\b(?P<codes>:\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)?(?P<why>\s+-\s+\S.*)?")
TYPE_IGNORE = re.compile(r"#\s*type:\s*ignore\b(?P<codes>\[[a-z-]+(?:\s*,\s*[a-z-]+)*\])?")


def pyproject() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def sources() -> list[Path]:
    return sorted((REPO / "sparkd").rglob("*.py"))


def test_mypy_is_strict_over_sparkd_and_the_test_fakes() -> None:
    mypy = pyproject()["tool"]["mypy"]
    assert mypy["strict"] is True
    assert "sparkd" in mypy["files"]
    for fake in TYPE_CHECKED_FAKES:
        assert fake in mypy["files"], f"{fake} left mypy's files: nothing checks it against its Protocol"
        assert (REPO / fake).is_file(), fake


def test_no_module_is_excluded_from_mypy() -> None:
    for override in pyproject()["tool"]["mypy"].get("overrides", []):
        names = override["module"]
        names = [names] if isinstance(names, str) else names
        loosened = set(override) - {"module", "ignore_missing_imports"}
        assert not loosened, f"an override loosens {sorted(loosened)} for {names}"
        assert not any(str(name).startswith(("sparkd", "tests")) for name in names), override


def test_no_module_of_sparkd_is_excluded_from_ruff() -> None:
    lint = pyproject()["tool"]["ruff"]["lint"]
    ignores = lint.get("per-file-ignores", {})
    excluded = sorted(path for path in ignores if not path.startswith("tests/"))
    assert not excluded, f"ruff's per-file-ignores exclude sparkd's own modules: {excluded}"
    assert all("ALL" not in rules for rules in ignores.values()), ignores
    assert not pyproject()["tool"]["ruff"].get("exclude"), "ruff's exclude takes files out of the check"
    assert not lint.get("exclude"), "ruff's lint.exclude takes files out of the check"


def test_ruff_keeps_its_complexity_limit_and_rules() -> None:
    lint = pyproject()["tool"]["ruff"]["lint"]
    assert lint["mccabe"]["max-complexity"] <= 15
    for rules in ("E", "F", "W", "I", "B", "UP", "SIM", "C90", "RUF", "ASYNC", "PGH", "BLE"):
        assert rules in lint["select"], f"{rules} left ruff's rule set"
    assert "C901" not in lint.get("ignore", []) and "C90" not in lint.get("ignore", [])
    assert not {"PGH003", "PGH004", "RUF100"} & set(lint.get("ignore", [])), "blanket or unused silencing allowed again"


def test_every_silenced_check_in_sparkd_names_its_code_and_says_why() -> None:
    problems = []
    for path in sources():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(REPO)}:{number}"
            for match in NOQA.finditer(line):
                if not match["codes"]:
                    problems.append(f"{where}: a noqa without a code")
                elif not match["why"]:
                    problems.append(f"{where}: a noqa that does not say why (`# noqa: CODE - why`)")
            for match in TYPE_IGNORE.finditer(line):
                if not match["codes"]:
                    problems.append(f"{where}: a type: ignore without an error code")
    assert not problems, "\n".join(problems)


def test_the_silencing_check_would_catch_each_kind() -> None:
    def match(pattern: re.Pattern[str], line: str) -> re.Match[str]:
        found = pattern.search(line)
        assert found is not None, line
        return found

    assert not match(NOQA, "x = 1  # noqa")["codes"]
    assert not match(NOQA, "x = 1  # noqa: E501")["why"]
    assert match(NOQA, "x = 1  # noqa: BLE001 - a bug must cost one request")["why"]
    assert not match(TYPE_IGNORE, "x = 1  # type: ignore")["codes"]
    assert match(TYPE_IGNORE, "x = 1  # type: ignore[arg-type]")["codes"]
