"""What the scheduler tells its observers, as data.

The scheduler emits one event per fact: ``Transitioned`` when a model's state
moves (with a structured ``cause``), ``LoadFinished`` when a start or a wake
ends (ready or failed, with when it began and how long it took), ``Progress``
while a model loads.  Logging, metrics, the usage history, the status page and
sd_notify consume them; none of them needs another's bookkeeping, the order in
which they subscribed, or a reason's wording.

A cause's ``describe(state)`` is the human reason shown in the status and the
history; observers that decide something match on the cause's type instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..engine.progress import LoadProgress
from .state import ModelState

S = ModelState


@dataclass(frozen=True)
class Requested:
    """A request (or ``sparkctl start``) needs the model."""

    def describe(self, state: ModelState) -> str:
        return "requested"


@dataclass(frozen=True)
class KeepUtility:
    """A utility model is brought up because nothing exclusive wants the GPU."""

    def describe(self, state: ModelState) -> str:
        return "utility model kept running"


@dataclass(frozen=True)
class RestartAfterLoss:
    """A watch gave the model up (``code``, e.g. ``engine_wedged``) while it served: it is started
    again on its own, so the next request finds it loading rather than failed."""

    code: str

    def describe(self, state: ModelState) -> str:
        return f"restarted after it was given up ({self.code})"


@dataclass(frozen=True)
class Adopted:
    """A container left running by an earlier sparkd was taken over."""

    container: str
    started_at: float
    """Wall-clock time the container started (from Podman): its session began then."""
    loading: bool
    """Its engine did not answer yet when it was adopted."""

    def describe(self, state: ModelState) -> str:
        if state is S.STARTING:
            return "adopted a container that is still loading"
        return "adopted container finished loading" if self.loading else "adopted running container"


@dataclass(frozen=True)
class SwapFor:
    """The model makes room on the GPU for ``for_model``."""

    for_model: str

    def describe(self, state: ModelState) -> str:
        return f"making room for {self.for_model}" if state is S.DRAINING else f"swapped out for {self.for_model}"


@dataclass(frozen=True)
class SwapCalledOff:
    """The model that was draining for a swap is needed no more: it serves again."""

    def describe(self, state: ModelState) -> str:
        return "swap called off"


@dataclass(frozen=True)
class WeightsPulled:
    """The model's weights are in its cache now: its start waits for the GPU like any other."""

    repo: str

    def describe(self, state: ModelState) -> str:
        return f"weights of {self.repo} pulled"


@dataclass(frozen=True)
class Idle:
    """No request for ``seconds`` (the idle limit)."""

    seconds: float
    asleep: bool = False

    def describe(self, state: ModelState) -> str:
        return f"{'asleep and ' if self.asleep else ''}idle for {self.seconds:.0f}s"


@dataclass(frozen=True)
class OperatorAction:
    """``sparkctl stop|sleep`` (or a reload that removed the model)."""

    action: Literal["stop", "sleep"]

    def describe(self, state: ModelState) -> str:
        if state is S.DRAINING:
            return f"{self.action} requested by an operator"
        return "put to sleep by an operator" if self.action == "sleep" else "stopped by an operator"


@dataclass(frozen=True)
class SleepFailed:
    """The engine refused to sleep, so the model is stopped instead (for ``then``'s sake)."""

    then: Cause

    def describe(self, state: ModelState) -> str:
        return self.then.describe(state) + " (sleep failed)"


@dataclass(frozen=True)
class Shutdown:
    """sparkd itself is stopping."""

    why: str = "sparkd is shutting down"

    def describe(self, state: ModelState) -> str:
        return self.why


@dataclass(frozen=True)
class FailureCause:
    """The model failed: what failed, the engine's last log lines, whether only the operator can fix it."""

    message: str
    log_lines: tuple[str, ...] = ()
    needs_operator: bool = False
    code: str = "model_failed"

    def describe(self, state: ModelState) -> str:
        return self.message


Cause = (
    Requested | KeepUtility | RestartAfterLoss | Adopted | SwapFor | SwapCalledOff | WeightsPulled | Idle | OperatorAction | SleepFailed | Shutdown | FailureCause
)


def swap_target(cause: Cause) -> str | None:
    """The model a swap made room for, when ``cause`` is (or wraps) a swap."""
    if isinstance(cause, SleepFailed):
        return swap_target(cause.then)
    return cause.for_model if isinstance(cause, SwapFor) else None


@dataclass(frozen=True)
class Transitioned:
    model: str
    old: ModelState
    new: ModelState
    cause: Cause
    at: float
    """Wall-clock time of the move."""

    @property
    def reason(self) -> str:
        return self.cause.describe(self.new)


@dataclass(frozen=True)
class LoadFinished:
    """A start or a wake ended; ``message`` is why it began (ready) or the failure (failed)."""

    model: str
    kind: Literal["start", "wake"]
    began: float
    """Wall-clock time the load began (for an adopted container: when the container started)."""
    took: float
    outcome: Literal["ready", "failed"]
    message: str


@dataclass(frozen=True)
class Progress:
    """A loading model's log showed how far it got."""

    model: str
    progress: LoadProgress
    at: float


@dataclass(frozen=True)
class FootprintMeasured:
    """The model's container was measured after a load or a sleep (bytes; None: not measured)."""

    model: str
    peak: int | None
    ready: int | None
    asleep: int | None
    total: int | None
    sleep_level: int | None
    at: float
    spec_hash: str | None = None
    """The container spec it was measured on."""


Event = Transitioned | LoadFinished | Progress | FootprintMeasured
Listener = Callable[[Event], None]
