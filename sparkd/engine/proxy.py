"""Pass-through from a client to an engine and back.

Answers that are not streamed go through the pooled aiohttp client and are read
whole.  A stream (server-sent events) an HTTP/1.1 client asked for takes the raw
relay of ``stream.py``: the engine's chunked frames go to the client as they
are (it costs a quarter less CPU per chunk than an aiohttp client relay; figures
in tests/bench/README.md).  Every other stream (an HTTP/1.0 client, which must
get a close-delimited body, or an SSE answer to a request that did not ask for
one) is relayed read by read through the aiohttp client, aiohttp framing it for
the client's protocol.  Nothing is buffered.  If the client goes away, the
handler is cancelled and the upstream connection is closed, which is how vLLM
learns to stop generating.  Every phase of the exchange has a time limit
(``deadlines.py``, ``[engine]`` in the configuration), so a hung engine or a
client that stopped reading cannot hold the model's in-flight count for ever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Protocol

import aiohttp
import structlog
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict

from ..config.schema import EngineConfig
from ..errors import BadGateway, GatewayTimeout
from . import stream
from .client import Endpoint
from .deadlines import CONFIG_KEYS, Phase, StallWatch
from .finale import LastWords, StreamEnding
from .outbound import EngineRequest, engine_request
from .usage import RequestRecord, StreamTail

log = structlog.get_logger("sparkd.proxy")

SSE = "text/event-stream"
_DROP_RESPONSE = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Server", "Date", "Upgrade", "Trailer")
)


class StreamRewrite(Protocol):
    """Changes the events of an engine's stream on their way to the client (the read-by-read relay only)."""

    def feed(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


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
    limits: EngineConfig,
    extra_headers: dict[str, str] | None = None,
    streaming: bool = False,
    record: RequestRecord | None = None,
    last_words: LastWords | None = None,
    prepared: web.StreamResponse | None = None,
    rewrite: StreamRewrite | None = None,
    own_headers: Mapping[str, str] | None = None,
    raw_relay: bool = True,
) -> web.StreamResponse:
    """Send the JSON ``body`` to the engine at ``path`` and relay its answer to the client.

    ``limits``: the ``[engine]`` time limits.  ``streaming``: the client asked for
    a stream (``"stream": true``).  ``record``: filled with the first byte's time
    and the usage the engine reported.  ``last_words``: the engine's last log lines,
    quoted when a stream ends without its final event.  ``prepared``: the client's
    stream, already sent its 200 and headers (it waited for its model): the engine's
    status and headers are not relayed, its body follows, and an answer that is not a
    stream becomes an error event in it.  ``rewrite``: what the stream's events need
    changed to follow what ``prepared`` was sent (it takes the read-by-read relay).  ``own_headers``:
    sparkd's own headers for the upstream (a peer sparkd's, ``sparkd/fleet``).  ``raw_relay``: False for
    an upstream the raw relay cannot reach (a peer behind TLS).  Redirects are never followed.
    """
    ending = StreamEnding(model, path, last_words, record)
    outbound = engine_request(path, request.raw_path, request.headers.items(), endpoint, own_headers)
    task = asyncio.current_task()
    assert task is not None
    watch = StallWatch(limits, task)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=limits.connect_timeout_s or None)
    try:
        if streaming and request.version >= HttpVersion11 and rewrite is None and raw_relay:
            return await _forward_raw(request, endpoint, outbound, body, ending, watch, limits, extra_headers, record, prepared)
        async with session.request(
            request.method, outbound.url, data=body, headers=outbound.headers, timeout=timeout, allow_redirects=False
        ) as upstream:
            if upstream.content_type == SSE and (prepared is None or upstream.status == 200):
                relayed = await _relay(request, upstream, watch, ending, extra_headers, record, prepared, rewrite)
                watch.close()  # the answer is complete: leaving the upstream context must not time out
                return relayed
            watch.enter(Phase.READ)
            parts = []
            async for part in upstream.content.iter_any():
                parts.append(part)
                watch.enter(Phase.READ)
            watch.close()
            payload = b"".join(parts)
            if record is not None:
                record.note_body(time.monotonic(), payload)
            if prepared is not None:
                return await _end_with_refusal(prepared, ending, upstream.status, payload, watch)
            return web.Response(status=upstream.status, body=payload, headers=_response_headers(upstream.headers, extra_headers))
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
        assert watch.expired is not None
        raise _timed_out(model, watch, watch.expired) from None
    except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as error:  # only connecting has a timeout of its own
        _log_timeout(model, "connect", limits.connect_timeout_s, "engine.connect_timeout_s")
        raise GatewayTimeout(
            f"model {model}: could not connect to its engine within {limits.connect_timeout_s:g} s "
            f"(engine.connect_timeout_s); see `sparkctl logs {model}`",
        ) from error
    except (aiohttp.ClientError, OSError, ValueError) as error:
        raise BadGateway(
            f"model {model}: the engine did not answer ({type(error).__name__}: {error}); "
            f"it may have crashed: see `sparkctl logs {model}` or `journalctl -u sparkd`",
        ) from error
    finally:
        watch.close()


