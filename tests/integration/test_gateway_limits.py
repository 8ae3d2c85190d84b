"""Timeouts for slow clients that do not cut long generations (issue 4, point 3)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from harness import engine_model

pytestmark = pytest.mark.podman


async def test_a_stalled_body_gets_408_but_a_long_generation_is_not_cut(sparkd_factory, engine_image):
    sparkd = sparkd_factory(
        {"a": engine_model(engine_image, env={"FAKE_TOKEN_RATE": "4", "FAKE_TOKENS": "10"})},
        {"server": {"body_timeout_s": 1}},
    )
    await sparkd.start()
    # a client that announces 100 bytes and sends 10: answered 408 after body_timeout_s, in OpenAI's shape
    reader, writer = await asyncio.open_connection("127.0.0.1", sparkd.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
    await writer.drain()
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(65536), 10)
    waited = time.monotonic() - started
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(body)["error"]["code"] == "request_timeout" and 0.9 < waited < 5

    # an answer streamed for ~2.5 s, longer than body_timeout_s, arrives whole
    chat = {"model": sparkd.model("a"), "messages": [{"role": "user", "content": "tell me"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(f"{sparkd.base_url}/v1/chat/completions", json=chat) as response:
            assert response.status == 200
            events = [line for line in (await response.read()).split(b"\n") if line.startswith(b"data: ")]
        elapsed = time.monotonic() - started
    assert events[-1] == b"data: [DONE]" and elapsed > 2.0
    tokens = sum(1 for e in events[:-1] if json.loads(e[6:])["choices"] and json.loads(e[6:])["choices"][0]["delta"].get("content"))
    assert tokens == 10
