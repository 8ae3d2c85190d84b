"""sparkd driving the real vLLM (issue 13): PyPI's CPU build serving SmolLM2-135M-Instruct.

The model is configured like a catalog entry: the image's entrypoint (``vllm
serve <its model>``) plus ``args``. One daemon and one engine (``--enforce-eager``,
about 25 s to start) are shared by the tests that are not about start-up; the
lifecycle test has a daemon of its own, and the engine-kill test runs last on the
shared engine because it ends it.

Needs the image of ``python3 tests/images/build.py real-vllm`` (tests/run-all.sh
builds it): with CI=true a missing image fails, elsewhere these tests skip.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

import realvllm
from harness import Sparkd, remove_containers, run_async, unique_prefix
from realvllm import MAX_MODEL_LEN, engine_address, metric, metrics, model_table

pytestmark = pytest.mark.podman

QUESTION = "What is the capital of France?"


@dataclass
class Served:
    """The shared daemon with its ready model ``m``, and what its cold start showed."""

    sparkd: Sparkd
    podman: Any
    key: str = ""
    """A user key: the SDKs must send one, and a key not in the keys file is a 401."""
    phases: list[str] = field(default_factory=list)
    start_s: float = 0.0

    @property
    def model(self) -> str:
        return self.sparkd.model("m")

    @property
    def container(self) -> str:
        return self.sparkd.container("m")

    def engine(self) -> tuple[str, str]:
        return engine_address(self.podman, self.container)

    def engine_metrics(self) -> dict[str, float]:
        address, _ = self.engine()
        return metrics(f"http://{address}/metrics")

    def engine_log(self) -> str:
        logs = subprocess.run(["podman", "logs", self.container], capture_output=True, text=True, check=False)
        return logs.stdout + logs.stderr


async def cold_start(sparkd: Sparkd, key: str) -> tuple[list[str], float, dict[str, Any]]:
    """Send a chat for the stopped model ``key`` and watch /api/status meanwhile: (load phases seen, seconds, answer)."""
    phases: list[str] = []
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(sparkd.chat(session, key, "Say hello.", max_tokens=8))
        while not request.done():
            status = await sparkd.model_status(key)
            progress = status.get("progress")
            if progress and (not phases or phases[-1] != progress["phase"]):
                phases.append(progress["phase"])
            await asyncio.sleep(0.02)
        code, answer = await request
    assert code == 200, answer
    return phases, time.monotonic() - began, answer


@pytest.fixture(scope="module")
def served(real_image: str, podman: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    prefix = unique_prefix()
    sparkd = Sparkd(tmp_path_factory.mktemp("real-vllm"), prefix, {"m": model_table(real_image, "--enforce-eager")},
                    # failure_backoff_s: after the engine-kill test, requests get the failure at once
                    {"lifecycle": {"idle_stop_s": 3600, "failure_backoff_s": 300}})
    shared = Served(sparkd, podman, sparkd.add_user_key())
    try:
        run_async(sparkd.start())
        shared.phases, shared.start_s, _ = run_async(cold_start(sparkd, "m"))
        yield shared
    finally:
        sparkd.kill()
        remove_containers(podman, prefix)
        # A vLLM being stopped can outlast podman-py's timeout: make sure it is gone.
        subprocess.run(["podman", "rm", "-f", "--time", "5", shared.container], capture_output=True, check=False)
        print(f"--- sparkd log ({sparkd.workdir}) ---\n{sparkd.logs()[-4000:]}")


def openai_client(served: Served) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=served.sparkd.base_url + "/v1", api_key=served.key, max_retries=0)


def anthropic_client(served: Served) -> Any:
    from anthropic import Anthropic

    return Anthropic(base_url=served.sparkd.base_url, api_key=served.key, max_retries=0)


# ---------------------------------------------------------------- start-up


def test_cold_start_reports_the_load_stages_of_vllms_real_log(served: Served) -> None:
    # What sparkd's progress parser made of vLLM's own lines, in the order they came.
    print(f"load phases seen in /api/status: {served.phases}; ready and answered after {served.start_s:.1f} s")
    assert "loading weights" in served.phases, served.phases
    assert "downloading weights" not in served.phases, served.phases  # the weights are in the image
    assert "profiling memory" in served.phases, served.phases
    assert served.phases.index("loading weights") < served.phases.index("profiling memory"), served.phases
    assert served.phases[-1] in ("starting API server", "ready", "profiling memory"), served.phases
    log = served.engine_log()
    assert "Starting vLLM" in log or "vLLM API server version" in log, log[-2000:]


# ---------------------------------------------------------------- the OpenAI endpoints


def test_chat_is_answered_by_the_real_model(served: Served) -> None:
    reply = openai_client(served).chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens > 0


async def test_streamed_chat_usage_reaches_sparkds_history_and_metrics(served: Served) -> None:
    sparkd = served.sparkd

    async def tokens(kind: str) -> float:
        async with sparkd.admin_session() as session, session.get(sparkd.admin_url + "/metrics") as response:
            text = await response.text()
        values = {}
        for line in text.splitlines():
            match = realvllm.METRIC_LINE.match(line)
            if match:
                values[match["name"] + (match["labels"] or "")] = float(match["value"])
        return metric(values, "sparkd_tokens_total", model=served.model, kind=kind)

    before = {kind: await tokens(kind) for kind in ("prompt", "completion")}
    stream = openai_client(served).chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices)
    assert await tokens("prompt") - before["prompt"] == usage.prompt_tokens
    assert await tokens("completion") - before["completion"] == usage.completion_tokens

    deadline = time.monotonic() + 30  # the history is written every 10 s
    recorded: dict[str, Any] = {}
    while time.monotonic() < deadline:
        async with sparkd.admin_session() as session:
            async with session.get(sparkd.admin_url + f"/api/history?model={served.model}") as response:
                history = await response.json()
        recorded = next((d for d in history.get("daily", []) if d["model"] == served.model), {})
        if recorded.get("completion_tokens", 0) >= usage.completion_tokens:
            break
        await asyncio.sleep(0.5)
    assert recorded.get("prompt_tokens", 0) >= usage.prompt_tokens and recorded.get("completion_tokens", 0) >= usage.completion_tokens, recorded


def test_completions(served: Served) -> None:
    reply = openai_client(served).completions.create(
        model=served.model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.choices[0].text.strip() and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0


def test_responses(served: Served) -> None:
    reply = openai_client(served).responses.create(
        model=served.model, input=QUESTION, max_output_tokens=24, temperature=0)
    assert "Paris" in reply.output_text
    assert reply.usage.input_tokens > 5 and reply.usage.output_tokens > 0


def test_messages_with_the_anthropic_sdk(served: Served) -> None:
    client = anthropic_client(served)
    # temperature through extra_body: this SDK release (2.x) dropped the keyword.
    reply = client.messages.create(model=served.model, max_tokens=24, messages=[{"role": "user", "content": QUESTION}],
                                   extra_body={"temperature": 0})
    assert reply.type == "message" and reply.role == "assistant"
    assert "Paris" in "".join(block.text for block in reply.content if block.type == "text")
    assert reply.usage.input_tokens > 5 and reply.usage.output_tokens > 0


def test_streamed_messages_with_the_anthropic_sdk(served: Served) -> None:
    client = anthropic_client(served)
    with client.messages.stream(model=served.model, max_tokens=24, messages=[{"role": "user", "content": QUESTION}],
                                extra_body={"temperature": 0}) as stream:
        events = [event.type for event in stream]
        text = stream.get_final_text()
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop", events
    assert "Paris" in text and final.usage.output_tokens > 0


def test_streamed_responses(served: Served) -> None:
    events = list(openai_client(served).responses.create(
        model=served.model, input=QUESTION, max_output_tokens=24, temperature=0, stream=True))
    types = [event.type for event in events]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    assert "Paris" in "".join(event.delta for event in events if event.type == "response.output_text.delta")


def test_count_tokens_with_the_anthropic_sdk_is_vllms_own_count(served: Served) -> None:
    counted = anthropic_client(served).messages.count_tokens(
        model=served.model, system="Answer briefly.", messages=[{"role": "user", "content": QUESTION}])
    assert counted.input_tokens == _tokenize(served, [{"role": "system", "content": "Answer briefly."},
                                                      {"role": "user", "content": QUESTION}])


def test_an_anthropic_prompt_that_alone_overflows_is_refused_in_anthropics_shape(served: Served) -> None:
    from anthropic import BadRequestError

    def messages_400s() -> int:
        return served.engine_log().count('"POST /v1/messages HTTP/1.1" 400')

    refusals = messages_400s()
    with pytest.raises(BadRequestError) as refused:
        anthropic_client(served).messages.create(
            model=served.model, max_tokens=16, messages=[{"role": "user", "content": "Paris " * (MAX_MODEL_LEN + 500)}])
    body = refused.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    assert body["error"]["code"] == "context_length_exceeded" and f"context of {MAX_MODEL_LEN} tokens" in body["error"]["message"]
    # vLLM's count_tokens refuses a prompt over the context (a 400 of its own): /tokenize counts it then,
    # and sparkd refuses it; the request itself never reached vLLM.
    assert messages_400s() == refusals


def test_a_responses_max_output_tokens_over_the_context_is_capped_by_vllms_own_count(served: Served) -> None:
    raw = openai_client(served).responses.with_raw_response.create(
        model=served.model, input=QUESTION, max_output_tokens=32000, temperature=0)
    prompt_tokens = _tokenize(served, [{"role": "user", "content": QUESTION}])
    assert raw.headers["X-Sparkd-Max-Tokens-Capped"] == (
        f"requested=32000 sent={MAX_MODEL_LEN - prompt_tokens - 32} prompt_tokens={prompt_tokens} "
        f"max_model_len={MAX_MODEL_LEN} counted=exact")
    assert "Paris" in raw.parse().output_text  # vLLM would have refused 32000 with a 400


# ---------------------------------------------------------------- the context cap


def _tokenize(served: Served, messages: list[dict[str, Any]]) -> int:
    address, key = served.engine()
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/tokenize", json.dumps({"model": served.model, "messages": messages}),
                       {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    response = connection.getresponse()
    body = json.loads(response.read())
    assert response.status == 200, body
    return int(body["count"])


def _engine_400s(served: Served) -> int:
    return served.engine_log().count('" 400')


async def test_a_max_tokens_that_does_not_fit_is_capped_by_vllms_own_count(served: Served) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    prompt_tokens = _tokenize(served, messages)
    refusals = _engine_400s(served)
    body = {"model": served.model, "messages": messages, "max_tokens": MAX_MODEL_LEN, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(served.sparkd.base_url + "/v1/chat/completions", json=body) as response:
            first = await response.content.readline()
            status, capped = response.status, response.headers.get("X-Sparkd-Max-Tokens-Capped")
    assert status == 200 and first.startswith(b"data: "), first
    sent = MAX_MODEL_LEN - prompt_tokens - 32
    assert capped == (f"requested={MAX_MODEL_LEN} sent={sent} prompt_tokens={prompt_tokens} "
                      f"max_model_len={MAX_MODEL_LEN} counted=exact")
    assert _engine_400s(served) == refusals  # vLLM never had to refuse it


async def test_an_anthropic_max_tokens_over_the_context_is_capped_too(served: Served) -> None:
    # Anthropic clients send large max_tokens (32 000 is common): vLLM would refuse it with a 400.
    system, messages = "Answer briefly.", [{"role": "user", "content": QUESTION}]
    prompt_tokens = _tokenize(served, [{"role": "system", "content": system}, *messages])
    body = {"model": served.model, "system": system, "messages": messages, "max_tokens": 32000, "stream": True}
    headers = {"x-api-key": served.key, "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as session:
        async with session.post(served.sparkd.base_url + "/v1/messages", json=body, headers=headers) as response:
            first = await response.content.readline()
            status, capped = response.status, response.headers.get("X-Sparkd-Max-Tokens-Capped")
    assert status == 200 and first.startswith(b"event: message_start"), first
    assert capped == (f"requested=32000 sent={MAX_MODEL_LEN - prompt_tokens - 32} prompt_tokens={prompt_tokens} "
                      f"max_model_len={MAX_MODEL_LEN} counted=exact")


async def test_a_prompt_that_alone_overflows_gets_context_length_exceeded(served: Served) -> None:
    messages = [{"role": "user", "content": "Paris " * (MAX_MODEL_LEN + 500)}]
    refusals = _engine_400s(served)
    async with aiohttp.ClientSession() as session, session.post(served.sparkd.base_url + "/v1/chat/completions",
                            json={"model": served.model, "messages": messages}) as response:
        status, body = response.status, await response.json()
    assert status == 400, body
    assert body["error"]["code"] == "context_length_exceeded"
    assert f"context of {MAX_MODEL_LEN} tokens" in body["error"]["message"]
    assert _engine_400s(served) == refusals  # refused by sparkd, not by vLLM


# ---------------------------------------------------------------- client disconnects


async def test_a_client_leaving_mid_stream_makes_vllm_abort_the_request(served: Served) -> None:
    # vLLM 0.32 counts no abort in request_success_total{finished_reason="abort"} (it stays 0):
    # an aborted request is one that had its first token (time_to_first_token_seconds_count)
    # and never finished (e2e_request_latency_seconds_count, request_success_total), and
    # whose generation stopped long before its max_tokens.
    def counts(values: dict[str, float]) -> dict[str, float]:
        return {
            "started": metric(values, "vllm:time_to_first_token_seconds_count"),
            "finished": metric(values, "vllm:e2e_request_latency_seconds_count"),
            "succeeded": metric(values, "vllm:request_success_total"),
            "generated": metric(values, "vllm:generation_tokens_total"),
            "running": metric(values, "vllm:num_requests_running"),
        }

    before = counts(served.engine_metrics())
    body = {"model": served.model, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 2000, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(served.sparkd.base_url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            for _ in range(5):
                assert (await response.content.readline()) is not None
            response.close()  # the client goes away in the middle of the answer
    deadline = time.monotonic() + 30
    after = counts(served.engine_metrics())
    while time.monotonic() < deadline and (after["running"] or after["started"] == before["started"]):
        await asyncio.sleep(0.2)
        after = counts(served.engine_metrics())
    await asyncio.sleep(1.0)
    settled = counts(served.engine_metrics())
    assert settled["running"] == 0 and settled["started"] == before["started"] + 1, (before, settled)
    assert settled["finished"] == before["finished"] and settled["succeeded"] == before["succeeded"], (before, settled)
    assert settled["generated"] == after["generated"]  # nothing is generated for it any more
    assert settled["generated"] - before["generated"] < 2000


# ---------------------------------------------------------------- the README's curl


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"], ids=["no content-type", "curl -d"])
def test_a_request_sent_like_the_readmes_curl_examples_is_answered(served: Served, content_type: str | None) -> None:
    # curl -d sends application/x-www-form-urlencoded; other clients send no Content-Type at all.
    # vLLM itself refuses both (415/400 "Unsupported Media Type"): sparkd must not pass that on.
    body = json.dumps({"model": served.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
    connection = http.client.HTTPConnection("127.0.0.1", served.sparkd.port, timeout=120)
    connection.request("POST", "/v1/chat/completions", body.encode(),
                       {"Content-Type": content_type} if content_type else {})
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == 200, answer
    assert answer["choices"][0]["message"]["content"]


# ---------------------------------------------------------------- the fake engine follows the real one


@pytest.fixture
def fake_engine(engine_image: str, podman: Any, served: Served) -> Iterator[tuple[str, str]]:
    """The fake engine in its container, serving the shared model's name: (address, key)."""
    from harness import free_port

    port, key = free_port(), "fake-engine-key-" + unique_prefix()
    container = podman.containers.run(
        engine_image, ["--port", "8000", "--served-model-name", served.model, "--max-model-len", str(MAX_MODEL_LEN)],
        environment={"VLLM_API_KEY": key}, ports={"8000/tcp": ("127.0.0.1", port)}, detach=True,
        labels={"io.sparkd.test": "real-vllm-probe"}, name=f"sparkd-probe-{unique_prefix()}")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        yield f"127.0.0.1:{port}", key
    finally:
        container.remove(force=True)


