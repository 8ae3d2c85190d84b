"""What ``Lifecycle``'s slow work ended in, handed back to the scheduler.

The lifecycle drives Podman and the engine and never touches a model's state
or the lease; the scheduler reads these outcomes and moves the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.client import Endpoint


@dataclass(frozen=True)
class Launched:
    """The model's container runs; its engine may still be loading."""

    endpoint: Endpoint | None
    """None for a container without an engine API (a Ray worker)."""
    started_at: float
    """Wall-clock time the container started (from Podman)."""
    began: float
    """time.monotonic() the start began: the start timeout and the load time count from then."""
    pid: int | None = None
    """The host PID of the container's first process: where its memory is read."""


@dataclass(frozen=True)
class Started:
    """The engine answers its readiness path."""

    took: float
    """Seconds since the start began (for an adopted container: since the container started)."""
    peak: int | None = None
    """Bytes the container held at most while it loaded (measured on unified memory only)."""
    ready: int | None = None
    """Bytes it held once ready."""
    total: int | None = None
    """Bytes of the memory the lease shares (MemTotal)."""


@dataclass(frozen=True)
class Failed:
    """A start, wake or clean-up failed; the container is stopped and worker leases are returned."""

    message: str
    log_lines: tuple[str, ...] = ()
    needs_operator: bool = False
    """Retrying cannot fix it (a missing image, encodings, GPU device): clients get no Retry-After."""
    code: str = "model_failed"


@dataclass(frozen=True)
class Stopped:
    """The container is gone from the GPU."""


@dataclass(frozen=True)
class StopFailed:
    message: str
    container_running: bool
    """True when the container still runs (or Podman cannot tell): it may hold GPU memory."""


@dataclass(frozen=True)
class Slept:
    """The engine sleeps: KV cache freed, and at level 2 the weights discarded too."""

    level: int = 1
    resident: int | None = None
    """Bytes the container still holds asleep (measured on unified memory only)."""
    total: int | None = None


@dataclass(frozen=True)
class Woke:
    took: float
    """Seconds from the wake's beginning (waiting for the memory included) to the engine answering."""


@dataclass(frozen=True)
class Adoption:
    """A running container an earlier sparkd left behind can be taken over."""

    container: str
    endpoint: Endpoint | None
    started_at: float
    serving: bool
    """Its engine answers already; False: it is still loading."""


@dataclass(frozen=True)
class NotAdoptable:
    message: str
