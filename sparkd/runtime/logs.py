"""Follow a container's log live (load progress while a model starts, `sparkctl logs -f`).

Like the event stream, a followed log is a blocking response that never ends, so
it gets its own thread and its own client with no timeout; lines are handed to
the event loop with ``call_soon_threadsafe``.

The follow request is issued here through podman-py's API client rather than
``container.logs(stream=True)``, so the ``requests`` response stays in hand:
``stop()`` shuts its socket down, which is the only way to end a read blocked on
a quiet container (closing the response instead waits for that very read,
which holds the stream's lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

import structlog
from podman import PodmanClient
from podman.api import stream_frames
from podman.api.client import APIResponse

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
        self._lock = threading.Lock()
        """Guards ``_response`` between the follow thread and ``stop()``."""
        self._response: APIResponse | None = None
        self._thread = threading.Thread(target=self._run, name=f"logs-{container}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the follow promptly, even while the container is silent (never blocks)."""
        self._stopped.set()
        with self._lock:
            response = self._response
        if response is not None:
            _interrupt(response)

    def _emit(self, line: str) -> None:
        if not self._stopped.is_set():
            self._on_line(line)

    def _params(self) -> dict[str, object]:
        params: dict[str, object] = {"follow": "true", "stdout": "true", "stderr": "true"}
        if self._since is not None:
            params["since"] = int(self._since)
        if self._tail is not None:
            params["tail"] = self._tail
        return params

    def _run(self) -> None:
        pending = b""
        client: PodmanClient | None = None
        response: APIResponse | None = None
        try:
            client = PodmanClient(base_url=self._url, timeout=None)
            response = client.api.get(f"/containers/{self._container}/logs", params=self._params(), stream=True)
            with self._lock:
                self._response = response
            # stop() may have run before there was a response to interrupt.
            if self._stopped.is_set():
                return
            response.raise_for_status()
            for frame in stream_frames(response):
                if self._stopped.is_set():
                    return
                if not isinstance(frame, bytes):
                    continue  # a (stdout, stderr) pair comes only with demux=True
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
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    self._loop.call_soon_threadsafe(self._emit, pending.decode("utf-8", "replace").rstrip())
            if response is not None:
                response.close()
            if client is not None:
                client.close()
            if self._on_end is not None and not self._stopped.is_set():
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    self._loop.call_soon_threadsafe(self._ended)

    def _ended(self) -> None:
        if self._on_end is not None and not self._stopped.is_set():
            self._on_end()


def _interrupt(response: APIResponse) -> None:
    """Shut the response's socket down for reading: a blocked read returns at once."""
    # RuntimeError/ValueError/OSError: the stream has ended or is being closed already, no read is blocked on it
    with contextlib.suppress(RuntimeError, ValueError, OSError):
        response.raw.shutdown()
