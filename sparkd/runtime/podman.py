"""Where containers are created, started and stopped: Podman's REST API via podman-py.

podman-py is synchronous (requests), so every call runs in a worker thread via
``asyncio.to_thread`` and the event loop never blocks on Podman.  Each worker
thread gets its own client because a ``requests.Session`` is not meant to be
shared between threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import secrets
import socket
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict, TypeVar, cast, final

import structlog
from podman import PodmanClient
from podman.domain.containers import Container
from podman.errors import NotFound

from .containerlogs import clip_line
from .containers import ContainerInfo, ContainerRuntime
from .failures import EncodingsMissing, RuntimeFailure, VolumeSourceMissing, translate
from .spec import LABEL_KEY_ENV, LABEL_MODEL, LABEL_SPEC, ContainerSpec, instance_filter

log = structlog.get_logger("sparkd.runtime")

T = TypeVar("T")


class _InspectConfig(TypedDict, total=False):
    Labels: dict[str, str] | None
    Env: list[str] | None


class _InspectState(TypedDict, total=False):
    Status: str
    Running: bool
    StartedAt: str
    ExitCode: int
    Pid: int


class _PortBinding(TypedDict, total=False):
    HostPort: str


class _InspectHostConfig(TypedDict, total=False):
    PortBindings: dict[str, list[_PortBinding] | None] | None


class ContainerInspect(TypedDict, total=False):
    """The part of Podman's container inspect JSON sparkd reads."""

    Name: str
    Id: str
    Config: _InspectConfig | None
    State: _InspectState | None
    HostConfig: _InspectHostConfig | None


@final  # mypy then reports any member of the protocol left out
class PodmanRuntime(ContainerRuntime):
    """Async facade over podman-py for the containers sparkd manages."""

    def __init__(self, url: str, timeout: float, instance: str) -> None:
        self.url = url
        self.instance = instance
        self._timeout = timeout
        self._local = threading.local()
        self._clients: list[PodmanClient] = []
        """Every worker thread's client, so that ``close`` reaches them all."""
        self._allocating = threading.Lock()
        """Held from picking a free host port until the container holding it exists."""

    # -- plumbing -------------------------------------------------------------

    def _client(self) -> PodmanClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = PodmanClient(base_url=self.url, timeout=self._timeout)
            self._local.client = client
            self._clients.append(client)  # list.append is atomic under the GIL
        return client

    async def _call(self, action: str, func: Callable[..., T], *args: Any, name: str = "", image: str = "") -> T:
        def run() -> T:
            try:
                return func(*args)
            except Exception as error:  # every failure gets translated
                raise translate(error, action=action, url=self.url, name=name, image=image) from error

        return await asyncio.to_thread(run)

    # -- queries --------------------------------------------------------------

    async def ping(self) -> None:
        await self._call("ping the API", self._ping_sync)

    def _ping_sync(self) -> None:
        if not self._client().ping():
            raise RuntimeFailure(f"Podman at {self.url} answered the ping with an error")

    async def version(self) -> str:
        info = await self._call("read its version", lambda: self._client().version())
        return str(info.get("Version", "?"))

    async def inspect(self, name: str) -> ContainerInfo | None:
        return await self._call(f"inspect container {name}", self._inspect_sync, name, name=name)

    def _inspect_sync(self, name: str) -> ContainerInfo | None:
        try:
            container = self._client().containers.get(name)
        except NotFound:
            return None
        return _info_from_inspect(container)

    async def list_managed(self) -> list[ContainerInfo]:
        """Every container this sparkd instance manages, running or not, with its engine key."""
        return await self._call("list sparkd's containers", self._list_managed_sync)

    def _list_managed_sync(self) -> list[ContainerInfo]:
        containers = self._client().containers.list(all=True, filters=instance_filter(self.instance))
        infos = []
        for container in containers:
            try:
                container.reload()
            except NotFound:
                continue
            infos.append(_info_from_inspect(container))
        return infos

    async def tail_logs(self, name: str, lines: int = 20) -> list[str]:
        return await self._call(f"read the log of {name}", self._tail_sync, name, lines, name=name)

    def _tail_sync(self, name: str, lines: int) -> list[str]:
        try:
            container = self._client().containers.get(name)
        except NotFound:
            return []
        frames = container.logs(tail=lines, stdout=True, stderr=True)
        text = (frames if isinstance(frames, bytes) else b"".join(frames)).decode("utf-8", "replace")
        return [clip_line(line) for line in text.splitlines() if line.strip()][-lines:]

    # -- changes --------------------------------------------------------------

    async def ensure(self, spec: ContainerSpec, port_range: tuple[int, int]) -> ContainerInfo:
        """The model's container, created (or re-created when its spec changed) if needed."""
        return await self._call(
            f"create container {spec.name}", self._ensure_sync, spec, port_range, name=spec.name, image=spec.image
        )

    def _ensure_sync(self, spec: ContainerSpec, port_range: tuple[int, int]) -> ContainerInfo:
        client = self._client()
        existing = self._inspect_sync(spec.name)
        if existing is not None and existing.spec_hash == spec.spec_hash:
            return existing
        if existing is not None:
            log.info("container_recreating", container=spec.name, old_spec=existing.spec_hash, new_spec=spec.spec_hash)
            client.containers.get(spec.name).remove(force=True)
        _prepare_mounts(spec)
        image_key = _prepare_caches(client, spec)
        engine_key = secrets.token_urlsafe(32)
        with self._allocating:  # two creates in two worker threads must not pick the same port
            host_port = spec.host_port if spec.network == "host" else spec.host_port or self._free_port(port_range, spec.model)
            container = client.containers.create(**spec.create_kwargs(host_port, engine_key, image_key))
        container.reload()
        log.info("container_created", container=spec.name, image=spec.image, host_port=host_port, spec=spec.spec_hash)
        return _info_from_inspect(container)

    def _free_port(self, port_range: tuple[int, int], exclude_model: str) -> int:
        """The first port of the range no other container of this instance uses and nothing listens on."""
        taken = {
            info.host_port
            for info in self._list_managed_sync()
            if info.host_port is not None and info.model != exclude_model
        }
        for port in range(port_range[0], port_range[1] + 1):
            if port not in taken and _port_is_free(port):
                return port
        raise RuntimeFailure(
            f"no free host port in defaults.port_range {port_range[0]}-{port_range[1]}: widen the range "
            "or give models explicit `port` values"
        )

    async def start(self, name: str, image: str = "") -> None:
        await self._call(f"start container {name}", lambda: self._client().containers.get(name).start(), name=name, image=image)

    async def stop(self, name: str, timeout: float) -> ContainerInfo | None:
        """Stop ``name`` (SIGTERM, then SIGKILL after ``timeout``) and return its final state."""
        return await self._call(f"stop container {name}", self._stop_sync, name, timeout, name=name)

    def _stop_sync(self, name: str, timeout: float) -> ContainerInfo | None:
        try:
            container = self._client().containers.get(name)
            container.stop(timeout=max(1, round(timeout)), ignore=True)  # already stopped is fine
        except NotFound:
            return None
        return self._inspect_sync(name)

    async def kill(self, name: str) -> None:
        """SIGKILL ``name`` now: for a container that must not take one more second of memory."""
        await self._call(f"kill container {name}", self._kill_sync, name, name=name)

    def _kill_sync(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            container = self._client().containers.get(name)
            if container.status == "running":
                container.kill(signal="SIGKILL")

    async def remove(self, name: str) -> None:
        await self._call(f"remove container {name}", self._remove_sync, name, name=name)

    def _remove_sync(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            self._client().containers.get(name).remove(force=True)

    def close(self) -> None:
        """Close the worker threads' connections (at shutdown, when no call is running)."""
        for client in self._clients:
            client.close()
        self._clients.clear()


def _prepare_mounts(spec: ContainerSpec) -> None:
    """Create missing writable host directories; refuse missing read-only sources."""
    for mount in spec.mounts:
        if not mount.source.startswith("/"):
            continue  # a named volume: Podman creates it
        source = Path(mount.source)
        if source.exists():
            continue
        if mount.read_only:
            missing = f"cannot create container {spec.name}: its read-only volume source {mount.source} does not exist"
            if mount.source.endswith(".tiktoken"):
                raise EncodingsMissing(missing + ": run `sparkd encodings fetch` (as root), then retry")
            raise VolumeSourceMissing(missing + ": create it, or fix the model's volumes in the configuration")
        source.mkdir(parents=True, exist_ok=True)


def _prepare_caches(client: PodmanClient, spec: ContainerSpec) -> str:
    """The key of the spec's image for its cache directories (its short id), with the directories made."""
    if not spec.caches:
        return ""
    image_key = str(client.images.get(spec.image).id).removeprefix("sha256:")[:16]
    for mount in spec.cache_mounts(image_key):
        Path(mount.source).mkdir(parents=True, exist_ok=True)
    return image_key


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _info_from_inspect(container: Container) -> ContainerInfo:
    attrs = cast(ContainerInspect, container.attrs)  # podman-py types it as a plain dict
    config = attrs.get("Config") or {}
    state = attrs.get("State") or {}
    labels = config.get("Labels") or {}
    env = dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item)
    key_env = labels.get(LABEL_KEY_ENV, "VLLM_API_KEY")
    return ContainerInfo(
        name=attrs.get("Name", "").lstrip("/"),
        id=attrs.get("Id", ""),
        model=labels.get(LABEL_MODEL),
        spec_hash=labels.get(LABEL_SPEC),
        status=str(state.get("Status", "unknown")).lower(),
        started_at=_parse_time(state.get("StartedAt")) if state.get("Running") else None,
        host_port=_host_port(attrs),
        engine_key=env.get(key_env),
        exit_code=state.get("ExitCode"),
        pid=(state.get("Pid") or None) if state.get("Running") else None,
    )


def _host_port(attrs: ContainerInspect) -> int | None:
    bindings = ((attrs.get("HostConfig") or {}).get("PortBindings")) or {}
    for binding in bindings.values():
        for entry in binding or []:
            port = entry.get("HostPort")
            if port:
                return int(port)
    return None


def _parse_time(text: str | None) -> float | None:
    """Podman's RFC 3339 time with nanoseconds → epoch seconds."""
    if not text or text.startswith("0001-"):
        return None
    main, _, rest = text.partition(".")
    fraction = ""
    zone = rest
    for index, char in enumerate(rest):
        if not char.isdigit():
            fraction, zone = rest[:index], rest[index:]
            break
    try:
        stamp = datetime.fromisoformat(main + ("." + fraction[:6] if fraction else "") + _iso_zone(zone))
    except ValueError:
        return None
    return stamp.timestamp()


def _iso_zone(zone: str) -> str:
    if zone in ("Z", ""):
        return "+00:00"
    # Podman may print "+0000 UTC" style zones.
    zone = zone.split(" ")[0]
    if len(zone) == 5 and zone[0] in "+-" and ":" not in zone:
        return zone[:3] + ":" + zone[3:]
    return zone
