"""Streams that wait for their model hear why (issue 14 point 4, acceptance c).

Real daemon, real Podman, the fake engine in real containers (``FAKE_LOAD_DELAY``
for a 20 s load, ``FAKE_CRASH_DURING_LOAD`` for an engine that dies part way),
the OpenAI and Anthropic SDKs as clients.  Times are measured on the wire: each
line's arrival is stamped as it is read.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from harness import engine_model, write_keys

pytestmark = pytest.mark.podman

LOAD = {"FAKE_LOAD_DELAY": "20"}
BUDGET = {"gpu": {"memory_budget": 0.9}}


async def stamped_lines(response: aiohttp.ClientResponse, since: float) -> list[tuple[float, bytes]]:
    """Every line of an SSE body with the seconds after ``since`` at which it arrived."""
    lines = []
    while True:
        line = await response.content.readline()
        if not line:
            return lines
        if line.strip():
            lines.append((time.monotonic() - since, line.rstrip(b"\n")))


async def stamped_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], since: float) -> tuple[int, list[tuple[float, bytes]]]:
    async with session.post(url, json=body) as response:
        return response.status, await stamped_lines(response, since)


def comments(lines: list[tuple[float, bytes]]) -> list[tuple[float, str]]:
    return [(at, line[2:].decode()) for at, line in lines if line.startswith(b": ")]


def chat(sparkd: Any, key: str, **fields: Any) -> dict[str, Any]:
    return {"model": sparkd.model(key), "messages": [{"role": "user", "content": "hello there"}], "stream": True, **fields}


def sdk(sparkd: Any, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sparkd.base_url + "/v1", api_key=key or "unused", max_retries=0, timeout=60)


async def test_a_cold_stream_hears_progress_within_1s_then_every_5s_and_the_sdk_loop_sees_the_answer(sparkd_factory, engine_image):
    """Acceptance c: a 20 s load, measured on the wire; the OpenAI SDK's loop, beside it, gets the answer."""
    sparkd = sparkd_factory({"a": engine_model(engine_image, env=LOAD)})
    key = sparkd.add_user_key()
    await sparkd.start()
    name = sparkd.model("a")
    client = sdk(sparkd, key)

    async def sdk_loop() -> str:
        stream = await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "sdk sees this"}], stream=True)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        sent = time.monotonic()
        async with session.post(sparkd.base_url + "/v1/chat/completions", json=chat(sparkd, "a")) as response:
            headers_at = time.monotonic() - sent
            sdk_answer = asyncio.create_task(sdk_loop())
            assert response.status == 200 and response.content_type == "text/event-stream"
            lines = await stamped_lines(response, sent)
        sdk_text = await sdk_answer
    await client.close()
    assert headers_at < 1.0
    notes = comments(lines)
    first_data = next(at for at, line in lines if line.startswith(b"data: "))
    assert first_data > 15, "the model loads for 20 s: the answer cannot come sooner"
    assert notes[0][0] < 1.0, notes[:2]
    waits = [at for at, _ in notes if at < first_data]
    gaps = [later - earlier for earlier, later in zip(waits, waits[1:])]
    assert waits and max(gaps) <= 5.0, gaps
    assert first_data - waits[-1] <= 5.0
    texts = [text for _, text in notes]
    assert all(text.startswith("sparkd: ") for text in texts)
    assert any(f"loading {name}, loading weights " in text and "%" in text for text in texts), texts
    assert all("left" not in text for text in texts), "it never loaded here: no ETA may be invented"
    assert any("s so far" in text for text in texts)
    assert texts[-1].startswith(f"sparkd: {name} is ready after ")
    events = [line for _, line in lines if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    answer = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1] if json.loads(e[6:])["choices"])
    assert answer.startswith("hello there")
    assert sdk_text.startswith("sdk sees this")


async def test_an_engine_dying_during_the_load_ends_the_stream_with_an_error_the_sdk_raises(sparkd_factory, engine_image):
    """Acceptance c: the 20 s load dies 8 s in; the stream had its headers and comments, then an error event."""
    sparkd = sparkd_factory({"a": engine_model(engine_image, env={**LOAD, "FAKE_CRASH_DURING_LOAD": "8"})})
    key = sparkd.add_user_key()
    await sparkd.start()
    name = sparkd.model("a")
    client = sdk(sparkd, key)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        sent = time.monotonic()
        raw = asyncio.create_task(stamped_stream(session, sparkd.base_url + "/v1/chat/completions", chat(sparkd, "a"), sent))
        with pytest.raises(openai.APIError) as caught:
            stream = await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], stream=True)
            async for _chunk in stream:
                pass
        failed_after = time.monotonic() - sent
        status, lines = await raw
    await client.close()
    assert status == 200
    message = str(caught.value)
    assert name in message and "CUDA out of memory" in message, message
    assert 6 < failed_after < 20, "it failed when the engine died, not after the load would have ended"
    assert comments(lines)[0][0] < 1.0
    last = lines[-1][1]
    assert last.startswith(b"data: {") and json.loads(last[6:])["error"]["code"] == "model_failed", lines[-3:]
    assert (await sparkd.status())["queue"]["depth"] == 0
