"""Issue 11 acceptance (security): what a LAN client or a local user can do, through a real daemon and Podman.

Each part below is one area of the issue; helpers a part needs live in its block
(or in tests/capture_engine.py).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from capture_engine import (
    captured,
    http_request,
    raw_exchange,
    request_lines,
    stalled_client,
)
from harness import engine_model, write_keys

pytestmark = pytest.mark.podman


# --- engine path: smuggling, HTTP/1.0, Content-Type, timeouts, readiness watch (issue 11 points 1, 2, 5; issue 12 point 4) ---

SMUGGLING_QUERY = (
    b"x=1%20HTTP/1.1%0D%0AX-Injected:%20yes%0D%0AContent-Length:%200%0D%0A%0D%0AGET%20/smuggled%20HTTP/1.1%0D%0AX:%20y"
)
BUDGET = {"gpu": {"memory_budget": 0.94}}
"""With two models claiming 0.8 each, one must stop before the other starts (a swap)."""


def user_key_daemon(sparkd_factory: Any, tmp_path: Path, models: dict[str, dict[str, Any]],
                    settings: dict[str, Any] | None = None) -> tuple[Any, str]:
    """A daemon that takes keys only (anonymous off); returns it and a user key."""
    keys_path = tmp_path / "keys.toml"
    merged = {section: dict(values) for section, values in (settings or {}).items()}
    merged.setdefault("server", {}).update({"keys_file": str(keys_path), "anonymous": "off"})
    sparkd = sparkd_factory(models, merged)
    admin, user = f"sk-test-admin-{secrets.token_hex(16)}", f"sk-test-user-{secrets.token_hex(16)}"
    write_keys(keys_path, {"admin": {"key": admin, "role": "admin"}, "user": {"key": user}})
    sparkd.admin_key = admin
    return sparkd, user


def chat_body(sparkd: Any, key: str, **fields: Any) -> bytes:
    return json.dumps({"model": sparkd.model(key), "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


async def engine_port(sparkd: Any, key: str) -> int:
    return int((await sparkd.model_status(key))["port"])


async def fake_state(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/fake/state") as response:
        return await response.json()


def sse_events(body: bytes) -> list[bytes]:
    return [event for event in body.split(b"\n\n") if event]


async def post_whole(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float]:
    """POST and read the whole answer: (status, body, time.monotonic() at its end)."""
    async with session.post(url, data=body, headers=headers) as response:
        return response.status, await response.read(), time.monotonic()


@pytest.mark.parametrize("stream", [False, True], ids=["pooled", "stream"])
async def test_the_smuggling_url_reaches_the_engine_as_one_request_with_the_raw_query(sparkd_factory, engine_image, tmp_path, stream):
    sparkd, user = user_key_daemon(sparkd_factory, tmp_path, {"a": engine_model(engine_image, env={"FAKE_CAPTURE": "1"})})
    await sparkd.start()
    target = b"/v1/chat/completions?" + SMUGGLING_QUERY
    request = http_request("POST", target, sparkd.port, chat_body(sparkd, "a", stream=stream, max_tokens=3),
                           {"Authorization": f"Bearer {user}", "Content-Type": "application/json"})
    answer = await raw_exchange(sparkd.port, request)
    assert answer.status == 200, answer.body
    if stream:
        assert sse_events(answer.body)[-1] == b"data: [DONE]"
    port = await engine_port(sparkd, "a")
    connections = await captured(port)
    everything = b"".join(connections)
    assert request_lines(connections, skip=("/health", "/fake/", "/tokenize")) == [b"POST /v1/chat/completions?" + SMUGGLING_QUERY + b" HTTP/1.1"]
    assert b"\nX-Injected:" not in everything  # the query stays percent-encoded: no header line of it
    assert b"\nGET /smuggled" not in everything


@pytest.mark.parametrize("stream", [False, True], ids=["pooled", "stream"])
async def test_what_would_break_a_request_toward_the_engine_is_a_400_and_reaches_nothing(sparkd_factory, engine_image, tmp_path, stream):
    sparkd, user = user_key_daemon(sparkd_factory, tmp_path, {"a": engine_model(engine_image, env={"FAKE_CAPTURE": "1"})})
    await sparkd.start()
    body = chat_body(sparkd, "a", stream=stream, max_tokens=3)
    auth = {"Authorization": f"Bearer {user}", "Content-Type": "application/json"}
    ok = await raw_exchange(sparkd.port, http_request("POST", b"/v1/chat/completions", sparkd.port, body, auth))
    assert ok.status == 200  # the model is up: what follows is refused by sparkd, not by a cold engine
    port = await engine_port(sparkd, "a")
    before = request_lines(await captured(port))
    hostile = [
        (b"/v1/chat/completions?x=" + b"a" * 5000, {}, "invalid_query"),  # within aiohttp's line limit, past sparkd's
        (b"/v1/chat/completions", {"X-Note": "caf\u00e9"}, "invalid_header"),  # obs-text aiohttp lets through
        (b"/v1/chat/completions", {"X-Note": "a\udcffb"}, "invalid_header"),  # a raw 0xff byte
    ]
    for target, headers, code in hostile:
        answer = await raw_exchange(sparkd.port, http_request("POST", target, sparkd.port, body, {**auth, **headers}))
        assert answer.status == 400, (target[:60], answer.body)
        error = answer.json()["error"]
        assert error["code"] == code and error["type"] == "invalid_request_error", error
    assert request_lines(await captured(port)) == before


async def test_a_curl_style_body_reaches_the_engine_as_application_json(sparkd_factory, engine_image, tmp_path):
    sparkd, user = user_key_daemon(sparkd_factory, tmp_path, {"a": engine_model(engine_image, env={"FAKE_CAPTURE": "1"})})
    await sparkd.start()
    body = chat_body(sparkd, "a", max_tokens=3)
    auth = {"Authorization": f"Bearer {user}"}
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}):  # curl -d without -H, and what it says
        answer = await raw_exchange(sparkd.port, http_request("POST", b"/v1/chat/completions", sparkd.port, body, {**auth, **headers}))
        assert answer.status == 200, answer.body
        port = await engine_port(sparkd, "a")
        seen = (await fake_state(port))["last_request_headers"]
        assert seen["Content-Type"] == "application/json", seen
    raw = b"".join(await captured(port))
    assert b"x-www-form-urlencoded" not in raw
    assert raw.count(b"\r\nContent-Type: application/json\r\n") == 2


async def test_an_http10_client_gets_the_stream_without_chunk_framing(sparkd_factory, engine_image, tmp_path):
    sparkd, user = user_key_daemon(sparkd_factory, tmp_path, {"a": engine_model(engine_image, env={"FAKE_TOKENS": "8"})})
    await sparkd.start()
    request = http_request("POST", b"/v1/chat/completions", sparkd.port, chat_body(sparkd, "a", stream=True),
                           {"Authorization": f"Bearer {user}", "Content-Type": "application/json"}, version=b"HTTP/1.0")
    answer = await raw_exchange(sparkd.port, request)  # returns only once sparkd closed the connection
    assert answer.status_line.startswith(b"HTTP/1.") and answer.status == 200, answer.status_line
    assert "transfer-encoding" not in answer.headers and "content-length" not in answer.headers, answer.headers
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = sse_events(answer.body)
    assert answer.body.startswith(b"data: {") and answer.body.endswith(b"data: [DONE]\n\n"), answer.body[:80]
    assert all(event.startswith(b"data: ") for event in events), events[:3]
    assert len(events) == 1 + 8 + 1 + 1  # the role chunk, 8 tokens, the finish chunk, [DONE]
    # And HTTP/1.1 still gets chunked framing (decoded by the client to the same events).
    async with aiohttp.ClientSession() as session, session.post(
        sparkd.base_url + "/v1/chat/completions", data=chat_body(sparkd, "a", stream=True), headers={"Authorization": f"Bearer {user}"}
    ) as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert len(sse_events(await response.read())) == len(events)


def timed_out_events(sparkd: Any) -> list[str]:
    return [line for line in sparkd.logs().splitlines() if "engine_request_timed_out" in line]


async def swap_waits_then_proceeds(sparkd: Any, session: aiohttp.ClientSession, user: str) -> asyncio.Task[Any]:
    """A request for b, sent while a holds the GPU with a request in flight: it waits (a swap is pending)."""

    async def call_b() -> tuple[int, Any]:
        async with session.post(sparkd.base_url + "/v1/chat/completions", data=chat_body(sparkd, "b", max_tokens=2),
                                headers={"Authorization": f"Bearer {user}"}) as response:
            return response.status, await response.json()

    waiting = asyncio.create_task(call_b())
    deadline = time.monotonic() + 10
    while (await sparkd.model_status("b"))["queued"] != 1:
        assert time.monotonic() < deadline, "the request for b never queued"
        await asyncio.sleep(0.05)
    assert not waiting.done()
    return waiting


@pytest.mark.parametrize(
    ("knobs", "stream", "setting", "reason"),
    [
        ({"FAKE_HANG": "1"}, False, "response_head_timeout_s", "response_head"),
        ({"FAKE_HANG": "1"}, True, "response_head_timeout_s", "response_head"),
        ({"FAKE_HOLD_AFTER_CHUNK": "2"}, True, "idle_read_timeout_s", "idle_read"),
    ],
    ids=["hung-pooled", "hung-stream", "silent-stream"],
)
async def test_a_hung_engine_ends_the_request_within_its_timeout_and_the_swap_proceeds(
        sparkd_factory, engine_image, tmp_path, knobs, stream, setting, reason):
    limit = 2.0
    sparkd, user = user_key_daemon(
        sparkd_factory, tmp_path,
        {"a": engine_model(engine_image, claim=0.8, env=knobs), "b": engine_model(engine_image, claim=0.8)},
        {**BUDGET, "engine": {setting: limit}},
    )
    await sparkd.start()
    headers = {"Authorization": f"Bearer {user}"}
    async with aiohttp.ClientSession() as session:
        hung = asyncio.create_task(post_whole(session, sparkd.base_url + "/v1/chat/completions", chat_body(sparkd, "a", stream=stream), headers))
        await sparkd.wait_state("a", "ready", timeout=20)
        began = time.monotonic()  # the engine has the request from about now
        waiting = await swap_waits_then_proceeds(sparkd, session, user)
        status, body, end = await asyncio.wait_for(hung, limit * 4)
        ended = end - began
        if reason == "idle_read":
            assert status == 200
            last = sse_events(body)[-1]
            assert b"engine.idle_read_timeout_s" in last and b'"engine_error"' in last, body[-300:]
        else:
            assert status == 504, body
            error = json.loads(body)["error"]
            assert error["code"] == "engine_timeout" and f"engine.{setting}" in error["message"], error
        assert ended < limit * 2, ended
        status, answer = await asyncio.wait_for(waiting, 30)
    assert status == 200, answer
    assert (await sparkd.model_status("a"))["in_flight"] == 0
    events = timed_out_events(sparkd)
    assert len(events) == 1 and f"reason={reason}" in events[0] and f"setting=engine.{setting}" in events[0], events


async def test_a_client_that_stops_reading_is_cut_off_and_the_swap_proceeds(sparkd_factory, engine_image, tmp_path):
    limit = 2.0
    sparkd, user = user_key_daemon(
        sparkd_factory, tmp_path,
        # A stream far larger than the socket buffers between sparkd and the client (about 150 MB).
        {"a": engine_model(engine_image, claim=0.8, args=["--max-model-len", "2000000"], env={"FAKE_TOKENS": "1000000"}),
         "b": engine_model(engine_image, claim=0.8)},
        {**BUDGET, "engine": {"write_stall_timeout_s": limit}},
    )
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        await sparkd.chat(session, "a", max_tokens=1)  # a holds the GPU and is ready
        request = http_request("POST", b"/v1/chat/completions", sparkd.port, chat_body(sparkd, "a", stream=True, max_tokens=1000000),
                               {"Authorization": f"Bearer {user}", "Content-Type": "application/json"})
        client = await asyncio.to_thread(stalled_client, sparkd.port, request)
        try:
            deadline = time.monotonic() + 10
            while (await sparkd.model_status("a"))["in_flight"] != 1:
                assert time.monotonic() < deadline, "the stalled stream never started"
                await asyncio.sleep(0.05)
            waiting = await swap_waits_then_proceeds(sparkd, session, user)
            began = time.monotonic()
            status, answer = await asyncio.wait_for(waiting, 30)
            waited = time.monotonic() - began
        finally:
            client.close()
    assert status == 200, answer
    # The stall begins only once the socket buffers between sparkd and the client are full (megabytes on
    # loopback, filled at the fake engine's pace); then the limit runs, then the swap. The limit itself is
    # timed in tests/unit/test_deadlines.py and test_stream_conformance.py.
    assert waited < 60, waited
    assert (await sparkd.model_status("a"))["in_flight"] == 0
    events = timed_out_events(sparkd)
    assert len(events) == 1 and "reason=write_stall" in events[0] and "setting=engine.write_stall_timeout_s" in events[0], events


async def test_a_ready_engine_that_stops_answering_its_readiness_path_is_failed(sparkd_factory, engine_image, tmp_path, podman):
    sparkd, user = user_key_daemon(
        sparkd_factory, tmp_path,
        {"a": engine_model(engine_image, claim=0.8, env={"FAKE_HANG": "1"}), "b": engine_model(engine_image, claim=0.8)},
        {**BUDGET, "engine": {"readiness_check_s": 0.5, "unresponsive_fail_s": 2}, "lifecycle": {"failure_backoff_s": 30}},
    )
    await sparkd.start()
    headers = {"Authorization": f"Bearer {user}"}
    async with aiohttp.ClientSession() as session:
        hung = asyncio.create_task(post_whole(session, sparkd.base_url + "/v1/chat/completions", chat_body(sparkd, "a"), headers))
        await sparkd.wait_state("a", "ready", timeout=20)
        await asyncio.sleep(3)  # several good probes of a READY engine: it is not failed for hanging on inference
        assert (await sparkd.model_status("a"))["state"] == "ready"
        waiting = await swap_waits_then_proceeds(sparkd, session, user)
        port = await engine_port(sparkd, "a")
        async with session.post(f"http://127.0.0.1:{port}/fake/hang_health") as toggle:
            assert toggle.status == 200
        began = time.monotonic()
        hung_status, hung_body, end = await asyncio.wait_for(hung, 20)
        assert hung_status == 502, hung_body  # its engine was stopped under it
        failed_after = end - began
        status, answer = await asyncio.wait_for(waiting, 30)
        assert status == 200, answer  # a's lease share was freed: b started
        a = await sparkd.model_status("a")
        assert a["state"] == "failed" and a["in_flight"] == 0, a
        # A request for a during its back-off gets the failure, naming the cause.
        async with session.post(sparkd.base_url + "/v1/chat/completions", data=chat_body(sparkd, "a"), headers=headers) as refused:
            error = (await refused.json())["error"]
        assert refused.status == 503 and error["code"] == "model_failed", error
        assert "engine.unresponsive_fail_s" in error["message"], error
    assert failed_after < 2 + 0.5 + 5 + 5, failed_after  # the limit, a probe period, a probe timeout, the stop
    assert podman.containers.get(sparkd.container("a")).status != "running"
    assert any("engine_unresponsive" in line for line in sparkd.logs().splitlines())
