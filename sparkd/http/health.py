"""Liveness and readiness for load balancers, systemd checks and humans."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..runtime.errors import RuntimeFailure

if TYPE_CHECKING:
    from ..daemon import Daemon


class HealthRoutes:
    def __init__(self, daemon: "Daemon") -> None:
        self._daemon = daemon

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)

    async def healthz(self, request: web.Request) -> web.Response:
        """Alive: the event loop answers."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready: configuration loaded, running containers reconciled, Podman reachable."""
        daemon = self._daemon
        if not daemon.reconciled:
            return web.json_response({"status": "starting", "reason": "reconciling running containers"}, status=503)
        try:
            await daemon.runtime.ping()
        except RuntimeFailure as error:
            return web.json_response({"status": "unavailable", "reason": str(error)}, status=503)
        return web.json_response({"status": "ready", "config": daemon.config.source})
