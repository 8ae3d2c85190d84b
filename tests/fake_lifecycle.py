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
from sparkd.engine.progress import DOWNLOAD_PHASE, LoadProgress
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
    """``failing``: model → the log line its start fails with (a test may add and remove entries).

    ``absent``: model → how long pulling its absent weights takes (its weights are present once
    pulled); ``pull_failing``: models whose pull fails; ``auto_pull``: as ``lifecycle.auto_pull``.
    Only the models named in ``absent`` have weights to manage.
    """

    def __init__(
        self, tmp: Path, start_delay: float = 0.02, failing: dict[str, str] | None = None,
        absent: dict[str, float] | None = None,
    ) -> None:
        self.absent: dict[str, float] = dict(absent or {})
        self.managed: set[str] = set(self.absent)
        self.pull_failing: set[str] = set()
        self.auto_pull = True
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

    def manages_weights(self, runner: ModelRunner) -> bool:
        return runner.name in self.managed

    async def check_weights(self, runner: ModelRunner) -> Failed | bool:
        await asyncio.sleep(0)  # a look at the cache on disk, in a worker thread
        if runner.name not in self.absent:
            return False
        if not self.auto_pull:
            return Failed(
                f"model {runner.name}: its weights are absent and lifecycle.auto_pull is off; "
                f"run `sparkctl pull {runner.name}` and ask again", needs_operator=True, code="weights_missing",
            )
        return True

    async def pull_weights(self, runner: ModelRunner, on_progress: ProgressSink) -> Failed | None:
        """Sleeps ``absent[model]`` in steps, reporting a download's progress at each."""
        self._record("pull", runner.name)
        took = self.absent[runner.name]
        steps = 10
        for step in range(steps):
            left = took * (steps - step) / steps
            on_progress(LoadProgress(DOWNLOAD_PHASE, step / steps, f"pulling {runner.name}", eta_s=left))
            await asyncio.sleep(took / steps)
        if runner.name in self.pull_failing:
            self._record("pull_failed", runner.name)
            return Failed(f"model {runner.name}: its weights could not be pulled: the hub answered 500",
                          needs_operator=True, code="weights_pull_failed")
        self.absent.pop(runner.name)
        self._record("pulled", runner.name)
        return None

    async def ensure_weights(self, runner: ModelRunner, on_progress: ProgressSink) -> Failed | None:
        needed = await self.check_weights(runner)
        if isinstance(needed, Failed):
            return needed
        return await self.pull_weights(runner, on_progress) if needed else None

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
