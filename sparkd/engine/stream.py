"""Streaming answers (SSE), relayed from the engine's socket to the client's as raw chunked frames.

A token stream is thousands of small chunks; passing each through an HTTP client
(parse, queue, wake a task) and an HTTP server (re-frame, write, drain) costs
more than the rest of the request together.  Here the engine's chunked body is
forwarded verbatim from the upstream protocol's ``data_received`` straight into
the client's transport: no task switch, no copy, no re-framing per chunk.  Only
the framing is tracked, to stop before the engine's last-chunk marker (aiohttp
sends its own on ``write_eof``) and to know whether a broken stream ended on a
frame boundary.

Only HTTP/1.1 clients are relayed here (their chunked framing is the engine's);
every other answer goes through the pooled aiohttp client (``proxy.py``).  The
request's time limits are kept by a ``StallWatch``: this protocol only tells it
when the engine's head is in, when bytes arrive and when a slow client pauses
the relay.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import web
from multidict import CIMultiDict

from ..errors import BadGateway, BadRequest
from .deadlines import CONFIG_KEYS, Phase, StallWatch
from .finale import StreamEnding
from .usage import StreamTail

log = structlog.get_logger("sparkd.proxy")

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
RESUME_CHECK_S = 0.005
MAX_HEAD = 64 * 1024


class EngineStreamBroken(Exception):
    def __init__(self, at_frame_boundary: bool) -> None:
        super().__init__("the engine closed its stream before the end")
        self.at_frame_boundary = at_frame_boundary


class ChunkFrames:
    """Follows HTTP/1.1 chunked framing across reads, passing the bytes through untouched."""

    def __init__(self) -> None:
        self._need = 0
        """Bytes of the current chunk (data and its CRLF) not seen yet."""
        self._held = b""
        """An incomplete size line, kept until its end arrives (it might be the last chunk)."""
        self.finished = False

    @property
    def at_boundary(self) -> bool:
        return self._need == 0 and not self._held

    def feed(self, data: bytes) -> bytes:
        """The part of ``data`` to forward; stops before the last-chunk marker (then ``finished``)."""
        if self._held:
            data, self._held = self._held + data, b""
        index, size = 0, len(data)
        while index < size:
            if self._need:
                step = min(self._need, size - index)
                index += step
                self._need -= step
                continue
            line_end = data.find(b"\r\n", index)
            if line_end < 0:
                self._held = data[index:]
                return data[:index]
            try:
                length = int(data[index:line_end].split(b";", 1)[0], 16)
            except ValueError:
                raise BadGateway("the engine sent a malformed chunked stream") from None
            if length == 0:
                self.finished = True
                return data[:index]
            self._need = length + 2
            index = line_end + 2
        return data


def decode_chunked(raw: bytes) -> bytes:
    """The payload of a complete chunked body."""
    out, index = bytearray(), 0
    while True:
        line_end = raw.find(b"\r\n", index)
        if line_end < 0:
            return bytes(out)
        length = int(raw[index:line_end].split(b";", 1)[0], 16)
        if length == 0:
            return bytes(out)
        out += raw[line_end + 2 : line_end + 2 + length]
        index = line_end + 2 + length + 2


class UpstreamStream(asyncio.Protocol):
    """One request to an engine over its own connection (``Connection: close``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, watch: StallWatch) -> None:
        self._loop = loop
        self._watch = watch
        self.head: asyncio.Future[tuple[int, CIMultiDict[str]]] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.chunked = False
        self.length: int | None = None
        self._received = bytearray()
        self._client: asyncio.Transport | None = None
        self._frames = ChunkFrames()
        self._paused = False
        self._unrelayed: int | None = None
        """Bytes of a sized (Content-Length) body still to relay."""
        self.first_byte: float | None = None
        """time.monotonic() of the first relayed body bytes (metrics: time to first byte)."""
        self.usage_tail = StreamTail()
        """The final SSE events relayed, where a stream reports its usage."""

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._client is not None:
            self._relay(data)
            return
        if not self.head.done():
            self._received += data
            self._parse_head()
            return
        self._watch.enter(Phase.READ)
        self._received += data
        self._check_complete(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionResetError("the engine closed the connection before answering"))
        if not self.done.done():
            if self._client is not None and (self.chunked or self.length is not None):
                self.done.set_exception(EngineStreamBroken(self._frames.at_boundary))
            else:
                self._finish()  # a close-delimited body ends with the connection

    # -- head ------------------------------------------------------------------------

    def _parse_head(self) -> None:
        end = self._received.find(b"\r\n\r\n")
        if end < 0:
            if len(self._received) > MAX_HEAD:
                self.head.set_exception(ValueError("the engine's response head is too large"))
            return
        lines = bytes(self._received[:end]).decode("latin-1").split("\r\n")
        del self._received[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        if 100 <= status < 200:
            self._parse_head()  # an interim answer (100 Continue): the real head follows
            return
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        length = headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None
        self._watch.enter(Phase.READ)
        self.head.set_result((status, headers))
        self._check_complete(bytes(self._received))

    def _check_complete(self, new: bytes) -> None:
        """Notice the end of a body that is collected, not relayed (the close also ends it)."""
        if self.chunked:
            self._frames.feed(new)
            if self._frames.finished:
                self._finish()
        elif self.length is not None and len(self._received) >= self.length:
            self._finish()

    # -- answers that are not streamed -------------------------------------------------

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    async def body(self) -> bytes:
        """The whole (decoded) body of an answer that is not relayed."""
        await self.done
        raw = bytes(self._received)
        return decode_chunked(raw) if self.chunked else raw

    # -- relaying ----------------------------------------------------------------------

    @property
    def at_frame_boundary(self) -> bool:
        """Everything relayed so far ended on a chunk boundary (an event may follow)."""
        return self._frames.at_boundary

    def relay_to(self, client: asyncio.Transport) -> None:
        """From now on, write the body straight to ``client`` (after aiohttp sent the headers)."""
        self._client = client
        self._frames = ChunkFrames()  # relaying re-reads the body from its start
        pending, self._received = bytes(self._received), bytearray()
        if pending:
            self._relay(pending)

    def _relay(self, data: bytes) -> None:
        client = self._client
        assert client is not None
        self._watch.enter(Phase.READ)
        if self.first_byte is None:
            self.first_byte = time.monotonic()
        self.usage_tail.feed(data)
        if client.is_closing():
            self._close_upstream()
            return
        if self.chunked:
            data = self._frames.feed(data)
            if data:
                client.write(data)
            if self._frames.finished:
                self._finish()
                self._close_upstream()
                return
        elif data:
            client.write(b"%x\r\n%b\r\n" % (len(data), data))  # a close-delimited or sized body: frame it ourselves
            if self.length is not None:
                self._unrelayed = (self.length if self._unrelayed is None else self._unrelayed) - len(data)
                if self._unrelayed <= 0:
                    self._finish()
                    self._close_upstream()
                    return
        if not self._paused and client.get_write_buffer_size() > HIGH_WATER:
            # A slow client: stop reading the engine until the client catches up.
            self._paused = True
            self._watch.enter(Phase.WRITE)
            assert self.transport is not None
            self.transport.pause_reading()
            self._loop.call_later(RESUME_CHECK_S, self._maybe_resume)

    def _maybe_resume(self) -> None:
        client, upstream = self._client, self.transport
        if client is None or upstream is None or client.is_closing() or upstream.is_closing():
            return
        if client.get_write_buffer_size() <= LOW_WATER:
            self._paused = False
            self._watch.enter(Phase.READ)
            upstream.resume_reading()
        else:
            self._loop.call_later(RESUME_CHECK_S, self._maybe_resume)

    def _close_upstream(self) -> None:
        if self.transport is not None:
            self.transport.close()


def request_bytes(method: str, target: str, host: str, headers: CIMultiDict[str], body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    try:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise BadRequest("a request header holds characters HTTP/1.1 headers cannot carry (only Latin-1)") from None
    return head + body


async def open_upstream(host: str, port: int, request: bytes, watch: StallWatch, connect_timeout: float) -> tuple[asyncio.Transport, UpstreamStream]:
    """Connect (within ``connect_timeout`` s, 0 = no limit; ``asyncio.TimeoutError`` past it) and send ``request``."""
    loop = asyncio.get_running_loop()
    connecting = loop.create_connection(lambda: UpstreamStream(loop, watch), host, port)
    transport, upstream = await (asyncio.wait_for(connecting, connect_timeout) if connect_timeout else connecting)
    transport.write(request)
    return transport, upstream


async def relay(
    request: web.Request,
    upstream: UpstreamStream,
    response_headers: CIMultiDict[str],
    status: int,
    model: str,
    watch: StallWatch,
    ending: StreamEnding,
    prepared: web.StreamResponse | None = None,
) -> web.StreamResponse:
    """Relay an SSE answer whose head has arrived; ``ending`` gives the error event it may need.

    The watch ends a stream whose engine went silent (an error event, as for a
    broken stream) or whose client stopped reading (the connection is dropped).
    A stream that ended cleanly without its final event gets an error event too.
    ``prepared``: the client's response, whose headers went out already (a stream that
    waited for its model): the engine's body follows what it was sent.
    """
    if prepared is None:
        response = web.StreamResponse(status=status, headers=response_headers)
        await response.prepare(request)
    else:
        response = prepared
    client = request.transport
    assert client is not None
    upstream.relay_to(client)
    try:
        await upstream.done
        if not client.is_closing():
            unfinished = await ending.unfinished(upstream.usage_tail.ending)
            if unfinished is not None:
                await response.write(unfinished)
    except EngineStreamBroken as broken:
        log.warning("engine_stream_broken", model=model, at_frame_boundary=broken.at_frame_boundary)
        if not broken.at_frame_boundary:
            client.close()  # mid-frame: nothing valid can follow
            return response
        await response.write(await ending.broken("connection closed", upstream.usage_tail.ending))
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
        expired = watch.expired
        assert expired is not None
        log.warning("engine_request_timed_out", model=model, reason=expired.value, limit_s=watch.limit(expired), setting=CONFIG_KEYS[expired])
        if expired is Phase.WRITE:
            client.abort()  # the client stopped reading: its unsent bytes are dropped with the connection
            return response
        if not upstream.at_frame_boundary:
            client.close()
            return response
        if not client.is_closing():
            how = f"nothing for {watch.limit(expired):g} s, {CONFIG_KEYS[expired]}"
            await response.write(await ending.broken(how, upstream.usage_tail.ending))
    await response.write_eof()
    return response
