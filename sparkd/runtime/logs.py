"""Follow a container's log live (load progress while a model starts, `sparkctl logs -f`).

Like the event stream, a followed log is a blocking response that never ends, so
it gets its own thread and its own client with no timeout; lines are handed to
the event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

import structlog
from podman import PodmanClient

log = structlog.get_logger("sparkd.runtime")


class LogFollower:
    """Relays each line of ``container``'s log, from ``since`` (epoch seconds) on, to ``on_line``."""

    def __init__(
        self,
        url: str,
        container: str,
        loop: asyncio.AbstractEventLoop,
        on_line: Callable[[str], None],
        since: float | None = None,
        tail: int | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self._url = url
        self._container = container
        self._loop = loop
        self._on_line = on_line
        self._since = since
        self._tail = tail
        self._on_end = on_end
        """Called on the loop when the log ends by itself (the container stopped or is gone)."""
        self._stopped = threading.Event()
        self._client: PodmanClient | None = None
        self._thread = threading.Thread(target=self._run, name=f"logs-{container}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._client is not None:
            self._client.close()

    def _emit(self, line: str) -> None:
        if not self._stopped.is_set():
            self._on_line(line)

    def _run(self) -> None:
        pending = b""
        try:
            self._client = PodmanClient(base_url=self._url, timeout=None)
            container = self._client.containers.get(self._container)
            options: dict[str, object] = {"stream": True, "follow": True, "stdout": True, "stderr": True}
            if self._since is not None:
                options["since"] = int(self._since)
            if self._tail is not None:
                options["tail"] = self._tail
            for frame in container.logs(**options):
                if self._stopped.is_set():
                    return
                # vLLM redraws progress bars with '\r'; each redraw is a line to us.
                pending += frame.replace(b"\r", b"\n")
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace").rstrip()
                    if line:
                        self._loop.call_soon_threadsafe(self._emit, line)
        except Exception as error:  # noqa: BLE001 - a lost log stream must not take the daemon down
            if not self._stopped.is_set():
                log.debug("log_follow_ended", container=self._container, error=str(error))
        finally:
            if pending.strip() and not self._stopped.is_set():
                try:
                    self._loop.call_soon_threadsafe(self._emit, pending.decode("utf-8", "replace").rstrip())
                except RuntimeError:
                    pass  # the loop is already closed
            if self._client is not None:
                self._client.close()
            if self._on_end is not None and not self._stopped.is_set():
                try:
                    self._loop.call_soon_threadsafe(self._ended)
                except RuntimeError:
                    pass  # the loop is already closed

    def _ended(self) -> None:
        if self._on_end is not None and not self._stopped.is_set():
            self._on_end()
