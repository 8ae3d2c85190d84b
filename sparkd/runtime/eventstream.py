"""Follow Podman's event stream so a dying container is known at once.

The stream is a long-lived blocking HTTP response, so it gets its own thread and
its own client with no timeout (a client with a timeout raises on an idle
stream).  Events are handed to the event loop with ``call_soon_threadsafe``.
After a broken stream the thread reconnects from the last event's time, so
nothing that happened in between is missed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

import structlog
from podman import PodmanClient

from .spec import LABEL_MODEL, instance_filter

log = structlog.get_logger("sparkd.runtime")

WATCHED_ACTIONS = frozenset({"create", "start", "died", "stop", "remove", "kill", "oom"})


@dataclass(frozen=True)
class ContainerEvent:
    action: str
    container: str
    model: str | None
    exit_code: int | None
    time: float


class _Actor(TypedDict, total=False):
    Attributes: dict[str, str] | None
    """The container's name and labels; ``containerExitCode`` on a died event."""


class PodmanEvent(TypedDict, total=False):
    """The part of one event of Podman's /events stream sparkd reads."""

    Type: str
    Action: str
    status: str
    """The action's older name, which Docker-compatible endpoints still send."""
    Actor: _Actor | None
    time: int
    timeNano: int


def parse_event(raw: PodmanEvent) -> ContainerEvent | None:
    if raw.get("Type") != "container":
        return None
    action = str(raw.get("Action") or raw.get("status") or "")
    if action not in WATCHED_ACTIONS:
        return None
    attributes = (raw.get("Actor") or {}).get("Attributes") or {}
    exit_code = attributes.get("containerExitCode")
    nanos = raw.get("timeNano")
    return ContainerEvent(
        action=action,
        container=str(attributes.get("name", "")),
        model=attributes.get(LABEL_MODEL),
        exit_code=int(exit_code) if exit_code not in (None, "") else None,
        time=nanos / 1e9 if nanos else float(raw.get("time") or time.time()),
    )


class EventStream:
    """A daemon thread relaying this instance's container events to ``callback`` on ``loop``."""

    def __init__(
        self, url: str, instance: str, loop: asyncio.AbstractEventLoop, callback: Callable[[ContainerEvent], None]
    ) -> None:
        self._url = url
        self._filters = instance_filter(instance)
        self._loop = loop
        self._callback = callback
        self._stopped = threading.Event()
        self._client: PodmanClient | None = None
        self._thread = threading.Thread(target=self._run, name="podman-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        client = self._client
        if client is not None:
            client.close()

    def _run(self) -> None:
        since = int(time.time())
        while not self._stopped.is_set():
            try:
                self._client = PodmanClient(base_url=self._url, timeout=None)
                for raw in self._client.events(since=since, filters=self._filters, decode=True):
                    if self._stopped.is_set():
                        return
                    event = parse_event(raw)
                    if event is None:
                        continue
                    since = int(event.time)
                    self._loop.call_soon_threadsafe(self._callback, event)
            except Exception as error:  # noqa: BLE001 - the stream must survive a Podman restart
                if self._stopped.is_set():
                    return
                log.warning("podman_events_interrupted", error=str(error), retry_in_s=1)
                self._stopped.wait(1.0)
            finally:
                if self._client is not None:
                    self._client.close()
