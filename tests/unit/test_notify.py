"""systemd's notify protocol, as the real daemon speaks it to a real datagram socket.

Each test binds an AF_UNIX/SOCK_DGRAM socket, starts ``python -m sparkd serve``
with ``NOTIFY_SOCKET`` (and ``WATCHDOG_USEC``) pointing at it, the way systemd
does, and reads what arrives: READY only once the listener is bound and the
running containers are adopted; STATUS following the models' states; WATCHDOG
at half the watchdog period, from the event loop (a stopped process sends
none); RELOADING=1 with MONOTONIC_USEC then READY=1 around a reload, a failed
reload kept visible in STATUS; STOPPING=1 on SIGTERM with nothing but STATUS
after it.

The daemon runs against real Podman with the fake engine image (marker podman).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness import engine_model

pytestmark = pytest.mark.podman


class Datagram:
    def __init__(self, at: float, raw: str) -> None:
        self.at = at
        self.raw = raw
        self.fields: dict[str, str] = {}
        for line in raw.splitlines():
            key, _, value = line.partition("=")
            self.fields[key] = value

    def __repr__(self) -> str:
        return f"<{self.at:.3f} {self.raw!r}>"


class NotifySocket:
    """What systemd would see: every datagram the daemon sends, with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[Datagram] = []
        self._task: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()

    @property
    def env(self) -> dict[str, str]:
        # WATCHDOG_USEC=0: no watchdog, even if the test runner itself has one.
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": "0"}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            self.received.append(Datagram(time.monotonic(), data.decode()))
            self._arrived.set()

    async def wait_for(self, predicate: Callable[[Datagram], bool], timeout: float = 30, after: int = 0) -> tuple[int, Datagram]:
        """The first datagram (index >= ``after``) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            for index in range(after, len(self.received)):
                if predicate(self.received[index]):
                    return index, self.received[index]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching datagram after {timeout}s; received: {self.received}")
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def with_field(self, key: str) -> list[Datagram]:
        return [d for d in self.received if key in d.fields]

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sock.close()


@pytest.fixture
async def notify_socket(tmp_path: Path) -> Any:
    listener = NotifySocket(tmp_path / "notify.sock")
    listener.start()
    yield listener
    await listener.close()


def has(key: str, value: str | None = None) -> Callable[[Datagram], bool]:
    return lambda d: key in d.fields and (value is None or d.fields[key] == value)


async def readyz(base_url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(base_url + "/readyz") as response:
        return response.status


async def test_ready_after_reconciliation_and_status_follows_model_state(sparkd_factory, engine_image, notify_socket):
    sparkd = sparkd_factory({"m": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "1"})})
    name = sparkd.model("m")

    # A cold start: READY once the listener answers, STATUS names nothing ready.
    await sparkd.start(wait=False, env=notify_socket.env)
    _, ready = await notify_socket.wait_for(has("READY", "1"))
    assert await readyz(sparkd.base_url) == 200, "READY=1 was sent before the daemon was ready to serve"
    assert ready.fields["STATUS"] == "ready: - | starting: - | queued: 0"
    assert not notify_socket.with_field("WATCHDOG"), "no WATCHDOG_USEC was set, so no pings are expected"
    before = [d for d in notify_socket.received if d is not ready]
    assert not any("READY" in d.fields for d in before)

    # STATUS follows the model: starting while it loads, then ready.
    mark = len(notify_socket.received)
    async with aiohttp.ClientSession() as session:
        chat = asyncio.ensure_future(sparkd.chat(session, "m"))
        _, starting = await notify_socket.wait_for(lambda d: f"starting: {name}" in d.fields.get("STATUS", ""), after=mark)
        status, body = await chat
    assert status == 200, body
    _, serving = await notify_socket.wait_for(lambda d: d.fields.get("STATUS", "").startswith(f"ready: {name} | starting: -"), after=mark)
    assert starting.at < serving.at

    # Restart safety: a new daemon adopts the running container before READY=1,
    # so its very first READY already reports the model as ready.
    sparkd.kill()
    mark = len(notify_socket.received)
    await sparkd.start(wait=False, env=notify_socket.env)
    _, ready = await notify_socket.wait_for(has("READY", "1"), after=mark)
    assert ready.fields["STATUS"] == f"ready: {name} | starting: - | queued: 0", ready
    assert await readyz(sparkd.base_url) == 200
    assert "adopted running container" in sparkd.logs()
    await sparkd.stop()


async def test_watchdog_pings_at_half_the_period_from_the_event_loop(sparkd_factory, engine_image, notify_socket):
    sparkd = sparkd_factory({"m": engine_model(engine_image)})
    await sparkd.start(wait=False, env={**notify_socket.env, "WATCHDOG_USEC": "1000000"})
    await notify_socket.wait_for(has("READY", "1"))
    await asyncio.sleep(3.2)
    pings = [d.at for d in notify_socket.with_field("WATCHDOG")]
    intervals = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 6, f"expected a ping every 0.5 s for WATCHDOG_USEC=1 s, got {len(pings)} in 3.2 s"
    assert all(0.35 <= gap <= 0.7 for gap in intervals), intervals

    # A process that does not run (a stuck daemon) sends no pings: systemd's
    # watchdog fires. Once it runs again the pings resume.
    assert sparkd.process is not None
    os.kill(sparkd.process.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    await asyncio.sleep(1.5)
    os.kill(sparkd.process.pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    during = [d for d in notify_socket.with_field("WATCHDOG") if stopped_at + 0.1 < d.at < resumed_at]
    assert not during, during
    await notify_socket.wait_for(has("WATCHDOG", "1"), timeout=2, after=len(notify_socket.received))
    await sparkd.stop()


async def test_reload_and_stop_send_their_messages_in_order(sparkd_factory, engine_image, notify_socket):
    sparkd = sparkd_factory({"m": engine_model(engine_image)})
    await sparkd.start(wait=False, env=notify_socket.env)
    await notify_socket.wait_for(has("READY", "1"))

    # A good reload: RELOADING=1 with the current CLOCK_MONOTONIC, then READY=1.
    mark = len(notify_socket.received)
    sent_at = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    sparkd.reload()
    reloading_index, reloading = await notify_socket.wait_for(has("RELOADING", "1"), after=mark)
    ready_index, ready = await notify_socket.wait_for(has("READY", "1"), after=mark)
    assert reloading_index < ready_index
    usec = int(reloading.fields["MONOTONIC_USEC"])
    assert sent_at <= usec <= sent_at + 10_000_000, (sent_at, usec)
    assert "reload failed" not in ready.fields["STATUS"]

    # A broken reload keeps the old configuration, says so in STATUS, and keeps
    # saying it (the periodic STATUS refresh does not wipe it).
    good = sparkd.config_path.read_text()
    sparkd.config_path.write_text(good.replace("gpu_memory = ", 'gpu_memory = "lots" # was '))
    mark = len(notify_socket.received)
    sparkd.reload()
    reloading_index, _ = await notify_socket.wait_for(has("RELOADING", "1"), after=mark)
    ready_index, ready = await notify_socket.wait_for(has("READY", "1"), after=mark)
    assert reloading_index < ready_index
    assert "reload failed" in ready.fields["STATUS"] and "gpu_memory" in ready.fields["STATUS"], ready
    await asyncio.sleep(2.5)
    latest = notify_socket.with_field("STATUS")[-1]
    assert "reload failed" in latest.fields["STATUS"], latest
    assert await readyz(sparkd.base_url) == 200, "a rejected reload must keep the daemon serving"

    # Fixed and reloaded: the note goes away.
    sparkd.config_path.write_text(good)
    mark = len(notify_socket.received)
    sparkd.reload()
    _, ready = await notify_socket.wait_for(has("READY", "1"), after=mark)
    assert "reload failed" not in ready.fields["STATUS"], ready

    # SIGTERM: STOPPING=1 first; afterwards nothing but STATUS (no READY, no RELOADING).
    mark = len(notify_socket.received)
    assert await sparkd.stop() == 0
    stopping_index, stopping = await notify_socket.wait_for(has("STOPPING", "1"), after=mark)
    assert stopping.fields.get("STATUS", "").startswith("stopping"), stopping
    after = notify_socket.received[stopping_index + 1 :]
    assert all(set(d.fields) <= {"STATUS", "WATCHDOG"} for d in after), after
