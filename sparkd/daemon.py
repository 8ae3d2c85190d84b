"""The daemon's lifespan: start-up, serving, reload on SIGHUP, graceful shutdown.

Start-up order matters to systemd: take the GPU lock, bind the listeners,
reach Podman, adopt running containers, and only then send READY=1.
Like uvicorn's ``serve()``, ``Daemon.run`` is three steps: ``startup`` (each
resource's release goes on an ``AsyncExitStack`` the moment it is acquired, so a
failure at any step releases exactly what was acquired before it), the main loop
(wait for SIGTERM/SIGINT), and ``shutdown`` (stop listening, drain, stop models);
the stack then releases everything in reverse order.

What a reload replaces (configuration, model directory, keys, compiled fixups) is one
frozen ``Snapshot``, swapped with one assignment; the services are built once.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from . import logsetup
from .cluster.head import HeadCoordinator
from .cluster.peers import Peer, PeerClient, PeerError, load_peers, warn_insecure
from .cluster.workers import WorkerLeases
from .config import Config, ConfigError, load_config, parse_listen
from .config.keys import KeysFileError, keys_of
from .engine.client import EngineClient
from .fixups.context import TokenizeFailures
from .fleet.coordinator import Fleet
from .hardware import cdi
from .hardware.memory import MemoryGauge
from .http.app import build_app
from .http.auth import KeyRing
from .http.connections import ConnectionGate, GuardedListener
from .http.snapshot import Snapshot, SnapshotHolder
from .lock import GpuLock
from .notify import Notifier, run_watchdog, watchdog_interval
from .observe.history import HistoryUnavailable
from .observe.operations import Operations
from .runtime.eventstream import EventStream
from .runtime.podman import PodmanRuntime
from .scheduler.lifecycle import Lifecycle
from .scheduler.loadtimes import LoadTimes
from .scheduler.reconcile import adopt_running
from .scheduler.running_guard import guard_running_models
from .scheduler.scheduler import Scheduler
from .scheduler.stall import watch_for_stalls
from .scheduler.status import status_line
from .scheduler.watch import watch_serving_engines
from .weights.peerpulls import PeerPulls
from .weights.service import WeightService

log = structlog.get_logger("sparkd")

STATUS_REFRESH_S = 1.0
RESTART_HINT = "systemctl restart sparkd"

Listener = web.BaseSite | GuardedListener


class StartupError(Exception):
    """sparkd cannot start; the message says why and what to do."""


@contextmanager
def startup_step(what: str, advice: str) -> Iterator[None]:
    """Any failure of one start-up step becomes a one-line ``StartupError`` naming the step, never a traceback."""
    try:
        yield
    except StartupError:
        raise
    except Exception as error:  # whatever fails here, sparkd cannot start and must say so
        raise StartupError(f"{what} failed: {str(error) or repr(error)}. {advice}") from error


@dataclass(frozen=True)
class Services:
    """What start-up builds once; a reload changes what they serve, never which they are."""

    runtime: PodmanRuntime
    engine: EngineClient
    scheduler: Scheduler
    workers: WorkerLeases
    ops: Operations
    memory: MemoryGauge
    fleet: Fleet
    weights: WeightService | None = None


class Daemon:
    def __init__(self, config: Config, config_path: Path) -> None:
        self.config_path = config_path
        self.snapshot = SnapshotHolder(Snapshot.of(config, KeyRing()))
        self.notifier = Notifier()
        self.reconciled = asyncio.Event()
        self.tokenize_failures = TokenizeFailures()
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[bool]] = set()
        # Shown in front of STATUS= until the next successful reload ("reload failed: ...").
        self._status_note: str | None = None

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self.snapshot.current.config

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT; raises ``StartupError`` when it cannot start."""
        async with AsyncExitStack() as stack:
            services, listeners = await self.startup(stack)
            await self.main_loop()
            await self.shutdown(services, listeners)
        log.info("sparkd_stopped")

    # -- start-up ----------------------------------------------------------------

    async def startup(self, stack: AsyncExitStack) -> tuple[Services, list[Listener]]:
        """Acquire and start everything, each release on ``stack`` right after its acquisition; READY=1 at the end."""
        config = self.config
        await self._load_keys(config)
        _take_gpu_lock(stack, config)
        services = await self._build_services(stack, config)
        listeners = await self._listen(stack, services, config)
        await self._reconcile(stack, services, config)
        self._handle_signals(services)
        await self._start_background(stack, services)
        self.notifier.ready(self._status_text(services.scheduler))
        log.info("sparkd_ready", models=len(services.scheduler.runners), config=str(self.config_path))
        return services, listeners

    async def _load_keys(self, config: Config) -> None:
        try:
            keys = KeyRing(await asyncio.to_thread(keys_of, config))
        except KeysFileError as error:
            raise StartupError(str(error)) from error
        self.snapshot.current = Snapshot.of(config, keys)
        _log_keys(keys, config)

    async def _build_services(self, stack: AsyncExitStack, config: Config) -> Services:
        runtime = PodmanRuntime(config.podman.url, config.podman.timeout_s, config.server.instance)
        stack.callback(runtime.close)
        engine = EngineClient()
        stack.push_async_callback(engine.close)
        memory = MemoryGauge(config.gpu.memory_probe)
        with startup_step("probing the GPU memory", "set gpu.memory_probe = \"none\" to run without a probe"):
            await memory.resolve()
        load_times = LoadTimes(Path(config.server.state_dir) / "load-times.json")
        with startup_step("reading the load times", "move the file aside; sparkd starts a new one"):
            await asyncio.to_thread(load_times.load)
        scheduler: Scheduler  # built after the coordinator, which reports lost workers to it
        peers, peer_client = await _peers(stack, config)
        coordinator = HeadCoordinator(config, peers, peer_client, lambda model, reason: scheduler.model_lost(model, reason)) if peers else None
        weights = WeightService(config)
        if coordinator is not None:
            peer_pulls = PeerPulls(coordinator.peers, coordinator.client)
            weights.peer_pull, weights.peer_presence = peer_pulls.follow, peer_pulls.missing
        stack.push_async_callback(weights.close)
        lifecycle = Lifecycle(config, runtime, engine, memory, load_times, cluster=coordinator, weights=weights)
        scheduler = Scheduler(config, lifecycle, unified_memory=memory.unified)
        workers = WorkerLeases(scheduler)
        scheduler.subscribe(lambda _event: self._publish_status(scheduler))
        ops = Operations(  # metrics, history, live status, the admin socket
            lambda: self.config, scheduler, runtime, memory, known_keys=lambda: self.snapshot.current.keys.name_set
        )
        stack.push_async_callback(ops.close)
        try:
            await ops.open()
        except HistoryUnavailable as error:
            raise StartupError(str(error)) from error
        fleet = Fleet(lambda: self.config, scheduler, peers, peer_client)
        await fleet.start()
        stack.push_async_callback(fleet.close)
        return Services(runtime, engine, scheduler, workers, ops, memory, fleet, weights)

    async def _listen(self, stack: AsyncExitStack, services: Services, config: Config) -> list[Listener]:
        """Bind every ``server.listen`` address and the admin socket."""
        app = build_app(
            self.snapshot, scheduler=services.scheduler, engine=services.engine, runtime=services.runtime,
            operations=services.ops, workers=services.workers, tokenize_failures=self.tokenize_failures,
            reconciled=self.reconciled, fleet=services.fleet, weights=services.weights,
        )
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=5, keepalive_timeout=config.server.keepalive_timeout_s,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        assert runner.server is not None
        refused = services.ops.metrics.connections_refused
        gate = ConnectionGate(runner.server, lambda: self.config.server, lambda reason: refused.labels(reason).inc())
        stack.callback(gate.close)
        listeners: list[Listener] = []
        stack.push_async_callback(_stop_listeners, listeners)  # runner.cleanup() stops the aiohttp sites
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
            listeners.append(site)
        log.info("listening", addresses=list(config.server.listen))
        admin_site = await services.ops.start_socket(runner)
        if admin_site is not None:
            listeners.append(admin_site)
        return listeners

    async def _reconcile(self, stack: AsyncExitStack, services: Services, config: Config) -> None:
        """Reach Podman, follow its events and adopt the containers an earlier sparkd left running."""
        scheduler = services.scheduler
        events = EventStream(config.podman.url, config.server.instance, asyncio.get_running_loop(), scheduler.on_container_event)
        stack.callback(events.stop)
        try:
            version = await services.runtime.version()
        except Exception as error:
            raise StartupError(str(error)) from error
        log.info("podman_connected", url=config.podman.url, version=version)
        events.start()
        with startup_step("looking for the GPU's CDI devices", "check `nvidia-ctk cdi list`, or set gpu.devices = []"):
            await self._check_gpu_devices(scheduler)
        with startup_step(
            "adopting the containers an earlier sparkd left running",
            f"check Podman (`podman ps --filter label=io.sparkd.managed=true`) and {config.podman.url}, then start sparkd again",
        ):
            await adopt_running(scheduler)
        with startup_step("closing the usage history's stale sessions", "check server.state_dir"):
            await services.ops.adopted()
        self.reconciled.set()

    def _handle_signals(self, services: Services) -> None:
        # Not undone on the exit stack: until the loop closes, a second SIGTERM or a SIGHUP
        # while sparkd releases its resources must not kill it half-way through (their default action).
        loop = asyncio.get_running_loop()
        handlers = ((signal.SIGTERM, self._stop.set), (signal.SIGINT, self._stop.set), (signal.SIGHUP, partial(self._on_sighup, services)))
        for signum, handler in handlers:
            loop.add_signal_handler(signum, handler)

    async def _start_background(self, stack: AsyncExitStack, services: Services) -> None:
        scheduler = services.scheduler
        jobs = [
            scheduler.run_reaper(), watch_serving_engines(scheduler, services.engine), self._refresh_status(scheduler),
            services.workers.run_expiry(),
            guard_running_models(scheduler, services.runtime, services.memory),
            watch_for_stalls(scheduler, services.engine),
        ]
        interval = watchdog_interval()
        if interval:
            jobs.append(run_watchdog(self.notifier, interval))
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(job) for job in jobs]
        stack.push_async_callback(_cancel, tasks)

    async def _check_gpu_devices(self, scheduler: Scheduler) -> None:
        """Note when no CDI spec provides the GPU devices (GPU utility models then wait for a request)."""
        config = self.config
        devices = config.gpu.devices
        if not devices or not any(m.gpu for m in config.enabled_models()):
            scheduler.gpu_missing = None
            return
        known, source = await asyncio.to_thread(cdi.known_devices)
        missing = [d for d in devices if d not in known]
        scheduler.gpu_missing = f"no CDI spec provides {', '.join(missing)} ({source})" if missing else None
        if missing:
            log.warning("gpu_devices_missing", devices=missing, source=source, fix="sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml")

    # -- main loop -------------------------------------------------------------------

    async def main_loop(self) -> None:
        """Serve (the listeners and background tasks do the work) until SIGTERM or SIGINT."""
        await self._stop.wait()

    def _status_text(self, scheduler: Scheduler) -> str:
        line = status_line(scheduler)
        return f"{self._status_note} | {line}" if self._status_note else line

    def _publish_status(self, scheduler: Scheduler) -> None:
        self.notifier.status(self._status_text(scheduler))

    async def _refresh_status(self, scheduler: Scheduler) -> None:
        """Queue depth changes without a state change: refresh STATUS= now and then."""
        while True:
            await asyncio.sleep(STATUS_REFRESH_S)
            self._publish_status(scheduler)

    # -- reload ----------------------------------------------------------------

    def _on_sighup(self, services: Services) -> None:
        if self._stop.is_set():
            log.info("reload_ignored", reason="sparkd is stopping")
            return  # no RELOADING=1/READY=1 after STOPPING=1
        task = asyncio.get_running_loop().create_task(self.reload(services.scheduler))
        self._reloads.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._reloads.discard)

    async def reload(self, scheduler: Scheduler) -> bool:
        """Re-read the configuration; keep the running one when the new one is invalid."""
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                new = await asyncio.to_thread(load_config, self.config_path)
                keys = KeyRing(await asyncio.to_thread(keys_of, new))
            except KeysFileError as error:
                for keys_problem in error.problems:
                    log.error("keys_problem", file=error.path, problem=keys_problem)
                log.error("reload_rejected", problems=len(error.problems), keys_file=error.path)
                return self._reload_refused(
                    scheduler, f"reload failed: keys file {error.path}: {error.problems[0]}; serving the previous configuration"
                )
            except ConfigError as error:
                for problem in error.problems:
                    log.error("config_problem", file=problem.file, key=problem.key, expected=problem.expected, found=problem.found)
                log.error("reload_rejected", problems=len(error.problems), config=str(self.config_path))
                first = error.problems[0]
                return self._reload_refused(
                    scheduler,
                    f"reload failed: {len(error.problems)} problem(s), first {first.key} in {first.file}; serving the previous configuration",
                )
            except Exception as error:  # systemd waits for READY=1 after RELOADING=1
                log.error("reload_failed", config=str(self.config_path), error=repr(error), exc_info=error)
                return self._reload_refused(scheduler, f"reload failed: {error!r}; serving the previous configuration")
            self._apply(scheduler, new, keys)
            _log_keys(keys, new)
            await self._check_gpu_devices(scheduler)
            self._status_note = None
            self.notifier.ready(self._status_text(scheduler))
            log.info("config_reloaded", models=len(new.models), config=str(self.config_path))
            return True

    def _reload_refused(self, scheduler: Scheduler, note: str) -> bool:
        self._status_note = note
        self.notifier.ready(self._status_text(scheduler))
        return False

    def _apply(self, scheduler: Scheduler, new: Config, keys: KeyRing) -> None:
        old = self.config
        _warn_needs_restart(old, new)
        if new.log != old.log:
            logsetup.configure(new.log.format, new.log.level)
        snapshot = Snapshot.of(new, keys)
        scheduler.apply_config(new)
        self.snapshot.current = snapshot  # the one swap: routes see the new models, keys and fixups together

    # -- shutdown --------------------------------------------------------------

    async def shutdown(self, services: Services, listeners: list[Listener]) -> None:
        """Stop accepting, drain what is in flight, stop (or keep) the models; the exit stack releases the rest."""
        config, scheduler = self.config, services.scheduler
        # Kept in STATUS= while in-flight requests drain.
        self._status_note = "stopping"
        self.notifier.stopping(self._status_text(scheduler))
        log.info("sparkd_stopping", on_shutdown=config.server.on_shutdown)
        services.ops.stopping()
        for site in listeners:
            await site.stop()
        await scheduler.drain(config.server.shutdown_grace_s)
        # Workers granted to other heads go either way: their leases cannot outlive this daemon.
        await services.workers.release_all("sparkd is stopping")
        if config.server.on_shutdown == "stop":
            await scheduler.stop_all()
        else:
            await scheduler.stop_multi_node()  # their worker leases end with this daemon
            log.info("containers_kept", models=[r.name for r in scheduler.runners.values() if r.endpoint])


