"""The admin API of weight pulls: start one (``sparkctl pull``) and follow them all."""

from __future__ import annotations

from aiohttp import web

from ..errors import ModelDisabled
from ..weights.service import WeightsUnavailable
from .appkeys import SNAPSHOT, WEIGHTS

PULLS_PATH = "/api/pulls"


class WeightRoutes:
    def add_to(self, app: web.Application) -> None:
        self._snapshot, self._weights = app[SNAPSHOT], app[WEIGHTS]
        app.router.add_post("/api/models/{model}/pull", self.pull)
        app.router.add_get(PULLS_PATH, self.pulls)

    async def pull(self, request: web.Request) -> web.Response:
        """Start the model's pull (or join the one running); answers at once with its progress."""
        model = self._snapshot.current.directory.resolve(request.match_info["model"])
        try:
            job = self._weights.start(model.name)
        except WeightsUnavailable as error:
            raise ModelDisabled(str(error), code="weights_unavailable") from None
        return web.json_response(job.view(), status=202)

    async def pulls(self, request: web.Request) -> web.Response:
        """Every model's last pull: running, done or failed."""
        return web.json_response({"pulls": [job.view() for job in self._weights.jobs.values()]})
