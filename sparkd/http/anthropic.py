"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``): its error shape and its token count.

The request itself takes the same path as every other inference request
(``openai.py``); what differs is how a failure is told. Anthropic clients (Claude
Code, the ``anthropic`` SDK) read ``{"type": "error", "error": {"type", "message"}}``
and pick their exception by status code, so on these routes every error sparkd
raises, and every error answer the engine gives before a stream starts, is
rendered in that shape: the status is kept, the ``type`` follows from it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import structlog
from aiohttp import web

from ..engine.client import Endpoint, EngineClient, EngineError
from ..errors import ApiError
from .routing import ENDPOINT_ROOTS

log = structlog.get_logger("sparkd.anthropic")

MESSAGES_PATH = "/v1/messages"
COUNT_PATH = "/v1/messages/count_tokens"
PATHS = frozenset({MESSAGES_PATH, COUNT_PATH})
COUNT_TIMEOUT_S = 10.0
# What a count_tokens request may carry (vLLM refuses other fields there, such as max_tokens).
COUNT_FIELDS = ("messages", "system", "tools", "tool_choice", "thinking", "output_config", "chat_template_kwargs")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
"""Anthropic's error types by status; any other 4xx is invalid_request_error, any other 5xx api_error."""


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def is_anthropic_path(request_path: str) -> bool:
    """Whether a client's path is the Messages API, in the body form (``/v1/messages...``) or the path form (``/v1/<model>/messages...``)."""
    segments = request_path.split("/")[2:] if request_path.startswith("/v1/") else []
    if segments and segments[0] in ENDPOINT_ROOTS:
        return segments[0] == "messages"
    return len(segments) >= 2 and segments[1] == "messages"


def error_body(status: int, message: str, code: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    # sparkd's own code (e.g. context_length_exceeded) and details (a model's endpoints), for scripts: the SDKs ignore them
    error: dict[str, Any] = {**(extra or {}), "type": error_type(status), "message": message}
    if code:
        error["code"] = code
    return {"type": "error", "error": error}


def error_response(error: ApiError) -> web.Response:
    """``error`` as an Anthropic client reads it: same status and headers (``Retry-After``), Anthropic's body."""
    headers = dict(error.headers)
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return web.Response(
        status=error.status, body=json.dumps(error_body(error.status, error.message, error.code, error.extra)).encode(),
        content_type="application/json", headers=headers,
    )


def engine_answer(response: web.StreamResponse, model: str, path: str) -> web.StreamResponse:
    """The engine's answer on a Messages route, its errors in Anthropic's shape.

    A streamed answer went to the client already and is returned as it is. An error
    already in Anthropic's shape (vLLM's) passes unchanged; an OpenAI-shaped one is
    reshaped; a 404/405 means the engine has no Messages API at all (llama.cpp's
    server, for one), which its raw ``{"detail": "Not Found"}`` does not say.
    """
    if not isinstance(response, web.Response) or response.status < 400:
        return response
    raw = response.body if isinstance(response.body, bytes) else b""
    try:
        answer: Any = json.loads(raw)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and answer.get("type") == "error" and isinstance(answer.get("error"), dict):
        return response
    status = response.status
    if status in (404, 405):
        log.info("engine_lacks_endpoint", model=model, path=path, status=status)
        message = (
            f"model {model} does not serve POST {path} of the Anthropic Messages API (its engine answered {status}). "
            "Call this model through the OpenAI API at /v1/chat/completions with an OpenAI client, or use a "
            "vLLM model for Anthropic clients (GET /v1/models lists the models)"
        )
        return _reshaped(404, message, "endpoint_not_served", response)
    return _reshaped(status, f"model {model}: the engine refused the request ({status}): {_engine_message(answer, raw)}", None, response)


def _engine_message(answer: Any, raw: bytes) -> str:
    error = answer.get("error") if isinstance(answer, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    if isinstance(message, str):
        return message
    detail = answer.get("detail") if isinstance(answer, dict) else None
    if isinstance(detail, str):
        return detail
    return raw[:300].decode("utf-8", "replace") or "no reason given"


def _reshaped(status: int, message: str, code: str | None, original: web.Response) -> web.Response:
    headers = {name: value for name, value in original.headers.items() if name.lower() not in ("content-type", "content-length")}
    return web.Response(status=status, body=json.dumps(error_body(status, message, code)).encode(),
                        content_type="application/json", headers=headers)


async def count_input_tokens(engine: EngineClient, endpoint: Endpoint, model: str, body: dict[str, Any]) -> int | None:
    """The request's prompt tokens by the engine's own Messages count (system, tools and all), or None when it cannot say."""
    payload: dict[str, Any] = {"model": model}
    payload.update((key, body[key]) for key in COUNT_FIELDS if body.get(key) is not None)
    try:
        answer = await engine.post_json(endpoint, COUNT_PATH, payload, timeout=COUNT_TIMEOUT_S)
    except EngineError as error:
        log.info("count_tokens_failed", model=model, error=str(error)[:300], fallback="tokenize")
        return None
    count = answer.get("input_tokens") if isinstance(answer, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        log.info("count_tokens_failed", model=model, error="no input_tokens in the answer", fallback="tokenize")
        return None
    return count
