"""The wait queue: requests that cannot be served yet, grouped by model, by priority, then FIFO.

Requests for the same model wait together in one group, placed where the group's
first request arrived, so ``A B A B A B`` needs one swap, not five.  A request
for a model whose group already waits joins that group; a model with no waiting
group starts a new one at the back.  A group's priority is the highest of its
waiters' (their keys' ``priority``): groups of a higher priority come first, groups
of one priority in the order they began, so when the GPU changes hands the most
important waiter is served first and equals are first come, first served.

The queue also bounds what waiting costs: the number of waiters, the bytes of
request bodies they hold (memory: a waiter keeps its body until it is served),
and the number of waiters of one key (one client cannot fill the queue for all).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field


class QueueFull(Exception):
    """No room for one more waiter (``lifecycle.queue_size``)."""


class QueueBytesFull(QueueFull):
    """The waiters' bodies would pass ``lifecycle.queue_body_bytes``."""


class KeyQueueFull(QueueFull):
    """This key has ``lifecycle.queue_per_key`` requests waiting already."""


@dataclass(frozen=True)
class QueueLimits:
    size: int
    body_bytes: int
    per_key: int


@dataclass(eq=False)
class Waiter:
    model: str
    key: str | None = None
    """The caller's key name (the anonymous principal has one too); None is not counted per key."""
    body_bytes: int = 0
    priority: int = 0
    """The caller's key's ``priority``: higher is served first when the GPU changes hands."""
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued_at: float = field(default_factory=time.monotonic)


class WaitQueue:
    def __init__(self, limits: QueueLimits) -> None:
        self.limits = limits
        self._groups: dict[str, deque[Waiter]] = {}
        self._size = 0
        self._bytes = 0
        self._per_key: dict[str, int] = {}

    def __len__(self) -> int:
        return self._size

    @property
    def limit(self) -> int:
        return self.limits.size

    @property
    def body_bytes(self) -> int:
        """Bytes of request bodies held by the waiters."""
        return self._bytes

    def waiting_for_key(self, key: str) -> int:
        return self._per_key.get(key, 0)

    def push(self, waiter: Waiter) -> None:
        limits = self.limits
        if self._size >= limits.size:
            raise QueueFull
        if waiter.key is not None and self._per_key.get(waiter.key, 0) >= limits.per_key:
            raise KeyQueueFull
        if self._bytes + waiter.body_bytes > limits.body_bytes:
            raise QueueBytesFull
        self._groups.setdefault(waiter.model, deque()).append(waiter)
        self._count(waiter, 1)

    def remove(self, waiter: Waiter) -> bool:
        group = self._groups.get(waiter.model)
        if group is None:
            return False
        try:
            group.remove(waiter)
        except ValueError:
            return False
        self._count(waiter, -1)
        if not group:
            del self._groups[waiter.model]
        return True

    def take(self, model: str) -> list[Waiter]:
        """Remove and return every waiter of ``model``, oldest first."""
        group = self._groups.pop(model, None)
        if not group:
            return []
        for waiter in group:
            self._count(waiter, -1)
        return list(group)

    def models(self) -> list[str]:
        """Models with waiting requests: the highest priority first, the longest-waiting group first among equals."""
        # sorted() is stable and the dict keeps the groups in the order they began.
        return sorted(self._groups, key=lambda model: -self.priority(model))

    def priority(self, model: str) -> int:
        """The highest priority among ``model``'s waiters (0 when none waits)."""
        group = self._groups.get(model)
        return max((waiter.priority for waiter in group), default=0) if group else 0

    def depth(self, model: str) -> int:
        group = self._groups.get(model)
        return len(group) if group else 0

    def _count(self, waiter: Waiter, sign: int) -> None:
        self._size += sign
        self._bytes += sign * waiter.body_bytes
        key = waiter.key
        if key is None:
            return
        left = self._per_key.get(key, 0) + sign
        if left:
            self._per_key[key] = left
        else:
            del self._per_key[key]
