"""The admin API: status of every model and the lease, and operator actions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import ModelDisabled
from ..scheduler.status import snapshot

if TYPE_CHECKING:
    from ..daemon import Daemon


class AdminRoutes:
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/api/status", self.status)
        app.router.add_post("/api/models/{model}/{action:start|stop|sleep|wake}", self.act)

    async def status(self, request: web.Request) -> web.Response:
        daemon = self._daemon
        status = snapshot(daemon.scheduler)
        coordinator = daemon.scheduler.lifecycle.cluster
        if coordinator is not None:
            for model in status["models"]:
                config = daemon.config.models.get(model["name"])
                if config is not None and len(config.nodes) > 1:
                    model["nodes"] = coordinator.nodes_view(config)
        status["worker_leases"] = [lease.view() for lease in daemon.workers.leases()]
        return web.json_response(status)

    async def act(self, request: web.Request) -> web.Response:
        daemon = self._daemon
        model = daemon.directory.resolve(request.match_info["model"])
        action = request.match_info["action"]
        scheduler = daemon.scheduler
        timeout = daemon.config.lifecycle.start_timeout_s
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
