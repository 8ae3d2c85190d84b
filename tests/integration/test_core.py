"""Issue 2 acceptance: sparkd serves models on demand through real Podman."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from harness import container_events, engine_model

pytestmark = pytest.mark.podman


async def engine_state(session: aiohttp.ClientSession, port: int) -> dict:
    async with session.get(f"http://127.0.0.1:{port}/fake/state") as response:
        return await response.json()


async def test_cold_stampede_of_200_requests_starts_the_container_once(sparkd_factory, engine_image, podman):
    sparkd = sparkd_factory({"a": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "1"})})
    await sparkd.start()
    since = time.time()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        results = await asyncio.gather(*(sparkd.chat(session, "a", f"request {i}") for i in range(200)))
    assert [status for status, _ in results] == [200] * 200
    assert all(body["choices"][0]["message"]["content"] for _, body in results)
    starts = container_events(podman, since, sparkd.prefix, {"start"})
    assert len(starts) == 1, starts


async def first_data_event(response: aiohttp.ClientResponse) -> bytes:
    """The stream's first answer event: a stream that waited for its cold model gets sparkd's comments first."""
    while True:
        event = await response.content.readuntil(b"\n\n")
        if not event.startswith(b": "):
            return event


async def test_streaming_is_not_buffered(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image, env={"FAKE_HOLD_AFTER_CHUNK": "2"})})
    await sparkd.start()
    body = {"model": sparkd.model("a"), "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(sparkd.base_url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            first = await asyncio.wait_for(first_data_event(response), timeout=5)
            assert b'"role": "assistant"' in first or b'"role":"assistant"' in first
            # The engine now holds its stream until released: the first chunk already arrived.
            port = (await sparkd.model_status("a"))["port"]
            async with session.post(f"http://127.0.0.1:{port}/fake/release") as release:
                assert release.status == 200
            rest = await asyncio.wait_for(response.content.read(), timeout=5)
    assert rest.rstrip().endswith(b"data: [DONE]")


async def test_client_disconnect_aborts_the_engine_stream(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image, env={"FAKE_TOKEN_RATE": "20", "FAKE_TOKENS": "400"})})
    await sparkd.start()
    body = {"model": sparkd.model("a"), "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 400}
    async with aiohttp.ClientSession() as session:
        async with session.post(sparkd.base_url + "/v1/chat/completions", json=body) as response:
            await first_data_event(response)
            await response.content.readuntil(b"\n\n")
            port = (await sparkd.model_status("a"))["port"]
            before = (await engine_state(session, port))["aborted_streams"]
            response.close()  # the client goes away mid-stream
        disconnected = time.monotonic()
        while time.monotonic() - disconnected < 2:
            if (await engine_state(session, port))["aborted_streams"] > before:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the engine did not see its stream aborted within 2 s")
    assert (await sparkd.model_status("a"))["in_flight"] == 0


async def test_idle_model_is_stopped_and_started_again(sparkd_factory, engine_image, podman):
    sparkd = sparkd_factory({"a": engine_model(engine_image)}, {"lifecycle": {"idle_stop_s": 1.0}})
    await sparkd.start()
    since = time.time()
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "a"))[0] == 200
        await sparkd.wait_state("a", "stopped", timeout=10)
        assert podman.containers.get(sparkd.container("a")).status == "exited"
        assert (await sparkd.chat(session, "a"))[0] == 200
    actions = [action for _, action, _ in container_events(podman, since, sparkd.prefix, {"start", "died"})]
    assert actions == ["start", "died", "start"], actions


async def test_engine_crash_during_start_fails_waiters_fast_with_its_log_line(sparkd_factory, engine_image):
    sparkd = sparkd_factory(
        {"a": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "0.5", "FAKE_CRASH_AT_START": "1"})},
        {"lifecycle": {"start_timeout_s": 600}},
    )
    await sparkd.start()
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(sparkd.chat(session, "a") for _ in range(3)))
    took = time.monotonic() - began
    assert took < 5, took
    for status, body in results:
        assert status == 503
        assert "fake crash at start" in body["error"]["message"]
        assert body["error"]["code"] == "model_failed"
    assert (await sparkd.model_status("a"))["state"] == "failed"


async def test_changed_args_recreate_the_container_on_next_start(sparkd_factory, engine_image, podman):
    sparkd = sparkd_factory({"a": engine_model(engine_image)})
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "a"))[0] == 200
    first = podman.containers.get(sparkd.container("a"))
    assert await sparkd.stop() == 0
    sparkd.models["a"] = engine_model(engine_image, args=["--fake-tokens", "3"])
    sparkd.write_config()
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        status, body = await sparkd.chat(session, "a", "one two three four five")
    assert status == 200
    second = podman.containers.get(sparkd.container("a"))
    assert second.id != first.id
    assert second.labels["io.sparkd.spec"] != first.labels["io.sparkd.spec"]
    assert body["usage"]["completion_tokens"] == 3
    assert "--fake-tokens" in json.dumps(second.attrs["Config"]["Cmd"])


async def test_missing_image_is_a_precise_error(sparkd_factory):
    sparkd = sparkd_factory({"a": {"image": "localhost/sparkd-no-such-image:1", "gpu": False}})
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        status, body = await sparkd.chat(session, "a")
    assert status == 503
    message = body["error"]["message"]
    assert "image localhost/sparkd-no-such-image:1 not found" in message and "build it" in message


async def test_unknown_and_path_form_errors(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image), "off": engine_model(engine_image, enabled=False, disabled_reason="broken on GB10")})
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        async with session.post(sparkd.base_url + "/v1/chat/completions", json={"model": "nope", "messages": []}) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "model_not_found"
        async with session.post(sparkd.base_url + "/v1/nope/chat/completions", json={"messages": []}) as response:
            assert response.status == 404
        async with session.post(sparkd.base_url + f"/v1/{sparkd.model('off')}/chat/completions", json={"messages": []}) as response:
            assert response.status == 409
            assert "broken on GB10" in (await response.json())["error"]["message"]
        async with session.get(sparkd.base_url + "/v1/models") as response:
            listing = await response.json()
    assert [m["id"] for m in listing["data"]] == [sparkd.model("a")]
    assert listing["data"][0]["state"] == "stopped"
    assert listing["unavailable"][0]["reason"] == "broken on GB10"


async def test_openai_sdk_works_unchanged_in_body_and_path_form(sparkd_factory, engine_image):
    openai = pytest.importorskip("openai")
    sparkd = sparkd_factory({"a": engine_model(engine_image)})
    key = sparkd.add_user_key()  # the SDK sends some key, and only a real one passes
    await sparkd.start()
    name = sparkd.model("a")
    for base_url in (sparkd.base_url + "/v1", f"{sparkd.base_url}/v1/{name}"):
        client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
        chat = await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hello sdk"}])
        assert chat.choices[0].message.content.startswith("hello sdk")
        stream = await client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "stream me"}], stream=True
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert "".join(pieces).startswith("stream me")
        completion = await client.completions.create(model=name, prompt="complete this", max_tokens=5)
        assert completion.choices[0].text
        embedding = await client.embeddings.create(model=name, input="embed me")
        assert len(embedding.data[0].embedding) == 8
        models = [m.id async for m in client.models.list()]
        assert name in models
        await client.close()
