"""One model's live state: its state machine, in-flight count, engine endpoint.

Everyone reads these fields; only the scheduler writes them (its ``_move`` is
the one place a model's state changes).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig
from ..engine.client import Endpoint
from ..engine.progress import LoadProgress
from ..runtime.spec import ContainerSpec
from .events import Cause
from .footprint import Footprint
from .quantum import Quantum
from .state import ModelState


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
    cause: Cause | None = None
    """Why the model entered its current state (None: it has been stopped since sparkd started)."""
    load_began: float = 0.0
    """Wall-clock time the current (or last) start or wake began."""
    state_since: float = field(default_factory=time.time)
    """Wall-clock time of the last transition."""
    stale_spec: bool = False
    """The running container was made from an older spec: re-create it at the next start."""
    died: asyncio.Event = field(default_factory=asyncio.Event)
    loss: str | None = None
    """Why the current start must fail although its container may run (a peer it needs is gone)."""
    task: asyncio.Task[Any] | None = None
    footprint: Footprint = field(default_factory=Footprint)
    """What its container was measured to use (its cgroup on unified memory, its processes' GPU
    memory on a discrete GPU), kept across restarts in the history."""
    claim_warnings: tuple[str, ...] = ()
    """Measured footprints above the configured claims, with the config line to change."""
    unified_memory: bool = False
    """The GPU allocates from system memory (set by the scheduler when it makes the runner)."""
    quantum: Quantum | None = None
    """The swap quantum it got when it last became ready for waiting requests (``quantum.py``)."""
    handed_at: float | None = None
    """time.monotonic() when the GPU was promised to its current load: the holders began draining for
    it, or it was admitted (the start of its swap, and of its quantum)."""
    last_swap_s: float | None = None
    """How long its last swap-in took: from ``handed_at`` until it was ready (the cost its quantum pays for)."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def reason(self) -> str:
        """Why the model is in its state, in words: "idle for 1200s", "swapped out for b", ..."""
        return self.cause.describe(self.state) if self.cause is not None else ""

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
        """Its share while it serves: the configured claim, or what it measured once ready if more."""
        return max(self.config.gpu_memory, self.footprint.fraction(self.footprint.ready))

    @property
    def load_claim(self) -> float:
        """Its share while it loads: a load's measured peak must fit beside what runs."""
        return max(self.claim, self.footprint.fraction(self.footprint.peak))

    @property
    def sleep_level(self) -> int:
        """vLLM's sleep level: as configured, else 2 on unified memory (level 1 would keep the weights
        in the same pool), 1 on discrete GPUs (the weights go to host memory, off the GPU)."""
        return self.config.sleep_level or (2 if self.unified_memory else 1)

    @property
    def sleep_claim(self) -> float:
        """Its share asleep: what its last sleep at this level measured, at least the configured
        ``sleep_gpu_memory``; not measured yet at level 1 on unified memory, its whole claim (the
        weights stay in the pool, only the KV cache goes)."""
        measured = self.footprint
        if measured.asleep is not None and measured.sleep_level == self.sleep_level:
            return max(self.config.sleep_gpu_memory, measured.fraction(measured.asleep))
        if self.unified_memory and self.sleep_level == 1:
            return self.claim
        return self.config.sleep_gpu_memory
