"""Issue 11 bounds, unit level: the wait queue's accounting, the readiness cache, nvidia-smi's timeout."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sparkd.config import ConfigError, load_config
from sparkd.http.auth import KeyRing
from sparkd.http.health import HealthRoutes
from sparkd.runtime.errors import RuntimeFailure
from sparkd.scheduler.memory import MemoryGauge
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
    daemon = SimpleNamespace(reconciled=True, runtime=runtime, keys=keys, config=SimpleNamespace(source="/etc/sparkd/sparkd.toml"))
    app = web.Application()
    HealthRoutes(daemon).add_to(app)  # type: ignore[arg-type]
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_readyz_pings_podman_once_a_second_for_every_caller_and_shows_details_to_admins_only():
    runtime = CountingRuntime()
    admin = "sk-admin-" + "a" * 32
    client = await readiness_client(runtime, KeyRing({"root": (admin, "admin", None)}))
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
