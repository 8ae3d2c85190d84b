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
  {"op": "mix", "url", "headers", "model", "n", "concurrency", "weights", "seed", "stream_tokens"}
      n requests of a weighted mix of kinds (see MIX_KINDS), ``concurrency`` at a
      time, on a session of its own closed at the end (so no client connection is
      left open between two commands); answers the statuses seen per kind and the
      ones that were not the kind's expected status.
  {"op": "ping"}   answers {} once the process is up
  {"op": "quit"}
Every answer carries "cpu_s" (this process's CPU time for the command) and "wall_s".
"""

from __future__ import annotations

import asyncio
import json
import random
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


MIX_KINDS: dict[str, int] = {
    "chat": 200,              # non-streaming chat on a kept-alive connection
    "stream": 200,            # a stream read to its end
    "cut": 200,               # a stream the client cuts after its second event (the connection is dropped)
    "close": 200,             # non-streaming chat with "Connection: close": a connection per request
    "bad_json": 400,          # a truncated JSON body
    "bad_type": 400,          # "messages" a string
    "unknown_model": 404,     # a model name never seen before (client input that must not be remembered)
    "unknown_endpoint": 404,  # a POST /v1/<never seen before> for a real model
    "path_unknown": 404,      # the path form with a model name never seen before
    "bad_key": 401,           # a key never seen before
}
"""Each kind of the ``mix`` command and the status it must get."""


def mix_schedule(weights: dict[str, int], seed: int) -> list[str]:
    """One round of kinds in proportion to ``weights``, shuffled the same way for the same seed."""
    kinds = [kind for kind, weight in weights.items() for _ in range(weight)]
    random.Random(seed).shuffle(kinds)
    return kinds


def mix_request(kind: str, command: dict[str, Any], rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    """(url, body, headers) of one request of ``kind``; fresh random names where client input varies."""
    base, model = command["url"], command["model"]
    headers = _headers(command)
    unique = f"{rng.getrandbits(64):016x}"
    messages = [{"role": "user", "content": f"soak {unique}"}]
    chat = base + "/v1/chat/completions"
    body: Any = {"model": model, "messages": messages, "max_tokens": command.get("stream_tokens", 16)}
    if kind in ("stream", "cut"):
        body["stream"] = True
    elif kind == "close":
        headers["Connection"] = "close"
    elif kind == "bad_json":
        return chat, json.dumps(body).encode()[:-7], headers
    elif kind == "bad_type":
        body["messages"] = "not an array " + unique
    elif kind == "unknown_model":
        body["model"] = "no-such-model-" + unique
    elif kind == "unknown_endpoint":
        return base + f"/v1/no-such-endpoint-{unique}", json.dumps(body).encode(), headers
    elif kind == "path_unknown":
        del body["model"]
        return base + f"/v1/no-such-model-{unique}/chat/completions", json.dumps(body).encode(), headers
    elif kind == "bad_key":
        headers["Authorization"] = f"Bearer sk-not-a-key-{unique}"
    return chat, json.dumps(body).encode(), headers


async def mix_one(session: aiohttp.ClientSession, kind: str, url: str, body: bytes, headers: dict[str, str]) -> str:
    """Send one mix request; its status (or the client error's name)."""
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if kind == "cut" and response.status == 200:
                events = 0
                async for line in response.content:
                    events += line.startswith(b"data:")
                    if events == 2:
                        break
                response.close()  # drops the connection mid-stream: sparkd sees the client go away
            else:
                await response.read()
            return str(response.status)
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        return type(error).__name__


async def op_mix(command: dict[str, Any]) -> dict[str, Any]:
    schedule = mix_schedule(command["weights"], command.get("seed", 0))
    rng = random.Random(command.get("seed", 0))
    statuses: dict[str, dict[str, int]] = {}
    unexpected: dict[str, dict[str, int]] = {}
    next_index = [0]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=command.get("timeout", 300), sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            while next_index[0] < command["n"]:
                kind = schedule[next_index[0] % len(schedule)]
                next_index[0] += 1
                status = await mix_one(session, kind, *mix_request(kind, command, rng))
                seen = statuses.setdefault(kind, {})
                seen[status] = seen.get(status, 0) + 1
                if status != str(MIX_KINDS[kind]):
                    wrong = unexpected.setdefault(kind, {})
                    wrong[status] = wrong.get(status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(min(command.get("concurrency", 1), command["n"]))))
    return {"statuses": statuses, "unexpected": unexpected}


async def op_ping(command: dict[str, Any]) -> dict[str, Any]:
    return {}


OPS = {"load": op_load, "stream": op_stream, "burst": op_burst, "mix": op_mix, "ping": op_ping}


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
