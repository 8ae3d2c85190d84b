"""Following a container's log (runtime/logs.py) against real Podman."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from harness import PODMAN_URL, unique_prefix
from sparkd.runtime.logs import LogFollower

pytestmark = pytest.mark.podman


async def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_follower_of_a_quiet_container_ends_promptly_when_stopped(podman, engine_image):
    """An abandoned `sparkctl logs -f` must not keep a thread and a Podman connection forever."""
    prefix = unique_prefix()
    name = f"{prefix}-quiet"
    labels = {"io.sparkd.managed": "true", "io.sparkd.model": name}
    container = await asyncio.to_thread(podman.containers.run, engine_image, name=name, labels=labels, detach=True)
    try:
        loop = asyncio.get_running_loop()
        lines: list[str] = []
        ends: list[bool] = []
        follower = LogFollower(PODMAN_URL, name, loop, lines.append, tail=1, on_end=lambda: ends.append(True))
        follower.start()
        (thread,) = [t for t in threading.enumerate() if t.name == f"logs-{name}"]
        # the fake engine logs its start-up, then stays silent
        await wait_for(lambda: any("Application startup complete" in line for line in lines), 30)
        await asyncio.sleep(1.0)  # the follower now sits in a blocking read of a silent stream
        assert thread.is_alive()

        before = time.monotonic()
        follower.stop()
        assert time.monotonic() - before < 0.1, "stop() must not block the event loop"
        await asyncio.to_thread(thread.join, 2.0)
        assert not thread.is_alive(), "the follow thread is still blocked in its read after stop()"
        await asyncio.sleep(0.1)
        assert not ends, "on_end is for a log that ends by itself, not for stop()"
        await asyncio.to_thread(container.reload)
        assert container.status == "running"
    finally:
        await asyncio.to_thread(container.remove, force=True)


async def test_a_follower_sees_the_end_of_the_log_when_the_container_stops(podman, engine_image):
    prefix = unique_prefix()
    name = f"{prefix}-ending"
    labels = {"io.sparkd.managed": "true", "io.sparkd.model": name}
    container = await asyncio.to_thread(podman.containers.run, engine_image, name=name, labels=labels, detach=True)
    try:
        loop = asyncio.get_running_loop()
        lines: list[str] = []
        ended = asyncio.Event()
        follower = LogFollower(PODMAN_URL, name, loop, lines.append, since=time.time() - 60, on_end=ended.set)
        follower.start()
        await wait_for(lambda: any("Application startup complete" in line for line in lines), 30)
        assert any("Loading safetensors checkpoint shards" in line for line in lines)
        await asyncio.to_thread(container.stop, timeout=2)
        await asyncio.wait_for(ended.wait(), 10)
        follower.stop()
    finally:
        await asyncio.to_thread(container.remove, force=True)
