"""One test per fixup profile, through the real daemon and the test engine (acceptance e of issue 4).

Each test sends what a real client sends and asserts what the engine received
(``GET /fake/state`` shows the exact JSON body), plus the headers that tell the
client what was changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from harness import engine_model

pytestmark = pytest.mark.podman

TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@dataclass
class Answer:
    status: int
    headers: Any
    body: Any
    engine_body: Any
    engine_requests: dict[str, int]


class Through:
    """A daemon with one model on ``profile``; ``send`` posts a request and reads what the engine got."""

    def __init__(self, sparkd):
        self.sparkd = sparkd
        self.session = aiohttp.ClientSession()

    async def send(self, body: dict[str, Any], path: str = "/v1/chat/completions", raw: bytes | None = None) -> Answer:
        sparkd = self.sparkd
        payload = raw if raw is not None else json.dumps({"model": sparkd.model("m"), **body}).encode()
        async with self.session.post(sparkd.base_url + path, data=payload, headers={"Content-Type": "application/json"}) as response:
            status, headers, answer = response.status, response.headers, await response.json(content_type=None)
        port = (await sparkd.model_status("m"))["port"]
        if port is None:
            return Answer(status, headers, answer, None, {})
        async with self.session.get(f"http://127.0.0.1:{port}/fake/state") as response:
            state = await response.json()
        return Answer(status, headers, answer, state["last_request_body"], state["requests"])

    async def close(self) -> None:
        await self.session.close()


@pytest.fixture
async def through(sparkd_factory, engine_image):
    made: list[Through] = []

    async def make(profile: str | None, *, tools: str = "full", max_model_len: int = 4096, settings: dict | None = None) -> Through:
        table = engine_model(engine_image, args=["--max-model-len", str(max_model_len)], max_model_len=max_model_len, tools=tools)
        if profile is not None:
            table["profile"] = profile
        sparkd = sparkd_factory({"m": table}, settings)
        await sparkd.start()
        made.append(Through(sparkd))
        return made[-1]

    yield make
    for item in made:
        await item.close()


def user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def test_default_profile_normalizes_and_caps_max_tokens_by_exact_count(through):
    model = await through(None)  # no profile = default
    # a clean request reaches the engine byte for byte (no re-serialization) and unmarked
    raw = json.dumps({"model": model.sparkd.model("m"), "messages": [user("hello world")], "max_tokens": 5, "extra_field": {"kept": 1}}, indent=1).encode()
    answer = await model.send({}, raw=raw)
    assert answer.status == 200 and answer.engine_body == json.loads(raw)
    assert "X-Sparkd-Fixups" not in answer.headers and "/tokenize" not in answer.engine_requests
    # an invalid limit is dropped, both limits become the smaller one
    answer = await model.send({"messages": [user("hi")], "max_tokens": -5})
    assert answer.status == 200 and "max_tokens" not in answer.engine_body
    assert answer.headers["X-Sparkd-Fixups"] == "normalize_max_tokens"
    answer = await model.send({"messages": [user("hi")], "max_tokens": 9, "max_completion_tokens": 7})
    assert answer.engine_body["max_tokens"] == answer.engine_body["max_completion_tokens"] == 7
    # near the limit the engine counts (<|user|> hello world <|assistant|> = 4 tokens): what fits exactly is kept ...
    answer = await model.send({"messages": [user("hello world")], "max_tokens": 4092})
    assert answer.status == 200 and answer.engine_body["max_tokens"] == 4092
    assert answer.engine_requests.get("/tokenize") == 1 and "X-Sparkd-Max-Tokens-Capped" not in answer.headers
    # ... what does not is capped below the limit (less the profile's margin of 32), and the answer says so
    answer = await model.send({"messages": [user("hello world")], "max_tokens": 8000})
    assert answer.status == 200, answer.body
    assert answer.engine_body["max_tokens"] == 4096 - 4 - 32
    assert answer.headers["X-Sparkd-Max-Tokens-Capped"] == "requested=8000 sent=4060 prompt_tokens=4 max_model_len=4096 counted=exact"
    assert answer.engine_requests.get("/tokenize") == 2
    # the same for the legacy completions endpoint
    answer = await model.send({"prompt": "one two three", "max_tokens": 5000}, path="/v1/completions")
    assert answer.status == 200 and answer.engine_body["max_tokens"] == 4096 - 3 - 32


async def test_seed_qwen25_coder_overflow_fails_early_naming_the_limit(through):
    """The seed's known problem: OpenCode sends qwen2.5-coder-7b-instruct more than its 32 768 tokens."""
    model = await through("coder-force-tools", tools="force-required", max_model_len=32768)
    prompt = "word " * 33000
    answer = await model.send({"messages": [{"role": "system", "content": "You are OpenCode."}, user(prompt)], "max_tokens": 32000, "tools": TOOLS})
    assert answer.status == 400, answer.body
    error = answer.body["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "32768 tokens" in error["message"] and "33007 tokens" in error["message"] and "max_model_len" in error["message"]
    assert answer.engine_body is None  # the engine only counted; it never saw the chat request
    assert answer.engine_requests.get("/tokenize") == 1
    # a long but fitting prompt gets its max_tokens capped instead
    answer = await model.send({"messages": [user("word " * 30000)], "max_tokens": 32000})
    assert answer.status == 200, answer.body
    assert answer.engine_body["max_tokens"] == 32768 - 30002 - 32


async def test_passthrough_profile_changes_nothing(through):
    model = await through("passthrough", tools="none")
    body = {"messages": [{"role": "system", "content": [{"type": "text", "text": "S"}]}, user("a"), user("b")], "tools": TOOLS, "max_tokens": 4000}
    answer = await model.send(body)
    assert answer.status == 200
    assert answer.engine_body == {"model": model.sparkd.model("m"), **body}
    assert "X-Sparkd-Fixups" not in answer.headers and "X-Sparkd-Max-Tokens-Capped" not in answer.headers


async def test_small_no_tools_profile_strips_tools_and_flattens(through):
    model = await through("small-no-tools")
    answer = await model.send(
        {
            "messages": [user([{"type": "text", "text": "list"}, {"type": "text", "text": "files"}])],
            "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False, "functions": [{"name": "f"}], "function_call": "auto",
        }
    )
    assert answer.status == 200, answer.body
    assert answer.engine_body == {"model": model.sparkd.model("m"), "messages": [user("list\nfiles")]}
    assert answer.headers["X-Sparkd-Fixups"] == "strip_tools,flatten_content"


async def test_models_tools_key_strips_tools_under_the_default_profile(through):
    model = await through("default", tools="none")
    answer = await model.send({"messages": [user("hi")], "tools": TOOLS, "tool_choice": "required"})
    assert answer.status == 200 and "tools" not in answer.engine_body and "tool_choice" not in answer.engine_body


async def test_coder_force_tools_profile_forces_required_until_a_tool_result(through):
    model = await through("coder-force-tools")
    answer = await model.send({"messages": [user("read a.txt")], "tools": TOOLS})
    assert answer.status == 200 and answer.engine_body["tool_choice"] == "required"
    assert answer.headers["X-Sparkd-Fixups"] == "force_tool_choice"
    call = {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": "{\"path\": \"a.txt\"}"}}
    after = [user("read a.txt"), {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c1", "content": "hello"}]
    answer = await model.send({"messages": after, "tools": TOOLS, "tool_choice": "auto"})
    assert answer.status == 200 and answer.engine_body["tool_choice"] == "auto"
    answer = await model.send({"messages": [user("hi")], "tools": TOOLS, "tool_choice": "none"})
    assert answer.engine_body["tool_choice"] == "none"


async def test_vision_profile_keeps_images(through):
    model = await through("vision", tools="none")
    content = [{"type": "text", "text": "what is this"}, IMAGE]
    answer = await model.send({"messages": [user(content)], "max_tokens": 0, "tools": TOOLS})
    assert answer.status == 200, answer.body
    assert answer.engine_body == {"model": model.sparkd.model("m"), "messages": [user(content)]}


async def test_qwen3_next_profile_flattens_text_only_content(through):
    model = await through("qwen3-next")
    answer = await model.send(
        {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, user([{"type": "text", "text": "hi"}]), user([{"type": "text", "text": "x"}, IMAGE])]}
    )
    assert answer.status == 200
    assert answer.engine_body["messages"] == [{"role": "system", "content": "Be brief."}, user("hi"), user([{"type": "text", "text": "x"}, IMAGE])]


async def test_gemma_profile_merges_system_and_repairs_alternation(through):
    model = await through("gemma")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "assistant", "content": "Hello! How can I help?"},
        user("first"),
        user([{"type": "text", "text": "second"}]),
        {"role": "assistant", "content": "ok"},
        {"role": "assistant", "content": "more"},
        user("third"),
    ]
    answer = await model.send({"messages": messages})
    assert answer.status == 200, answer.body
    assert answer.engine_body["messages"] == [
        user("You are terse."),
        {"role": "assistant", "content": "Hello! How can I help?"},
        user("first\n\nsecond"),
        {"role": "assistant", "content": "ok\n\nmore"},
        user("third"),
    ]
    assert answer.headers["X-Sparkd-Fixups"] == "flatten_content,merge_system,alternate_roles"