def test_the_fake_engine_answers_like_the_real_vllm(served: Served, fake_engine: tuple[str, str]) -> None:
    from engine.probe_engine import Probe, differences

    address, key = served.engine()
    real = Probe(address, key, served.model).run()
    fake = Probe(*fake_engine, served.model).run()
    found = differences(fake, real)
    assert not found, "the fake engine differs from vLLM " + "\n".join(found) + "\nvLLM: " + realvllm.dumps(real)


# ---------------------------------------------------------------- lifecycle


async def test_restart_adopts_the_running_vllm_and_idle_stop_stops_it(real_image: str, podman: Any, sparkd_factory: Any) -> None:
    sparkd = sparkd_factory({"m": model_table(real_image, "--enforce-eager", idle_stop_s=8.0)},
                            {"server": {"on_shutdown": "keep"}})
    await sparkd.start()
    await cold_start(sparkd, "m")
    started_at = podman.containers.get(sparkd.container("m")).attrs["State"]["StartedAt"]

    assert await sparkd.stop() == 0  # on_shutdown = keep: vLLM goes on running
    await sparkd.start()
    status = await sparkd.model_status("m")
    assert status["state"] == "ready", status  # adopted at start-up, before any request
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        code, answer = await sparkd.chat(session, "m", QUESTION, max_tokens=8)
    assert code == 200, answer
    assert time.monotonic() - began < 15  # answered by the adopted engine, not after a new load
    assert podman.containers.get(sparkd.container("m")).attrs["State"]["StartedAt"] == started_at
    assert "model_adopted" in sparkd.logs() or "adopted" in sparkd.logs()

    await sparkd.wait_state("m", "stopped", timeout=60)  # idle_stop_s after the last request
    assert podman.containers.get(sparkd.container("m")).attrs["State"]["Running"] is False


