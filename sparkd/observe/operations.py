"""What operators see and do beside the request path: metrics, usage history, live
status for the page and ``sparkctl top``, ``prepare``, and the admin unix socket.

``Operations`` is created by the daemon right after the scheduler; it subscribes
the metrics, the history and the status hub to the scheduler's events,
runs three small background loops (memory sampling for the history's peaks, the
history's periodic flush, and giving the C heap's free pages back: ``allocator.py``),
and owns the admin socket's lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from .. import __version__
from ..adminjson import LiveStatus, PrepareOutcome, PrepareResult, RecentFailure, RecentMove
from ..allocator import trim_heap_forever
from ..hardware.memory import parse_meminfo
from ..runtime.failures import ImageMissing, RuntimeFailure
from ..scheduler.events import Event, FailureCause, Transitioned
from ..scheduler.state import ModelState
from ..scheduler.status import snapshot
from .history import History
from .metrics import Metrics

if TYPE_CHECKING:
    from ..config import Config
    from ..hardware.memory import MemoryGauge
    from ..runtime.podman import PodmanRuntime
    from ..scheduler.runner import ModelRunner
    from ..scheduler.scheduler import Scheduler

log = structlog.get_logger("sparkd.ops")

S = ModelState
SOCKET_NAME = "sparkd.sock"
SOCKET_MODE = 0o660
# A sample (podman stats per running container) costs tens of ms of CPU; every 5 s that was
# most of sparkd's idle CPU. Peaks that last less than this can be missed.
SAMPLE_EVERY_S = 15.0
FLUSH_EVERY_S = 10.0
RECENT_EVENTS = 100
"""State changes the status hub keeps for the page and ``sparkctl top`` (which show the last 30)."""
RECENT_FAILURES = 20
"""Failures the status hub keeps, each with the model's last log lines (at most 20, each cut at
``runtime.containerlogs.MAX_LINE_CHARS``)."""
RUNNING_STATES = frozenset({S.STARTING, S.READY, S.DRAINING, S.STOPPING, S.SLEEPING, S.WAKING})
MAX_UNIX_PATH = 107


class StatusHub:
    """Wakes the live views (SSE) when something changed; keeps recent transitions and failures."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self.closing = False
        self.recent: deque[RecentMove] = deque(maxlen=RECENT_EVENTS)
        self.failures: deque[RecentFailure] = deque(maxlen=RECENT_FAILURES)

    def on_event(self, event: Event) -> None:
        """Scheduler listener: keep moves and failures, wake the live views on any news."""
        if isinstance(event, Transitioned):
            at = round(event.at, 3)
            self.recent.append(
                {"at": at, "model": event.model, "from": event.old.value, "to": event.new.value, "reason": event.reason}
            )
            if isinstance(event.cause, FailureCause):
                self.failures.append(
                    {"at": at, "model": event.model, "message": event.cause.message, "log_lines": list(event.cause.log_lines)}
                )
        self.poke()

    def poke(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Return after the next change, or after ``timeout`` seconds."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def close(self) -> None:
        self.closing = True
        self.poke()


class Operations:
    def __init__(
        self, config: Callable[[], Config], scheduler: Scheduler, runtime: PodmanRuntime, memory: MemoryGauge,
        known_keys: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        """``config``: the configuration in force (a reload replaces it); ``known_keys``: the names of
        the keys file in force (the per-key metrics series)."""
        self._config = config
        self._scheduler = scheduler
        self._runtime = runtime
        self._memory = memory
        self.started_at = time.time()
        self.metrics = Metrics(scheduler, memory, known_keys=known_keys)
        self.history = History(Path(config().server.state_dir) / "history.sqlite3", pending_usage=self.metrics.take_usage)
        self.hub = StatusHub()
        self.socket_path = Path(config().server.runtime_dir) / SOCKET_NAME
        self._sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparkd-sampler")
        self._podman: Any = None  # the sampler thread's own Podman client
        self._tasks: list[asyncio.Task[Any]] = []
        scheduler.subscribe(self.metrics.on_event)
        scheduler.subscribe(self.history.on_event)
        scheduler.subscribe(self.hub.on_event)

    # -- lifespan ---------------------------------------------------------------------

    async def open(self) -> None:
        """Before adoption: open the history so adopted models continue their sessions, and admission
        knows the footprints measured before."""
        await self.history.open()
        self.metrics.key_usage.remember_today(await self.history.key_usage(days=1))
        for name, footprint in (await self.history.footprints()).items():
            self._scheduler.remember_footprint(name, footprint)

    async def adopted(self) -> None:
        """After adoption: close sessions of containers that did not survive, start the loops."""
        running = {r.name for r in self._scheduler.runners.values() if r.state in RUNNING_STATES}
        await self.history.close_stale(running)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sample_loop()), loop.create_task(self._flush_loop()),
                       loop.create_task(trim_heap_forever())]

    async def start_socket(self, runner: web.AppRunner) -> web.UnixSite | None:
        """The admin API on ``<runtime_dir>/sparkd.sock`` (mode 0660: the owner and group may use it)."""
        path = self.socket_path
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            log.warning("admin_socket_unavailable", path=str(path), reason="path too long for a unix socket")
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                path.unlink()  # left by an earlier sparkd; we hold the GPU lock, so it is not in use
            site = web.UnixSite(runner, str(path))
            await site.start()
            os.chmod(path, SOCKET_MODE)
        except OSError as error:
            log.warning("admin_socket_unavailable", path=str(path), reason=error.strerror or str(error))
            return None
        log.info("admin_socket_listening", path=str(path))
        return site

    def stopping(self) -> None:
        """Shutdown begins: end the live streams (SSE, followed logs) so they do not hold it up."""
        self.hub.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.history.flush_key_usage(self.metrics.key_usage.drain())
        await self.history.close(self.metrics.drain_usage())
        self._sampler.submit(self._close_podman)
        await asyncio.to_thread(self._sampler.shutdown, True)  # a stats call may still run: not on the loop
        try:
            if self.socket_path.is_socket():
                self.socket_path.unlink()
        except OSError:
            pass

    # -- live status ------------------------------------------------------------------

    def live(self) -> LiveStatus:
        """What the status page and ``sparkctl top`` show: status, recent events and failures."""
        config = self._config()
        return {
            **snapshot(self._scheduler),
            "server": {
                "version": __version__,
                "instance": config.server.instance,
                "started_at": round(self.started_at, 3),
                "now": round(time.time(), 3),
                "policy": config.lifecycle.policy,
                "listen": list(config.server.listen),
            },
            "recent": list(self.hub.recent)[-30:],
            "failures": list(self.hub.failures),
            "usage_today": self.metrics.key_usage.today(),
        }

    # -- background loops -----------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            usage = self.metrics.drain_usage()
            await self.history.flush(usage)
            await self.flush_key_usage()

    async def flush_key_usage(self) -> None:
        """Write the per-key usage counted since the last flush (before a read of the history wants it)."""
        await self.history.flush_key_usage(self.metrics.key_usage.drain())

    async def _sample_loop(self) -> None:
        """Peak memory while models run: host memory in use, each container's, the GPU's."""
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            try:
                await self.sample_memory()
            except Exception as error:  # noqa: BLE001 - a failed sample must not end the loop
                log.debug("memory_sample_failed", error=str(error))

    async def sample_memory(self) -> None:
        running = {r.name: r.spec.name for r in self._scheduler.runners.values() if r.state in RUNNING_STATES}
        if not running:
            return
        loop = asyncio.get_running_loop()
        host_used, containers = await loop.run_in_executor(self._sampler, self._sample_sync, list(running.values()))
        gpu_used = None
        if self._memory.mode == "nvidia-smi":
            reading = await self._memory.read()
            if reading is not None:
                gpu_used = int((reading.total - reading.available) * 1024 * 1024)  # nvidia-smi reports MiB
        for model, container in running.items():
            self.history.record_memory(model, host_used, containers.get(container), gpu_used)

    def _sample_sync(self, containers: list[str]) -> tuple[int | None, dict[str, int]]:
        host_used = None
        try:
            reading = parse_meminfo(Path("/proc/meminfo").read_text())
            if reading is not None:
                host_used = int((reading.total - reading.available) * 1024)
        except OSError:
            pass
        usage: dict[str, int] = {}
        try:
            if self._podman is None:
                from podman import PodmanClient

                self._podman = PodmanClient(base_url=self._runtime.url, timeout=10)
            for name in containers:
                try:
                    stats = self._podman.containers.get(name).stats(stream=False, decode=True)
                except Exception as error:  # noqa: BLE001 - gone meanwhile, or not running
                    log.debug("container_stats_skipped", container=name, error=str(error))
                    continue
                for entry in (stats or {}).get("Stats") or []:
                    if entry.get("MemUsage"):
                        usage[name] = int(entry["MemUsage"])
        except Exception as error:  # noqa: BLE001 - no Podman client or socket: the sample goes without container figures
            log.debug("container_stats_failed", error=str(error))
        return host_used, usage

    def _close_podman(self) -> None:
        if self._podman is not None:
            self._podman.close()
            self._podman = None

    # -- prepare -------------------------------------------------------------------------

    async def prepare(self, names: list[str]) -> list[PrepareResult]:
        """Create the containers of ``names`` ahead of time (not started) and check their images.

        One result per model: ``created``, ``recreated``, ``exists`` (the container is
        there with the current spec), ``running`` (left alone), ``busy`` (a start or stop
        is under way), ``image_missing`` or ``error`` with a message saying what to do.
        """
        results = []
        for name in names:
            results.append(await self._prepare_one(name))
        return results

    async def _prepare_one(self, name: str) -> PrepareResult:
        runner = self._scheduler.runners[name]
        port_range = self._config().defaults.port_range
        first, last = port_range[0], port_range[-1]

        async def create(runner: ModelRunner) -> PrepareOutcome:
            runtime = self._runtime
            try:
                before = await runtime.inspect(runner.spec.name)
                info = await runtime.ensure(runner.spec, (first, last))
            except ImageMissing as error:
                return {"result": "image_missing", "message": str(error)}
            except RuntimeFailure as error:
                return {"result": "error", "message": str(error)}
            self._scheduler.container_current(runner)
            if before is None:
                result = "created"
            elif before.id != info.id:
                result = "recreated"
            else:
                result = "exists"
            return {"result": result, "status": info.status, "port": info.host_port}

        outcome = await self._scheduler.while_stopped(name, create)
        if outcome is None:
            busy = runner.task is not None and not runner.task.done()
            if busy and runner.state in (S.STOPPED, S.FAILED):
                outcome = {"result": "busy", "message": f"model {name} is being started or stopped; try again shortly"}
            else:
                note = " (its container predates the configuration: it is re-created at the next start)" if runner.stale_spec else ""
                outcome = {"result": "running", "message": f"model {name} is {runner.state}; its container is left alone{note}"}
        log.info("model_prepared", model=name, result=outcome["result"])
        entry: PrepareResult = {
            "model": name, "container": runner.spec.name, "image": runner.spec.image, "result": outcome["result"]
        }
        entry.update(outcome)
        return entry
