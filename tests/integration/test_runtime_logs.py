"""Following a container's log (runtime/containerlogs.py) against real Podman."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from harness import PODMAN_URL, unique_prefix
from sparkd.runtime.containerlogs import MAX_LINE_CHARS, LogFollower, clip_line
from sparkd.runtime.podman import PodmanRuntime

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


async def test_huge_log_lines_are_cut_by_the_follower_and_the_tail(podman, engine_image):
    """Issue 20: an engine printing huge lines, or never ending one, must not grow sparkd.

    Followed lines and the tail (failure records, stream error messages, status) are cut to
    ``MAX_LINE_CHARS``; a line that never ends is relayed in pieces, not held whole.
    """
    prefix = unique_prefix()
    name = f"{prefix}-chatty"
    labels = {"io.sparkd.managed": "true", "io.sparkd.model": name}
    script = (
        "import sys, time\n"
        "print('a' * 100000, flush=True)\n"
        "sys.stdout.write('b' * 300000); sys.stdout.flush()\n"
        "time.sleep(1)\n"
        "print('', flush=True)\n"
        "print('done', flush=True)\n"
        "time.sleep(600)\n"
    )
    container = await asyncio.to_thread(
        podman.containers.run, engine_image, entrypoint=["python3", "-c", script], name=name, labels=labels, detach=True
    )
    try:
        loop = asyncio.get_running_loop()
        lines: list[str] = []
        follower = LogFollower(PODMAN_URL, name, loop, lines.append, since=time.time() - 60)
        follower.start()
        try:
            await wait_for(lambda: "done" in lines, 30)
        finally:
            follower.stop()
        longest = len(clip_line("x" * 1_000_000))
        assert all(len(line) <= longest for line in lines), [len(line) for line in lines]
        assert lines[0] == "a" * MAX_LINE_CHARS + lines[0][MAX_LINE_CHARS:] and "more characters]" in lines[0]
        for letter, printed in (("a", 100000), ("b", 300000)):
            pieces = [line for line in lines if line.startswith(letter)]
            shown = sum(piece.split(" [... ")[0].count(letter) for piece in pieces)
            left_out = sum(int(piece.rsplit("[... ", 1)[1].split()[0]) for piece in pieces if "[... " in piece)
            assert shown + left_out == printed, f"every {letter} of the long line is shown or counted"

        runtime = PodmanRuntime(PODMAN_URL, timeout=30, instance=prefix)
        try:
            tail = await runtime.tail_logs(name, 20)
        finally:
            await asyncio.to_thread(runtime.close)
        assert tail[-1] == "done"
        assert all(len(line) <= longest for line in tail)
        assert any(line.endswith(" more characters]") for line in tail), [line[-40:] for line in tail]
    finally:
        await asyncio.to_thread(container.remove, force=True)