async def test_a_killed_engine_fails_the_requests_at_once_quoting_its_log(served: Served, podman: Any) -> None:
    # Last on purpose: it ends the shared engine. vLLM's engine core (a process of its own)
    # is killed while an answer streams: vLLM ends that stream with an error event and exits.
    body = {"model": served.model, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 2000, "ignore_eos": True, "stream": True}
    kill = ("import os, signal\n"
            "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    if open(f'/proc/{pid}/cmdline', 'rb').read().startswith(b'VLLM::EngineCore'):\n"
            "        os.kill(int(pid), signal.SIGKILL)\n")
    async with aiohttp.ClientSession() as session:
        async with session.post(served.sparkd.base_url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            await response.content.readline()
            subprocess.run(["podman", "exec", served.container, "/opt/vllm/bin/python", "-c", kill], check=True)
            began = time.monotonic()
            rest = await asyncio.wait_for(response.content.read(), 60)
        assert time.monotonic() - began < 30  # the stream ends, it does not hang
        assert b"EngineCore encountered an issue" in rest or b"error" in rest, rest[-500:]

        failed = await served.sparkd.wait_state("m", "failed", timeout=60)
        quoted = "\n".join(failed["failure"]["log_lines"])
        assert "EngineDeadError" in quoted or "EngineCore" in quoted, failed["failure"]
        began = time.monotonic()
        code, answer = await served.sparkd.chat(session, "m", "hello")
    assert time.monotonic() - began < 10  # at once (failure_backoff_s), not after a start timeout
    assert code in (502, 503), answer
    assert served.model in answer["error"]["message"], answer
    assert "EngineDeadError" in answer["error"]["message"] or "EngineCore" in answer["error"]["message"], answer
