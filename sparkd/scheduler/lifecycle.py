"""Carrying out one model's start, stop, sleep, wake and adoption.

The scheduler decides *what* happens, and alone moves the model's state and its
lease share; this module does the slow work, driving Podman and the engine, and
returns what came of it (``outcomes``).  Every failure is an outcome too, never
an exception, so the scheduler can always just await an action.  It reads the
model's runner (its spec, its endpoint, whether its container died) and writes
nothing on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog

from ..cluster.head import HeadCoordinator, WorkersUnavailable
from ..config import Config
from ..engine.client import Endpoint, EngineClient, EngineError
from ..engine.progress import parse_line
from ..hardware.memory import MemoryGauge, container_memory_peak_bytes
from ..runtime.containerlogs import LogFollower
from ..runtime.containers import ContainerInfo
from ..runtime.failures import PortInUse, RuntimeFailure
from ..runtime.podman import PodmanRuntime
from ..weights.loadstage import pull_progress
from ..weights.service import PullJob, WeightService, WeightsUnavailable
from .contract import ProgressSink
from .guard import LoadWatch, Tripped, guard_message
from .loadtimes import LoadTimes
from .outcomes import (
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
from .runner import ModelRunner

log = structlog.get_logger("sparkd.scheduler")

INSPECT_EVERY_S = 2.0
PORT_ATTEMPTS = 3
LOG_LINES_ON_FAILURE = 20


class StartFailed(Exception):
    def __init__(self, message: str, log_lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.log_lines = log_lines or []


class GuardTripped(Exception):
    """Free memory fell under ``gpu.min_free`` while the model loaded."""

    def __init__(self, tripped: Tripped) -> None:
        super().__init__("memory guard")
        self.tripped = tripped


@dataclass
class Lifecycle:
    config: Config
    runtime: PodmanRuntime
    engine: EngineClient
    memory: MemoryGauge
    load_times: LoadTimes
    cluster: HeadCoordinator | None = None
    """Worker leases on the peers, for models that span several nodes."""
    weights: WeightService | None = None
    """The weight pulls a start waits for (models with ``hf_model``)."""

    def apply_config(self, config: Config) -> None:
        self.config = config
        if self.cluster is not None:
            self.cluster.config = config
        if self.weights is not None:
            self.weights.apply_config(config)

    # -- start ----------------------------------------------------------------

    def manages_weights(self, runner: ModelRunner) -> bool:
        return self.weights is not None and bool(runner.config.hf_model)

    async def check_weights(self, runner: ModelRunner) -> Failed | bool:
        """True when the model's weights must be pulled (absent or partial, ``lifecycle.auto_pull`` on)."""
        if self.weights is None or not runner.config.hf_model:
            return False
        try:
            missing = await self.weights.missing(runner.config)
        except WeightsUnavailable as error:
            return Failed(str(error), needs_operator=True, code="weights_unavailable")
        if missing is None:
            return False
        if not self.config.lifecycle.auto_pull:
            return Failed(
                f"model {runner.name}: its weights ({runner.config.hf_model}) are {missing} and "
                f"lifecycle.auto_pull is off; run `sparkctl pull {runner.name}` and ask again",
                needs_operator=True, code="weights_missing",
            )
        return True

    async def pull_weights(self, runner: ModelRunner, on_progress: ProgressSink) -> Failed | None:
        """Pull the model's weights (joining a pull under way), its progress as a load stage."""
        if self.weights is None:
            return None
        try:
            job = self.weights.start(runner.name)
        except WeightsUnavailable as error:
            return Failed(str(error), needs_operator=True, code="weights_unavailable")

        def report(pulled: PullJob) -> None:
            on_progress(pull_progress(pulled))

        job.listeners.append(report)
        try:
            await self.weights.wait(job)
        except WeightsUnavailable as error:
            return Failed(f"model {runner.name}: its weights could not be pulled: {error}", needs_operator=True,
                          code="weights_pull_failed")
        finally:
            job.listeners.remove(report)
        return None

    async def ensure_weights(self, runner: ModelRunner, on_progress: ProgressSink) -> Failed | None:
        """Before ``launch``: the model's weights in its cache, pulled first when absent (``lifecycle.auto_pull``).

        The scheduler pulls them before it admits the model (``check_weights``, ``pull_weights``);
        this catches weights removed since.  Its own step, so the start timeout, which counts from
        ``launch``, never counts a download.
        """
        needed = await self.check_weights(runner)
        if isinstance(needed, Failed):
            return needed
        return await self.pull_weights(runner, on_progress) if needed else None

    async def launch(self, runner: ModelRunner) -> Launched | Failed:
        """Bring the model's container up (create or re-create it, start it); ``await_ready`` follows."""
        began = time.monotonic()
        try:
            await self.memory.wait_for(runner.load_claim, self.config.gpu.reclaim_timeout_s)
            await self._drop_page_cache(runner)
            if runner.config.spans:
                await self._acquire_workers(runner)
            info = await self._create_and_start(runner)
            endpoint = self._endpoint(runner, info)
        except RuntimeFailure as error:
            return await self._failed(runner, str(error), [], error)
        except (StartFailed, WorkersUnavailable) as error:
            return await self._failed(runner, str(error), getattr(error, "log_lines", []))
        return Launched(endpoint=endpoint, started_at=info.started_at or time.time(), began=began, pid=info.pid)

    async def _drop_page_cache(self, runner: ModelRunner) -> None:
        """``gpu.drop_caches_before_load``: room for the load's peak plus the floor, out of the page cache."""
        gpu = self.config.gpu
        if not (gpu.drop_caches_before_load and self.memory.unified):
            return
        reading = await self.memory.read()
        if reading is not None:
            total = reading.total * reading.unit_bytes
            await self.memory.drop_page_cache_if_short(int(runner.load_claim * total) + gpu.min_free)

    async def _create_and_start(self, runner: ModelRunner) -> ContainerInfo:
        attempts = 0
        while True:
            info = await self.runtime.ensure(runner.spec, _port_range(self.config))
            if info.running:
                return info
            try:
                await self.runtime.start(runner.spec.name, image=runner.spec.image)
                return await self.runtime.inspect(runner.spec.name) or info
            except PortInUse:
                # Something took the allocated port between its check and this start: pick another.
                attempts += 1
                if runner.spec.host_port is not None or attempts >= PORT_ATTEMPTS:
                    raise
                log.warning("container_port_taken", model=runner.name, port=info.host_port, attempt=attempts)
                await self.runtime.remove(runner.spec.name)

    async def _acquire_workers(self, runner: ModelRunner) -> None:
        if self.cluster is None:
            raise WorkersUnavailable(f"model {runner.name} spans nodes but this sparkd has no [peers] configured")
        await self.cluster.acquire(runner.config)

    async def release_workers(self, runner: ModelRunner, reason: str) -> None:
        if self.cluster is not None and runner.config.spans:
            await self.cluster.release(runner.name, reason)

    async def adopt(self, runner: ModelRunner, info: ContainerInfo) -> Adoption | NotAdoptable:
        """Look at a container left running by an earlier sparkd: serving, still loading, or not adoptable."""
        try:
            endpoint = self._endpoint(runner, info)
        except StartFailed as error:
            log.warning("container_not_adoptable", model=runner.name, error=str(error))
            return NotAdoptable(str(error))
        started_at = info.started_at or time.time()
        serving = endpoint is None or await self.engine.is_ready(endpoint, runner.config.readiness_path, timeout=5.0)
        return Adoption(container=info.name, endpoint=endpoint, started_at=started_at, serving=serving)

    async def await_ready(
        self, runner: ModelRunner, on_progress: ProgressSink, launched: Launched | None,
    ) -> Started | Failed:
        """Wait until the engine of the runner's container answers (at the runner's endpoint).

        ``launched``: this sparkd started the container (its start timeout counts from then, its
        load time is recorded); None: an adopted container that was still loading.
        """
        began = launched.began if launched is not None else time.monotonic()
        follower = self._follow_progress(runner, on_progress)
        watch = await self._load_watch(runner, launched.pid if launched is not None else None)
        try:
            await self._wait_ready(runner, runner.endpoint, began, watch)
        except GuardTripped as error:
            return await self._guard_stopped(runner, error.tripped, "loading")
        except (StartFailed, RuntimeFailure) as error:
            return await self._failed(runner, str(error), getattr(error, "log_lines", []))
        finally:
            follower.stop()
        ready, total = await self._measure(watch.pid)
        if launched is None:
            # An adopted container's load began with the container, under the earlier sparkd: its peak is unknown.
            return Started(took=max(0.0, time.time() - (runner.started_at or time.time())), ready=ready, total=total)
        took = time.monotonic() - began
        await self.load_times.record(runner.name, took)
        return Started(took=took, peak=await self._load_peak(watch, ready), ready=ready, total=total)

    async def _measure(self, pid: int | None) -> tuple[int | None, int | None]:
        """The container's share now and the memory the lease shares, in bytes: on unified memory its
        cgroup's memory, on a discrete GPU its processes' GPU memory (``MemoryGauge.container_bytes``)."""
        if pid is None or not self.memory.measures_containers:
            return None, None
        used = await self.memory.container_bytes(pid)
        reading = await self.memory.read()
        return used, (int(reading.total * reading.unit_bytes) if reading is not None else None)

    async def _load_peak(self, watch: LoadWatch, ready: int | None) -> int | None:
        """A start's peak: the most its samples saw, or on unified memory the kernel's own high-water
        mark of the container's cgroup (created with the container, so it covers exactly this load)."""
        if ready is None:
            return None
        kernel = None
        if self.memory.unified and watch.pid is not None:
            kernel = await asyncio.to_thread(container_memory_peak_bytes, watch.pid)
        return max(watch.peak or 0, ready, kernel or 0)

    async def _load_watch(self, runner: ModelRunner, pid: int | None) -> LoadWatch:
        """The memory watch of a load; ``pid``: its container's first process, when known."""
        if pid is None:
            try:
                info = await self.runtime.inspect(runner.spec.name)
            except RuntimeFailure:
                info = None
            pid = info.pid if info is not None else None
        return LoadWatch(self.memory, self.config.gpu.min_free, pid)

    async def _guard_stopped(self, runner: ModelRunner, tripped: Tripped, doing: str) -> Failed:
        """Kill the container first (each second counts), then clean up as any failed load."""
        try:
            await self.runtime.kill(runner.spec.name)
        except RuntimeFailure as error:
            log.error("memory_guard_kill_failed", model=runner.name, error=str(error))
        log.error(
            "memory_guard_stopped", model=runner.name, doing=doing, available_bytes=tripped.available,
            min_free=tripped.floor, peak_bytes=tripped.peak,
        )
        failed = await self._failed(runner, guard_message(runner.name, tripped, doing), [])
        return Failed(failed.message, failed.log_lines, code="memory_guard")

    async def _failed(self, runner: ModelRunner, message: str, log_lines: list[str],
                      cause: RuntimeFailure | None = None) -> Failed:
        """Stop what is left of a failed model; ``cause``: the container operation that failed, which
        says whether retrying can help."""
        lines = log_lines or await self.tail_logs(runner)
        await self._clean_up_failed(runner)
        await self.release_workers(runner, "the model failed")
        if cause is not None:
            return Failed(message, tuple(lines), needs_operator=cause.needs_operator, code=cause.code)
        return Failed(message, tuple(lines))

    def _endpoint(self, runner: ModelRunner, info: ContainerInfo) -> Endpoint | None:
        """Where the container's engine answers; None when it has no engine API (a Ray worker)."""
        # A host-network container (multi-node) publishes nothing: its engine listens on the port itself.
        port = info.host_port or runner.spec.host_port
        if not runner.config.readiness_path:
            return None
        if port is None or info.engine_key is None:
            raise StartFailed(
                f"container {info.name} has no published port or engine key; remove it with "
                f"`podman rm -f {info.name}` and sparkd re-creates it"
            )
        return Endpoint(port=port, key=info.engine_key)

    def _follow_progress(self, runner: ModelRunner, on_progress: ProgressSink) -> LogFollower:
        def on_line(line: str) -> None:
            progress = parse_line(line)
            if progress is not None:
                on_progress(progress)

        follower = LogFollower(
            self.runtime.url,
            runner.spec.name,
            asyncio.get_running_loop(),
            on_line,
            since=runner.start_requested_at - 1,
        )
        follower.start()
        return follower

    async def _wait_ready(
        self, runner: ModelRunner, endpoint: Endpoint | None, began: float, watch: LoadWatch | None = None,
    ) -> None:
        lifecycle = self.config.lifecycle
        timeout = runner.config.start_timeout_s or lifecycle.start_timeout_s
        deadline = began + timeout
        last_inspect = time.monotonic()
        while True:
            if runner.died.is_set():
                raise StartFailed(await self._exit_message(runner))
            tripped = await watch.sample() if watch is not None else None
            if tripped is not None:
                raise GuardTripped(tripped)
            if endpoint is None:
                # No readiness path (a Ray worker): a running container is ready.
                info = await self.runtime.inspect(runner.spec.name)
                if info is None or not info.running:
                    raise StartFailed(await self._exit_message(runner, info))
                return
            if await self.engine.is_ready(endpoint, runner.config.readiness_path):
                return
            now = time.monotonic()
            if now >= deadline:
                raise StartFailed(
                    f"model {runner.name} was not ready after {timeout:.0f}s (start_timeout_s); "
                    f"its engine never answered {runner.config.readiness_path}"
                )
            if now - last_inspect >= INSPECT_EVERY_S:
                # The event stream tells us about deaths at once; this covers a lost stream.
                last_inspect = now
                try:
                    info = await self.runtime.inspect(runner.spec.name)
                except RuntimeFailure as error:
                    log.warning("container_inspect_failed", model=runner.name, error=str(error))  # unknown: keep probing
                else:
                    if info is None or not info.running:
                        raise StartFailed(await self._exit_message(runner, info))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(runner.died.wait(), lifecycle.probe_interval_s)

    async def _exit_message(self, runner: ModelRunner, info: ContainerInfo | None = None) -> str:
        if runner.loss:
            return runner.loss
        if info is None:
            try:
                info = await self.runtime.inspect(runner.spec.name)
            except RuntimeFailure:
                info = None
        code = info.exit_code if info is not None else None
        return f"model {runner.name}: its container exited during start" + (f" with code {code}" if code is not None else "")

    async def tail_logs(self, runner: ModelRunner) -> list[str]:
        """The engine's last log lines, quoted in failure messages."""
        try:
            return await self.runtime.tail_logs(runner.spec.name, LOG_LINES_ON_FAILURE)
        except RuntimeFailure:
            return []

    async def _clean_up_failed(self, runner: ModelRunner) -> None:
        """Make sure a failed model's container is not left running (it may hold GPU memory)."""
        try:
            await self.runtime.stop(runner.spec.name, self.config.lifecycle.stop_timeout_s)
        except RuntimeFailure as error:
            log.warning("container_stop_failed", model=runner.name, error=str(error))

    # -- stop -----------------------------------------------------------------

    async def stop(self, runner: ModelRunner, reason: str) -> Stopped | StopFailed:
        """Stop the model's container and return its worker leases."""
        try:
            info = await self.runtime.stop(runner.spec.name, self.config.lifecycle.stop_timeout_s)
        except RuntimeFailure as error:
            return StopFailed(f"could not stop model {runner.name}: {error}", await self._still_running(runner))
        if info is not None and info.running:
            return StopFailed(f"model {runner.name}: container still running after stop", container_running=True)
        await self.release_workers(runner, reason)
        return Stopped()

    async def _still_running(self, runner: ModelRunner) -> bool:
        """Whether the container may still run after a failed stop (True when Podman cannot tell)."""
        try:
            info = await self.runtime.inspect(runner.spec.name)
        except RuntimeFailure:
            return True
        return info is not None and info.running

    async def stop_after_loss(self, runner: ModelRunner, reason: str, *, kill: bool = False) -> Failed:
        """A model whose container or peer went away, or that a watch gave up: make sure it is stopped
        (``kill``: SIGKILL at once), return its worker leases."""
        lines = await self.tail_logs(runner)
        if kill:
            try:
                await self.runtime.kill(runner.spec.name)
            except RuntimeFailure as error:
                log.warning("container_kill_failed", model=runner.name, error=str(error))
        await self._clean_up_failed(runner)
        await self.release_workers(runner, reason)
        return Failed(reason, tuple(lines))

    # -- sleep / wake (vLLM sleep mode) -----------------------------------------

    async def sleep(self, runner: ModelRunner) -> Slept | Failed:
        """Put the engine to sleep (KV cache freed; weights offloaded at level 1, discarded at level 2)."""
        assert runner.endpoint is not None
        level = runner.sleep_level
        try:
            await self.engine.post_json(runner.endpoint, f"/sleep?level={level}", timeout=self.config.lifecycle.start_timeout_s)
        except EngineError as error:
            log.warning("model_sleep_failed", model=runner.name, error=str(error))
            return Failed(f"model {runner.name} could not be put to sleep: {error}")
        watch = await self._load_watch(runner, None)
        resident, total = await self._measure(watch.pid)
        return Slept(level=level, resident=resident, total=total)

    async def wake(self, runner: ModelRunner) -> Woke | Failed:
        began = time.monotonic()
        endpoint = runner.endpoint
        assert endpoint is not None
        try:
            await self.memory.wait_for(runner.load_claim, self.config.gpu.reclaim_timeout_s)
            await self.engine.post_json(endpoint, "/wake_up", timeout=self.config.lifecycle.start_timeout_s)
            await self._wait_ready(runner, endpoint, began, await self._load_watch(runner, None))
        except GuardTripped as error:
            return await self._guard_stopped(runner, error.tripped, "waking up")
        except (EngineError, StartFailed, RuntimeFailure) as error:
            return await self._failed(runner, f"model {runner.name} failed to wake up: {error}", [])
        return Woke(took=time.monotonic() - began)


def _port_range(config: Config) -> tuple[int, int]:
    first, last = config.defaults.port_range
    return first, last
