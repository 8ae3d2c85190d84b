"""The API a head sparkd calls on its peers: worker leases and their heartbeats (role ``peer``), and the version.

The worker-lease routes exist only on a node with a ``[cluster]`` table: elsewhere
they are a 404, so no key of any role can ask such a node to run a container.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .. import __version__
from ..cluster.workers import WorkerRequest
from .auth import PRINCIPAL
from .openai import parse_json_object

if TYPE_CHECKING:
    from ..daemon import Daemon

VERSION_PATH = "/api/version"
LEASE_PATH = "/api/worker-leases"


class ClusterRoutes:
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def add_to(self, app: web.Application) -> None:
        app.router.add_get(VERSION_PATH, self.version)
        if not self._daemon.config.cluster_configured:
            return
        app.router.add_get(LEASE_PATH, self.list_leases)
        app.router.add_post(LEASE_PATH, self.grant)
        app.router.add_post(LEASE_PATH + "/{lease}/heartbeat", self.heartbeat)
        app.router.add_delete(LEASE_PATH + "/{lease}", self.release)

    async def version(self, request: web.Request) -> web.Response:
        config = self._daemon.config
        return web.json_response({"sparkd": __version__, "instance": config.server.instance, "address": config.cluster.address})

    async def list_leases(self, request: web.Request) -> web.Response:
        """The caller's own leases (the admin API's status lists them all)."""
        caller = request[PRINCIPAL].name
        return web.json_response({"leases": [lease.view() for lease in self._daemon.workers.leases() if lease.peer_key == caller]})

    async def grant(self, request: web.Request) -> web.Response:
        """Admit a worker like a local model; answers once it runs, or with this node's refusal."""
        body = parse_json_object(await request.read())
        worker_request = WorkerRequest.parse(body, self._daemon.config)
        lease = await self._daemon.workers.grant(worker_request, request[PRINCIPAL].name)
        return web.json_response(lease.view())

    async def heartbeat(self, request: web.Request) -> web.Response:
        return web.json_response(self._daemon.workers.heartbeat(request.match_info["lease"], request[PRINCIPAL].name).view())

    async def release(self, request: web.Request) -> web.Response:
        await self._daemon.workers.release(request.match_info["lease"], "released by its head", request[PRINCIPAL].name)
        return web.json_response({"released": request.match_info["lease"]})
