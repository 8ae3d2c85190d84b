"""The admin API a head sparkd calls on its peers: worker leases and their heartbeats."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .. import __version__
from ..cluster.workers import WorkerRequest
from .openai import parse_json_object

if TYPE_CHECKING:
    from ..daemon import Daemon


class ClusterRoutes:
    def __init__(self, daemon: "Daemon") -> None:
        self._daemon = daemon

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/worker-leases", self.list_leases)
        app.router.add_post("/api/worker-leases", self.grant)
        app.router.add_post("/api/worker-leases/{lease}/heartbeat", self.heartbeat)
        app.router.add_delete("/api/worker-leases/{lease}", self.release)

    async def version(self, request: web.Request) -> web.Response:
        config = self._daemon.config
        return web.json_response({"sparkd": __version__, "instance": config.server.instance, "address": config.cluster.address})

    async def list_leases(self, request: web.Request) -> web.Response:
        return web.json_response({"leases": [lease.view() for lease in self._daemon.workers.leases()]})

    async def grant(self, request: web.Request) -> web.Response:
        """Admit a worker like a local model; answers once it runs, or with this node's refusal."""
        body = parse_json_object(await request.read())
        lease = await self._daemon.workers.grant(WorkerRequest.parse(body, self._daemon.config))
        return web.json_response(lease.view())

    async def heartbeat(self, request: web.Request) -> web.Response:
        return web.json_response(self._daemon.workers.heartbeat(request.match_info["lease"]).view())

    async def release(self, request: web.Request) -> web.Response:
        await self._daemon.workers.release(request.match_info["lease"], "released by its head")
        return web.json_response({"released": request.match_info["lease"]})
