"""The one validated place where a client's request becomes an engine request: hostile query strings and headers."""

from __future__ import annotations

import pytest

from sparkd.engine.client import Endpoint
from sparkd.engine.outbound import (
    MAX_QUERY,
    engine_headers,
    engine_request,
    engine_target,
)
from sparkd.errors import BadRequest

ENDPOINT = Endpoint(port=18001, key="engine-secret")
SMUGGLING = (
    "/v1/chat/completions?x=1%20HTTP/1.1%0D%0AX-Injected:%20yes%0D%0AContent-Length:%200%0D%0A%0D%0A"
    "GET%20/smuggled%20HTTP/1.1%0D%0AX:%20y"
)


def test_the_raw_query_string_goes_to_the_engine_byte_for_byte():
    request = engine_request("/v1/chat/completions", SMUGGLING, [], ENDPOINT)
    assert request.url.raw_path_qs == SMUGGLING
    assert str(request.url) == "http://127.0.0.1:18001" + SMUGGLING


@pytest.mark.parametrize("query", ["a=%7C|b", "q=%zz", "x=%2F%3F&y=;z", "a=b=c&&d", "~!$'()*+,;=:@/?"])
def test_visible_ascii_is_kept_as_it_came(query):
    assert engine_target("/v1/completions", "/v1/m/completions?" + query) == "/v1/completions?" + query
    assert engine_request("/v1/completions", "/v1/completions?" + query, [], ENDPOINT).url.raw_path_qs == "/v1/completions?" + query


def test_no_query_or_an_empty_one_forwards_none():
    assert engine_target("/v1/chat/completions", "/v1/chat/completions") == "/v1/chat/completions"
    assert engine_target("/v1/chat/completions", "/v1/chat/completions?") == "/v1/chat/completions"
    assert engine_target("/v1/chat/completions", "/v1/chat/completions?a=1#frag") == "/v1/chat/completions?a=1"


@pytest.mark.parametrize(
    "query",
    [
        "x=1\r\nX-Injected: yes",
        "x=1 HTTP/1.1",
        "x=\n",
        "x=\r",
        "x=\x00",
        "x=\x7f",
        "x=\x1b[31m",
        "x=\t",
        "x=caf\u00e9",
        "x=\udcff",  # a raw 0xff byte as aiohttp's surrogateescape shows it
        "x=\u2028",
    ],
)
def test_a_query_that_would_break_the_request_line_is_a_400(query):
    with pytest.raises(BadRequest) as refused:
        engine_target("/v1/chat/completions", "/v1/chat/completions?" + query)
    assert refused.value.status == 400
    assert refused.value.code == "invalid_query"
    assert "percent-encode" in refused.value.message
    assert "\r" not in refused.value.message and "\n" not in refused.value.message


def test_a_very_long_query_is_a_400_naming_the_limit():
    with pytest.raises(BadRequest) as refused:
        engine_target("/v1/chat/completions", "/v1/chat/completions?x=" + "a" * MAX_QUERY)
    assert str(MAX_QUERY) in refused.value.message
    assert engine_target("/v1/chat/completions", "/v1/chat/completions?" + "a" * MAX_QUERY).endswith("a" * MAX_QUERY)


@pytest.mark.parametrize("path", ["/v1/chat completions", "/v1/a\r\nb", "v1/chat", "/v1/\x00"])
def test_a_path_that_would_break_the_request_line_is_a_400(path):
    with pytest.raises(BadRequest):
        engine_target(path, path)


def test_headers_drop_hop_by_hop_and_credentials_and_set_the_engine_key_and_json():
    client = [
        ("Authorization", "Bearer sk-client"), ("X-Api-Key", "sk-client"), ("Cookie", "a=b"), ("Connection", "keep-alive"),
        ("Transfer-Encoding", "chunked"), ("Content-Length", "12"), ("Content-Type", "application/x-www-form-urlencoded"),
        ("Content-Encoding", "gzip"), ("Host", "lan"), ("Expect", "100-continue"), ("X-Request-Id", "abc 123"),
        ("Accept", "text/event-stream"), ("User-Agent", "curl/8.5.0"),
    ]
    headers = engine_headers(client, ENDPOINT, json_body=True)
    assert dict(headers) == {
        "X-Request-Id": "abc 123",
        "Accept": "text/event-stream",
        "User-Agent": "curl/8.5.0",
        "Authorization": "Bearer engine-secret",
        "Content-Type": "application/json",
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Evil", "a\r\nX-Injected: yes"),
        ("X-Evil", "a\nb"),
        ("X-Evil", "a\x00b"),
        ("X-Evil", "a\x7fb"),
        ("X-Evil", "caf\u00e9"),
        ("X-Evil", "\udcc3\udca9"),
        ("X-Evil", " leading"),
        ("X Evil", "a"),
        ("X-Evil:", "a"),
        ("X-\u00e9", "a"),
        ("", "a"),
    ],
)
def test_a_header_that_would_break_the_request_is_a_400(name, value):
    with pytest.raises(BadRequest) as refused:
        engine_headers([(name, value)], ENDPOINT, json_body=True)
    assert refused.value.status == 400
    assert refused.value.code == "invalid_header"
    assert "\r" not in refused.value.message and "\n" not in refused.value.message


def test_a_header_with_inner_spaces_and_tabs_and_an_empty_one_pass():
    headers = engine_headers([("X-A", "a b\tc"), ("X-Empty", "")], ENDPOINT, json_body=False)
    assert headers["X-A"] == "a b\tc" and headers["X-Empty"] == ""
    assert "Content-Type" not in headers
