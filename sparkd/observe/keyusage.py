"""Usage per key name and model: what today's limits count, and what the history has yet to write.

Only a key's name (from the keys file) is ever kept, never the key. A day is a local
calendar day, as in the history's ``usage_daily``; ``tokens_per_day`` resets at local
midnight (``seconds_to_reset``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..adminjson import KeyUsageRow


@dataclass
class UsageCounts:
    """One key's use of one model: requests, errors, tokens, seconds waited for the model."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_wait_s: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: UsageCounts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.queue_wait_s += other.queue_wait_s


def local_day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(at))


def seconds_to_midnight(at: float) -> float:
    """Seconds from ``at`` to the next local midnight (at least 1)."""
    moment = time.localtime(at)
    midnight = time.mktime((moment.tm_year, moment.tm_mon, moment.tm_mday + 1, 0, 0, 0, 0, 0, -1))
    return max(1.0, midnight - at)


class KeyUsage:
    """Today's counts per (key name, model), and the counts not yet written to the history."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._day = local_day(clock())
        self._today: dict[tuple[str, str], UsageCounts] = {}
        self._pending: dict[tuple[str, str, str], UsageCounts] = {}
        """By (day, key, model): a flush after midnight still adds to the right day."""

    def record(self, key: str, model: str, counts: UsageCounts) -> None:
        """One finished request of ``key`` on ``model``."""
        self._roll()
        self._today.setdefault((key, model), UsageCounts()).add(counts)
        self._pending.setdefault((self._day, key, model), UsageCounts()).add(counts)

    def remember_today(self, rows: Iterable[KeyUsageRow]) -> None:
        """Today's counts the history holds from before this sparkd started (so a restart resets no limit)."""
        self._roll()
        for row in rows:
            if row["day"] != self._day:
                continue
            counts = UsageCounts(
                row["requests"], row["errors"], row["prompt_tokens"], row["completion_tokens"], row["queue_wait_s"]
            )
            self._today.setdefault((row["key"], row["model"]), UsageCounts()).add(counts)

    def tokens_today(self, key: str) -> int:
        self._roll()
        return sum(counts.tokens for (name, _), counts in self._today.items() if name == key)

    def seconds_to_reset(self) -> float:
        """Seconds until today's counts start again from zero (local midnight)."""
        return seconds_to_midnight(self._clock())

    def today(self) -> list[KeyUsageRow]:
        """Today's rows, by key then model."""
        self._roll()
        return [_row(self._day, key, model, counts) for (key, model), counts in sorted(self._today.items())]

    def drain(self) -> list[KeyUsageRow]:
        """Hand what the history has not written yet (it adds the rows to theirs) and forget it."""
        pending, self._pending = self._pending, {}
        return [_row(day, key, model, counts) for (day, key, model), counts in pending.items()]

    def _roll(self) -> None:
        day = local_day(self._clock())
        if day != self._day:
            self._day, self._today = day, {}


def _row(day: str, key: str, model: str, counts: UsageCounts) -> KeyUsageRow:
    return {
        "day": day, "key": key, "model": model, "requests": counts.requests, "errors": counts.errors,
        "prompt_tokens": counts.prompt_tokens, "completion_tokens": counts.completion_tokens,
        "queue_wait_s": round(counts.queue_wait_s, 3),
    }