async def _forward_raw(
    request: web.Request,
    endpoint: Endpoint,
    outbound: EngineRequest,
    body: bytes,
    ending: StreamEnding,
    watch: StallWatch,
    limits: EngineConfig,
    extra_headers: dict[str, str] | None,
    record: RequestRecord | None,
    prepared: web.StreamResponse | None,
) -> web.StreamResponse:
    """The streamed answer to an HTTP/1.1 client, over a connection of its own (``stream.py``)."""
    raw_request = stream.request_bytes(request.method, outbound.url.raw_path_qs, f"{endpoint.host}:{endpoint.port}", outbound.headers, body)
    transport, upstream = await stream.open_upstream(endpoint.host, endpoint.port, raw_request, watch, limits.connect_timeout_s)
    try:
        status, headers = await upstream.head
        response_headers = _response_headers(headers, extra_headers)
        if status == 200 and headers.get("Content-Type", "").startswith(SSE):
            try:
                return await stream.relay(request, upstream, response_headers, status, ending.model, watch, ending, prepared)
            finally:
                if record is not None:
                    record.note_body(upstream.first_byte, upstream.usage_tail.text)
        payload = await upstream.body()
        if record is not None:
            record.note_body(time.monotonic(), payload)
        if prepared is not None:
            return await _end_with_refusal(prepared, ending, status, payload, watch)
        return web.Response(status=status, body=payload, headers=response_headers)
    finally:
        transport.close()


async def _end_with_refusal(
    prepared: web.StreamResponse, ending: StreamEnding, status: int, payload: bytes, watch: StallWatch
) -> web.StreamResponse:
    """The engine answered without a stream after the client's 200 went out: end that stream with an error event."""
    watch.enter(Phase.WRITE)
    await prepared.write(ending.refused(status, payload))
    await prepared.write_eof()
    return prepared


def _log_timeout(model: str, reason: str, limit: float, key: str) -> None:
    log.warning("engine_request_timed_out", model=model, reason=reason, limit_s=limit, setting=key)


def _timed_out(model: str, watch: StallWatch, phase: Phase) -> GatewayTimeout:
    limit = watch.limit(phase)
    _log_timeout(model, phase.value, limit, CONFIG_KEYS[phase])
    what = "sent no answer" if phase is Phase.HEAD else "stopped sending its answer"
    return GatewayTimeout(
        f"model {model}: the engine {what} for {limit:g} s ({CONFIG_KEYS[phase]}); it may be overloaded or hung: "
        f"retry, or see `sparkctl logs {model}`",
        code="engine_timeout",
    )


async def _relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    watch: StallWatch,
    ending: StreamEnding,
    extra_headers: dict[str, str] | None,
    record: RequestRecord | None,
    prepared: web.StreamResponse | None,
    rewrite: StreamRewrite | None,
) -> web.StreamResponse:
    """Relay an SSE answer read by read (an HTTP/1.0 client, a stream nobody asked for, a stream
    ``rewrite`` changes); a broken or silent engine, or one that ends without a final event, ends it
    with an error event.  ``prepared``: the client's stream, its headers sent already."""
    model = ending.model
    response = prepared if prepared is not None else web.StreamResponse(
        status=upstream.status, headers=_response_headers(upstream.headers, extra_headers)
    )
    first: float | None = None
    tail = b""
    usage_tail = StreamTail()
    broken: str | None = None
    try:
        watch.enter(Phase.WRITE)
        if not response.prepared:
            await response.prepare(request)
        watch.enter(Phase.READ)
        async for chunk in upstream.content.iter_any():
            watch.enter(Phase.WRITE)
            await response.write(chunk if rewrite is None else rewrite.feed(chunk))
            watch.enter(Phase.READ)
            if first is None:
                first = time.monotonic()
            tail = chunk
            usage_tail.feed(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError) as error:
        if request.transport is None or request.transport.is_closing():
            return response  # the client went away (a write to it failed): leaving closes the engine's stream
        log.warning("engine_stream_broken", model=model, error=type(error).__name__)
        broken = f"connection {type(error).__name__}"
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
        assert watch.expired is not None
        _log_timeout(model, watch.expired.value, watch.limit(watch.expired), CONFIG_KEYS[watch.expired])
        if watch.expired is not Phase.READ:
            return _abort(request, response, drop=True)  # the client stopped reading: nothing more can reach it
        broken = f"nothing for {watch.limit(Phase.READ):g} s, {CONFIG_KEYS[Phase.READ]}"
    finally:
        if record is not None:
            record.note_body(first, usage_tail.text)
    if broken is not None and tail and not tail.endswith(b"\n\n"):
        return _abort(request, response)  # cut inside an event: an error event would be glued to its remains
    return await _end_relay(request, response, watch, ending, rewrite, broken, usage_tail)


async def _end_relay(
    request: web.Request,
    response: web.StreamResponse,
    watch: StallWatch,
    ending: StreamEnding,
    rewrite: StreamRewrite | None,
    broken: str | None,
    usage_tail: StreamTail,
) -> web.StreamResponse:
    """Close a relayed stream: the rewrite's rest, then an error event for a ``broken`` engine or
    the final event an engine left out, and the end of the body."""
    try:
        watch.enter(Phase.WRITE)
        if rewrite is not None and broken is None:
            await response.write(rewrite.flush())
        if broken is not None:
            await response.write(await ending.broken(broken, usage_tail.ending))
        else:
            unfinished = await ending.unfinished(usage_tail.ending)
            if unfinished is not None:
                await response.write(unfinished)
        await response.write_eof()
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
        _log_timeout(ending.model, Phase.WRITE.value, watch.limit(Phase.WRITE), CONFIG_KEYS[Phase.WRITE])
        return _abort(request, response, drop=True)
    return response


def _abort(request: web.Request, response: web.StreamResponse, drop: bool = False) -> web.StreamResponse:
    """End a stream that cannot end well: the client sees a cut connection, not a complete answer.

    ``drop``: the client stopped reading; what it has not taken is dropped (a close would wait for it).
    """
    if request.transport is not None:
        if drop:
            request.transport.abort()
        else:
            request.transport.close()
    return response
