"""``sparkd doctor``'s peer check never sends the peer key on to where a redirect points (issue 11, point 8)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sparkd import __version__
from sparkd.commands.doctor import check_peers
from sparkd.config import load_config

PEER_KEY = "sk-peer-key-for-the-head-0123456789"


class Recorder:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        """(path, Authorization header) of every request the server saw."""


def serve(recorder: Recorder, answer: Any) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            recorder.requests.append((self.path, self.headers.get("Authorization")))
            answer(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def servers() -> Iterator[tuple[Recorder, Recorder, ThreadingHTTPServer, ThreadingHTTPServer]]:
    """A 'peer' that redirects every request to a second server (the attacker's), which answers as a sparkd."""
    target_seen, redirect_seen = Recorder(), Recorder()

    def as_sparkd(handler: BaseHTTPRequestHandler) -> None:
        body = json.dumps({"sparkd": __version__, "instance": "x", "address": ""}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    target = serve(target_seen, as_sparkd)

    def redirect(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", f"http://127.0.0.1:{target.server_address[1]}{handler.path}")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    redirecting = serve(redirect_seen, redirect)
    yield redirect_seen, target_seen, redirecting, target
    redirecting.shutdown()
    target.shutdown()


def config_for(tmp_path: Path, port: int) -> Any:
    key_file = tmp_path / "peer.key"
    key_file.write_text(PEER_KEY + "\n")
    key_file.chmod(0o600)
    path = tmp_path / "sparkd.toml"
    path.write_text(
        '[cluster]\naddress = "10.0.0.1"\n'
        f'[peers.p]\nurl = "http://127.0.0.1:{port}"\nkey_file = "{key_file}"\naddress = "10.0.0.2"\ninsecure = true\n'
    )
    return load_config(path)


def test_doctor_does_not_follow_a_redirect_with_the_peer_key(tmp_path, servers):
    redirect_seen, target_seen, redirecting, _ = servers
    checks = check_peers(config_for(tmp_path, redirecting.server_address[1]))
    assert redirect_seen.requests == [("/api/version", f"Bearer {PEER_KEY}")]  # the configured URL got the key
    assert target_seen.requests == []  # the place it redirects to got nothing, least of all the key
    failed = [c for c in checks if not c.ok and not c.warning]
    assert len(failed) == 1 and "answered 302, a redirect to" in failed[0].message and "not followed" in failed[0].message
    assert PEER_KEY not in failed[0].render()
    warned = [c for c in checks if c.warning]
    assert len(warned) == 1 and "without TLS" in warned[0].message


def test_doctor_passes_a_peer_that_answers_directly(tmp_path, servers):
    _, target_seen, _, target = servers
    checks = check_peers(config_for(tmp_path, target.server_address[1]))
    assert target_seen.requests == [("/api/version", f"Bearer {PEER_KEY}")]
    assert [c.ok for c in checks if not c.warning] == [True] and "accepts its key" in checks[-1].message
