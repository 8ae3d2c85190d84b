"""Anthropic's Messages API and OpenAI's Responses API through a real daemon (issue 14, points 5-6, acceptance b).

Against the fake engine (which serves /v1/messages as vLLM does, without
/v1/messages/count_tokens): the anthropic SDK's keys, its exception classes for
sparkd's refusals, the fixups in Anthropic's shape, the caps of ``max_tokens``
and ``max_output_tokens``. Against the shipped CPU demo model (llama.cpp's
server, no Messages API): the SDK gets an Anthropic-shaped 404 naming the model
and what to use instead. Answers from the real vLLM are in test_real_vllm.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from test_demo_model import shipped_demo_table, shipped_document

from harness import Sparkd, engine_model, remove_containers, run_async, unique_prefix, write_keys

pytestmark = pytest.mark.podman

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

TOOL = {"name": "read_file", "description": "Read a file", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}
HELLO = [{"role": "user", "content": "Say hello"}]
MAX_MODEL_LEN = 4096


@dataclass
class Daemon:
    sparkd: Sparkd
    key: str
    restricted_key: str
    """A key that may use model ``m`` only."""

    def client(self, key: str | None = None, **options: Any) -> Any:
        return anthropic.Anthropic(base_url=self.sparkd.base_url, api_key=key or self.key, max_retries=0, timeout=120, **options)

    def engine_state(self, model: str) -> dict[str, Any]:
        status = run_async(self.sparkd.model_status(model))
        return run_async(_get_json(f"http://127.0.0.1:{status['port']}/fake/state"))


async def _get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.json()


@pytest.fixture(scope="module")
def daemon(engine_image: str, podman: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    prefix = unique_prefix()
    fake = {"args": ["--max-model-len", str(MAX_MODEL_LEN)], "max_model_len": MAX_MODEL_LEN}
    sparkd = Sparkd(tmp_path_factory.mktemp("anthropic"), prefix, {
        "m": engine_model(engine_image, **fake),
        "plain": engine_model(engine_image, profile="gemma", tools="none", **fake),
        "coder": engine_model(engine_image, profile="coder-force-tools", **fake),
        "think": engine_model(engine_image, profile="thinking-off", **fake),
        "slow": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "6"}, **fake),
        "broken": engine_model(engine_image, env={"FAKE_CRASH_AT_START": "1"}, **fake),
    }, {"lifecycle": {"queue_size": 1, "failure_backoff_s": 300}})
    key, restricted = f"sk-test-user-{prefix}-0000", f"sk-test-ci-{prefix}-00000"
    write_keys(sparkd.workdir / "keys.toml", {"user": {"key": key}, "ci": {"key": restricted, "models": [sparkd.model("m")]}})
    try:
        run_async(sparkd.start())
        yield Daemon(sparkd, key, restricted)
    finally:
        sparkd.kill()
        remove_containers(podman, prefix)
        print(f"--- sparkd log ---\n{sparkd.logs()[-3000:]}")


# ---------------------------------------------------------------- keys


def test_the_sdks_x_api_key_and_a_bearer_key_both_reach_the_engine_with_its_own_key(daemon: Daemon) -> None:
    name = daemon.sparkd.model("m")
    reply = daemon.client().messages.create(model=name, max_tokens=8, messages=HELLO)
    assert reply.type == "message" and reply.content[0].text.startswith("Say hello")
    bearer = anthropic.Anthropic(base_url=daemon.sparkd.base_url, auth_token=daemon.key, max_retries=0)
    assert bearer.messages.create(model=name, max_tokens=8, messages=HELLO).content[0].text
    headers = {k.lower(): v for k, v in daemon.engine_state("m")["last_request_headers"].items()}
    assert "x-api-key" not in headers and daemon.key not in json.dumps(headers)  # the client's key stays with sparkd
    assert headers["authorization"].startswith("Bearer ")  # the fake engine, like vLLM, takes only its own Bearer key


def test_a_wrong_key_is_an_authentication_error(daemon: Daemon) -> None:
    with pytest.raises(anthropic.AuthenticationError) as refused:
        daemon.client("sk-not-a-key-of-this-server").messages.create(model=daemon.sparkd.model("m"), max_tokens=8, messages=HELLO)
    assert refused.value.status_code == 401
    assert refused.value.body["error"]["type"] == "authentication_error"


def test_a_key_without_the_model_is_a_permission_error_naming_what_it_may_use(daemon: Daemon) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        daemon.client(daemon.restricted_key).messages.create(model=daemon.sparkd.model("plain"), max_tokens=8, messages=HELLO)
    assert daemon.sparkd.model("m") in str(refused.value) and "'ci'" in str(refused.value)


# ---------------------------------------------------------------- refusals


def test_an_unknown_model_is_a_not_found_error(daemon: Daemon) -> None:
    with pytest.raises(anthropic.NotFoundError) as refused:
        daemon.client().messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=HELLO)
    assert "'claude-sonnet-4-5' is not configured on this server" in str(refused.value)
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "not_found_error"
    assert refused.value.body["error"]["code"] == "model_not_found"


def test_a_body_the_messages_api_cannot_take_is_refused_before_the_engine(daemon: Daemon) -> None:
    client = daemon.client()
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=daemon.sparkd.model("m"), max_tokens=8,
                               messages=[{"role": "system", "content": "Be brief."}, *HELLO])
    message = refused.value.body["error"]["message"]
    assert "messages[0].role" in message and "top-level 'system'" in message, message
    assert daemon.engine_state("m")["last_request_body"]["messages"][0]["role"] != "system"  # the engine never saw it
    # The SDK itself insists on max_tokens: a raw request without it.
    status, body = run_async(_post(daemon, "/v1/messages", {"model": daemon.sparkd.model("m"), "messages": HELLO}))
    assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


async def _post(daemon: Daemon, path: str, body: Any, key: str | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(daemon.sparkd.base_url + path, json=body, headers={"x-api-key": key or daemon.key}) as response:
            return response.status, await response.json(content_type=None)


def test_a_model_that_failed_to_start_is_an_api_error_quoting_why(daemon: Daemon) -> None:
    with pytest.raises(anthropic.InternalServerError) as refused:
        daemon.client().messages.create(model=daemon.sparkd.model("broken"), max_tokens=8, messages=HELLO)
    assert refused.value.status_code in (502, 503)
    assert daemon.sparkd.model("broken") in str(refused.value) and "CUDA" in str(refused.value)
    assert refused.value.body["error"]["type"] in ("api_error", "overloaded_error")


async def test_a_full_queue_is_an_overloaded_error_with_retry_after(daemon: Daemon) -> None:
    client = anthropic.AsyncAnthropic(base_url=daemon.sparkd.base_url, api_key=daemon.key, max_retries=0, timeout=120)
    slow = daemon.sparkd.model("slow")
    waiting = asyncio.ensure_future(client.messages.create(model=slow, max_tokens=8, messages=HELLO))
    while (await daemon.sparkd.model_status("slow"))["queued"] < 1:
        await asyncio.sleep(0.05)
    with pytest.raises(anthropic.InternalServerError) as refused:
        await client.messages.create(model=slow, max_tokens=8, messages=HELLO)
    assert refused.value.status_code == 503 and refused.value.body["error"]["type"] == "overloaded_error"
    assert "queue is full" in str(refused.value) and int(refused.value.response.headers["Retry-After"]) >= 1
    assert (await waiting).content[0].text  # the waiting one is answered once the model is up
    await client.close()


# ---------------------------------------------------------------- fixups and caps in Anthropic's shape


def test_a_max_tokens_over_the_context_is_capped_and_the_sdk_streams_the_answer(daemon: Daemon) -> None:
    client = daemon.client()
    name = daemon.sparkd.model("m")
    with client.messages.stream(model=name, max_tokens=32000, system="Be brief.", messages=HELLO) as stream:
        text = stream.get_final_text()
        capped = stream.response.headers["X-Sparkd-Max-Tokens-Capped"]
    assert text.startswith("Say hello")
    sent = daemon.engine_state("m")["last_request_body"]["max_tokens"]
    # The fake engine has no /v1/messages/count_tokens: its /tokenize counted the system prompt and the message.
    prompt_tokens = len(["<|system|>", "Be", "brief", ".", "<|user|>", "Say", "hello", "<|assistant|>"])
    assert sent == MAX_MODEL_LEN - prompt_tokens - 32
    assert capped == f"requested=32000 sent={sent} prompt_tokens={prompt_tokens} max_model_len={MAX_MODEL_LEN} counted=exact"


def test_tools_are_stripped_and_the_system_prompt_merged_in_anthropics_shape(daemon: Daemon) -> None:
    reply = daemon.client().messages.with_raw_response.create(
        model=daemon.sparkd.model("plain"), max_tokens=8, system=[{"type": "text", "text": "Be brief."}],
        tools=[TOOL], tool_choice={"type": "auto"}, messages=HELLO)
    assert set(reply.headers["X-Sparkd-Fixups"].split(",")) >= {"strip_tools", "merge_system"}
    assert reply.parse().content[0].text
    sent = daemon.engine_state("plain")["last_request_body"]
    assert "tools" not in sent and "tool_choice" not in sent and "system" not in sent
    assert sent["messages"] == [{"role": "user", "content": "Be brief.\n\nSay hello"}]


def test_a_coder_model_gets_anthropics_forced_tool_choice(daemon: Daemon) -> None:
    daemon.client().messages.create(model=daemon.sparkd.model("coder"), max_tokens=8, tools=[TOOL], messages=HELLO)
    sent = daemon.engine_state("coder")["last_request_body"]
    assert sent["tool_choice"] == {"type": "any"} and sent["tools"] == [TOOL]


def test_count_tokens_on_an_engine_without_it_is_a_clear_not_found(daemon: Daemon) -> None:
    with pytest.raises(anthropic.NotFoundError) as refused:
        daemon.client().messages.count_tokens(model=daemon.sparkd.model("m"), messages=HELLO)
    assert daemon.sparkd.model("m") in str(refused.value) and "/v1/messages/count_tokens" in str(refused.value)


# ---------------------------------------------------------------- the Responses API


def test_responses_max_output_tokens_is_capped_and_reasoning_effort_mapped(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=daemon.sparkd.base_url + "/v1", api_key=daemon.key, max_retries=0)
    raw = client.responses.with_raw_response.create(model=daemon.sparkd.model("think"), input="Say hello",
                                                    max_output_tokens=32000, reasoning={"effort": "high"})
    reply = raw.parse()
    assert reply.output_text.startswith("Say hello")  # the fake engine refuses a max_output_tokens over its context
    sent = daemon.engine_state("think")["last_request_body"]
    prompt_tokens = len(["<|user|>", "Say", "hello", "<|assistant|>"])
    assert sent["max_output_tokens"] == MAX_MODEL_LEN - prompt_tokens - 32
    assert sent["chat_template_kwargs"] == {"enable_thinking": True}
    assert raw.headers["X-Sparkd-Max-Tokens-Capped"].startswith("requested=32000 ")
    client.responses.create(model=daemon.sparkd.model("think"), input="Say hello", max_output_tokens=8)
    assert daemon.engine_state("think")["last_request_body"]["chat_template_kwargs"] == {"enable_thinking": False}


def test_responses_instructions_are_merged_for_a_template_without_a_system_role(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=daemon.sparkd.base_url + "/v1", api_key=daemon.key, max_retries=0)
    reply = client.responses.create(model=daemon.sparkd.model("plain"), instructions="Be brief.", input="Say hello",
                                    max_output_tokens=8)
    assert reply.output_text
    sent = daemon.engine_state("plain")["last_request_body"]
    assert "instructions" not in sent and sent["input"] == "Be brief.\n\nSay hello"


def test_responses_errors_are_openai_shaped_and_raised_by_the_sdk(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=daemon.sparkd.base_url + "/v1", api_key=daemon.key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as refused:
        client.responses.create(model="gpt-5", input="Say hello")
    assert "'gpt-5' is not configured" in refused.value.message and refused.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as overflow:
        client.responses.create(model=daemon.sparkd.model("m"), input="word " * (MAX_MODEL_LEN + 10), max_output_tokens=100)
    assert overflow.value.code == "context_length_exceeded" and f"context of {MAX_MODEL_LEN} tokens" in overflow.value.message


# ---------------------------------------------------------------- the CPU demo model: llama.cpp's server has no Messages API


@pytest.fixture(scope="module")
def demo(cpu_demo_image: str, podman: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    prefix = unique_prefix()
    table = {**shipped_demo_table(), "image": cpu_demo_image}
    shipped = shipped_document()["defaults"]
    defaults = {"volumes": shipped["volumes"], "env": shipped["env"]}
    sparkd = Sparkd(tmp_path_factory.mktemp("anthropic-demo"), prefix, {"demo": table}, {"defaults": defaults})
    key = sparkd.add_user_key()
    try:
        run_async(sparkd.start())
        yield Daemon(sparkd, key, key)
    finally:
        sparkd.kill()
        remove_containers(podman, prefix)


def test_the_demo_model_refuses_the_anthropic_sdk_clearly_plain_and_streaming(demo: Daemon) -> None:
    client = demo.client()
    name = demo.sparkd.model("demo")
    with pytest.raises(anthropic.NotFoundError) as plain:
        client.messages.create(model=name, max_tokens=16, messages=HELLO)
    with pytest.raises(anthropic.NotFoundError) as streamed:
        with client.messages.stream(model=name, max_tokens=16, messages=HELLO) as stream:
            stream.get_final_text()
    for refused in (plain, streamed):
        message = refused.value.body["error"]["message"]
        assert refused.value.status_code == 404 and refused.value.body["error"]["type"] == "not_found_error"
        assert name in message and "does not serve POST /v1/messages" in message and "/v1/chat/completions" in message
        assert refused.value.body["error"]["code"] == "unsupported_endpoint"
        assert "detail" not in message
    # The model itself works: the same daemon answers its OpenAI API.
    chat = openai.OpenAI(base_url=demo.sparkd.base_url + "/v1", api_key=demo.key, max_retries=0).chat.completions.create(
        model=name, messages=HELLO, max_tokens=8)
    assert chat.choices[0].message.content is not None
