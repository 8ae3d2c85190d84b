"""What clients see when things go wrong (issue 14): never a silent stream, errors that say who must act,
one log line per request.  Real daemon, real Podman, the fake engine in real containers, the OpenAI SDK."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from harness import engine_model

pytestmark = pytest.mark.podman


async def _stream_all(client, model: str) -> list[object]:
    chunks = []
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], stream=True)
    async for piece in stream:
        chunks.append(piece)
    return chunks


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"FAKE_END_STREAM_AFTER": "2"}, "ended after 2 events without [DONE]"),
        ({"FAKE_STREAM_FAIL": "Requested tokens (18750) exceed context window of 8192"}, "exceed context window of 8192"),
    ],
    ids=["ends-without-done", "200-sse-then-nothing"],
)
async def test_a_stream_without_its_final_event_ends_with_an_error_the_sdk_raises(sparkd_factory, engine_image, env, reason):
    sparkd = sparkd_factory({"a": engine_model(engine_image, env=env)})
    key = sparkd.add_user_key()
    await sparkd.start()
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=sparkd.base_url + "/v1", api_key=key, max_retries=0)
    try:
        with pytest.raises(openai.APIError) as caught:
            await _stream_all(client, sparkd.model("a"))
        message = str(caught.value)
        assert f"model {sparkd.model('a')}" in message and "without a final event" in message
        assert reason in message  # the engine's own words, from its log
    finally:
        await client.close()
    assert "engine_stream_unfinished" in sparkd.logs()


async def test_an_http10_stream_without_its_final_event_ends_with_an_error_event(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image, env={"FAKE_END_STREAM_AFTER": "2"})})
    await sparkd.start()
    async with aiohttp.ClientSession(version=aiohttp.HttpVersion10) as session:
        _status, _ = await sparkd.chat(session, "a")  # start it first: the stream's answer is what is under test
        async with session.post(
            sparkd.base_url + "/v1/chat/completions",
            json={"model": sparkd.model("a"), "stream": True, "messages": [{"role": "user", "content": "x"}]},
        ) as response:
            body = await response.read()
    assert response.status == 200
    assert body.rstrip().endswith(b"}}") and b'"code": "engine_error"' in body and b"without a final event" in body


async def test_missing_encodings_are_for_the_operator_no_retry_after_and_the_fix_named(sparkd_factory, engine_image, podman):
    """Acceptance e: a failure retrying cannot fix says so (OpenCode retried a Retry-After for 60 s)."""
    sparkd = sparkd_factory({
        "gptoss": engine_model(engine_image, encodings=True),
        "off": engine_model(engine_image, enabled=False, disabled_reason="its weights are not on this host"),
    })
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        async with session.post(sparkd.base_url + "/v1/chat/completions",
                                json={"model": sparkd.model("off"), "messages": [{"role": "user", "content": "hi"}]}) as off:
            body = await off.json()
        assert off.status == 409 and body["error"]["code"] == "model_disabled", body
        assert "enabled = true" in body["error"]["message"] and "Retry-After" not in off.headers
        for attempt in ("first", "during the back-off"):
            async with session.post(
                sparkd.base_url + "/v1/chat/completions",
                json={"model": sparkd.model("gptoss"), "messages": [{"role": "user", "content": "hi"}]},
            ) as response:
                body = await response.json()
            assert response.status == 503, (attempt, body)
            assert "Retry-After" not in response.headers, attempt
            assert body["error"]["code"] == "encodings_missing", body
            assert "sparkd encodings fetch" in body["error"]["message"]
    assert not podman.containers.exists(sparkd.container("gptoss"))


def _request_lines(sparkd) -> list[str]:
    return [line for line in sparkd.logs().splitlines() if "request_done" in line]


async def _wait_request_lines(sparkd, count: int, timeout: float = 10) -> list[str]:
    """The log lines once ``count`` are written: a line follows its answer's last byte (the handler's end)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(lines := _request_lines(sparkd)) < count and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return lines


