"""Anthropic's Messages API and OpenAI's Responses API in-process: error shapes, body checks, fixups, caps (issue 14, points 5-6)."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
from aiohttp import web

from sparkd.config import ModelConfig
from sparkd.engine.client import Endpoint
from sparkd.errors import ApiError, BadRequest, Forbidden, ModelBusy, NotFound, ServiceUnavailable, Unauthorized
from sparkd.fixups import BUILTIN_PROFILES, compile_profile
from sparkd.fixups.context import TokenizeFailures
from sparkd.fixups.messages import merge_system
from sparkd.fixups.reasoning import map_thinking
from sparkd.fixups.tools import force_tool_choice, strip_tools
from sparkd.http import responses
from sparkd.http.anthropic import engine_answer, error_type, is_anthropic_path
from sparkd.http.app import error_middleware
from sparkd.http.validation import validate_body

TOOL = {"name": "read_file", "description": "Read a file", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}


# ---------------------------------------------------------------- which routes, which types


@pytest.mark.parametrize("path, expected", [
    ("/v1/messages", True), ("/v1/messages/count_tokens", True), ("/v1/qwen3-8b/messages", True),
    ("/v1/qwen3-8b/messages/count_tokens", True), ("/v1/chat/completions", False), ("/v1/responses", False),
    ("/v1/qwen3-8b/chat/completions", False), ("/v1/models", False), ("/api/status", False), ("/v1/messagesx", False),
])
def test_the_messages_routes_are_recognized_in_body_and_path_form(path: str, expected: bool) -> None:
    assert is_anthropic_path(path) is expected


@pytest.mark.parametrize("status, kind", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"), (404, "not_found_error"),
    (409, "invalid_request_error"), (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
    (502, "api_error"), (503, "overloaded_error"), (504, "api_error"),
])
def test_anthropic_error_types_follow_the_status(status: int, kind: str) -> None:
    assert error_type(status) == kind


# ---------------------------------------------------------------- the error middleware, through the anthropic SDK

REFUSALS: dict[str, ApiError] = {
    "auth": Unauthorized("no valid key: send x-api-key or Authorization: Bearer", code="missing_api_key"),
    "forbidden": Forbidden("the key 'ci' may not use model m", code="model_not_allowed"),
    "unknown": NotFound("model 'nope' is not configured on this server", code="model_not_found"),
    "busy": ModelBusy("model big holds the GPU", retry_after=12),
    "full": ServiceUnavailable("the queue is full (8 waiting)", retry_after=5, code="queue_full"),
    "failed": ApiError("model m failed to start: CUDA error", code="model_failed"),
    "bad": BadRequest("'messages' is empty: send at least one message", code="invalid_value"),
}


@pytest.fixture
async def refusing(aiohttp_client: Any) -> Any:
    async def handler(request: web.Request) -> web.Response:
        raise REFUSALS[request.headers["x-refusal"]]

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/v1/{tail:.+}", handler)
    return await aiohttp_client(app)


@pytest.mark.parametrize("refusal, status, kind, exception", [
    ("auth", 401, "authentication_error", anthropic.AuthenticationError),
    ("forbidden", 403, "permission_error", anthropic.PermissionDeniedError),
    ("unknown", 404, "not_found_error", anthropic.NotFoundError),
    ("busy", 429, "rate_limit_error", anthropic.RateLimitError),
    ("full", 503, "overloaded_error", anthropic.InternalServerError),
    ("failed", 500, "api_error", anthropic.InternalServerError),
    ("bad", 400, "invalid_request_error", anthropic.BadRequestError),
])
async def test_errors_on_the_messages_routes_are_anthropic_shaped_and_the_sdk_raises_them(
    refusing: Any, refusal: str, status: int, kind: str, exception: type[Exception]
) -> None:
    response = await refusing.post("/v1/messages", json={}, headers={"x-refusal": refusal})
    body = await response.json()
    assert response.status == status
    assert body == {"type": "error", "error": {"type": kind, "message": REFUSALS[refusal].message, "code": REFUSALS[refusal].code}}
    if REFUSALS[refusal].retry_after is not None:
        assert response.headers["Retry-After"] == str(REFUSALS[refusal].retry_after)

    client = anthropic.AsyncAnthropic(base_url=str(refusing.make_url("")), api_key="k" * 20, max_retries=0,
                                      default_headers={"x-refusal": refusal})
    with pytest.raises(exception) as raised:
        await client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == status  # type: ignore[attr-defined]
    assert REFUSALS[refusal].message in str(raised.value)
    await client.close()


async def test_the_other_routes_keep_openais_shape(refusing: Any) -> None:
    response = await refusing.post("/v1/chat/completions", json={}, headers={"x-refusal": "auth"})
    body = await response.json()
    assert response.status == 401 and body["error"]["code"] == "missing_api_key" and "type" not in body


async def test_an_unknown_path_under_messages_is_an_anthropic_not_found(aiohttp_client: Any) -> None:
    app = web.Application(middlewares=[error_middleware])
    client = await aiohttp_client(app)
    response = await client.post("/v1/messages/batches")
    body = await response.json()
    assert response.status == 404 and body["type"] == "error" and body["error"]["type"] == "not_found_error"


# ---------------------------------------------------------------- the engine's own errors


def _engine(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


def _read(response: web.StreamResponse) -> Any:
    assert isinstance(response, web.Response) and isinstance(response.body, bytes)
    return json.loads(response.body)


def test_an_engine_without_the_messages_api_gets_a_not_found_naming_the_model() -> None:
    answer = engine_answer(_engine(404, {"detail": "Not Found"}), "smollm2-135m-cpu", "/v1/messages")
    body = _read(answer)
    assert answer.status == 404 and body["type"] == "error" and body["error"]["type"] == "not_found_error"
    message = body["error"]["message"]
    assert "smollm2-135m-cpu" in message and "/v1/messages" in message and "/v1/chat/completions" in message
    assert "Not Found" not in message.split(":")[0]


def test_an_openai_shaped_engine_error_is_reshaped_and_an_anthropic_one_kept() -> None:
    openai_shaped = _engine(400, {"error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": None, "code": 400}})
    body = _read(engine_answer(openai_shaped, "m", "/v1/messages"))
    assert body["error"]["type"] == "invalid_request_error" and "max_tokens is too large" in body["error"]["message"]
    kept = _engine(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "vLLM said so"}})
    assert engine_answer(kept, "m", "/v1/messages") is kept
    fine = _engine(200, {"type": "message"})
    assert engine_answer(fine, "m", "/v1/messages") is fine


# ---------------------------------------------------------------- body checks in the Messages API's terms


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": "8", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": 8, "messages": []}, "messages"),
    ({"max_tokens": 8, "messages": "hi"}, "messages"),
    ({"max_tokens": 8, "messages": [{"role": "system", "content": "be brief"}]}, "messages[0].role"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]"),
    ({"max_tokens": 8, "system": {"text": "x"}, "messages": [{"role": "user", "content": "hi"}]}, "system"),
    ({"max_tokens": 8, "stop_sequences": "END", "messages": [{"role": "user", "content": "hi"}]}, "stop_sequences"),
    ({"max_tokens": 8, "tool_choice": "auto", "messages": [{"role": "user", "content": "hi"}]}, "tool_choice"),
])
def test_a_messages_body_that_cannot_be_valid_is_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as refused:
        validate_body("/v1/messages", body)
    assert refused.value.extra["param"] == param


def test_valid_messages_bodies_pass() -> None:
    validate_body("/v1/messages", {"max_tokens": 8, "system": [{"type": "text", "text": "be brief"}], "tools": [TOOL],
                                   "tool_choice": {"type": "auto"}, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    validate_body("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "hi"}]})  # no max_tokens there


# ---------------------------------------------------------------- fixups in Anthropic's shape


def test_tools_are_stripped_in_anthropics_shape() -> None:
    body = {"model": "m", "max_tokens": 8, "tools": [TOOL], "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "hi"}]}
    fixed, applied = compile_profile(BUILTIN_PROFILES["small-no-tools"], "full").apply(body)
    assert "tools" not in fixed and "tool_choice" not in fixed and "strip_tools" in applied
    assert strip_tools({"model": "m", "messages": []}) == {"model": "m", "messages": []}


def test_force_tool_choice_speaks_anthropics_tool_choice() -> None:
    body = {"tools": [TOOL], "messages": [{"role": "user", "content": "read a.txt"}]}
    assert force_tool_choice(body)["tool_choice"] == {"type": "any"}
    auto = force_tool_choice({**body, "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}})
    assert auto["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    named = {**body, "tool_choice": {"type": "tool", "name": "read_file"}}
    assert force_tool_choice(named) is named
    answered = {"tools": [TOOL], "messages": [
        {"role": "user", "content": "read a.txt"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "read_file", "input": {"path": "a.txt"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "hello"}]},
    ]}
    assert force_tool_choice(answered) is answered


def test_the_top_level_system_is_merged_for_templates_without_a_system_role() -> None:
    body = {"model": "m", "max_tokens": 8, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [{"role": "user", "content": "Hi"}]}
    fixed, applied = compile_profile(BUILTIN_PROFILES["gemma"], "full").apply(body)
    assert "system" not in fixed and "merge_system" in applied
    assert fixed["messages"] == [{"role": "user", "content": "Be brief.\n\nHi"}]
    assert body["system"] == [{"type": "text", "text": "Be brief."}]  # the input is untouched
    assert merge_system({"system": "", "messages": [{"role": "user", "content": "Hi"}]})["messages"] == [{"role": "user", "content": "Hi"}]


# ---------------------------------------------------------------- the Responses API


def test_instructions_are_merged_into_the_first_input_for_templates_without_a_system_role() -> None:
    assert merge_system({"instructions": "Be brief.", "input": "Hi"}) == {"input": "Be brief.\n\nHi"}
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]
    assert merge_system({"instructions": "Be brief.", "input": items})["input"] == [
        {"role": "user", "content": [{"type": "input_text", "text": "Be brief."}, {"type": "input_text", "text": "Hi"}]}]
    answered = [{"type": "function_call_output", "call_id": "c1", "output": "42"}]
    assert merge_system({"instructions": "Be brief.", "input": answered})["input"] == [{"role": "user", "content": "Be brief."}, *answered]
    assert merge_system({"instructions": "", "input": "Hi"}) == {"input": "Hi"}
    odd = {"instructions": "Be brief.", "input": 5}
    assert merge_system(odd) is odd


def test_reasoning_effort_of_a_responses_request_sets_the_thinking_flag() -> None:
    body = {"model": "m", "input": "hi", "reasoning": {"effort": "none"}}
    assert map_thinking(body, "enable_thinking", None)["chat_template_kwargs"] == {"enable_thinking": False}
    assert map_thinking({**body, "reasoning": {"effort": "high"}}, "enable_thinking", False)["chat_template_kwargs"] == {"enable_thinking": True}
    fixed, applied = compile_profile(BUILTIN_PROFILES["thinking-off"], "full").apply({"model": "m", "input": "hi"})
    assert fixed["chat_template_kwargs"] == {"enable_thinking": False} and "map_thinking" in applied


def test_the_chat_view_of_a_responses_request() -> None:
    body = {"instructions": "Be brief.", "max_output_tokens": 100, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
    ], "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}
    view = responses.chat_view(body)
    assert view["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
    ]
    assert view["max_tokens"] == 100 and view["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert responses.chat_view({"input": "Hi"})["messages"] == [{"role": "user", "content": "Hi"}]


class CountingEngine:
    """An engine whose /tokenize answers ``count`` (the request path's only engine call before the proxy)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.asked: list[tuple[str, Any]] = []

    async def post_json(self, endpoint: Endpoint, path: str, payload: Any = None, timeout: float = 30.0) -> Any:
        self.asked.append((path, payload))
        return {"count": self.count}


async def test_max_output_tokens_is_capped_by_the_exact_count() -> None:
    model = ModelConfig(name="m", image="i", max_model_len=4096)
    fixups = compile_profile(BUILTIN_PROFILES["default"], "full")
    body = {"model": "m", "input": "What is the capital of France?", "max_output_tokens": 32000}
    assert responses.needs_fitting(fixups, model, "/v1/responses", body)
    engine = CountingEngine(20)
    fitted, headers = await responses.fit(engine, Endpoint(1, "k"), model, fixups, "/v1/responses", body, TokenizeFailures())  # type: ignore[arg-type]
    assert fitted["max_output_tokens"] == 4096 - 20 - 32 and "max_tokens" not in fitted
    assert headers["X-Sparkd-Max-Tokens-Capped"] == "requested=32000 sent=4044 prompt_tokens=20 max_model_len=4096 counted=exact"
    assert engine.asked == [("/tokenize", {"model": "m", "messages": [{"role": "user", "content": body["input"]}]})]
    small = {"model": "m", "input": "Hi", "max_output_tokens": 64}
    assert not responses.needs_fitting(fixups, model, "/v1/responses", small)


async def test_a_responses_prompt_that_fills_the_context_is_refused() -> None:
    model = ModelConfig(name="m", image="i", max_model_len=4096)
    fixups = compile_profile(BUILTIN_PROFILES["default"], "full")
    body = {"model": "m", "input": "word " * 5000, "max_output_tokens": 100}
    with pytest.raises(BadRequest) as refused:
        await responses.fit(CountingEngine(5000), Endpoint(1, "k"), model, fixups, "/v1/responses", body, TokenizeFailures())  # type: ignore[arg-type]
    assert refused.value.code == "context_length_exceeded"
