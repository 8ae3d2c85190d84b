"""The OpenAI-compatible endpoint: ``/v1/models`` and every ``POST /v1/...``.

The request path, in order: parse → resolve the model (body or path form) →
``scheduler.acquire`` (may start the model, queue, or refuse) → proxy to the
engine, streaming → ``scheduler.release``.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..engine.proxy import forward
from ..errors import BadRequest
from .routing import ModelDirectory, target

if TYPE_CHECKING:
    from ..daemon import Daemon


class OpenAIRoutes:
    def __init__(self, daemon: "Daemon") -> None:
        self._daemon = daemon
        self._created = int(time.time())

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_get("/v1/{model}/models", self.list_models_path_form)
        app.router.add_post("/v1/{tail:.+}", self.proxy)

    # -- models ------------------------------------------------------------------

    def _model_entry(self, name: str) -> dict[str, Any]:
        daemon = self._daemon
        model = daemon.config.models[name]
        runner = daemon.scheduler.runners.get(name)
        entry: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "sparkd",
            "state": runner.state.value if runner else "disabled",
            "max_model_len": model.max_model_len,
            "aliases": list(model.aliases),
            "lifecycle": model.lifecycle,
            "tools": model.tools,
        }
        if model.notes:
            entry["notes"] = list(model.notes)
        if not model.enabled:
            entry["enabled"] = False
            entry["reason"] = model.disabled_reason or model.experimental_reason or "disabled in the configuration"
            entry["experimental"] = model.experimental
        return entry

    async def list_models(self, request: web.Request) -> web.Response:
        config = self._daemon.config
        return web.json_response(
            {
                "object": "list",
                "data": [self._model_entry(m.name) for m in config.enabled_models()],
                # Off models stay out of "data" so clients do not offer them; their reasons are here.
                "unavailable": [self._model_entry(n) for n, m in config.models.items() if not m.enabled],
            }
        )

    async def get_model(self, request: web.Request) -> web.Response:
        model = self._daemon.directory.resolve(request.match_info["model"])
        return web.json_response(self._model_entry(model.name))

    async def list_models_path_form(self, request: web.Request) -> web.Response:
        model = self._daemon.directory.resolve(request.match_info["model"])
        return web.json_response({"object": "list", "data": [self._model_entry(model.name)]})

    # -- inference -------------------------------------------------------------------

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        daemon = self._daemon
        raw = await request.read()
        payload = parse_json_object(raw)
        directory: ModelDirectory = daemon.directory
        route = target(directory, request.match_info["tail"], payload.get("model"))
        name = route.model.name
        if payload.get("model") != name:
            payload["model"] = name  # aliases and the path form reach the engine by its served name
            raw = json.dumps(payload).encode()
        runner = await daemon.scheduler.acquire(name)
        try:
            assert runner.endpoint is not None
            return await forward(request, daemon.engine.session, runner.endpoint, route.path, raw, name)
        finally:
            daemon.scheduler.release(runner)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise BadRequest("the request body is empty: send a JSON object such as {\"model\": ..., \"messages\": [...]}", code="empty_body")
    try:
        payload = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8 text", code="invalid_json") from None
    except json.JSONDecodeError as error:
        raise BadRequest(f"the request body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"the request body must be a JSON object, found a JSON {type(payload).__name__}", code="invalid_json")
    return payload

