"""The admin API: status of every model and the lease, and operator actions."""

from __future__ import annotations

from aiohttp import web

from ..adminjson import StatusDoc
from ..errors import Conflict, ModelDisabled
from ..scheduler.status import snapshot
from .appkeys import FLEET, SCHEDULER, SNAPSHOT, WORKERS


class AdminRoutes:
    def add_to(self, app: web.Application) -> None:
        self._snapshot, self._scheduler, self._workers = app[SNAPSHOT], app[SCHEDULER], app[WORKERS]
        self._fleet = app[FLEET]
        app.router.add_get("/api/status", self.status)
        app.router.add_post("/api/models/{model}/{action:start|stop|sleep|wake}", self.act)

    async def status(self, request: web.Request) -> web.Response:
        status: StatusDoc = {
            **snapshot(self._scheduler), "worker_leases": [lease.view() for lease in self._workers.leases()],
            "fleet": self._fleet.view() if self._fleet.peers else None,
        }
        coordinator = self._scheduler.lifecycle.cluster
        if coordinator is not None:
            models = self._snapshot.current.config.models
            for model in status["models"]:
                config = models.get(model["name"])
                if config is not None and config.spans:
                    model["nodes"] = coordinator.nodes_view(config)
        return web.json_response(status)

    async def act(self, request: web.Request) -> web.Response:
        current = self._snapshot.current
        model = current.directory.resolve(request.match_info["model"])
        if model.name not in self._scheduler.runners:
            raise Conflict(
                f"model {model.name} does not run on this node (its nodes are {', '.join(model.nodes)}): "
                "start or stop it with sparkctl on the node that runs it",
                code="not_served_here",
            )
        action = request.match_info["action"]
        scheduler = self._scheduler
        timeout = current.config.lifecycle.start_timeout_s
        if action in ("start", "wake"):
            runner = await scheduler.start_model(model.name)
        elif action == "stop":
            runner = await scheduler.stop_model(model.name, timeout)
        else:
            if not model.sleep_mode:
                raise ModelDisabled(
                    f"model {model.name} has no sleep mode: set sleep_mode = true in its table "
                    "(its engine needs --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1)",
                    code="sleep_not_supported",
                )
            runner = await scheduler.sleep_model(model.name, timeout)
        return web.json_response({"model": model.name, "action": action, "state": runner.state.value})
