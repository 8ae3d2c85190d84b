"""Issue 15 point 6: modules are where their concern is, and a name says which module it is.

Two modules with the same file name in different packages (``logs.py`` and
``runtime/logs.py``) make every traceback, grep and "open file" ambiguous; each name
under ``sparkd/`` is therefore used once (a package's ``__init__``/``__main__`` aside).
README.md's "Where things are" table is how a newcomer finds a module, so every
path it names must exist.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_FILES = {"__init__.py", "__main__.py"}


def shared_names(package: Path) -> dict[str, list[str]]:
    """File name → the modules under ``package`` that have it, for names held by more than one."""
    holders: dict[str, list[str]] = defaultdict(list)
    for path in sorted(package.rglob("*.py")):
        if path.name not in PACKAGE_FILES:
            holders[path.name].append(str(path.relative_to(package.parent)))
    return {name: paths for name, paths in holders.items() if len(paths) > 1}


def where_things_are(readme: str) -> list[str]:
    """The paths the README's "Where things are" table names, each resolved against its row's package."""
    section = readme.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    named = []
    for row in section.splitlines():
        if not row.startswith("| `sparkd/"):
            continue
        path_cell, what_cell = row.split("|")[1:3]
        packages = re.findall(r"`(sparkd/[\w/.]*)`", path_cell)
        named += packages
        base = packages[0] if len(packages) == 1 and packages[0].endswith("/") else None
        for name in re.findall(r"`([\w/]+(?:\.py|/))`", what_cell):
            named.append(name if name.startswith("sparkd/") else f"{base}{name}" if base else name)
    return named


def test_no_two_modules_share_a_file_name() -> None:
    clashes = shared_names(ROOT / "sparkd")
    assert not clashes, "modules sharing a name (rename each for its concern): " + "; ".join(
        f"{name}: {', '.join(paths)}" for name, paths in sorted(clashes.items())
    )


def test_a_shared_name_is_found_in_any_package_and_package_files_are_not_one(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    for module in ("__init__.py", "logs.py", "a/__init__.py", "a/__main__.py", "a/b/logs.py", "a/other.py"):
        (package / module).parent.mkdir(parents=True, exist_ok=True)
        (package / module).write_text("")
    (package / "__main__.py").write_text("")
    assert shared_names(package) == {"logs.py": ["pkg/a/b/logs.py", "pkg/logs.py"]}


def test_the_readme_names_only_modules_that_exist() -> None:
    named = where_things_are((ROOT / "README.md").read_text())
    assert "sparkd/scheduler/" in named and "sparkd/scheduler/queue.py" in named  # the table was read
    missing = [path for path in named if not (ROOT / path).exists()]
    assert not missing, f"README.md's 'Where things are' names what does not exist: {missing}"
