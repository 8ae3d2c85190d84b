"""Constraints on a config value, declared on the schema: ``Annotated[float, Positive]``.

The generic builder (``validate.build``) checks each constraint of a field once the
value has its type, and reports every one that fails with the field's key path, what
was expected and what was found; the value is kept, so checks across fields still run.
A constraint on a whole array or table can name the item at fault (``listen[1]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .validate import describe

Failure = tuple[tuple[str, ...], str, str]
"""Key path below the field (``("[1]",)``, ``()`` for the field itself), expected, found."""


@dataclass(frozen=True)
class Check:
    """The value must satisfy ``holds``; ``found`` shows a value that does not (default: its type and repr)."""

    holds: Callable[[Any], bool]
    expected: str
    found: Callable[[Any], str] = describe

    def failures(self, value: Any) -> Iterator[Failure]:
        if value is not None and not self.holds(value):
            yield (), self.expected, self.found(value)


@dataclass(frozen=True)
class Explained:
    """``why`` says what is wrong with a value (None: nothing); found shows the value and that reason."""

    why: Callable[[Any], str | None]
    expected: str

    def failures(self, value: Any) -> Iterator[Failure]:
        reason = self.why(value) if value is not None else None
        if reason:
            yield (), self.expected, f"{value!r} ({reason})"


@dataclass(frozen=True)
class Each:
    """Every item of an array (key ``[index]``) or value of a table (key ``name``) meets ``constraint``."""

    constraint: Constraint

    def failures(self, value: Any) -> Iterator[Failure]:
        items = value.items() if isinstance(value, dict) else ((f"[{i}]", item) for i, item in enumerate(value or ()))
        for where, item in items:
            for below, expected, found in self.constraint.failures(item):
                yield (where, *below), expected, found


@dataclass(frozen=True)
class Entries:
    """Every ``name = value`` of a table passes ``why``, which gives (expected, found) for one that does not."""

    why: Callable[[str, Any], tuple[str, str] | None]

    def failures(self, value: Any) -> Iterator[Failure]:
        for name, item in (value or {}).items():
            failure = self.why(name, item)
            if failure is not None:
                yield (name,), failure[0], failure[1]


Constraint = Check | Explained | Each | Entries


def positive(unit: str = "number") -> Check:
    return Check(lambda value: value > 0, f"a positive {unit}")


def at_least_zero(unit: str = "number") -> Check:
    return Check(lambda value: value >= 0, f"zero or a positive {unit}")


def matches(pattern: str | re.Pattern[str], expected: str) -> Check:
    regex = re.compile(pattern)
    return Check(lambda value: regex.match(value) is not None, expected)


def not_blank(expected: str) -> Check:
    return Check(lambda value: bool(value.strip()), expected, lambda _value: "an empty string")


def not_empty(expected: str, found: str) -> Check:
    return Check(lambda value: len(value) > 0, expected, lambda _value: found)


Positive = positive()
AtLeastZero = at_least_zero()
PositiveSeconds = positive("number of seconds")
PositiveTokens = positive("number of tokens")
AbsolutePath = Check(lambda value: value.startswith("/"), "an absolute path")
Port = Check(lambda value: 1 <= value <= 65535, "a port within 1-65535")
Fraction = Check(lambda value: 0 < value <= 1, "a fraction of GPU memory in (0, 1]")


def distinct(expected: str, found: str) -> Check:
    return Check(lambda value: len(set(value)) == len(value), expected, lambda _value: found)
