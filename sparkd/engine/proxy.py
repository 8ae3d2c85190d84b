"""Streaming pass-through from a client to an engine and back.

Server-sent events are written to the client chunk by chunk as they arrive
(never buffered).  If the client goes away, the handler is cancelled and
leaving ``session.request``'s context closes the upstream connection, which
is how vLLM learns to stop generating.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from ..errors import BadGateway
from .client import Endpoint

log = structlog.get_logger("sparkd.proxy")

# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones sparkd sets itself.
_DROP_REQUEST = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Authorization", "X-Api-Key", "Cookie",
        "Origin", "Referer",
    )
)
_DROP_RESPONSE = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Server", "Date", "Upgrade", "Trailer")
)


def _request_headers(request: web.Request, endpoint: Endpoint) -> CIMultiDict[str]:
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST)
    headers["Authorization"] = endpoint.auth_header
    return headers


def _response_headers(upstream: aiohttp.ClientResponse, extra: dict[str, str] | None) -> CIMultiDict[str]:
    headers = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE)
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
) -> web.StreamResponse:
    """Send ``body`` to the engine at ``path`` and relay its answer to the client."""
    url = endpoint.base_url + path
    if request.query_string:
        url += "?" + request.query_string
    try:
        upstream_cm = session.request(request.method, url, data=body, headers=_request_headers(request, endpoint))
        async with upstream_cm as upstream:
            if upstream.content_type == "text/event-stream":
                return await _stream(request, upstream, model, extra_headers)
            payload = await upstream.read()
            return web.Response(status=upstream.status, body=payload, headers=_response_headers(upstream, extra_headers))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
        raise BadGateway(
            f"model {model}: the engine did not answer ({type(error).__name__}: {error}); "
            "it may have crashed: see `sparkctl logs " + model + "` or `journalctl -u sparkd`",
        ) from error


async def _stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    model: str,
    extra_headers: dict[str, str] | None,
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, headers=_response_headers(upstream, extra_headers))
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError) as error:
        # The engine died mid-answer: the headers are gone already, so the error
        # travels as a final SSE event the OpenAI SDKs raise as an APIError.
        log.warning("engine_stream_broken", model=model, error=type(error).__name__)
        message = f"model {model}: the engine stopped in the middle of the answer ({type(error).__name__}); retry the request"
        event = {"error": {"message": message, "type": "server_error", "param": None, "code": "engine_error"}}
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
    await response.write_eof()
    return response
