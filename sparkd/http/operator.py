"""Admin endpoints for operators: live events, catalog, container logs, prepare, history, metrics.

``/api/*`` and ``/metrics`` are admin-only (see ``auth.py``): an admin key, or no key over
the local unix socket; never a keyless TCP client, loopback included.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from ..adminjson import CatalogDoc, CatalogEntry, PrepareDoc, UsageDoc
from ..config import ModelConfig
from ..config.keys import KEY_NAME
from ..errors import BadRequest, NotFound, ServiceUnavailable
from ..observe.metrics import CONTENT_TYPE
from ..runtime.containerlogs import Backlog, LogFollower
from ..runtime.failures import RuntimeFailure
from ..runtime.spec import container_name
from .appkeys import OPERATIONS, RUNTIME, SCHEDULER, SNAPSHOT, WEIGHTS
from .routing import shown

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
TEXT_HEADERS = {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_TAIL = 10000
COALESCE_S = 0.05


class OpsRoutes:
    def add_to(self, app: web.Application) -> None:
        self._snapshot, self._scheduler, self._runtime, self._ops = app[SNAPSHOT], app[SCHEDULER], app[RUNTIME], app[OPERATIONS]
        self._weights = app[WEIGHTS]
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/events", self.events)
        app.router.add_get("/api/models", self.models)
        app.router.add_get("/api/models/{model}/logs", self.logs)
        app.router.add_post("/api/prepare", self.prepare)
        app.router.add_get("/api/history", self.history)
        app.router.add_get("/api/usage", self.usage)

    # -- helpers ------------------------------------------------------------------------

    def _configured(self, name: str) -> ModelConfig:
        model = self._snapshot.current.directory.lookup(name)
        if model is None:
            raise NotFound(f"model {shown(name)} is not configured on this server; `sparkctl models` lists them", code="model_not_found")
        return model

    @staticmethod
    def _int(request: web.Request, key: str, default: int, low: int, high: int) -> int:
        raw = request.query.get(key)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest(f"query parameter {key} must be a whole number, found {shown(raw)}", code="invalid_parameter") from None
        return max(low, min(high, value))

    # -- metrics --------------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self._ops.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    # -- live status (status page, sparkctl top) -------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: a ``status`` event with the full live status on every change
        (coalesced) and at least every ``interval`` seconds (default 1)."""
        ops = self._ops
        try:
            interval = min(60.0, max(0.2, float(request.query.get("interval", "1"))))
        except ValueError:
            raise BadRequest("query parameter interval must be a number of seconds", code="invalid_parameter") from None
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        while not ops.hub.closing:
            data = json.dumps(ops.live(), separators=(",", ":")).encode()
            await response.write(b"event: status\ndata: " + data + b"\n\n")
            await ops.hub.wait(interval)
            await asyncio.sleep(COALESCE_S)  # one update for a burst of transitions
        return response

    # -- catalog ----------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        config = self._snapshot.current.config
        runners = self._scheduler.runners
        entries: list[CatalogEntry] = []
        for name, model in config.models.items():
            runner = runners.get(name)
            entries.append(
                {
                    "name": name,
                    "enabled": model.enabled,
                    "experimental": model.experimental,
                    "reason": None if model.enabled else (model.disabled_reason or model.experimental_reason or "disabled in the configuration"),
                    "state": runner.state.value if runner else "disabled",
                    "lifecycle": model.lifecycle,
                    "claim": runner.claim if runner else model.gpu_memory,
                    "configured_claim": model.gpu_memory,
                    "footprint": runner.footprint.view() if runner else None,
                    "claim_warnings": list(runner.claim_warnings) if runner else [],
                    "max_model_len": model.max_model_len,
                    "image": model.image,
                    "gpu": model.gpu,
                    "sleep_mode": model.sleep_mode,
                    "aliases": list(model.aliases),
                    "profile": model.profile,
                    "tools": model.tools,
                    "hf_model": model.hf_model,
                    "notes": list(model.notes),
                    "container": runner.spec.name if runner else container_name(name, config.server.instance),
                }
            )
        presences = await self._weights.presences(list(config.models.values()))
        for entry in entries:
            found = presences.get(entry["name"])
            if found is not None:
                entry["weights"] = {"weights": found["weights"], "weights_bytes": found["weights_bytes"], "weights_repo": found["weights_repo"]}
        catalog: CatalogDoc = {"models": entries}
        return web.json_response(catalog)

    # -- container logs ------------------------------------------------------------------------

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """The model's container log: the last ``tail`` lines, then (``follow=1``) new lines live,
        across restarts of the container, until the client leaves."""
        model = self._configured(request.match_info["model"])
        runner = self._scheduler.runners.get(model.name)
        name = runner.spec.name if runner else container_name(model.name, self._snapshot.current.config.server.instance)
        tail = self._int(request, "tail", 100, 0, MAX_TAIL)
        follow = request.query.get("follow", "") in ("1", "true", "yes")
        try:
            info = await self._runtime.inspect(name)
        except RuntimeFailure as error:
            raise ServiceUnavailable(str(error), code="podman_unavailable") from None
        if info is None and not follow:
            raise NotFound(
                f"model {model.name} has no container yet: it was never started or prepared (`sparkctl prepare {model.name}`)",
                code="no_container",
            )
        response = web.StreamResponse(headers=TEXT_HEADERS)
        await response.prepare(request)
        if not follow:
            lines = await self._runtime.tail_logs(name, tail) if tail else []
            await response.write("".join(line + "\n" for line in lines).encode())
            await response.write_eof()
            return response
        await self._follow(response, name, info, tail)
        return response

    async def _follow(self, response: web.StreamResponse, name: str, info: Any, tail: int) -> None:
        hub = self._ops.hub
        loop = asyncio.get_running_loop()
        since: float | None = None
        shown_start = info.started_at if info is not None else None
        if info is None:
            await response.write(f"--- sparkd: container {name} does not exist yet; waiting for it ---\n".encode())
        while not hub.closing:
            if info is not None:
                backlog = Backlog()  # bounded: a reader slower than the log loses lines, sparkd keeps no more
                follower = LogFollower(
                    self._runtime.url, name, loop, backlog.put, since=since, tail=tail if since is None else None,
                    on_end=backlog.end,
                )
                follower.start()
                try:
                    while not hub.closing:
                        batch = await backlog.take(1.0)
                        if batch:
                            await response.write("".join(line + "\n" for line in batch).encode())
                        if backlog.ended and not len(backlog):
                            break
                finally:
                    follower.stop()
                if hub.closing:
                    break
                await response.write(f"--- sparkd: container {name} stopped; waiting for it to start again ---\n".encode())
            # Wait for a (re)start of the container.
            while not hub.closing:
                await hub.wait(1.0)
                try:
                    info = await self._runtime.inspect(name)
                except RuntimeFailure:
                    info = None
                if info is not None and info.running and info.started_at != shown_start:
                    shown_start = info.started_at
                    since = (info.started_at or time.time()) - 1
                    await response.write(f"--- sparkd: container {name} started ---\n".encode())
                    break

    # -- prepare ---------------------------------------------------------------------------------

    async def prepare(self, request: web.Request) -> web.Response:
        """Create the containers of the named (default: every enabled) model ahead of time."""
        current = self._snapshot.current
        raw = await request.read()
        names: list[str]
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise BadRequest("the body must be JSON: {\"models\": [\"name\", ...]}", code="invalid_json") from None
            requested = body.get("models") if isinstance(body, dict) else None
            if requested is not None and (not isinstance(requested, list) or not all(isinstance(n, str) for n in requested)):
                raise BadRequest("'models' must be a list of model names", code="invalid_parameter")
        else:
            requested = None
        if requested:
            names = []
            for name in requested:
                model = current.directory.resolve(name)  # 404 unknown, 409 disabled
                if model.name not in names:
                    names.append(model.name)
        else:
            names = [m.name for m in current.config.enabled_models()]
        names = [n for n in names if n in self._scheduler.runners]
        results = await self._ops.prepare(names)
        ok = all(r["result"] in ("created", "recreated", "exists", "running") for r in results)
        answer: PrepareDoc = {"ok": ok, "results": results}
        return web.json_response(answer)

    # -- history ------------------------------------------------------------------------------------

    async def history(self, request: web.Request) -> web.Response:
        name = request.query.get("model") or None
        if name is not None:
            name = self._configured(name).name
        days = self._int(request, "days", 30, 1, 3660)
        limit = self._int(request, "limit", 20, 1, 1000)
        data = await self._ops.history.query(name, days, limit)
        return web.json_response(data)

    # -- usage per key ------------------------------------------------------------------------------

    async def usage(self, request: web.Request) -> web.Response:
        """Requests, tokens, errors and queue wait per key name, model and day (``sparkctl usage``)."""
        name = request.query.get("model") or None
        if name is not None:
            name = self._configured(name).name
        key = request.query.get("key") or None
        if key is not None and not KEY_NAME.match(key):
            raise BadRequest(f"query parameter key must be a key name from the keys file, found {shown(key)}", code="invalid_parameter")
        days = self._int(request, "days", 7, 1, 3660)
        await self._ops.flush_key_usage()  # what the last seconds counted shows too
        answer: UsageDoc = {"days": days, "key": key, "model": name, "rows": await self._ops.history.key_usage(key, name, days)}
        return web.json_response(answer)
