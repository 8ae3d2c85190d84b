"""Streaming pass-through from a client to an engine and back.

Answers that are not streamed go through a pooled aiohttp client.  Streams
(server-sent events) take the raw relay of ``stream.py``, chunk by chunk as they
arrive, never buffered.  If the client goes away, the handler is cancelled and
the upstream connection is closed, which is how vLLM learns to stop generating.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Mapping

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from ..errors import BadGateway
from . import stream
from .client import Endpoint
from .outbound import EngineRequest, engine_request
from .usage import RequestRecord

log = structlog.get_logger("sparkd.proxy")

_DROP_RESPONSE = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Server", "Date", "Upgrade", "Trailer")
)


def _response_headers(upstream: Mapping[str, str], extra: dict[str, str] | None) -> CIMultiDict[str]:
    headers = CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in _DROP_RESPONSE)
    if extra:
        headers.update(extra)
    return headers


async def forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    path: str,
    body: bytes,
    model: str,
    extra_headers: dict[str, str] | None = None,
    streaming: bool = False,
    record: RequestRecord | None = None,
) -> web.StreamResponse:
    """Send ``body`` to the engine at ``path`` and relay its answer to the client.

    ``streaming``: the client asked for a stream (``"stream": true``); the answer
    then takes the raw relay (``stream.py``) instead of the pooled HTTP client.
    ``record``: filled with the first byte's time and the usage the engine reported.
    """
    outbound = engine_request(path, request.raw_path, request.headers.items(), endpoint)
    try:
        if streaming:
            return await _forward_stream(request, endpoint, outbound, body, model, extra_headers, record)
        async with session.request(request.method, outbound.url, data=body, headers=outbound.headers) as upstream:
            if upstream.content_type == "text/event-stream":
                return await _stream(request, upstream, model, extra_headers, record)
            payload = await upstream.read()
            if record is not None:
                record.note_body(time.monotonic(), payload)
            return web.Response(status=upstream.status, body=payload, headers=_response_headers(upstream.headers, extra_headers))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as error:
        raise BadGateway(
            f"model {model}: the engine did not answer ({type(error).__name__}: {error}); "
            f"it may have crashed: see `sparkctl logs {model}` or `journalctl -u sparkd`",
        ) from error


async def _forward_stream(
    request: web.Request,
    endpoint: Endpoint,
    outbound: EngineRequest,
    body: bytes,
    model: str,
    extra_headers: dict[str, str] | None,
    record: RequestRecord | None,
) -> web.StreamResponse:
    raw_request = stream.request_bytes(request.method, outbound.url.raw_path_qs, f"{endpoint.host}:{endpoint.port}", outbound.headers, body)
    transport, upstream = await stream.open_upstream(endpoint.host, endpoint.port, raw_request)
    try:
        status, headers = await upstream.head
        response_headers = _response_headers(headers, extra_headers)
        if status == 200 and headers.get("Content-Type", "").startswith("text/event-stream"):
            try:
                return await stream.relay(request, upstream, response_headers, status, model, lambda: broken_stream_event(model, "closed"))
            finally:
                if record is not None:
                    record.note_body(upstream.first_byte, upstream.before_tail + upstream.tail)
        payload = await upstream.body()
        if record is not None:
            record.note_body(time.monotonic(), payload)
        return web.Response(status=status, body=payload, headers=response_headers)
    finally:
        transport.close()


def broken_stream_event(model: str, how: str) -> bytes:
    """The last SSE event of a stream the engine broke off: the OpenAI SDKs raise it as an APIError."""
    message = f"model {model}: the engine stopped in the middle of the answer (connection {how}); retry the request"
    event = {"error": {"message": message, "type": "server_error", "param": None, "code": "engine_error"}}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def _stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    model: str,
    extra_headers: dict[str, str] | None,
    record: RequestRecord | None = None,
) -> web.StreamResponse:
    """An SSE answer to a request that did not ask for a stream (rare): relayed through aiohttp."""
    response = web.StreamResponse(status=upstream.status, headers=_response_headers(upstream.headers, extra_headers))
    await response.prepare(request)
    first: float | None = None
    tail = before_tail = b""
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
            if first is None:
                first = time.monotonic()
            before_tail, tail = tail, chunk
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError) as error:
        log.warning("engine_stream_broken", model=model, error=type(error).__name__)
        await response.write(broken_stream_event(model, type(error).__name__))
    finally:
        if record is not None:
            record.note_body(first, before_tail + tail)
    await response.write_eof()
    return response
