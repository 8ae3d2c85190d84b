"""A lifecycle without containers, for the scheduling unit tests.

It does the slow work with short sleeps and returns the outcomes the real
``Lifecycle`` does (the scheduler alone moves the models' states), and records
what ran when. It subclasses the Protocol the scheduler asks of a lifecycle
(``sparkd.scheduler.contract.ModelLifecycle``), so mypy checks it against the
same signatures as the real one (tests/run-all.sh type-checks this file with
sparkd/).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import final

from fake_runtime import FakeRuntime
from sparkd.cluster.head import HeadCoordinator
from sparkd.config import Config
from sparkd.engine.client import Endpoint
from sparkd.runtime.containers import ContainerInfo
from sparkd.scheduler.contract import ModelLifecycle, ProgressSink
from sparkd.scheduler.loadtimes import LoadTimes
from sparkd.scheduler.outcomes import (
    Adoption,
    Failed,
    Launched,
    NotAdoptable,
    Slept,
    Started,
    StopFailed,
    Stopped,
    Woke,
)
from sparkd.scheduler.runner import ModelRunner


@final  # mypy reports a final class that leaves a protocol member out
class FakeLifecycle(ModelLifecycle):
    """``failing``: model → the log line its start fails with (a test may add and remove entries)."""

    def __init__(self, tmp: Path, start_delay: float = 0.02, failing: dict[str, str] | None = None) -> None:
        self._runtime = FakeRuntime()
        self._load_times = LoadTimes(tmp / "load-times.json")
        self.start_delay = start_delay
        self.failing: dict[str, str] = dict(failing or {})
        self.running: set[str] = set()
        self.timeline: list[tuple[str, str]] = []
        """(action, model) in the order they ran."""
        self.overlaps: list[set[str]] = []
        """The models whose containers ran when each action began."""

    @property
    def runtime(self) -> FakeRuntime:
        return self._runtime

    @property
    def load_times(self) -> LoadTimes:
        return self._load_times

    @property
    def cluster(self) -> HeadCoordinator | None:
        return None

    def apply_config(self, config: Config) -> None:
        pass  # nothing here depends on the configuration

    def _record(self, action: str, name: str) -> None:
        self.timeline.append((action, name))
        self.overlaps.append(set(self.running))

    def starts(self, name: str | None = None) -> int:
        return sum(1 for action, model in self.timeline if action == "start" and (name is None or model == name))

    async def ensure_weights(self, runner: ModelRunner, on_progress: ProgressSink) -> Failed | None:
        return None  # the fake engines load no weights

    async def launch(self, runner: ModelRunner) -> Launched | Failed:
        self.running.add(runner.name)
        self._record("start", runner.name)
        return Launched(endpoint=Endpoint(port=1, key="k"), started_at=time.time(), began=time.monotonic())

    async def await_ready(
        self, runner: ModelRunner, on_progress: ProgressSink, launched: Launched | None
    ) -> Started | Failed:
        await asyncio.sleep(self.start_delay)
        if runner.name in self.failing:
            self.running.discard(runner.name)
            return Failed(f"model {runner.name}: its container exited during start with code 1", (self.failing[runner.name],))
        return Started(took=self.start_delay)

    async def adopt(self, runner: ModelRunner, info: ContainerInfo) -> Adoption | NotAdoptable:
        return NotAdoptable(f"model {runner.name}: the fake lifecycle adopts nothing")

    async def stop(self, runner: ModelRunner, reason: str) -> Stopped | StopFailed:
        await asyncio.sleep(0.005)
        self.running.discard(runner.name)
        self._record("stop", runner.name)
        return Stopped()

    async def stop_after_loss(self, runner: ModelRunner, reason: str, *, kill: bool = False) -> Failed:
        if kill:
            self._record("kill", runner.name)
        self.running.discard(runner.name)
        return Failed(reason)

    async def sleep(self, runner: ModelRunner) -> Slept | Failed:
        await asyncio.sleep(0.005)
        self._record("sleep", runner.name)
        return Slept()

    async def wake(self, runner: ModelRunner) -> Woke | Failed:
        await asyncio.sleep(0.005)
        self._record("wake", runner.name)
        return Woke(took=0.005)

    async def tail_logs(self, runner: ModelRunner) -> list[str]:
        return []
