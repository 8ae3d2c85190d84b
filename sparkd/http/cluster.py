"""The API a head sparkd calls on its peers: worker leases and their heartbeats (role ``peer``), and the version.

The worker-lease routes exist only on a node with a ``[cluster]`` table: elsewhere
they are a 404, so no key of any role can ask such a node to run a container.
"""

from __future__ import annotations

from aiohttp import web

from .. import __version__
from ..cluster.workers import WorkerRequest
from ..errors import ModelDisabled, NotFound
from ..weights.peerpulls import WORKER_WEIGHTS_PATH, PeerWeightRequest
from ..weights.service import WeightsUnavailable
from .appkeys import SNAPSHOT, WEIGHTS, WORKERS
from .auth import PRINCIPAL
from .openai import parse_json_object
from .routing import shown

VERSION_PATH = "/api/version"
LEASE_PATH = "/api/worker-leases"


class ClusterRoutes:
    def add_to(self, app: web.Application) -> None:
        self._snapshot, self._workers = app[SNAPSHOT], app[WORKERS]
        app.router.add_get(VERSION_PATH, self.version)
        if not self._snapshot.current.config.cluster_configured:
            return
        app.router.add_get(LEASE_PATH, self.list_leases)
        app.router.add_post(LEASE_PATH, self.grant)
        app.router.add_post(LEASE_PATH + "/{lease}/heartbeat", self.heartbeat)
        app.router.add_delete(LEASE_PATH + "/{lease}", self.release)
        self._weights = app[WEIGHTS]
        app.router.add_post(WORKER_WEIGHTS_PATH + "/{model}", self.pull_weights)
        app.router.add_get(WORKER_WEIGHTS_PATH + "/{model}", self.weights_progress)
        app.router.add_post(WORKER_WEIGHTS_PATH + "/{model}/presence", self.weights_presence)

    async def version(self, request: web.Request) -> web.Response:
        config = self._snapshot.current.config
        return web.json_response({"sparkd": __version__, "instance": config.server.instance, "address": config.cluster.address})

    async def list_leases(self, request: web.Request) -> web.Response:
        """The caller's own leases (the admin API's status lists them all)."""
        caller = request[PRINCIPAL].name
        return web.json_response({"leases": [lease.view() for lease in self._workers.leases() if lease.peer_key == caller]})

    async def grant(self, request: web.Request) -> web.Response:
        """Admit a worker like a local model; answers once it runs, or with this node's refusal."""
        body = parse_json_object(await request.read())
        worker_request = WorkerRequest.parse(body, self._snapshot.current.config)
        lease = await self._workers.grant(worker_request, request[PRINCIPAL].name)
        return web.json_response(lease.view())

    async def heartbeat(self, request: web.Request) -> web.Response:
        return web.json_response(self._workers.heartbeat(request.match_info["lease"], request[PRINCIPAL].name).view())

    async def release(self, request: web.Request) -> web.Response:
        await self._workers.release(request.match_info["lease"], "released by its head", request[PRINCIPAL].name)
        return web.json_response({"released": request.match_info["lease"]})

    async def pull_weights(self, request: web.Request) -> web.Response:
        """A head's model spans this node: pull its weights into the cache this node's worker mounts."""
        config = self._snapshot.current.config
        asked = PeerWeightRequest.parse(request.match_info["model"], parse_json_object(await request.read()), config,
                                        request[PRINCIPAL].name)
        try:
            job = self._weights.start_model(asked.model_table(config))
        except WeightsUnavailable as error:
            raise ModelDisabled(str(error), code="weights_unavailable") from None
        return web.json_response(job.view(), status=202)

    async def weights_progress(self, request: web.Request) -> web.Response:
        job = self._weights.jobs.get(request.match_info["model"])
        if job is None or request.match_info["model"] not in self._snapshot.current.config.workers:
            raise NotFound(f"no pull of {shown(request.match_info['model'])} on this node", code="pull_unknown")
        return web.json_response(job.view())

    async def weights_presence(self, request: web.Request) -> web.Response:
        """Whether this node's worker cache holds a head's model weights (before the head starts it)."""
        config = self._snapshot.current.config
        asked = PeerWeightRequest.parse(request.match_info["model"], parse_json_object(await request.read()), config,
                                        request[PRINCIPAL].name)
        try:
            found = await self._weights.presence(asked.model_table(config))
        except WeightsUnavailable as error:
            raise ModelDisabled(str(error), code="weights_unavailable") from None
        assert found is not None
        return web.json_response({"model": asked.model, "weights": found.state, "weights_bytes": found.size})
