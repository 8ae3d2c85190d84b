#!/usr/bin/env python3
"""The benchmarks' load generator: an aiohttp client in its own process.

It reads one JSON command per line on stdin and answers one JSON line on stdout,
so the driver (run.py) can sample the daemon's CPU time right before and after
each phase while this process keeps its keep-alive connections warm between
phases.  Times are client-side wall times from ``time.perf_counter``.

Commands (``target`` names a connection pool, e.g. "direct" or "sparkd"):
  {"op": "load", "target", "url", "headers", "body", "n", "concurrency"}
      n requests, ``concurrency`` at a time, non-streaming; answers latencies (ms).
  {"op": "stream", "target", "url", "headers", "body", "streams", "concurrency", "stagger_s"}
      ``streams`` SSE requests, ``concurrency`` at a time (worker i begins after
      i * stagger_s); answers time to first event and the gaps between
      consecutive events of a stream (ms).
  {"op": "burst", "url", "headers", "body", "n"}
      n requests all at once on n fresh connections (a stampede).
  {"op": "ping"}   answers {} once the process is up
  {"op": "quit"}
Every answer carries "cpu_s" (this process's CPU time for the command) and "wall_s".
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

SESSIONS: dict[str, aiohttp.ClientSession] = {}


def session_for(target: str) -> aiohttp.ClientSession:
    session = SESSIONS.get(target)
    if session is None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
        )
        SESSIONS[target] = session
    return session


def _body(command: dict[str, Any]) -> bytes:
    return json.dumps(command["body"]).encode()


def _headers(command: dict[str, Any]) -> dict[str, str]:
    return {"Content-Type": "application/json", **(command.get("headers") or {})}


async def op_load(command: dict[str, Any]) -> dict[str, Any]:
    session = session_for(command["target"])
    url, body, headers = command["url"], _body(command), _headers(command)
    total, remaining = command["n"], [command["n"]]
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def worker() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            began = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError as error:
                status = type(error).__name__
            if status == 200:
                latencies.append((time.perf_counter() - began) * 1000)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    await asyncio.gather(*(worker() for _ in range(min(command.get("concurrency", 1), total))))
    return {"lat": latencies, "errors": errors}


async def op_stream(command: dict[str, Any]) -> dict[str, Any]:
    session = session_for(command["target"])
    url, body, headers = command["url"], _body(command), _headers(command)
    remaining = [command["streams"]]
    ttfc: list[float] = []
    gaps: list[float] = []
    chunks = [0]
    errors: dict[str, int] = {}

    async def one() -> None:
        began = time.perf_counter()
        last: float | None = None
        try:
            async with session.post(url, data=body, headers=headers) as response:
                if response.status != 200:
                    await response.read()
                    errors[str(response.status)] = errors.get(str(response.status), 0) + 1
                    return
                async for line in response.content:
                    if not line.startswith(b"data:"):
                        continue
                    now = time.perf_counter()
                    if line.startswith(b"data: [DONE]"):
                        continue  # read on to the end of the body, so the connection is kept alive
                    chunks[0] += 1
                    if last is None:
                        ttfc.append((now - began) * 1000)
                    else:
                        gaps.append((now - last) * 1000)
                    last = now
        except aiohttp.ClientError as error:
            errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1

    async def worker(index: int) -> None:
        # Spread the streams' starts over a stream's duration, as independent clients would.
        await asyncio.sleep(index * command.get("stagger_s", 0.0))
        while remaining[0] > 0:
            remaining[0] -= 1
            await one()

    await asyncio.gather(*(worker(i) for i in range(command.get("concurrency", 1))))
    return {"ttfc": ttfc, "gaps": gaps, "chunks": chunks[0], "errors": errors}


async def op_burst(command: dict[str, Any]) -> dict[str, Any]:
    url, body, headers = command["url"], _body(command), _headers(command)
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    began_wall = time.time()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=command.get("timeout", 300))) as session:

        async def one() -> None:
            began = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = str(response.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                status = type(error).__name__
            statuses[status] = statuses.get(status, 0) + 1
            if status == "200":
                latencies.append((time.perf_counter() - began) * 1000)

        await asyncio.gather(*(one() for _ in range(command["n"])))
    return {"statuses": statuses, "lat": latencies, "began_wall": began_wall}


async def op_ping(command: dict[str, Any]) -> dict[str, Any]:
    return {}


OPS = {"load": op_load, "stream": op_stream, "burst": op_burst, "ping": op_ping}


async def main() -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        if command["op"] == "quit":
            break
        cpu0, wall0 = time.process_time(), time.perf_counter()
        try:
            answer = await OPS[command["op"]](command)
        except Exception as error:  # noqa: BLE001 - report, the driver decides
            answer = {"fatal": f"{type(error).__name__}: {error}"}
        answer["cpu_s"] = time.process_time() - cpu0
        answer["wall_s"] = time.perf_counter() - wall0
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    for session in SESSIONS.values():
        await session.close()


if __name__ == "__main__":
    asyncio.run(main())
