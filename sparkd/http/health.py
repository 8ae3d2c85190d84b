"""Liveness and readiness for load balancers, systemd checks and humans.

``/readyz`` answers without a key, so a flood of it must not become a flood of Podman
pings (one per second at most, shared by every caller) and a keyless caller learns
only the verdict: why Podman is unreachable, or which configuration is loaded, is
shown to the admin role (or the admin unix socket) only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TypedDict

from aiohttp import web

from ..runtime.failures import RuntimeFailure
from .appkeys import RECONCILED, RUNTIME, SNAPSHOT
from .auth import ADMIN_ROLES, presented_key, via_unix_socket

READINESS_CACHE_S = 1.0


class ReadinessDetail(TypedDict, total=False):
    """What /readyz adds for the admin: why it is not ready, or the configuration it serves."""

    reason: str
    config: str


class ReadinessDoc(ReadinessDetail):
    status: str


@dataclass(frozen=True)
class Readiness:
    status: str
    detail: ReadinessDetail

    @property
    def http_status(self) -> int:
        return 200 if self.status == "ready" else 503


class HealthRoutes:
    def __init__(self) -> None:
        self._checked: tuple[float, Readiness] | None = None
        self._checking: asyncio.Task[Readiness] | None = None

    def add_to(self, app: web.Application) -> None:
        self._snapshot, self._runtime, self._reconciled = app[SNAPSHOT], app[RUNTIME], app[RECONCILED]
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)

    async def healthz(self, request: web.Request) -> web.Response:
        """Alive: the event loop answers."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready: configuration loaded, running containers reconciled, Podman reachable."""
        readiness = await self._readiness()
        shown: ReadinessDetail = readiness.detail if self._shows_details(request) else {}
        body: ReadinessDoc = {"status": readiness.status, **shown}
        return web.json_response(body, status=readiness.http_status)

    def _shows_details(self, request: web.Request) -> bool:
        if via_unix_socket(request):
            return True
        key = presented_key(request.headers)
        principal = self._snapshot.current.keys.check(key) if key is not None else None
        return principal is not None and principal.role in ADMIN_ROLES

    async def _readiness(self) -> Readiness:
        if not self._reconciled.is_set():
            return Readiness("starting", {"reason": "reconciling running containers"})
        now = time.monotonic()
        if self._checked is not None and now - self._checked[0] < READINESS_CACHE_S:
            return self._checked[1]
        if self._checking is None:
            # One ping answers every caller of this second; shielded so a caller that leaves does not cancel it.
            self._checking = asyncio.get_running_loop().create_task(self._check())
        return await asyncio.shield(self._checking)

    async def _check(self) -> Readiness:
        try:
            await self._runtime.ping()
        except RuntimeFailure as error:
            readiness = Readiness("unavailable", {"reason": str(error)})
        else:
            readiness = Readiness("ready", {"config": self._snapshot.current.config.source})
        finally:
            self._checking = None
        self._checked = (time.monotonic(), readiness)
        return readiness
