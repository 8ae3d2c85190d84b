"""What the scheduler needs of the component that carries out its decisions.

``lifecycle.Lifecycle`` is the real one (Podman and the engine); the unit tests'
``FakeLifecycle`` (tests/fake_lifecycle.py) stands in for it with short sleeps.
Both are checked by mypy against this Protocol, so a change of what the scheduler
asks, or of an outcome it gets back, breaks the fake where it breaks the real one.
Every action answers with an outcome (``outcomes``), never by moving the model:
the scheduler alone does that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..cluster.head import HeadCoordinator
from ..config import Config
from ..engine.progress import LoadProgress
from ..runtime.containers import ContainerInfo, ContainerLookup
from .loadtimes import LoadTimes
from .outcomes import Adoption, Failed, Launched, NotAdoptable, Slept, Started, StopFailed, Stopped, Woke
from .runner import ModelRunner

ProgressSink = Callable[[LoadProgress], None]
"""Told each load progress the engine's log shows while a model starts."""


class ModelLifecycle(Protocol):
    @property
    def runtime(self) -> ContainerLookup:
        """The containers, for the adoption after a restart."""
        ...

    @property
    def load_times(self) -> LoadTimes:
        """Past load times: ETAs for the status and for clients that wait."""
        ...

    @property
    def cluster(self) -> HeadCoordinator | None:
        """Worker leases on the peers, for models that span several nodes."""
        ...

    def apply_config(self, config: Config) -> None:
        """A reload's configuration, for the actions that begin from now on."""
        ...

    def manages_weights(self, runner: ModelRunner) -> bool:
        """Whether the model has weights sparkd keeps in its cache (``hf_model``), checked before it is admitted."""
        ...

    async def check_weights(self, runner: ModelRunner) -> Failed | bool:
        """Whether its weights must be pulled first (True), are present (False), or cannot be had
        without the operator (``weights_missing`` with ``lifecycle.auto_pull`` off, ``weights_unavailable``)."""
        ...

    async def pull_weights(self, runner: ModelRunner, on_progress: ProgressSink) -> Failed | None:
        """Download its weights into the cache (``weights_pull_failed``), the progress told to ``on_progress``."""
        ...

    async def ensure_weights(self, runner: ModelRunner, on_progress: ProgressSink) -> Failed | None:
        """Before ``launch``: the model's weights in its cache (pulled first when absent), or why not."""
        ...

    async def launch(self, runner: ModelRunner) -> Launched | Failed:
        """Bring the model's container up; ``await_ready`` follows."""
        ...

    async def await_ready(
        self, runner: ModelRunner, on_progress: ProgressSink, launched: Launched | None
    ) -> Started | Failed:
        """Wait until the engine answers; ``launched`` None: an adopted container still loading."""
        ...

    async def adopt(self, runner: ModelRunner, info: ContainerInfo) -> Adoption | NotAdoptable:
        """Whether a container an earlier sparkd left running can be taken over."""
        ...

    async def stop(self, runner: ModelRunner, reason: str) -> Stopped | StopFailed: ...

    async def stop_after_loss(self, runner: ModelRunner, reason: str, *, kill: bool = False) -> Failed:
        """The container or a peer it needs went away, or a watch gave it up: make sure it is stopped
        (``kill``: at once, without the engine's graceful shutdown a wedged engine never finishes)."""
        ...

    async def sleep(self, runner: ModelRunner) -> Slept | Failed: ...

    async def wake(self, runner: ModelRunner) -> Woke | Failed: ...

    async def tail_logs(self, runner: ModelRunner) -> list[str]:
        """The engine's last log lines, quoted in failure messages."""
        ...
