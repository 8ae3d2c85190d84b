"""Message fixups for chat templates that are stricter than OpenAI's API.

Every function takes a request body and returns a body: the same object when
nothing needed changing, a new one (the input untouched) when something did.
None of them raises, whatever JSON they are given; parts of the body that do not
have the expected shape are left as they are.
"""

from __future__ import annotations

from typing import Any

SYSTEM_ROLES = frozenset({"system", "developer"})
TEXT_PART = "text"


def _is_system(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") in SYSTEM_ROLES


def _text_only(content: list[Any]) -> bool:
    return all(isinstance(p, dict) and p.get("type") == TEXT_PART and isinstance(p.get("text"), str) for p in content)


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of an array joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _as_parts(content: Any) -> list[Any]:
    if isinstance(content, list):
        return list(content)
    text = content_text(content)
    return [{"type": TEXT_PART, "text": text}] if text else []


def join_content(first: Any, second: Any) -> Any:
    """Two contents as one: strings joined by a blank line, arrays concatenated."""
    if isinstance(first, list) or isinstance(second, list):
        return _as_parts(first) + _as_parts(second)
    a, b = content_text(first), content_text(second)
    return f"{a}\n\n{b}" if a and b else a or b


def flatten_content(body: dict[str, Any]) -> dict[str, Any]:
    """Text-only content arrays become one string (for templates that print ``content`` as text).

    Arrays holding anything else (images, audio) are kept: flattening would lose them.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return body
    out: list[Any] | None = None
    for index, message in enumerate(messages):
        if isinstance(message, dict) and isinstance(message.get("content"), list) and _text_only(message["content"]):
            if out is None:
                out = list(messages)
            out[index] = {**message, "content": "\n".join(p["text"] for p in message["content"])}
    return body if out is None else {**body, "messages": out}


def merge_system(body: dict[str, Any]) -> dict[str, Any]:
    """System (and developer) messages merged into the first user turn, for templates without a system role.

    The leading system messages become a prefix of the first message when it is the
    user's (else a user message of their own, in front); a system message later in the conversation
    becomes a user message, which ``alternate_roles`` then merges with its neighbours. Anthropic's
    top-level ``system`` is merged the same way, and so are the Responses API's ``instructions``.
    """
    if isinstance(body.get("instructions"), str) and "input" in body:
        return _merge_instructions(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        return body
    if body.get("system") is not None:
        body, messages = _merge_top_level_system(body, messages)
    if not any(_is_system(m) for m in messages):
        return body
    start = 0
    while start < len(messages) and _is_system(messages[start]):
        start += 1
    prefix = "\n\n".join(t for t in (content_text(m.get("content")) for m in messages[:start]) if t)
    rest = [{**m, "role": "user"} if _is_system(m) else m for m in messages[start:]]
    if prefix:
        first = rest[0] if rest else None
        if isinstance(first, dict) and first.get("role") == "user":
            rest[0] = {**first, "content": join_content(prefix, first.get("content"))}
        else:
            rest.insert(0, {"role": "user", "content": prefix})
    return {**body, "messages": rest}


def _merge_top_level_system(body: dict[str, Any], messages: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    """Anthropic's Messages API has the system prompt at the top (``system``: a string or text
    blocks), which vLLM renders as a system message: it becomes a system message here, merged below."""
    text = content_text(body["system"])
    out = {key: value for key, value in body.items() if key != "system"}
    merged = [{"role": "system", "content": text}, *messages] if text else list(messages)
    out["messages"] = merged
    return out, merged


def _merge_instructions(body: dict[str, Any]) -> dict[str, Any]:
    """The Responses API's ``instructions`` (rendered by vLLM as a system message) as a prefix of the first user input."""
    text, items = body["instructions"], body["input"]
    out = {key: value for key, value in body.items() if key != "instructions"}
    if not text:
        return out
    if isinstance(items, str):
        out["input"] = f"{text}\n\n{items}" if items else text
        return out
    if not isinstance(items, list):
        return body  # not a Responses input the engine takes: its refusal says so
    first = items[0] if items else None
    if isinstance(first, dict) and first.get("role") == "user" and isinstance(first.get("content"), (str, list)):
        content = first["content"]
        joined = f"{text}\n\n{content}" if isinstance(content, str) else [{"type": "input_text", "text": text}, *content]
        out["input"] = [{**first, "content": joined}, *items[1:]]
    else:
        out["input"] = [{"role": "user", "content": text}, *items]
    return out


def _mergeable(message: Any, role: str) -> bool:
    return isinstance(message, dict) and message.get("role") == role and "tool_calls" not in message and "function_call" not in message


def alternate_roles(body: dict[str, Any]) -> dict[str, Any]:
    """Repair user/assistant alternation for templates that refuse anything else (Gemma, Llama).

    Consecutive user (or assistant) messages are merged into one; a conversation
    whose first turn after the system messages is the assistant's gets an empty
    user turn in front. Messages carrying tool calls and tool results are never merged.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return body
    out: list[Any] = []
    changed = False
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("user", "assistant") and out and _mergeable(out[-1], role) and _mergeable(message, role):
            out[-1] = {**out[-1], "content": join_content(out[-1].get("content"), message.get("content"))}
            changed = True
            continue
        out.append(message)
    first = next((i for i, m in enumerate(out) if not _is_system(m)), None)
    if first is not None and isinstance(out[first], dict) and out[first].get("role") == "assistant":
        out.insert(first, {"role": "user", "content": ""})
        changed = True
    return {**body, "messages": out} if changed else body