async def test_one_log_line_per_request_with_key_name_model_status_tokens_and_code(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "1"})}, {"log": {"level": "info"}})
    key = sparkd.add_user_key()
    await sparkd.start()
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        status, _ = await sparkd.chat(session, "a")  # cold: it waits for the model
        assert status == 200
        async with session.post(sparkd.base_url + "/v1/chat/completions", json={"model": "no-such-model", "messages": []}) as missing:
            assert missing.status == 404
        async with session.post(
            sparkd.base_url + "/v1/chat/completions",
            json={"model": sparkd.model("a"), "stream": True, "stream_options": {"include_usage": True},
                  "messages": [{"role": "user", "content": "x"}]},
        ) as streamed:
            await streamed.read()
    lines = await _wait_request_lines(sparkd, 3)
    assert len(lines) == 3, lines
    first, refused, stream = lines
    for line in lines:
        assert "key=test-user" in line and key not in line  # the key's name, never the key
        assert "duration_ms=" in line and "queued_ms=" in line
    assert f"model={sparkd.model('a')}" in first and "path=/v1/chat/completions" in first and "status=200" in first
    assert "prompt_tokens=" in first and "completion_tokens=16" in first
    assert float(first.split("queued_ms=")[1].split()[0]) >= 900  # it waited for the 1 s load
    assert "status=404" in refused and "code=model_not_found" in refused and "model=(none)" in refused
    assert "status=200" in stream and "completion_tokens=16" in stream and "code=" not in stream


async def test_the_request_log_line_can_be_turned_off(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image)}, {"log": {"level": "info", "requests": False}})
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "a"))[0] == 200
    await asyncio.sleep(0.5)  # a line would follow the answer within this
    assert _request_lines(sparkd) == []


async def test_an_endpoint_the_engine_lacks_is_a_clear_4xx_naming_path_model_and_what_it_serves(sparkd_factory, engine_image):
    served = ["/v1/chat/completions", "/v1/completions", "/v1/score", "/v1/models"]
    sparkd = sparkd_factory({"a": engine_model(engine_image, api_paths=served)})
    await sparkd.start()
    name = sparkd.model("a")
    async with aiohttp.ClientSession() as session:
        # refused before the engine: the model is not even started for it
        async with session.post(sparkd.base_url + "/v1/messages",
                                json={"model": name, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}) as refused:
            error = (await refused.json())["error"]
        assert refused.status == 404 and error["code"] == "unsupported_endpoint", error
        assert f"model {name}" in error["message"] and "POST /v1/messages" in error["message"]
        assert error["endpoints"] == served and "Retry-After" not in refused.headers
        assert (await sparkd.model_status("a"))["state"] == "stopped"
        # declared, but the engine has no such route (the fake engine has no /v1/score): its 404 is translated
        async with session.post(sparkd.base_url + "/v1/score", json={"model": name, "text_1": "a", "text_2": "b"}) as translated:
            error = (await translated.json())["error"]
        assert translated.status == 404 and error["code"] == "unsupported_endpoint", error
        assert "POST /v1/score" in error["message"] and error["endpoints"] == served
        async with session.get(sparkd.base_url + "/v1/models") as listing:
            entry = next(m for m in (await listing.json())["data"] if m["id"] == name)
        assert entry["endpoints"] == served
    lines = await _wait_request_lines(sparkd, 2)
    assert len(lines) == 2 and all("code=unsupported_endpoint" in line and "status=404" in line for line in lines), lines


async def test_an_anthropic_stream_without_message_stop_ends_with_anthropics_error_event(sparkd_factory, engine_image):
    anthropic = pytest.importorskip("anthropic")
    sparkd = sparkd_factory({"a": engine_model(engine_image, env={"FAKE_END_STREAM_AFTER": "3"})})
    key = sparkd.add_user_key()
    await sparkd.start()
    client = anthropic.AsyncAnthropic(base_url=sparkd.base_url, api_key=key, max_retries=0)
    try:
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with client.messages.stream(
                model=sparkd.model("a"), max_tokens=16, messages=[{"role": "user", "content": "x"}]
            ) as stream:
                async for _event in stream:
                    pass
        assert f"model {sparkd.model('a')}" in str(caught.value) and "without a final event" in str(caught.value)
    finally:
        await client.close()
