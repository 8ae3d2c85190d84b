"""CORS origin patterns and preflight headers."""

from __future__ import annotations

import pytest

from sparkd.config import ServerConfig
from sparkd.http.cors import ALLOW_METHODS, origin_allowed, pattern_error, preflight_headers

DEFAULTS = ServerConfig().cors_origins


@pytest.mark.parametrize(
    "origin",
    ["http://localhost", "http://localhost:5173", "http://127.0.0.1:8080", "vscode-webview://1a2b3c4d5e", "vscode-webview://abc-def.x"],
)
def test_default_allowlist_allows(origin):
    assert origin_allowed(origin, DEFAULTS, None)


@pytest.mark.parametrize(
    "origin",
    [
        "https://localhost:5173",            # another scheme
        "http://localhost.evil.com",         # a suffix
        "http://localhost:5173.evil.com",
        "http://evil.com",
        "http://127.0.0.1.nip.io:80",
        "http://localhost:abc",
        "vscode-webview://",
        "null",
        "",
        "http://localhost:80/path",
    ],
)
def test_default_allowlist_refuses(origin):
    assert not origin_allowed(origin, DEFAULTS, None)


def test_same_origin_and_explicit_patterns():
    assert origin_allowed("http://192.168.1.5:8009", DEFAULTS, "192.168.1.5:8009")
    assert origin_allowed("http://[::1]:8009", DEFAULTS, "[::1]:8009")
    assert origin_allowed("http://localhost:8009", (), "localhost:8009")
    assert not origin_allowed("http://192.168.1.5:8009", DEFAULTS, "192.168.1.5:9999")
    # a DNS name is not trusted as "own origin": it may be rebound to this machine by a hostile page
    assert not origin_allowed("http://evil.example:8009", DEFAULTS, "evil.example:8009")
    assert origin_allowed("http://spark.lan:8009", ("http://spark.lan:*",), "spark.lan:8009")
    assert origin_allowed("https://chat.example.com", ("https://chat.example.com",), None)
    assert not origin_allowed("https://chatxexample.com", ("https://chat.example.com",), None)
    assert origin_allowed("https://a.b.example.com", ("https://*.example.com",), None)
    assert origin_allowed("http://anything:1", ("*",), None)
    assert not origin_allowed("http://localhost", (), None)


@pytest.mark.parametrize(("pattern", "ok"), [("http://localhost:*", True), ("*", True), ("localhost", False), ("http://x/y", False), ("", False), ("http://a b", False)])
def test_pattern_errors(pattern, ok):
    assert (pattern_error(pattern) is None) is ok


def test_preflight_headers_allow_the_sdk_headers_and_reflect_requested_tokens():
    headers = preflight_headers("http://localhost:3000", "authorization, x-stainless-os, content-type, bad header, x\r\ny")
    assert headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert headers["Access-Control-Allow-Methods"] == ALLOW_METHODS
    allowed = [h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")]
    assert {"authorization", "x-api-key", "content-type", "x-stainless-os"} <= set(allowed)
    assert "bad header" not in allowed and not any("\r" in h or "\n" in h for h in allowed)
    assert allowed.count("authorization") == 1
