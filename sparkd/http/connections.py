"""Connection bounds aiohttp lacks: a cap on open TCP connections and a deadline for request headers.

aiohttp closes idle keep-alive connections (``keepalive_timeout``) but has no timer
for a request whose line and headers trickle in, so a client sending one header
byte every few seconds holds a connection forever (slowloris). Each TCP connection
therefore gets a ``GuardedConnection``: an asyncio protocol that wraps the protocol
aiohttp's server makes (its public protocol factory, ``runner.server()``) and passes
every protocol call through, adding

- the cap: past ``server.max_connections`` open connections a new one is aborted
  in ``connection_made``, before aiohttp allocates anything for it;
- the header deadline: armed when the connection opens and when the first byte of
  a next request arrives on a kept-alive connection, disarmed when the request
  reaches the application (``watch_requests``, the outermost middleware); when it
  fires first, the connection is closed.

Refusals are logged once when a burst begins and once, with a count, when it ends.
The admin unix socket is not wrapped: a flood on the TCP port never locks out the
local administrator.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from ..config import ServerConfig

log = structlog.get_logger("sparkd.http")

BURST_QUIET_S = 5.0
"""A burst of refusals ends after this long without one."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BurstLog:
    """One warning when refusals begin, one summary when they stop: a flood costs two log lines."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reason: str, counted: Callable[[str], None]) -> None:
        self._loop = loop
        self._reason = reason
        self._counted = counted
        self._count = 0
        self._began = 0.0
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def note(self, **fields: object) -> None:
        now = self._loop.time()
        self._count += 1
        self._last = now
        self._counted(self._reason)
        if self._timer is None:
            self._began = now
            log.warning("connections_refusing", reason=self._reason, **fields)
            self._timer = self._loop.call_at(now + BURST_QUIET_S, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        quiet_at = self._last + BURST_QUIET_S
        if now < quiet_at:
            self._timer = self._loop.call_at(quiet_at, self._check)
            return
        self._timer = None
        log.warning("connections_refused", reason=self._reason, count=self._count, over_s=round(self._last - self._began, 1))
        self._count = 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ConnectionGate:
    """Counts the open TCP connections and makes their guarded protocols."""

    def __init__(
        self, factory: Callable[[], asyncio.Protocol], settings: Callable[[], ServerConfig], counted: Callable[[str], None]
    ) -> None:
        """``counted(reason)`` is called for every refused connection (the metrics counter)."""
        self._factory = factory
        self._settings = settings  # read per connection: a reload applies to new connections
        self.open = 0
        loop = asyncio.get_running_loop()
        self.over_limit = BurstLog(loop, "max_connections", counted)
        self.header_timeouts = BurstLog(loop, "header_timeout", counted)

    def protocol(self) -> GuardedConnection:
        return GuardedConnection(self)

    def settings(self) -> ServerConfig:
        return self._settings()

    def inner_protocol(self) -> asyncio.Protocol:
        return self._factory()

    def close(self) -> None:
        self.over_limit.close()
        self.header_timeouts.close()


class GuardedConnection(asyncio.Protocol):
    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self._gate
        settings = gate.settings()
        assert isinstance(transport, asyncio.Transport)
        if gate.open >= settings.max_connections:
            gate.over_limit.note(limit=settings.max_connections)
            transport.abort()  # no lingering close: the slot is needed now
            return
        gate.open += 1
        self._transport = transport
        self._arm()
        self._inner = gate.inner_protocol()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self._in_request and self._deadline is None:
            self._arm()  # the first byte of the next request on a kept-alive connection
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        inner, self._inner = self._inner, None
        if inner is None:
            return  # refused at connection_made
        self._disarm()
        self._gate.open -= 1
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def request_started(self) -> None:
        self._in_request = True
        self._disarm()

    def request_finished(self) -> None:
        self._in_request = False

    def _arm(self) -> None:
        timeout = self._gate.settings().header_timeout_s
        self._deadline = asyncio.get_running_loop().call_later(timeout, self._expired, timeout)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, timeout: float) -> None:
        self._deadline = None
        if self._in_request or self._transport is None:
            return
        self._gate.header_timeouts.note(header_timeout_s=timeout)
        self._transport.close()


@web.middleware
async def watch_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the connection its request arrived whole (the header deadline stops) and when it is done."""
    transport = request.transport
    connection = transport.get_protocol() if transport is not None else None
    if not isinstance(connection, GuardedConnection):
        return await handler(request)  # the admin unix socket, or a test client
    connection.request_started()
    try:
        return await handler(request)
    finally:
        connection.request_finished()


class GuardedListener:
    """A TCP listener whose connections pass through ``gate``."""

    def __init__(self, gate: ConnectionGate, host: str, port: int) -> None:
        self._gate = gate
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._gate.protocol, self._host, self._port, backlog=1024, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
