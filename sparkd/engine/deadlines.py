"""Time limits of one proxied request: waiting for the engine's head, for its next bytes, for the client.

A stream is thousands of reads and writes; re-arming a timer for each would cost
more than the relay itself.  The relay only notes which phase it is in and since
when (two attribute stores per chunk); one timer per request looks at that a few
times per limit and, once a phase has lasted longer than its limit, cancels the
request's task, which the relay turns into a precise ending (``expired``).
"""

from __future__ import annotations

import asyncio
import enum

from ..config.schema import EngineConfig

MIN_TICK_S = 0.05
MAX_TICK_S = 5.0


class Phase(enum.Enum):
    HEAD = "response_head"
    """Request sent, the engine's response head not arrived."""
    READ = "idle_read"
    """Waiting for the next bytes of the engine's answer."""
    WRITE = "write_stall"
    """Waiting for the client to take the bytes written to it."""


def limits(config: EngineConfig) -> dict[Phase, float]:
    return {
        Phase.HEAD: config.response_head_timeout_s,
        Phase.READ: config.idle_read_timeout_s,
        Phase.WRITE: config.write_stall_timeout_s,
    }


CONFIG_KEYS = {Phase.HEAD: "engine.response_head_timeout_s", Phase.READ: "engine.idle_read_timeout_s",
               Phase.WRITE: "engine.write_stall_timeout_s"}


class StallWatch:
    """Cancels ``task`` when the current phase has lasted longer than its limit (0 = none)."""

    __slots__ = ("_limits", "_loop", "_task", "_tick", "_timer", "expired", "phase", "since")

    def __init__(self, config: EngineConfig, task: asyncio.Task[object]) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = task
        self._limits = limits(config)
        active = [limit for limit in self._limits.values() if limit > 0]
        # Checked four times per limit: a phase ends at most a quarter past its limit.
        self._tick = min(MAX_TICK_S, max(MIN_TICK_S, min(active) / 4)) if active else 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.phase = Phase.HEAD
        self.since = self._loop.time()
        self.expired: Phase | None = None
        if self._tick:
            self._timer = self._loop.call_later(self._tick, self._check)

    def enter(self, phase: Phase) -> None:
        self.phase = phase
        self.since = self._loop.time()

    def limit(self, phase: Phase) -> float:
        return self._limits[phase]

    def _check(self) -> None:
        limit = self._limits[self.phase]
        if limit and self._loop.time() - self.since >= limit:
            self.expired = self.phase
            self._timer = None
            self._task.cancel()
            return
        self._timer = self._loop.call_later(self._tick, self._check)

    def absorb(self) -> bool:
        """After a ``CancelledError``: True when this watch cancelled the task and nothing else did."""
        if self.expired is None:
            return False
        uncancel = getattr(self._task, "uncancel", None)  # 3.11+; on 3.10 catching the error is enough
        return not (uncancel is not None and uncancel() > 0)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