async def test_llama_profile_repairs_alternation_and_keeps_the_system_prompt(through):
    model = await through("llama")
    answer = await model.send({"messages": [{"role": "system", "content": "S"}, user("a"), user("b"), {"role": "assistant", "content": "c"}]})
    assert answer.status == 200
    assert answer.engine_body["messages"] == [{"role": "system", "content": "S"}, user("a\n\nb"), {"role": "assistant", "content": "c"}]


async def test_thinking_profile_maps_reasoning_controls(through):
    model = await through("thinking")
    for field, expected in (({"reasoning_effort": "high"}, True), ({"reasoning": {"effort": "none"}}, False), ({"thinking": {"type": "enabled"}}, True)):
        answer = await model.send({"messages": [user("hi")], **field})
        assert answer.status == 200 and answer.engine_body["chat_template_kwargs"] == {"enable_thinking": expected}, field
    answer = await model.send({"messages": [user("hi")]})
    assert "chat_template_kwargs" not in answer.engine_body


async def test_thinking_off_profile_defaults_thinking_off(through):
    model = await through("thinking-off")
    answer = await model.send({"messages": [user("hi")], "chat_template_kwargs": {"custom": 1}})
    assert answer.engine_body["chat_template_kwargs"] == {"custom": 1, "enable_thinking": False}
    answer = await model.send({"messages": [user("hi")], "reasoning_effort": "medium"})
    assert answer.engine_body["chat_template_kwargs"] == {"enable_thinking": True}
    answer = await model.send({"messages": [user("hi")], "chat_template_kwargs": {"enable_thinking": True}})
    assert answer.engine_body["chat_template_kwargs"] == {"enable_thinking": True} and "X-Sparkd-Fixups" not in answer.headers


async def test_a_profile_table_extends_a_builtin(through):
    settings = {"profiles": {"house": {"extends": "gemma", "default_max_tokens": 100, "thinking_flag": "enable_thinking", "thinking_default": False}}}
    model = await through("house", settings=settings)
    answer = await model.send({"messages": [{"role": "system", "content": "S"}, user("q")]})
    assert answer.status == 200, answer.body
    assert answer.engine_body == {
        "model": model.sparkd.model("m"),
        "messages": [user("S\n\nq")],
        "max_tokens": 100,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    # /v1/models says which profile and tool handling each model has
    async with model.session.get(model.sparkd.base_url + "/v1/models") as response:
        entry = (await response.json())["data"][0]
    assert entry["profile"] == "house" and entry["tools"] == "full"
