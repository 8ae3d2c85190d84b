#!/usr/bin/env python3
"""A raw asyncio relay: the floor of what a Python proxy pays per streamed chunk.

    raw_relay.py PORT ENGINE_PORT ENGINE_KEY

A yardstick for the proxy benchmark's streaming phase, not a proxy to use: it
reads a client's HTTP/1.1 request (Content-Length bodies only), opens a new
connection to the engine on 127.0.0.1, sends the request with the engine's key,
and relays the engine's answer *verbatim* (status line, headers, chunked body)
from the upstream protocol's ``data_received`` straight into the client's
transport: no HTTP parsing of the answer beyond spotting its end, no
re-framing, no task switch per chunk.  Keep-alive toward the client; one
upstream connection per request.
"""

from __future__ import annotations

import asyncio
import sys

ENGINE_PORT = 0
ENGINE_KEY = b""


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.remaining = 0
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client.transport
        if client is None or client.is_closing():
            self.close()
            return
        client.write(data)
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end].lower(), self.head[end + 4:]
            self.in_body = True
            self.chunked = b"transfer-encoding: chunked" in head
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    self.remaining = int(line.split(b":", 1)[1])
        if self.chunked:
            self.tail = (self.tail + data)[-5:]
            if self.tail == b"0\r\n\r\n":
                self.finish()
        else:
            self.remaining -= len(data)
            if self.remaining <= 0:
                self.finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.upstream is self:
            self.client.close()  # the engine went away mid-answer

    def finish(self) -> None:
        self.client.upstream = None
        self.close()
        self.client.next_request()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upstream: Upstream | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self.next_request()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def next_request(self) -> None:
        self.busy = False
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = self.buffer[:end].split(b"\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4:end + 4 + length]
        self.buffer = self.buffer[end + 4 + length:]
        method, path = lines[0].split(b" ")[:2]
        request = (method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + ENGINE_KEY
                   + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.busy = True
        asyncio.get_running_loop().create_task(self.forward(request))

    async def forward(self, request: bytes) -> None:
        try:
            transport, upstream = await asyncio.get_running_loop().create_connection(lambda: Upstream(self), "127.0.0.1", ENGINE_PORT)
        except OSError:
            self.close()
            return
        self.upstream = upstream
        transport.write(request)


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


def main() -> None:
    global ENGINE_PORT, ENGINE_KEY
    port, ENGINE_PORT, ENGINE_KEY = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
    asyncio.run(serve(port))


if __name__ == "__main__":
    main()
