"""Helpers for tests that look at the raw bytes an engine received (the fake engine's ``capture`` knob)
and that talk HTTP over a raw socket (exact request bytes, HTTP/1.0, a client that stops reading)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from dataclasses import dataclass
from typing import Any

import aiohttp

REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]\r$", re.MULTILINE)


async def captured(port: int) -> list[bytes]:
    """The raw bytes of every connection the engine on ``port`` received so far."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/fake/captured") as response:
        assert response.status == 200, await response.text()
        return [c.encode("latin-1") for c in (await response.json())["connections"]]


def request_lines(connections: list[bytes], skip: tuple[str, ...] = ("/health", "/fake/")) -> list[bytes]:
    """Every request line in the captured bytes (a smuggled request shows as one more), probes left out."""
    lines = []
    for raw in connections:
        for match in REQUEST_LINE.finditer(raw):
            if not match.group(2).decode("latin-1").startswith(skip):
                lines.append(match.group(0).rstrip(b"\r"))
    return lines


@dataclass
class RawAnswer:
    status_line: bytes
    headers: dict[str, str]
    body: bytes
    closed: bool
    """The server closed the connection after the answer (EOF seen)."""

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ")[1])

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(method: str, target: bytes, port: int, body: bytes, headers: dict[str, str] | None = None,
                 version: bytes = b"HTTP/1.1") -> bytes:
    lines = [method.encode() + b" " + target + b" " + version, b"Host: 127.0.0.1:%d" % port, b"Content-Length: %d" % len(body)]
    lines += [f"{name}: {value}".encode("utf-8", "surrogateescape") for name, value in (headers or {}).items()]
    if version == b"HTTP/1.1":
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def raw_exchange(port: int, request: bytes, timeout: float = 30) -> RawAnswer:
    """Send ``request`` as is and read the answer until the server closes (never parsed by an HTTP client)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)  # to EOF
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", ""):
        body = dechunk(body)
    return RawAnswer(status_line=lines[0], headers=headers, body=body, closed=True)


def dechunk(raw: bytes) -> bytes:
    """The payload of a chunked body; AssertionError when the framing is wrong or the last chunk is missing."""
    out, index = bytearray(), 0
    while True:
        line_end = raw.index(b"\r\n", index)
        size = int(raw[index:line_end].split(b";")[0], 16)
        if size == 0:
            assert raw[line_end:] == b"\r\n\r\n", raw[line_end:]
            return bytes(out)
        out += raw[line_end + 2 : line_end + 2 + size]
        assert raw[line_end + 2 + size : line_end + 4 + size] == b"\r\n", "a chunk does not end with CRLF"
        index = line_end + 4 + size


def stalled_client(port: int, request: bytes) -> socket.socket:
    """A blocking socket with a tiny receive buffer that sends ``request`` and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock
