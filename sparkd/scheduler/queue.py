"""The wait queue: requests that cannot be served yet, grouped by model, in FIFO order.

Requests for the same model wait together in one group, placed where the group's
first request arrived, so ``A B A B A B`` needs one swap, not five.  A request
for a model whose group already waits joins that group; a model with no waiting
group starts a new one at the back.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Waiter:
    model: str
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued_at: float = field(default_factory=time.monotonic)


class WaitQueue:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._groups: dict[str, deque[Waiter]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, waiter: Waiter) -> None:
        if self._size >= self.limit:
            raise QueueFull
        self._groups.setdefault(waiter.model, deque()).append(waiter)
        self._size += 1

    def remove(self, waiter: Waiter) -> bool:
        group = self._groups.get(waiter.model)
        if group is None:
            return False
        try:
            group.remove(waiter)
        except ValueError:
            return False
        self._size -= 1
        if not group:
            del self._groups[waiter.model]
        return True

    def take(self, model: str) -> list[Waiter]:
        """Remove and return every waiter of ``model``, oldest first."""
        group = self._groups.pop(model, None)
        if not group:
            return []
        self._size -= len(group)
        return list(group)

    def models(self) -> list[str]:
        """Models with waiting requests, the longest-waiting group first."""
        return list(self._groups)

    def depth(self, model: str) -> int:
        group = self._groups.get(model)
        return len(group) if group else 0
