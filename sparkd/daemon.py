"""The daemon's lifespan: start-up, serving, reload on SIGHUP, graceful shutdown.

Start-up order matters to systemd: take the GPU lock, bind the listeners,
reach Podman, adopt running containers, and only then send READY=1.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import structlog
from aiohttp import web

from . import logs
from .config import Config, ConfigError, load_config, parse_listen
from .cluster.head import HeadCoordinator
from .cluster.peers import PeerClient, PeerError, load_peers, warn_insecure
from .cluster.workers import WorkerLeases
from .engine.client import EngineClient
from .history import HistoryUnavailable
from .http.app import build_app
from .http.auth import KeyRing, KeysFileError, load_keys
from .http.connections import ConnectionGate, GuardedListener
from .http.context import TokenizeFailures
from .http.routing import ModelDirectory
from .lock import GpuLock
from .notify import Notifier, run_watchdog, watchdog_interval
from .ops import Operations
from .runtime import cdi
from .runtime.events import EventStream
from .runtime.podman import PodmanRuntime
from .scheduler.lifecycle import Lifecycle
from .scheduler.loadtimes import LoadTimes
from .scheduler.memory import MemoryGauge
from .scheduler.reconcile import adopt_running
from .scheduler.scheduler import Scheduler
from .scheduler.status import status_line
from .scheduler.watch import watch_serving_engines

log = structlog.get_logger("sparkd")

STATUS_REFRESH_S = 1.0


class StartupError(Exception):
    """sparkd cannot start; the message says why and what to do."""


@contextmanager
def startup_step(what: str, advice: str) -> Iterator[None]:
    """Any failure of one start-up step becomes a one-line ``StartupError`` naming the step, never a traceback."""
    try:
        yield
    except StartupError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever fails here, sparkd cannot start and must say so
        raise StartupError(f"{what} failed: {str(error) or repr(error)}. {advice}") from error


class Daemon:
    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.directory = ModelDirectory(config)
        self.keys = KeyRing()
        self.runtime = PodmanRuntime(config.podman.url, config.podman.timeout_s, config.server.instance)
        self.notifier = Notifier()
        self.reconciled = False
        self.tokenize_failures = TokenizeFailures()
        self.engine: EngineClient
        self.scheduler: Scheduler
        self.ops: Operations
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._background: list[asyncio.Task[Any]] = []
        self._reloads: set[asyncio.Task[bool]] = set()
        # Shown in front of STATUS= until the next successful reload ("reload failed: ...").
        self._status_note: str | None = None

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT; raises ``StartupError`` when it cannot start."""
        async with AsyncExitStack() as cleanup:
            await self._run(cleanup)
        log.info("sparkd_stopped")

    async def _run(self, cleanup: AsyncExitStack) -> None:
        """Start, serve, shut down; whatever was set up is torn down by ``cleanup`` (in reverse), on failure too."""
        config = self.config
        try:
            self.keys = await asyncio.to_thread(load_keys, config)
        except KeysFileError as error:
            raise StartupError(str(error)) from error
        _log_keys(self.keys, config)
        lock = GpuLock(Path(config.server.runtime_dir) / "gpu.lock")
        try:
            lock.acquire()
        except Exception as error:
            raise StartupError(str(error)) from error
        cleanup.callback(lock.release)
        cleanup.callback(self.runtime.close)
        loop = asyncio.get_running_loop()
        self.engine = EngineClient()
        cleanup.push_async_callback(self.engine.close)
        memory = MemoryGauge(config.gpu.memory_probe)
        with startup_step("probing the GPU memory", "set gpu.memory_probe = \"none\" to run without a probe"):
            await memory.resolve()
        load_times = LoadTimes(Path(config.server.state_dir) / "load-times.json")
        with startup_step("reading the load times", "move the file aside; sparkd starts a new one"):
            await asyncio.to_thread(load_times.load)
        try:
            peers = await asyncio.to_thread(load_peers, config.peers)
        except PeerError as error:
            raise StartupError(str(error)) from error
        warn_insecure(config.peers)
        self.peer_client = PeerClient()
        cleanup.push_async_callback(self.peer_client.close)
        coordinator = (
            HeadCoordinator(config, peers, self.peer_client, lambda model, reason: self.scheduler.model_lost(model, reason))
            if peers
            else None
        )
        lifecycle = Lifecycle(config, self.runtime, self.engine, memory, load_times, cluster=coordinator)
        self.scheduler = Scheduler(config, lifecycle)
        self.workers = WorkerLeases(self.scheduler)
        self.scheduler.subscribe(lambda _event: self._publish_status())
        self.ops = Operations(self, memory)  # metrics, history, live status, the admin socket
        cleanup.push_async_callback(self.ops.close)
        try:
            await self.ops.open()
        except HistoryUnavailable as error:
            raise StartupError(str(error)) from error
        events = EventStream(config.podman.url, config.server.instance, loop, self.scheduler.on_container_event)
        cleanup.callback(events.stop)
        runner = web.AppRunner(
            build_app(self), handler_cancellation=True, access_log=None, shutdown_timeout=5,
            keepalive_timeout=config.server.keepalive_timeout_s,
        )
        await runner.setup()
        cleanup.push_async_callback(runner.cleanup)
        assert runner.server is not None
        refused = self.ops.metrics.connections_refused
        gate = ConnectionGate(runner.server, lambda: self.config.server, lambda reason: refused.labels(reason).inc())
        cleanup.callback(gate.close)
        sites: list[web.BaseSite | GuardedListener] = []
        cleanup.push_async_callback(_stop_listeners, sites)  # runner.cleanup() stops the aiohttp sites
        for address in config.server.listen:
            host, port = parse_listen(address)
            site = GuardedListener(gate, host, port)
            try:
                await site.start()
            except OSError as error:
                raise StartupError(
                    f"cannot listen on {address}: {error.strerror or error}. Is another service using the port? "
                    "Change server.listen in the configuration"
                ) from error
            sites.append(site)
        log.info("listening", addresses=list(config.server.listen))
        admin_site = await self.ops.start_socket(runner)
        if admin_site is not None:
            sites.append(admin_site)
        try:
            version = await self.runtime.version()
        except Exception as error:
            raise StartupError(str(error)) from error
        log.info("podman_connected", url=config.podman.url, version=version)
        events.start()
        with startup_step("looking for the GPU's CDI devices", "check `nvidia-ctk cdi list`, or set gpu.devices = []"):
            await self._check_gpu_devices()
        with startup_step(
            "adopting the containers an earlier sparkd left running",
            f"check Podman (`podman ps --filter label=io.sparkd.managed=true`) and {config.podman.url}, then start sparkd again",
        ):
            await adopt_running(self.scheduler)
        with startup_step("closing the usage history's stale sessions", "check server.state_dir"):
            await self.ops.adopted()
        self.reconciled = True
        for signum, handler in ((signal.SIGTERM, self._stop.set), (signal.SIGINT, self._stop.set), (signal.SIGHUP, self._on_sighup)):
            loop.add_signal_handler(signum, handler)
        cleanup.callback(self._cancel_background)
        self._start_background()
        self.notifier.ready(self._status_text())
        log.info("sparkd_ready", models=len(self.scheduler.runners), config=str(self.config_path))
        await self._stop.wait()
        await self._shutdown(sites)

    def _cancel_background(self) -> None:
        for task in self._background:
            task.cancel()

    async def _check_gpu_devices(self) -> None:
        """Note when no CDI spec provides the GPU devices (GPU utility models then wait for a request)."""
        devices = self.config.gpu.devices
        if not devices or not any(m.gpu for m in self.config.enabled_models()):
            self.scheduler.gpu_missing = None
            return
        known, source = await asyncio.to_thread(cdi.known_devices)
        missing = [d for d in devices if d not in known]
        self.scheduler.gpu_missing = f"no CDI spec provides {', '.join(missing)} ({source})" if missing else None
        if missing:
            log.warning("gpu_devices_missing", devices=missing, source=source, fix="sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml")

    def _start_background(self) -> None:
        tasks = [
            self.scheduler.run_reaper(), watch_serving_engines(self.scheduler, self.engine), self._refresh_status(),
            self.workers.run_expiry(),
        ]
        interval = watchdog_interval()
        if interval:
            tasks.append(run_watchdog(self.notifier, interval))
        self._background = [asyncio.get_running_loop().create_task(t) for t in tasks]

    def _status_text(self) -> str:
        line = status_line(self.scheduler)
        return f"{self._status_note} | {line}" if self._status_note else line

    def _publish_status(self) -> None:
        self.notifier.status(self._status_text())

    async def _refresh_status(self) -> None:
        """Queue depth changes without a state change: refresh STATUS= now and then."""
        while True:
            await asyncio.sleep(STATUS_REFRESH_S)
            self._publish_status()

    # -- reload ----------------------------------------------------------------

    def _on_sighup(self) -> None:
        if self._stop.is_set():
            log.info("reload_ignored", reason="sparkd is stopping")
            return  # no RELOADING=1/READY=1 after STOPPING=1
        task = asyncio.get_running_loop().create_task(self.reload())
        self._reloads.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> bool:
        """Re-read the configuration; keep the running one when the new one is invalid."""
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                new = await asyncio.to_thread(load_config, self.config_path)
                keys = await asyncio.to_thread(load_keys, new)
            except KeysFileError as error:
                for problem in error.problems:
                    log.error("keys_problem", file=error.path, problem=problem)
                log.error("reload_rejected", problems=len(error.problems), keys_file=error.path)
                self._status_note = f"reload failed: keys file {error.path}: {error.problems[0]}; serving the previous configuration"
                self.notifier.ready(self._status_text())
                return False
            except ConfigError as error:
                for problem in error.problems:
                    log.error("config_problem", file=problem.file, key=problem.key, expected=problem.expected, found=problem.found)
                log.error("reload_rejected", problems=len(error.problems), config=str(self.config_path))
                first = error.problems[0]
                self._status_note = (
                    f"reload failed: {len(error.problems)} problem(s), first {first.key} in {first.file}; "
                    "serving the previous configuration"
                )
                self.notifier.ready(self._status_text())
                return False
            except Exception as error:  # noqa: BLE001 - systemd waits for READY=1 after RELOADING=1
                log.error("reload_failed", config=str(self.config_path), error=repr(error), exc_info=error)
                self._status_note = f"reload failed: {error!r}; serving the previous configuration"
                self.notifier.ready(self._status_text())
                return False
            self._apply(new, keys)
            _log_keys(keys, new)
            await self._check_gpu_devices()
            self._status_note = None
            self.notifier.ready(self._status_text())
            log.info("config_reloaded", models=len(new.models), config=str(self.config_path))
            return True

    def _apply(self, new: Config, keys: KeyRing) -> None:
        if new.server.listen != self.config.server.listen:
            log.warning("config_needs_restart", key="server.listen", hint="systemctl restart sparkd")
        if new.server.keepalive_timeout_s != self.config.server.keepalive_timeout_s:
            log.warning("config_needs_restart", key="server.keepalive_timeout_s", hint="systemctl restart sparkd")
        # [workers.<model>] tables apply at once (each lease request reads them); the lease routes exist from start-up.
        if new.peers != self.config.peers or new.cluster != self.config.cluster or new.cluster_configured != self.config.cluster_configured:
            log.warning("config_needs_restart", key="peers/cluster", hint="systemctl restart sparkd")
        if new.podman != self.config.podman or new.server.runtime_dir != self.config.server.runtime_dir:
            log.warning("config_needs_restart", key="podman/server.runtime_dir", hint="systemctl restart sparkd")
        if new.log != self.config.log:
            logs.configure(new.log.format, new.log.level)
        self.scheduler.apply_config(new)
        self.directory = ModelDirectory(new)
        self.keys = keys
        self.config = new

    # -- shutdown --------------------------------------------------------------

    async def _shutdown(self, sites: list[web.BaseSite | GuardedListener]) -> None:
        # Kept in STATUS= while in-flight requests drain.
        self._status_note = "stopping"
        self.notifier.stopping(self._status_text())
        log.info("sparkd_stopping", on_shutdown=self.config.server.on_shutdown)
        self.ops.stopping()
        for site in sites:
            await site.stop()
        await self.scheduler.drain(self.config.server.shutdown_grace_s)
        # Workers granted to other heads go either way: their leases cannot outlive this daemon.
        await self.workers.release_all("sparkd is stopping")
        if self.config.server.on_shutdown == "stop":
            await self.scheduler.stop_all()
        else:
            await self.scheduler.stop_multi_node()  # their worker leases end with this daemon
            log.info("containers_kept", models=[r.name for r in self.scheduler.runners.values() if r.endpoint])


async def _stop_listeners(sites: list[web.BaseSite | GuardedListener]) -> None:
    for site in sites:
        if isinstance(site, GuardedListener):
            await site.stop()  # idempotent


def _log_keys(keys: KeyRing, config: Config) -> None:
    """Which keys are in force (their names only) and how keyless requests are treated."""
    log.info("keys_loaded", file=config.server.keys_file, count=len(keys), names=keys.names, anonymous=config.server.anonymous)


def serve(config_path: Path) -> int:
    """Run the daemon in the foreground; the exit code for the CLI."""
    try:
        config = load_config(config_path)
    except ConfigError as error:
        logs.configure()
        for problem in error.problems:
            log.error("config_problem", file=problem.file, key=problem.key, expected=problem.expected, found=problem.found)
        log.error("startup_failed", reason=f"{len(error.problems)} problem(s) in {config_path}; run `sparkd check-config`")
        return 1
    logs.configure(config.log.format, config.log.level)
    try:
        asyncio.run(Daemon(config, config_path).run())
    except StartupError as error:
        log.error("startup_failed", reason=str(error))
        return 1
    return 0
