"""How sparkctl reaches sparkd's admin API: the local unix socket, or HTTP(S) with an admin key.

Standard library only (``http.client``): sparkctl starts fast and needs no event loop.
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from ..adminjson import LiveStatus

DEFAULT_SOCKET = "/run/sparkd/sparkd.sock"


class CtlError(Exception):
    """A failure to show the user; ``exit_code`` 1 = the daemon refused or failed, 3 = unreachable."""

    def __init__(self, message: str, exit_code: int = 1, payload: Any = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.payload = payload


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("sparkd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass
class Target:
    socket_path: str | None = None
    url: str | None = None
    key: str | None = None

    def describe(self) -> str:
        return self.url if self.url else f"unix socket {self.socket_path}"


class Client:
    def __init__(self, target: Target) -> None:
        self.target = target
        if target.url:
            parts = urlsplit(target.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise CtlError(f"--url must look like http://host:8009, found {target.url!r}", exit_code=2)
            self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
            self._prefix = parts.path.rstrip("/")

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self.target.url:
            if self._scheme == "https":
                return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=ssl.create_default_context())
            return http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        assert self.target.socket_path
        return _UnixConnection(self.target.socket_path, timeout)

    def _headers(self, body: bytes | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "sparkctl"}
        if self.target.url and self.target.key:
            headers["Authorization"] = f"Bearer {self.target.key}"
        if body is not None:
            headers["Content-Type"] = "application/json"
        return headers

    def open(self, method: str, path: str, payload: Any = None, timeout: float | None = 30.0) -> http.client.HTTPResponse:
        """Send a request; return the response once its status is a success (else raise ``CtlError``)."""
        body = json.dumps(payload).encode() if payload is not None else None
        connection = self._connection(timeout)
        path = (self._prefix if self.target.url else "") + path
        try:
            connection.request(method, path, body=body, headers=self._headers(body))
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise self._unreachable(error) from None
        if response.status >= 400:
            raw = response.read()
            connection.close()
            raise _refusal(response.status, raw)
        return response

    def get_json(self, path: str, timeout: float | None = 30.0) -> Any:
        return self._json(self.open("GET", path, timeout=timeout))

    def post_json(self, path: str, payload: Any = None, timeout: float | None = None) -> Any:
        return self._json(self.open("POST", path, payload, timeout=timeout))

    @staticmethod
    def _json(response: http.client.HTTPResponse) -> Any:
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as error:
            raise CtlError(f"the connection to sparkd broke: {error}", exit_code=3) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise CtlError(f"sparkd answered something that is not JSON: {raw[:200]!r}") from None

    def events(self, interval: float) -> Iterator[LiveStatus]:
        """The live status, one snapshot per server-sent event, until the stream ends."""
        response = self.open("GET", f"/api/events?interval={interval:g}", timeout=None)
        data: list[str] = []
        event = "message"
        try:
            for raw in response:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    if event == "status" and data:
                        yield json.loads("\n".join(data))
                    data, event = [], "message"
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" ") if line.startswith("data: ") else line[5:])
        except (OSError, http.client.HTTPException) as error:
            raise CtlError(f"the status stream broke: {error}", exit_code=3) from None
        finally:
            response.close()

    def _unreachable(self, error: Exception) -> CtlError:
        target = self.target
        if target.url:
            return CtlError(f"cannot reach sparkd at {target.url}: {error}", exit_code=3)
        path = target.socket_path
        code = getattr(error, "errno", None)
        if code == errno.ENOENT:
            hint = (
                f"no socket at {path}: is sparkd running (`systemctl status sparkd`)? "
                "For a sparkd elsewhere use --url http://HOST:8009 with an admin key (SPARKD_ADMIN_KEY or --key-file)"
            )
        elif code in (errno.EACCES, errno.EPERM):
            hint = (
                f"permission denied on {path}: run sparkctl as root, or join the sparkd group "
                "(`sudo usermod -aG sparkd $USER`, then log in again)"
            )
        elif code == errno.ECONNREFUSED:
            hint = f"nothing listens on {path}: sparkd is not running (a stale socket file); `systemctl start sparkd`"
        else:
            hint = f"{path}: {error}"
        return CtlError(f"cannot reach sparkd: {hint}", exit_code=3)


def _refusal(status: int, raw: bytes) -> CtlError:
    try:
        payload = json.loads(raw)
        message = payload["error"]["message"]
    except (ValueError, KeyError, TypeError):
        payload, message = None, raw.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
    if status == 401:
        message += " (sparkctl: give an admin key in SPARKD_ADMIN_KEY or a file with --key-file)"
    return CtlError(f"sparkd refused ({status}): {message}", payload=payload)


def model_path(name: str) -> str:
    return "/api/models/" + quote(name, safe="")
