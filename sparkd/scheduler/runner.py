"""One model's live state: its state machine, in-flight count, engine endpoint.

``transition`` is the only place a model's state changes; it checks the move
against ``state.ALLOWED`` and logs it as one structured event
(``model_starting``, ``model_ready``, ``model_failed``, ...).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from ..config import ModelConfig
from ..engine.client import Endpoint
from ..engine.lastwords import telling_lines
from ..engine.progress import LoadProgress
from ..runtime.spec import ContainerSpec
from .state import ALLOWED, ModelState

log = structlog.get_logger("sparkd.scheduler")


class TransitionError(RuntimeError):
    pass


@dataclass(frozen=True)
class Failure:
    message: str
    log_lines: tuple[str, ...]
    at: float
    """time.monotonic() of the failure."""
    needs_operator: bool = False
    """Retrying cannot fix it (a missing image, encodings, GPU device): clients get no Retry-After."""
    code: str = "model_failed"


@dataclass(eq=False)
class ModelRunner:
    config: ModelConfig
    spec: ContainerSpec
    on_change: Callable[["ModelRunner", "ModelState | None"], None]
    """Called with the previous state after a transition, with None after other news (progress)."""
    state: ModelState = ModelState.STOPPED
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    """Wall-clock time the container started (from Podman), for uptime."""
    ready_at: float | None = None
    """time.monotonic() when the model last became ready."""
    start_requested_at: float = 0.0
    """Wall-clock time of the current start; older container events are stale."""
    endpoint: Endpoint | None = None
    progress: LoadProgress | None = None
    failure: Failure | None = None
    consecutive_failures: int = 0
    reason: str = ""
    """Why the model entered its current state (``transition``'s reason): "idle for 1200s",
    "swapped out for b", "stopped by an operator", ... (status, metrics, history)."""
    state_since: float = field(default_factory=time.time)
    """Wall-clock time of the last transition."""
    stale_spec: bool = False
    """The running container was made from an older spec: re-create it at the next start."""
    died: asyncio.Event = field(default_factory=asyncio.Event)
    loss: str | None = None
    """Why the current start must fail although its container may run (a peer it needs is gone)."""
    task: asyncio.Task[Any] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def transition(self, new: ModelState, reason: str, **fields: Any) -> None:
        old = self.state
        if new == old:
            return
        if new not in ALLOWED[old]:
            raise TransitionError(f"model {self.name}: {old} -> {new} is not allowed ({reason})")
        self.state = new
        self.reason = reason
        self.state_since = time.time()
        now = time.monotonic()
        if new == ModelState.READY:
            self.ready_at = now
            self.last_used = now
            self.progress = None
            self.failure = None
            self.consecutive_failures = 0
        elif new == ModelState.STARTING:
            self.progress = None
        elif new in (ModelState.STOPPED, ModelState.FAILED):
            self.endpoint = None
            self.started_at = None
            self.ready_at = None
            self.progress = None
        method = log.error if new == ModelState.FAILED else log.info
        method(f"model_{new.value}", model=self.name, previous=old.value, reason=reason, **fields)
        self.on_change(self, old)

    def fail(self, message: str, log_lines: list[str] | tuple[str, ...] = (), *, needs_operator: bool = False,
             code: str = "model_failed") -> None:
        self.failure = Failure(message=message, log_lines=tuple(log_lines), at=time.monotonic(),
                               needs_operator=needs_operator, code=code)
        self.consecutive_failures += 1
        self.transition(ModelState.FAILED, reason=message, last_log=telling_lines(log_lines, 3))

    def uptime(self, now_wall: float | None = None) -> float | None:
        if self.started_at is None:
            return None
        return max(0.0, (now_wall or time.time()) - self.started_at)

    def idle_for(self, now: float | None = None) -> float:
        if self.in_flight:
            return 0.0
        return max(0.0, (now or time.monotonic()) - self.last_used)

    @property
    def claim(self) -> float:
        return self.config.gpu_memory

    @property
    def sleep_claim(self) -> float:
        return self.config.sleep_gpu_memory
