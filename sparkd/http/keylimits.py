"""A key's own limits from the keys file, checked before its request goes further.

* ``max_concurrent``: the key's requests in flight plus those waiting for their model at
  most; one more is a 429 ``key_max_concurrent`` (``Retry-After``: the model's load ETA,
  a request of the key ends sooner or later).
* ``tokens_per_day``: once the prompt and completion tokens the engines reported for the
  key today reach it, a 429 ``key_tokens_per_day`` with ``Retry-After`` until the count
  starts again at local midnight.

A reload changes the limits at once (the principal carries them); the counts are by key
name, so they carry over a reload.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import TooManyRequests
from ..observe.keyusage import KeyUsage
from .auth import Principal

CONCURRENCY_RETRY_S = 5.0
"""Retry-After of a request refused for ``max_concurrent``: the key's own requests end it."""


class KeyGate:
    """Counts each key's requests in flight or waiting; refuses one past the key's limits."""

    def __init__(self, usage: KeyUsage) -> None:
        self._usage = usage
        self._active: dict[str, int] = {}

    def active(self, key: str) -> int:
        """The key's requests in flight or waiting now."""
        return self._active.get(key, 0)

    @contextlib.contextmanager
    def admit(self, principal: Principal) -> Iterator[None]:
        """Hold one of the key's places while the request runs; refuse it (429) past a limit."""
        self.check(principal)
        name = principal.name
        self._active[name] = self._active.get(name, 0) + 1
        try:
            yield
        finally:
            left = self._active[name] - 1
            if left:
                self._active[name] = left
            else:
                del self._active[name]

    def check(self, principal: Principal) -> None:
        limits, name = principal.limits, principal.name
        if limits.tokens_per_day is not None:
            used = self._usage.tokens_today(name)
            if used >= limits.tokens_per_day:
                reset = self._usage.seconds_to_reset()
                raise TooManyRequests(
                    f"the key {name!r} has used {used} tokens today, its limit is {limits.tokens_per_day} "
                    f"(tokens_per_day in the keys file); the count starts again at midnight, in {_hours(reset)}. "
                    "Wait until then, or ask the operator to raise the limit",
                    retry_after=reset,
                    code="key_tokens_per_day",
                    extra={"limit": "tokens_per_day", "tokens_per_day": limits.tokens_per_day, "used": used},
                )
        if limits.max_concurrent is not None and self.active(name) >= limits.max_concurrent:
            raise TooManyRequests(
                f"the key {name!r} has {self.active(name)} requests running or waiting, its limit is "
                f"{limits.max_concurrent} (max_concurrent in the keys file); wait for one to finish, or send fewer at once",
                retry_after=CONCURRENCY_RETRY_S,
                code="key_max_concurrent",
                extra={"limit": "max_concurrent", "max_concurrent": limits.max_concurrent},
            )


def _hours(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h {minutes % 60:02d}min"