def _take_gpu_lock(stack: AsyncExitStack, config: Config) -> None:
    lock = GpuLock(Path(config.server.runtime_dir) / "gpu.lock")
    try:
        lock.acquire()
    except Exception as error:
        raise StartupError(str(error)) from error
    stack.callback(lock.release)


async def _peers(stack: AsyncExitStack, config: Config) -> tuple[dict[str, Peer], PeerClient]:
    """The peers with their keys, and the client that calls them (worker leases, the fleet)."""
    try:
        peers = await asyncio.to_thread(load_peers, config.peers)
    except PeerError as error:
        raise StartupError(str(error)) from error
    warn_insecure(config.peers)
    peer_client = PeerClient()
    stack.push_async_callback(peer_client.close)
    return peers, peer_client


def _warn_needs_restart(old: Config, new: Config) -> None:
    """Settings a reload cannot apply: the listeners, Podman and the cluster are set up once."""
    if new.server.listen != old.server.listen:
        log.warning("config_needs_restart", key="server.listen", hint=RESTART_HINT)
    if new.server.keepalive_timeout_s != old.server.keepalive_timeout_s:
        log.warning("config_needs_restart", key="server.keepalive_timeout_s", hint=RESTART_HINT)
    # [workers.<model>] tables apply at once (each lease request reads them); the lease routes exist from start-up.
    if new.peers != old.peers or new.cluster != old.cluster or new.cluster_configured != old.cluster_configured:
        log.warning("config_needs_restart", key="peers/cluster", hint=RESTART_HINT)
    if new.podman != old.podman or new.server.runtime_dir != old.server.runtime_dir:
        log.warning("config_needs_restart", key="podman/server.runtime_dir", hint=RESTART_HINT)


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _stop_listeners(sites: list[Listener]) -> None:
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
        logsetup.configure()
        for problem in error.problems:
            log.error("config_problem", file=problem.file, key=problem.key, expected=problem.expected, found=problem.found)
        log.error("startup_failed", reason=f"{len(error.problems)} problem(s) in {config_path}; run `sparkd check-config`")
        return 1
    logsetup.configure(config.log.format, config.log.level)
    try:
        asyncio.run(Daemon(config, config_path).run())
    except StartupError as error:
        log.error("startup_failed", reason=str(error))
        return 1
    return 0
