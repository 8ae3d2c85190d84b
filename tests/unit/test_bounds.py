"""Issue 11 bounds, unit level: the wait queue's accounting, the readiness cache, nvidia-smi's timeout."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sparkd.config import Config, ConfigError, ServerConfig, load_config
from sparkd.config.keys import ClientKey
from sparkd.hardware.memory import MemoryGauge
from sparkd.http.appkeys import RECONCILED, RUNTIME, SNAPSHOT
from sparkd.http.auth import KeyRing
from sparkd.http.connections import ConnectionGate, GuardedListener, watch_requests
from sparkd.http.health import HealthRoutes
from sparkd.http.snapshot import Snapshot, SnapshotHolder
from sparkd.runtime.failures import RuntimeFailure
from sparkd.scheduler.queue import (
    KeyQueueFull,
    QueueBytesFull,
    QueueFull,
    QueueLimits,
    Waiter,
    WaitQueue,
)


def limits(size: int = 10, body_bytes: int = 1000, per_key: int = 3) -> QueueLimits:
    return QueueLimits(size=size, body_bytes=body_bytes, per_key=per_key)


async def test_the_queue_counts_bytes_and_keys_through_push_remove_and_take():
    queue = WaitQueue(limits())
    a1, a2 = Waiter("a", key="alice", body_bytes=300), Waiter("a", key="bob", body_bytes=200)
    b1 = Waiter("b", key="alice", body_bytes=100)
    for waiter in (a1, a2, b1):
        queue.push(waiter)
    assert (len(queue), queue.body_bytes, queue.waiting_for_key("alice"), queue.waiting_for_key("bob")) == (3, 600, 2, 1)
    assert queue.remove(a1) and not queue.remove(a1)  # a second removal changes nothing
    assert (len(queue), queue.body_bytes, queue.waiting_for_key("alice")) == (2, 300, 1)
    assert queue.take("a") == [a2]
    assert (len(queue), queue.body_bytes, queue.waiting_for_key("bob")) == (1, 100, 0)
    assert queue.take("b") == [b1] and queue.take("b") == []
    assert (len(queue), queue.body_bytes, queue.waiting_for_key("alice")) == (0, 0, 0)


async def test_the_queue_refuses_past_each_limit_and_a_refusal_counts_nothing():
    queue = WaitQueue(limits(size=4, body_bytes=1000, per_key=2))
    queue.push(Waiter("a", key="alice", body_bytes=400))
    queue.push(Waiter("a", key="alice", body_bytes=400))
    with pytest.raises(KeyQueueFull):
        queue.push(Waiter("a", key="alice", body_bytes=1))
    with pytest.raises(QueueBytesFull):
        queue.push(Waiter("a", key="bob", body_bytes=201))
    assert (len(queue), queue.body_bytes, queue.waiting_for_key("bob")) == (2, 800, 0)
    queue.push(Waiter("a", key="bob", body_bytes=200))  # exactly at the byte limit: fits
    queue.push(Waiter("b"))  # no key (an operator's start): not counted per key
    with pytest.raises(QueueFull) as full:
        queue.push(Waiter("b", key="carol"))
    assert type(full.value) is QueueFull
    # A reload that raises the limits applies to the next push.
    queue.limits = limits(size=5, body_bytes=2000, per_key=3)
    queue.push(Waiter("a", key="alice", body_bytes=500))
    assert (len(queue), queue.body_bytes, queue.waiting_for_key("alice")) == (5, 1500, 3)


def test_queue_body_bytes_below_the_body_limit_is_a_config_error(tmp_path: Path):
    path = tmp_path / "sparkd.toml"
    path.write_text(
        "[server]\nmax_body_bytes = 67108864\nheader_timeout_s = 0\n[lifecycle]\nqueue_body_bytes = 1024\nqueue_per_key = 0\n"
    )
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    problems = {problem.key: problem for problem in refused.value.problems}
    assert "at least server.max_body_bytes" in problems["lifecycle.queue_body_bytes"].expected
    assert "lifecycle.queue_per_key" in problems and "server.header_timeout_s" in problems


class CountingRuntime:
    def __init__(self) -> None:
        self.pings = 0
        self.failure: str | None = None

    async def ping(self) -> None:
        self.pings += 1
        await asyncio.sleep(0.05)
        if self.failure:
            raise RuntimeFailure(self.failure)


async def readiness_client(runtime: CountingRuntime, keys: KeyRing) -> TestClient:
    app = web.Application()
    app[SNAPSHOT] = SnapshotHolder(Snapshot.of(Config(source="/etc/sparkd/sparkd.toml"), keys))
    app[RUNTIME] = runtime  # type: ignore[assignment]
    app[RECONCILED] = asyncio.Event()
    app[RECONCILED].set()
    HealthRoutes().add_to(app)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_readyz_pings_podman_once_a_second_for_every_caller_and_shows_details_to_admins_only():
    runtime = CountingRuntime()
    admin = "sk-admin-" + "a" * 32
    client = await readiness_client(runtime, KeyRing([ClientKey.of("root", admin, "admin")]))
    try:
        answers = await asyncio.gather(*(client.get("/readyz") for _ in range(50)))
        assert {a.status for a in answers} == {200} and runtime.pings == 1
        assert {tuple(sorted((await a.json()).items())) for a in answers} == {(("status", "ready"),)}
        detailed = await client.get("/readyz", headers={"Authorization": f"Bearer {admin}"})
        assert await detailed.json() == {"status": "ready", "config": "/etc/sparkd/sparkd.toml"}
        assert runtime.pings == 1  # still cached
        runtime.failure = "Podman at unix:///run/podman/podman.sock is not answering: No such file"
        await asyncio.sleep(1.1)
        refused = await client.get("/readyz")
        assert refused.status == 503 and await refused.json() == {"status": "unavailable"}
        detailed = await client.get("/readyz", headers={"Authorization": f"Bearer {admin}"})
        assert (await detailed.json())["reason"].startswith("Podman at unix:///run/podman")
        assert runtime.pings == 2
    finally:
        await client.close()


async def test_a_hanging_nvidia_smi_is_killed_at_its_timeout(tmp_path: Path):
    pid_file = tmp_path / "pid"
    tool = tmp_path / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    gauge = MemoryGauge("nvidia-smi", nvidia_smi=str(tool), timeout_s=0.5)
    assert await gauge.read() is None
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left running


async def guarded_server(settings: ServerConfig, refused: list[str]) -> tuple[web.AppRunner, ConnectionGate, GuardedListener, int]:
    app = web.Application(middlewares=[watch_requests])

    async def slow_body(request: web.Request) -> web.Response:
        return web.json_response({"read": len(await request.read())})

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_get("/ok", ok)
    app.router.add_post("/body", slow_body)
    runner = web.AppRunner(app, keepalive_timeout=30)
    await runner.setup()
    assert runner.server is not None
    gate = ConnectionGate(runner.server, lambda: settings, refused.append)
    port = free_port()
    listener = GuardedListener(gate, "127.0.0.1", port)
    await listener.start()
    return runner, gate, listener, port


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bytes:
    writer.write(request)
    await writer.drain()
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


async def closed(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionResetError:
        return True
    except asyncio.TimeoutError:
        return False


async def test_the_gate_caps_connections_and_frees_a_slot_when_one_closes():
    refused: list[str] = []
    runner, gate, listener, port = await guarded_server(ServerConfig(max_connections=2, header_timeout_s=30), refused)
    try:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for reader, _ in extra:
            assert await closed(reader, 2)
        assert refused == ["max_connections"] * 3 and gate.open == 2
        head = await answered(*held[0], b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        held[1][1].close()
        await asyncio.sleep(0.2)
        assert gate.open == 1
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await answered(reader, writer, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200")
        for _, each in held + extra + [(reader, writer)]:
            each.close()
    finally:
        await listener.stop()
        gate.close()
        await runner.cleanup()


async def test_the_header_deadline_cuts_slow_headers_but_not_a_slow_body_or_an_idle_keepalive():
    refused: list[str] = []
    runner, gate, listener, port = await guarded_server(ServerConfig(max_connections=10, header_timeout_s=0.5), refused)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ok HTTP/1.1\r\n")
        for index in range(10):
            await asyncio.sleep(0.1)
            if reader.at_eof():
                break
            writer.write(b"X-%d: y\r\n" % index)
        assert await closed(reader, 1) and refused == ["header_timeout"]
        writer.close()
        # A body that takes longer than the deadline is the handler's business; the idle time between
        # two requests of a kept-alive connection is the keep-alive timeout's.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
        for byte in b"abcd":
            await asyncio.sleep(0.3)
            writer.write(bytes([byte]))
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(reader.readuntil(b"}"), 5)
        await asyncio.sleep(0.8)
        assert (await answered(reader, writer, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert refused == ["header_timeout"]
        writer.close()
    finally:
        await listener.stop()
        gate.close()
        await runner.cleanup()
