"""Check a parsed TOML table against a config dataclass and build it.

The dataclass annotations are the schema.  Checking never stops at the first
mistake: every problem is collected with its file, key path, what was expected and
what was found, so a user fixes the whole file in one go.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union

T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    file: str
    key: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: expected {self.expected}, found {self.found}"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every mistake found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(f"{len(problems)} problem(s) in the configuration")
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


def key_path(*parts: str) -> str:
    """Dotted TOML key path, quoting parts that hold dots (``models."qwen2.5-7b".args``)."""
    out = ""
    for part in parts:
        if part.startswith("[") and part.endswith("]") and part[1:-1].isdigit():
            out += part
            continue
        bare = part.replace("_", "").replace("-", "").isalnum()
        text = part if bare else '"' + part.replace('"', '\\"') + '"'
        out += ("." if out else "") + text
    return out


def describe(value: Any) -> str:
    """How a found value is shown in a problem: its TOML type and a short repr."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}
    kind = names.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


class _Mismatch(Exception):
    def __init__(self, expected: str, found: Any = None, where: tuple[str, ...] = ()) -> None:
        super().__init__(expected)
        self.expected = expected
        self.found = found
        self.where = where


def _expected_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is bool:
        return "a boolean (true or false)"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _expected_text(inner[0])
    if origin is tuple:
        return f"an array of {_plural(args[0])}"
    if origin is dict:
        return f"a table of {_plural(args[1])}"
    return str(annotation)


def _plural(annotation: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(
        annotation, _expected_text(annotation)
    )


def _unannotated(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    """The type of ``Annotated[type, *constraints]`` and its constraints (``constraints.py``)."""
    if typing.get_origin(annotation) is Annotated:
        return annotation.__origin__, annotation.__metadata__
    return annotation, ()


_SCALARS: dict[Any, Callable[[Any], bool]] = {
    bool: lambda value: isinstance(value, bool),
    int: lambda value: isinstance(value, int) and not isinstance(value, bool),
    float: lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
    str: lambda value: isinstance(value, str),
}
"""Whether a TOML value is one of the scalar types (TOML's booleans are no integers; integers are numbers)."""


def convert(annotation: Any, value: Any) -> Any:
    """Return ``value`` as ``annotation`` wants it, or raise ``_Mismatch``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return convert(inner[0], value)
    if annotation in _SCALARS:
        if _SCALARS[annotation](value):
            return float(value) if annotation is float else value
    elif origin is Literal:
        if value in args and type(value) is type(args[0]):
            return value
    elif origin is tuple:
        if isinstance(value, list):
            return tuple(_convert_items(args[0], ((f"[{index}]", item) for index, item in enumerate(value))).values())
    elif origin is dict:
        if isinstance(value, dict):
            return _convert_items(args[1], value.items())
    else:
        raise TypeError(f"unsupported annotation in config schema: {annotation!r}")
    raise _Mismatch(_expected_text(annotation), value)


def _convert_items(annotation: Any, items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Each item of an array or table as ``annotation`` wants it; a mismatch names the item (``[1]``, ``name``)."""
    converted = {}
    for where, item in items:
        try:
            converted[where] = convert(annotation, item)
        except _Mismatch as inner:
            raise _Mismatch(inner.expected, inner.found, (where, *inner.where)) from None
    return converted


def build(
    cls: type[T],
    table: Any,
    *,
    file: str,
    path: tuple[str, ...],
    problems: list[Problem],
    fixed: dict[str, Any] | None = None,
) -> T | None:
    """Build dataclass ``cls`` from ``table``; append every problem found to ``problems``.

    ``fixed`` supplies fields that are not TOML keys (e.g. a model's name, taken
    from its table header).  A key with a problem keeps its default so that the
    cross-field checks can still run on the rest; None comes back only when a
    required key is missing or ``table`` is not a table.
    """
    fixed = fixed or {}
    if not isinstance(table, dict):
        problems.append(Problem(file, key_path(*path), "a table", describe(table)))
        return None
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}  # type: ignore[arg-type]
    values: dict[str, Any] = dict(fixed)
    for name, raw in table.items():
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                Problem(
                    file,
                    key_path(*path, name),
                    "one of the known keys " + ", ".join(sorted(fields)),
                    f"unknown key {name!r}{hint}",
                )
            )
            continue
        value = _build_value(hints[name], raw, file=file, path=(*path, name), problems=problems)
        if value is not _INVALID:
            values[name] = value
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    for name in missing:
        problems.append(Problem(file, key_path(*path, name), f"{_expected_text(_unannotated(hints[name])[0])} (required)", "nothing"))
    if missing:
        return None
    return cls(**values)


_INVALID = object()
"""What ``_build_value`` returns for a value that does not have the field's type."""


def _build_value(hint: Any, raw: Any, *, file: str, path: tuple[str, ...], problems: list[Problem]) -> Any:
    """``raw`` as the field's type wants it (a nested dataclass is built), its constraints checked.

    A value that breaks a constraint is kept (its problem reported), so checks across fields
    still see it; one of the wrong type is ``_INVALID`` and the field keeps its default.
    """
    annotation, constraints = _unannotated(hint)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        built = build(annotation, raw, file=file, path=path, problems=problems)
        return _INVALID if built is None else built
    try:
        value = convert(annotation, raw)
    except _Mismatch as mismatch:
        found = raw if mismatch.found is None else mismatch.found
        problems.append(Problem(file, key_path(*path, *mismatch.where), mismatch.expected, describe(found)))
        return _INVALID
    for constraint in constraints:
        for where, expected, found_text in constraint.failures(value):
            problems.append(Problem(file, key_path(*path, *where), expected, found_text))
    return value
