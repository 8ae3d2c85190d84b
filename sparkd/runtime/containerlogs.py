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
from collections import deque
from collections.abc import Callable

import structlog
from podman import PodmanClient
from podman.api import stream_frames
from podman.api.client import APIResponse

log = structlog.get_logger("sparkd.runtime")

MAX_LINE_CHARS = 4096
"""A container log line sparkd reads is cut to this many characters (``podman logs`` shows it whole): the
failure records kept per model and in the status (20 lines each), stream error messages and followed
logs hold no more, whatever an engine prints."""
FOLLOW_BACKLOG_LINES = 10_000
"""Lines of a followed log waiting for a slow reader (``sparkctl logs -f``); past that the oldest are dropped
and counted, so a reader slower than the log costs at most this many lines of memory.  As many as the
longest tail a reader may ask for first (``http/operator.py`` ``MAX_TAIL``), which arrives in one burst."""


def clip_line(line: str) -> str:
    """``line``, cut to ``MAX_LINE_CHARS`` with a note of how much was left out."""
    if len(line) <= MAX_LINE_CHARS:
        return line
    return line[:MAX_LINE_CHARS] + f" [... {len(line) - MAX_LINE_CHARS} more characters]"


class Backlog:
    """A followed log's lines between its thread and the reader: at most ``FOLLOW_BACKLOG_LINES``, then counted.

    ``put`` and ``end`` run on the event loop (``LogFollower`` hands lines over with ``call_soon_threadsafe``).
    """

    def __init__(self, limit: int = FOLLOW_BACKLOG_LINES) -> None:
        self._lines: deque[str] = deque(maxlen=limit)
        self._dropped = 0
        self._ready = asyncio.Event()
        self.ended = False

    def __len__(self) -> int:
        return len(self._lines)

    def put(self, line: str) -> None:
        if len(self._lines) == self._lines.maxlen:
            self._dropped += 1
        self._lines.append(line)
        self._ready.set()

    def end(self) -> None:
        self.ended = True
        self._ready.set()

    async def take(self, timeout: float) -> list[str]:
        """Every waiting line, oldest first (after a note of the dropped ones); waits up to ``timeout`` s for one."""
        if not self._lines and not self.ended:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        self._ready.clear()
        lines = list(self._lines)
        self._lines.clear()
        if self._dropped:
            lines.insert(0, f"--- sparkd: {self._dropped} lines left out: the reader was slower than the log ---")
            self._dropped = 0
        return lines


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
                if len(pending) > 4 * MAX_LINE_CHARS:  # a line without end is relayed in pieces, not held
                    lines.append(pending)
                    pending = b""
                for raw in lines:
                    line = raw.decode("utf-8", "replace").rstrip()
                    if line:
                        self._loop.call_soon_threadsafe(self._emit, clip_line(line))
        except Exception as error:  # noqa: BLE001 - a lost log stream must not take the daemon down
            if not self._stopped.is_set():
                log.debug("log_follow_ended", container=self._container, error=str(error))
        finally:
            if pending.strip() and not self._stopped.is_set():
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    self._loop.call_soon_threadsafe(self._emit, clip_line(pending.decode("utf-8", "replace").rstrip()))
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
