"""systemd's notify protocol (sd_notify): READY, STATUS, WATCHDOG, RELOADING, STOPPING.

Without ``NOTIFY_SOCKET`` (not under systemd) every call is a no-op.  The
watchdog ping is sent from the event loop itself, so a blocked loop stops the
pings and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        # sdnotify reads NOTIFY_SOCKET when the notifier is built.
        self._notifier = sdnotify.SystemdNotifier()
        self._last_status: str | None = None
        self._stopping = False

    def _send(self, message: str) -> None:
        self._notifier.notify(message)

    def ready(self, status: str) -> None:
        if self._stopping:  # a reload that ends after SIGTERM: no READY=1 after STOPPING=1
            self.status(status)
            return
        self._last_status = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self, status: str = "stopping") -> None:
        self._stopping = True
        self._last_status = status
        self._send(f"STOPPING=1\nSTATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Half of systemd's WatchdogSec, or None when no watchdog is set for this process."""
    environ = dict(os.environ) if environ is None else environ
    usec = environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2 / 1_000_000


async def run_watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
