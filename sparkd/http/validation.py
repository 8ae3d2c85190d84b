"""The shape of a request body, checked before anything reaches an engine.

Only what is certainly wrong is refused, with a 400 naming the field (``param``)
and what it must be: ``messages`` not an array, ``stream`` not a boolean, a
message without a role, ... Fields sparkd does not know pass through; token
limits are the fixups' business (invalid ones are dropped there, not refused).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import BadRequest

ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
ANTHROPIC_ROLES = frozenset({"user", "assistant"})

_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _NAMES.get(type(value), type(value).__name__)


def _fail(param: str, expected: str, value: Any, hint: str = "") -> BadRequest:
    return BadRequest(
        f"'{param}' must be {expected}, found {_kind(value)}{hint}",
        code="invalid_type",
        extra={"param": param},
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


Check = Callable[[Any], bool]
"""A test of one JSON value: does it have the shape the field needs?"""

# Optional top-level fields: name → (test, what it must be). null always passes.
COMMON: dict[str, tuple[Check, str]] = {
    "stream": (lambda v: isinstance(v, bool), "true or false"),
    "stream_options": (lambda v: isinstance(v, dict), "an object such as {\"include_usage\": true}"),
    "n": (_is_int, "an integer"),
    "seed": (_is_int, "an integer"),
    "temperature": (_is_number, "a number"),
    "top_p": (_is_number, "a number"),
    "frequency_penalty": (_is_number, "a number"),
    "presence_penalty": (_is_number, "a number"),
    "stop": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)), "a string or an array of strings"),
    "user": (lambda v: isinstance(v, str), "a string"),
    "tools": (lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v), "an array of tool objects"),
    "tool_choice": (lambda v: isinstance(v, (str, dict)), "\"auto\", \"none\", \"required\" or an object naming a tool"),
    "response_format": (lambda v: isinstance(v, dict), "an object such as {\"type\": \"json_object\"}"),
    "logit_bias": (lambda v: isinstance(v, dict), "an object"),
    "chat_template_kwargs": (lambda v: isinstance(v, dict), "an object"),
    "metadata": (lambda v: isinstance(v, dict), "an object"),
}


def validate_body(path: str, body: dict[str, Any]) -> None:
    """Raise a precise 400 when ``body`` cannot be a valid request for engine path ``path``."""
    for name, value in body.items():
        rule = COMMON.get(name)
        if rule is not None and value is not None and not rule[0](value):
            raise _fail(name, rule[1], value)
    if path in ANTHROPIC_PATHS:
        _anthropic(path, body)
    elif path.endswith("/chat/completions"):
        _messages(body)
    elif path.endswith("/completions"):
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)):
            raise _fail("prompt", "a string or an array (of strings or token ids)", prompt, "; /v1/completions needs a prompt")
    elif path.endswith("/embeddings"):
        value = body.get("input")
        if not isinstance(value, (str, list)):
            raise _fail("input", "a string or an array", value, "; /v1/embeddings needs an input")


def _message_list(body: dict[str, Any], path: str) -> list[Any]:
    """The body's non-empty ``messages`` array, or the 400 that says what is wrong with it."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _fail("messages", "an array of message objects", messages, f"; {path} needs messages")
    if not messages:
        raise BadRequest("'messages' is empty: send at least one message", code="invalid_value", extra={"param": "messages"})
    return messages


def _messages(body: dict[str, Any]) -> None:
    for index, message in enumerate(_message_list(body, "/v1/chat/completions")):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _fail(where, "an object with role and content", message)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _fail(f"{where}.role", "a string such as \"user\", \"assistant\" or \"system\"", role)
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _fail(f"{where}.content", "a string or an array of content parts", content)
        if isinstance(content, list):
            for part_index, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise _fail(f"{where}.content[{part_index}]", "an object with a type, e.g. {\"type\": \"text\", \"text\": ...}", part)


def _anthropic(path: str, body: dict[str, Any]) -> None:
    """Anthropic's Messages API: ``max_tokens`` is required (it has no default), roles are user and assistant
    only, the system prompt is the top-level ``system`` (a string or text blocks)."""
    if path == "/v1/messages" and not (_is_int(body.get("max_tokens")) and body["max_tokens"] >= 1):
        raise _fail("max_tokens", "a positive integer", body.get("max_tokens"), "; the Messages API requires max_tokens")
    system = body.get("system")
    if system is not None and not isinstance(system, str) and not (
        isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in system)
    ):
        raise _fail("system", "a string or an array of text blocks such as {\"type\": \"text\", \"text\": ...}", system)
    anthropic_fields: tuple[tuple[str, Check, str], ...] = (
        ("stop_sequences", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "an array of strings"),
        ("top_k", _is_int, "an integer"),
        ("thinking", lambda v: isinstance(v, dict), "an object such as {\"type\": \"enabled\", \"budget_tokens\": 1024}"),
        ("tool_choice", lambda v: isinstance(v, dict), "an object such as {\"type\": \"auto\"}"),
    )
    for name, test, expected in anthropic_fields:
        if body.get(name) is not None and not test(body[name]):
            raise _fail(name, expected, body[name])
    for index, message in enumerate(_message_list(body, path)):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _fail(where, "an object with role and content", message)
        role = message.get("role")
        if role not in ANTHROPIC_ROLES:
            hint = "; the system prompt goes in the top-level 'system'" if role == "system" else ""
            raise _fail(f"{where}.role", "\"user\" or \"assistant\"", role, hint)
        content = message.get("content")
        if not isinstance(content, (str, list)):
            raise _fail(f"{where}.content", "a string or an array of content blocks", content)
        if isinstance(content, list):
            for block_index, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise _fail(f"{where}.content[{block_index}]", "an object with a type, e.g. {\"type\": \"text\", \"text\": ...}", block)
