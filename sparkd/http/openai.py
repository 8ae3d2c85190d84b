"""The OpenAI-compatible endpoint: ``/v1/models`` and every ``POST /v1/...``.

The request path, in order (the key was checked by the auth middleware already):
read the body (size and time limits) → parse → resolve the model (body or path
form) → may this key use it → validate the body's shape → the model's fixups
(pure, profile-driven) → ``scheduler.acquire`` (may start the model, queue, or
refuse) → fit the context (exact token count, only when the cap could matter)
→ proxy to the engine, streaming → ``scheduler.release``.

The body is re-serialized only when a fixup (or the model's canonical name)
changed it; otherwise the client's bytes go to the engine as they came.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import StreamReader, web

from ..config import ModelConfig, ServerConfig
from ..engine.client import Endpoint
from ..engine.proxy import forward
from ..engine.usage import RequestRecord
from ..errors import ApiError, BadRequest, PayloadTooLarge, RequestTimeout
from ..fixups import DEFAULT_PROFILE, Fixups
from . import anthropic, loading, responses
from .appkeys import ENGINE, FLEET, OPERATIONS, SCHEDULER, SNAPSHOT, TOKENIZE_FAILURES, WEIGHTS
from .auth import PRINCIPAL
from .endpoints import is_missing_route, serves, unsupported
from .fleet import fleet_model_entry, fleet_models, forward_elsewhere, where
from .keylimits import KeyGate
from .routing import target
from .snapshot import Snapshot
from .validation import validate_body

FIXUPS_HEADER = "X-Sparkd-Fixups"
CLIENT_GONE = 499
"""The status counted for a request whose client went away before its answer ended (nginx's convention)."""

if TYPE_CHECKING:
    from ..scheduler.runner import ModelRunner

log = structlog.get_logger("sparkd.requests")


class OpenAIRoutes:
    def __init__(self) -> None:
        self._created = int(time.time())

    def add_to(self, app: web.Application) -> None:
        self._snapshot, self._scheduler, self._engine = app[SNAPSHOT], app[SCHEDULER], app[ENGINE]
        self._metrics, self._tokenize_failures = app[OPERATIONS].metrics, app[TOKENIZE_FAILURES]
        self._key_gate = KeyGate(self._metrics.key_usage)
        self._fleet = app[FLEET]
        self._weights = app[WEIGHTS]
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_get("/v1/{model}/models", self.list_models_path_form)
        app.router.add_post("/v1/{tail:.+}", self.proxy)

    # -- models ------------------------------------------------------------------

    def _model_entry(self, current: Snapshot, name: str) -> dict[str, Any]:
        model = current.config.models[name]
        runner = self._scheduler.runners.get(name)
        entry: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "sparkd",
            "state": runner.state.value if runner else "disabled",
            "max_model_len": model.max_model_len,
            "aliases": list(model.aliases),
            "lifecycle": model.lifecycle,
            "tools": current.fixups_of(model).tools,
            "profile": model.profile or DEFAULT_PROFILE,
            "endpoints": list(model.api_paths),
            **where(self._fleet, current, model),
        }
        if model.notes:
            entry["notes"] = list(model.notes)
        if not model.enabled:
            entry["enabled"] = False
            entry["reason"] = model.disabled_reason or model.experimental_reason or "disabled in the configuration"
            entry["experimental"] = model.experimental
        return entry

    async def list_models(self, request: web.Request) -> web.Response:
        """The models this key may use."""
        current = self._snapshot.current
        principal = request[PRINCIPAL]
        usable = [m for m in current.config.models.values() if principal.may_use(m)]
        return web.json_response(
            {
                "object": "list",
                "data": await self._with_weights([self._model_entry(current, m.name) for m in usable if m.enabled])
                + fleet_models(self._fleet, principal, self._created),
                # Off models stay out of "data" so clients do not offer them; their reasons are here.
                "unavailable": [self._model_entry(current, m.name) for m in usable if not m.enabled],
            }
        )

    async def _with_weights(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each entry with its weights' presence and size (extra fields: the OpenAI shape stays valid)."""
        models = self._snapshot.current.config.models
        presences = await self._weights.presences([models[e["id"]] for e in entries if e["id"] in models])
        return [{**entry, **presences.get(entry["id"], {})} for entry in entries]

    async def get_model(self, request: web.Request) -> web.Response:
        current = self._snapshot.current
        remote = fleet_model_entry(self._fleet, current, request[PRINCIPAL], request.match_info["model"], self._created)
        if remote is not None:
            return web.json_response(remote)
        model = current.directory.resolve(request.match_info["model"])
        request[PRINCIPAL].check_model(model)
        [entry] = await self._with_weights([self._model_entry(current, model.name)])
        return web.json_response(entry)

    async def list_models_path_form(self, request: web.Request) -> web.Response:
        current = self._snapshot.current
        model = current.directory.resolve(request.match_info["model"])
        request[PRINCIPAL].check_model(model)
        return web.json_response({"object": "list", "data": [self._model_entry(current, model.name)]})

    # -- inference -------------------------------------------------------------------

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Every inference request, counted once in /metrics and the usage history, whatever its outcome."""
        record = RequestRecord()
        started = time.monotonic()
        status = 500
        code: str | None = "internal_error"
        try:
            with self._key_gate.admit(request[PRINCIPAL]):
                response = await self._proxy(request, record)
            status, code = response.status, record.stream_error
            return response
        except ApiError as error:
            status, code = error.status, error.code
            raise
        except web.HTTPException as error:
            status, code = error.status, None
            raise
        except asyncio.CancelledError:
            status, code = CLIENT_GONE, "client_gone"
            raise
        finally:
            now = time.monotonic()
            self._metrics.request_finished(request[PRINCIPAL].name, status, started, record, now)
            if self._snapshot.current.config.log.requests:
                log_request(request[PRINCIPAL].name, record, status, code, now - started, via=request[PRINCIPAL].via)

    async def _proxy(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        raw = await read_body(request, self._snapshot.current.config.server)
        # A reload may land while the body arrives: resolve against the configuration of now.
        current = self._snapshot.current
        payload = parse_json_object(raw)
        elsewhere = await forward_elsewhere(self._fleet, request, current, raw, payload, record)
        if elsewhere is not None:
            return elsewhere
        return await self._serve_here(request, record, current, raw, payload)

    async def _serve_here(
        self, request: web.Request, record: RequestRecord, current: Snapshot, raw: bytes, payload: dict[str, Any]
    ) -> web.StreamResponse:
        route = target(current.directory, request.match_info["tail"], payload.get("model"))
        model = route.model
        record.model, record.path = model.name, route.path
        request[PRINCIPAL].check_model(model)
        if not serves(model, route.path):
            raise unsupported(model, route.path)
        validate_body(route.path, payload)
        fixups = current.fixups_of(model)
        body, applied = fixups.apply(payload)
        if body.get("model") != model.name:
            body = {**body, "model": model.name}  # aliases and the path form reach the engine by its served name
        headers = {FIXUPS_HEADER: ",".join(applied)} if applied else {}
        changed = body is not payload
        del payload
        streaming = body.get("stream") is True
        fitting = responses.needs_fitting(fixups, model, route.path, body)
        if fitting:
            responses.refuse_certain_overflow(model, route.path, body)
        runner = self._scheduler.acquire_now(model.name)
        feed: loading.LoadingFeed | None = None
        if runner is None:
            # While it waits a request holds its body as bytes only: the parsed form costs
            # several times its size (~7x for a long chat), and the queue bounds bytes.
            if changed:
                raw, changed = json.dumps(body, separators=(",", ":")).encode(), False
            del body
            if streaming:
                feed = self._loading_feed(request, model, route.path, headers)
            queued = time.monotonic()
            try:
                principal = request[PRINCIPAL]
                runner = await self._wait_for(model.name, principal.name, len(raw), feed, principal.limits.priority)
            except ApiError as error:
                if feed is None or feed.response is None:
                    raise
                return await feed.end_with_error(error, record)
            finally:
                record.queued_s = time.monotonic() - queued
            if runner is None:
                assert feed is not None and feed.response is not None
                record.stream_error = "client_gone"
                return feed.response
            body = parse_json_object(raw) if fitting else {}
        prepared = feed.response if feed is not None else None
        try:
            assert runner.endpoint is not None
            if fitting:
                fitted = await self._fit(runner.endpoint, model, fixups, route.path, body, headers, feed)
                changed, body = changed or fitted is not body, fitted
            if changed:
                raw = json.dumps(body, separators=(",", ":")).encode()
            answer = await forward(
                request, self._engine.session, runner.endpoint, route.path, raw, model.name, current.config.engine, headers or None,
                streaming, record, last_words=lambda: self._scheduler.last_words(runner), prepared=prepared,
                rewrite=feed.engine_rewrite() if feed is not None else None,
            )
            if isinstance(answer, web.Response) and isinstance(answer.body, bytes) and is_missing_route(answer.status, answer.body):
                raise unsupported(model, route.path)
            return anthropic.engine_answer(answer, model.name, route.path) if route.path in anthropic.PATHS else answer
        except ApiError as error:
            if feed is None or feed.response is None:
                raise
            return await feed.end_with_error(error, record)  # the stream's 200 went out while it waited
        finally:
            self._scheduler.release(runner)

    def _loading_feed(
        self, request: web.Request, model: ModelConfig, path: str, headers: dict[str, str]
    ) -> loading.LoadingFeed | None:
        """What tells a waiting stream's client about its model's loading; None for paths without one."""
        if path not in loading.STREAM_PATHS:
            return None
        feedback = request[PRINCIPAL].feedback_for(model)
        return loading.LoadingFeed(request, self._scheduler, model.name, path, feedback, headers)

    async def _fit(
        self,
        endpoint: Endpoint,
        model: ModelConfig,
        fixups: Fixups,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        feed: loading.LoadingFeed | None,
    ) -> dict[str, Any]:
        """The body with its token limit fitted to the context left; the cap's headers go to
        ``headers`` and, for a stream whose headers went out while it waited, to its client."""
        fitted, capped = await responses.fit(self._engine, endpoint, model, fixups, path, body, self._tokenize_failures)
        headers.update(capped)
        if feed is not None and capped:
            await feed.tell_headers(capped)
        return fitted

    async def _wait_for(
        self, model: str, key: str, body_bytes: int, feed: loading.LoadingFeed | None, priority: int = 0
    ) -> ModelRunner | None:
        """Wait for the model, telling a stream's client why (``feed``); None when that client left."""
        if feed is not None:
            return await feed.acquire(key=key, body_bytes=body_bytes, priority=priority)
        return await self._scheduler.acquire(model, key=key, body_bytes=body_bytes, priority=priority)


def log_request(key: str, record: RequestRecord, status: int, code: str | None, duration_s: float, via: str | None = None) -> None:
    """The one log line of an inference request; its key's name only, never the key (``via``: the peer
    key that forwarded it, ``key`` then being the client's key name at the entry node)."""
    usage = record.usage
    fields: dict[str, Any] = {
        "key": key, "model": record.model, "path": record.path, "status": status,
        "duration_ms": round(duration_s * 1000, 1), "queued_ms": round(record.queued_s * 1000, 1),
        "prompt_tokens": usage[0] if usage else None, "completion_tokens": usage[1] if usage else None,
    }
    if code is not None or status >= 400:
        fields["code"] = code
    if via is not None:
        fields["via"] = via
    log.info("request_done", **fields)


async def read_body(request: web.Request, server: ServerConfig) -> bytes:
    """The request body, within ``server.max_body_bytes`` (413) and ``server.body_timeout_s`` (408).

    A body that arrived with the headers (most requests) is taken without a timer.
    """
    limit = server.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(_too_large(limit))
    content = request.content
    if content.is_eof():
        return await _read_within(content, limit)
    try:
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(server.body_timeout_s):
                return await _read_within(content, limit)
        else:  # pragma: no cover - 3.10
            return await asyncio.wait_for(_read_within(content, limit), server.body_timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        raise RequestTimeout(
            f"the request body did not arrive within {server.body_timeout_s:g} s (server.body_timeout_s); "
            "check the network, or send a smaller body"
        ) from None


def _too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes (server.max_body_bytes)"


async def _read_within(content: StreamReader, limit: int) -> bytes:
    """Read the body, refusing it as soon as it passes ``limit`` (a chunked body has no length up front)."""
    body = await content.readany()
    chunk = await content.readany() if body else b""
    if chunk:
        buffer = bytearray(body)
        while chunk:
            buffer += chunk
            if len(buffer) > limit:
                raise PayloadTooLarge(_too_large(limit))
            chunk = await content.readany()
        body = bytes(buffer)
    if len(body) > limit:
        raise PayloadTooLarge(_too_large(limit))
    return body


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (use a number or null)")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise BadRequest("the request body is empty: send a JSON object such as {\"model\": ..., \"messages\": [...]}", code="empty_body")
    try:
        payload = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8 text", code="invalid_json") from None
    except json.JSONDecodeError as error:
        raise BadRequest(f"the request body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}", code="invalid_json") from None
    except ValueError as error:  # NaN, Infinity
        raise BadRequest(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("the request body is not acceptable JSON: it is nested too deeply", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"the request body must be a JSON object, found a JSON {type(payload).__name__}", code="invalid_json")
    return payload

