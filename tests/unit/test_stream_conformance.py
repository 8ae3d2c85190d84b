"""Conformance of the raw HTTP/1.1 stream relay (sparkd/engine/stream.py through proxy.forward), on real sockets.

The relay hand-writes HTTP/1.1 (it earns its keep per chunk: tests/bench/README.md),
so its framing is tested here against a scripted engine that answers with exactly
the bytes each case needs (chunk sizes split across reads, extensions, trailers,
interim answers, close-delimited bodies, breaks, silences) and raw-socket clients
(HTTP/1.0, pipelining, half-closed, not reading).  The real engine path through
Podman is tests/integration/test_security.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from capture_engine import dechunk, http_request, raw_exchange, stalled_client
from sparkd.config.schema import EngineConfig
from sparkd.engine.client import Endpoint
from sparkd.engine.proxy import StreamRewrite, forward
from sparkd.errors import ApiError

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]
PAYLOAD = b"".join(EVENTS)
BODY = json.dumps({"model": "m", "stream": True, "messages": []}).encode()

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


@dataclass
class Engine:
    """A scripted engine: every connection gets ``script``; what it received is kept."""

    script: Script
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a connection's client (sparkd) closed its side."""

    open_connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            self.requests.append(head + await reader.readexactly(length))
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_connections -= 1
            writer.close()


@dataclass
class Proxy:
    engine: Engine
    port: int
    limits: EngineConfig


@pytest.fixture
async def relay() -> AsyncIterator[Callable[..., Awaitable[Proxy]]]:
    """Start a scripted engine and a minimal app whose handler is sparkd's ``forward``."""
    cleanups: list[Callable[[], Awaitable[None]]] = []
    session = aiohttp.ClientSession(auto_decompress=False)

    async def make(script: Script, limits: EngineConfig | None = None, prepared: bytes | None = None,
                   rewrite: Callable[[], StreamRewrite] | None = None) -> Proxy:
        """``prepared``: the handler sends its 200 and these bytes before the engine is asked (a stream
        that waited for its model); ``rewrite``: makes the rewrite the engine's stream gets."""
        engine = Engine(script)
        server = await asyncio.start_server(engine.handle, "127.0.0.1", 0)
        engine.port = server.sockets[0].getsockname()[1]
        limits = limits or EngineConfig()

        async def handler(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            early = None
            if prepared is not None:
                early = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await early.prepare(request)
                await early.write(prepared)
            try:
                return await forward(request, session, Endpoint(port=engine.port, key="k"), "/v1/chat/completions", body, "m",
                                     limits, streaming=json.loads(body).get("stream") is True, prepared=early,
                                     rewrite=rewrite() if rewrite is not None else None)
            except ApiError as error:
                return error.response()

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        async def cleanup() -> None:
            await runner.cleanup()
            server.close()

        cleanups.append(cleanup)
        return Proxy(engine, port, limits)

    yield make
    for cleanup in cleanups:
        await cleanup()
    await session.close()


def chunked_answer(*parts: bytes, pause: float = 0.0) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)

    return script


def request_for(proxy: Proxy, body: bytes = BODY, version: bytes = b"HTTP/1.1") -> bytes:
    return http_request("POST", b"/v1/chat/completions", proxy.port, body, {"Content-Type": "application/json"}, version=version)


WIRE = b"".join(chunk(e) for e in EVENTS) + b"0\r\n\r\n"


@pytest.mark.parametrize(
    "parts",
    [
        [SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + WIRE],
        # every byte in a read of its own: size lines, CRLFs and the head split everywhere
        [bytes([b]) for b in SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + WIRE],
        # chunk extensions, upper-case hex, and trailers after the last chunk
        [SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
         + b"".join(b"%X;ext=1\r\n%b\r\n" % (len(e), e) for e in EVENTS) + b"0\r\nX-Trailer: t\r\n\r\n"],
        # an interim 100 Continue before the answer
        [b"HTTP/1.1 100 Continue\r\n\r\n", SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", WIRE],
        # a close-delimited body (no length, no chunks): sparkd frames it
        [SSE_HEAD + b"Connection: close\r\n\r\n", *EVENTS],
    ],
    ids=["whole", "byte-by-byte", "extensions-trailers", "100-continue", "close-delimited"],
)
async def test_an_http11_client_gets_every_event_in_valid_chunked_framing(relay, parts):
    proxy = await relay(chunked_answer(*parts))
    answer = await raw_exchange(proxy.port, request_for(proxy))
    assert answer.status == 200
    assert answer.headers["transfer-encoding"] == "chunked"  # raw_exchange checked the framing while decoding it
    assert answer.body == PAYLOAD
    assert b"X-Trailer" not in answer.body


async def test_an_http10_client_gets_a_close_delimited_stream(relay):
    proxy = await relay(chunked_answer(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", *[chunk(e) for e in EVENTS], b"0\r\n\r\n"))
    answer = await raw_exchange(proxy.port, request_for(proxy, version=b"HTTP/1.0"))
    assert answer.status == 200 and answer.status_line.startswith(b"HTTP/1.0")
    assert "transfer-encoding" not in answer.headers and "content-length" not in answer.headers
    assert answer.body == PAYLOAD  # no framing at all: the body ends where the connection does


async def test_pipelined_requests_are_answered_in_order_each_framed(relay):
    proxy = await relay(chunked_answer(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + WIRE))
    one = http_request("POST", b"/v1/chat/completions", proxy.port, BODY, {"Content-Type": "application/json", "Connection": "keep-alive"})
    one = one.replace(b"Connection: close\r\n", b"")
    two = request_for(proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(one + two)  # both at once, before any answer
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    first_head, _, rest = data.partition(b"\r\n\r\n")
    first_end = rest.index(b"0\r\n\r\n") + 5
    second_head, _, second_body = rest[first_end:].partition(b"\r\n\r\n")
    assert first_head.startswith(b"HTTP/1.1 200") and second_head.startswith(b"HTTP/1.1 200"), data[:200]
    assert dechunk(rest[:first_end]) == PAYLOAD and dechunk(second_body) == PAYLOAD
    assert len(proxy.engine.requests) == 2


async def test_a_half_closed_client_is_treated_as_gone_and_leaves_no_engine_connection(relay):
    """A client that shuts its sending side after the request: aiohttp's server takes the EOF for a departure
    (as for any handler); the relay must then close its engine connection, not leave it streaming."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(chunk(EVENTS[0]))
            await writer.drain()
            await asyncio.sleep(0.01)

    proxy = await relay(endless)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(request_for(proxy))
    await writer.drain()
    await asyncio.sleep(0.3)  # the stream is flowing
    assert proxy.engine.open_connections == 1
    writer.write_eof()
    await asyncio.wait_for(reader.read(), 5)  # sparkd closes the client's connection...
    writer.close()
    deadline = time.monotonic() + 5
    while proxy.engine.open_connections:  # ...and the engine's
        assert time.monotonic() < deadline, "the engine's stream is still open"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(("at_boundary", "ending"), [(True, b"data: {\"error\""), (False, None)], ids=["at-boundary", "mid-frame"])
async def test_an_engine_that_breaks_off_ends_the_stream_visibly(relay, at_boundary, ending):
    cut = chunk(EVENTS[0]) + (b"" if at_boundary else b"40\r\ndata: {\"n\"")
    proxy = await relay(chunked_answer(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + cut))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(request_for(proxy))
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    body = data.partition(b"\r\n\r\n")[2]
    if at_boundary:
        payload = dechunk(body)  # complete framing: an error event, then the last chunk
        assert payload.startswith(EVENTS[0]) and payload[len(EVENTS[0]):].startswith(ending)
    else:
        assert not body.endswith(b"0\r\n\r\n")  # no last chunk: the client sees a broken stream, not a complete one
        with pytest.raises((AssertionError, ValueError)):
            dechunk(body)


async def test_an_error_answer_to_a_stream_request_is_relayed_whole(relay):
    error = b'{"error": {"message": "bad", "type": "BadRequestError"}}'
    proxy = await relay(chunked_answer(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(error), error)))
    answer = await raw_exchange(proxy.port, request_for(proxy))
    assert answer.status == 400 and answer.body == error


async def test_the_raw_query_and_checked_headers_reach_the_engine_unchanged(relay):
    proxy = await relay(chunked_answer(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + WIRE))
    request = http_request("POST", b"/v1/chat/completions?a=%0D%0AX:%20y&b=%7C", proxy.port, BODY,
                           {"Content-Type": "text/plain", "X-Request-Id": "r 1", "Authorization": "Bearer client"})
    answer = await raw_exchange(proxy.port, request)
    assert answer.status == 200
    head = proxy.engine.requests[0].partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /v1/chat/completions?a=%0D%0AX:%20y&b=%7C HTTP/1.1"
    lowered = [line.lower() for line in head]
    assert b"content-type: application/json" in lowered and b"x-request-id: r 1" in lowered, head
    assert b"authorization: bearer k" in lowered and b"authorization: bearer client" not in lowered
    assert not any(line.startswith(b"x:") for line in lowered)


async def test_an_engine_that_never_answers_is_a_504_within_the_head_timeout(relay):
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    proxy = await relay(hang, EngineConfig(response_head_timeout_s=0.5))
    began = time.monotonic()
    answer = await raw_exchange(proxy.port, request_for(proxy))
    assert answer.status == 504 and answer.json()["error"]["code"] == "engine_timeout"
    assert time.monotonic() - began < 2


async def test_an_engine_that_goes_silent_ends_the_stream_with_an_error_event(relay):
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(EVENTS[0]))
        await writer.drain()
        await reader.read()

    proxy = await relay(silent, EngineConfig(idle_read_timeout_s=0.5))
    answer = await raw_exchange(proxy.port, request_for(proxy), timeout=5)
    assert answer.body.startswith(EVENTS[0])
    assert b"engine.idle_read_timeout_s" in answer.body[len(EVENTS[0]):]


async def test_a_client_that_stops_reading_is_dropped_within_the_write_stall_timeout(relay):
    big = b"data: " + b"x" * 60000 + b"\n\n"

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(chunk(big))
                await writer.drain()
        finally:
            proxy.engine.closed.set()

    proxy = await relay(firehose, EngineConfig(write_stall_timeout_s=0.5))
    client = await asyncio.to_thread(stalled_client, proxy.port, request_for(proxy))
    try:
        await asyncio.wait_for(proxy.engine.closed.wait(), 10)  # sparkd gave up on the client and closed the engine's stream
    finally:
        client.close()


@pytest.mark.parametrize("stream", [True, False], ids=["raw-relay", "pooled"])
async def test_an_engine_that_does_not_accept_is_a_504_within_the_connect_timeout(relay, stream):
    proxy = await relay(chunked_answer(), EngineConfig(connect_timeout_s=0.5))
    # A listening socket whose accept queue is full: Linux drops further SYNs, so a connect hangs.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    queued = []
    for _ in range(3):
        waiting = socket.socket()
        waiting.setblocking(False)
        waiting.connect_ex(full.getsockname())
        queued.append(waiting)
    await asyncio.sleep(0.1)
    proxy.engine.port = full.getsockname()[1]
    try:
        began = time.monotonic()
        answer = await raw_exchange(proxy.port, request_for(proxy, json.dumps({"stream": stream}).encode()))
        took = time.monotonic() - began
    finally:
        for waiting in queued:
            waiting.close()
        full.close()
    assert answer.status == 504, answer.body
    assert "engine.connect_timeout_s" in answer.json()["error"]["message"]
    assert took < 3


UNFINISHED = [b'data: {"choices": [{"delta": {"content": "hi"}, "finish_reason": null}]}\n\n']


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"], ids=["raw-relay", "aiohttp-relay"])
@pytest.mark.parametrize(
    ("events", "reason"),
    [
        (UNFINISHED, b"it gave no reason"),
        ([], b"it gave no reason"),  # 200 text/event-stream, then nothing at all
        ([b'data: {"error": {"message": "Requested tokens (18750) exceed context window of 8192"}}\n\n'],
         b"Requested tokens (18750) exceed context window of 8192"),
    ],
    ids=["no-done", "empty", "engine-error-without-done"],
)
async def test_a_stream_that_ends_without_its_final_event_gets_an_error_event(relay, version, events, reason):
    proxy = await relay(chunked_answer(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", *[chunk(e) for e in events], b"0\r\n\r\n"))
    answer = await raw_exchange(proxy.port, request_for(proxy, version=version))
    assert answer.status == 200
    body = answer.body
    assert body.startswith(b"".join(events))
    last = json.loads(body[len(b"".join(events)):].removeprefix(b"data: "))
    assert last["error"]["code"] == "engine_error"
    assert "model m" in last["error"]["message"] and "without a final event" in last["error"]["message"]
    assert reason.decode() in last["error"]["message"]


@pytest.mark.parametrize("final", [b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n',
                                   b'event: response.completed\ndata: {"type": "response.completed"}\n\n'],
                         ids=["finish-reason", "responses-completed"])
async def test_a_stream_with_a_final_event_but_no_done_is_left_alone(relay, final):
    proxy = await relay(chunked_answer(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(UNFINISHED[0]) + chunk(final) + b"0\r\n\r\n"))
    answer = await raw_exchange(proxy.port, request_for(proxy))
    assert answer.body == UNFINISHED[0] + final


COMMENT = b": sparkd: loading m, loading weights 50%, 3 s so far\n\n"


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
@pytest.mark.parametrize(
    "parts",
    [
        [SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + WIRE],
        [bytes([b]) for b in SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + WIRE],
        [SSE_HEAD + b"Connection: close\r\n\r\n", *EVENTS],
    ],
    ids=["whole", "byte-by-byte", "close-delimited"],
)
async def test_a_stream_whose_headers_went_out_gets_the_engines_body_after_what_it_was_sent(relay, parts, version):
    """The response a waiting stream prepared: the engine's status and headers are not relayed, its body follows."""
    proxy = await relay(chunked_answer(*parts), prepared=COMMENT)
    answer = await raw_exchange(proxy.port, request_for(proxy, version=version))
    assert answer.status == 200
    assert answer.headers.get("transfer-encoding") == ("chunked" if version == b"HTTP/1.1" else None)
    assert answer.body == COMMENT + PAYLOAD


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
async def test_an_engine_refusing_a_stream_whose_200_went_out_ends_it_with_an_error_event(relay, version):
    error = b'{"error": {"message": "max_tokens is too large", "type": "BadRequestError"}}'
    proxy = await relay(chunked_answer(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(error), error)),
        prepared=COMMENT)
    answer = await raw_exchange(proxy.port, request_for(proxy, version=version))
    assert answer.status == 200 and answer.body.startswith(COMMENT)
    event = json.loads(answer.body[len(COMMENT):].removeprefix(b"data: "))["error"]
    assert event["code"] == "engine_refused" and event["type"] == "invalid_request_error"
    assert "model m" in event["message"] and "status 400" in event["message"] and "max_tokens is too large" in event["message"]


class Shout:
    """A rewrite that upper-cases the stream (what it returns is what the client gets)."""

    def feed(self, data: bytes) -> bytes:
        return data.upper()

    def flush(self) -> bytes:
        return b": flushed\n\n"


async def test_a_rewritten_stream_takes_the_read_by_read_relay_and_is_flushed_at_its_end(relay):
    proxy = await relay(chunked_answer(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + WIRE), prepared=COMMENT, rewrite=Shout)
    answer = await raw_exchange(proxy.port, request_for(proxy))
    assert answer.status == 200 and answer.headers["transfer-encoding"] == "chunked"
    assert answer.body == COMMENT + PAYLOAD.upper() + b": flushed\n\n"
