"""The Responses API's ``max_output_tokens`` fitted into the context like a chat's ``max_tokens``.

A Responses request is a chat in another shape (``instructions`` is the system
prompt, ``input`` a string or a list of items), so it is fitted through its chat
view: the view is counted by the engine's ``/tokenize`` and capped by
``context.fit``, and a lowered limit is written back as ``max_output_tokens``.
Every other path goes to ``context`` unchanged.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..engine.client import Endpoint, EngineClient
from ..fixups import Fixups, context

RESPONSES_PATH = "/v1/responses"
CHAT_PATH = "/v1/chat/completions"
LIMIT = "max_output_tokens"
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def chat_view(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the chat the engine renders it to: messages, tools, and its limit as ``max_tokens``.

    Items that are not messages of text (images, files, tool calls and their outputs)
    are kept as they are: ``/tokenize`` refuses them, and the estimate stands in.
    """
    messages: list[Any] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        messages.extend(_as_message(item) for item in items)
    view: dict[str, Any] = {"messages": messages, "max_tokens": body.get(LIMIT)}
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        view["tools"] = [_as_chat_tool(tool) for tool in tools]
    return view


def _as_message(item: Any) -> Any:
    if not isinstance(item, dict) or item.get("type", "message") != "message" or not isinstance(item.get("role"), str):
        return item
    content = item.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS for p in content):
        content = [{"type": "text", "text": p.get("text")} for p in content]
    return {"role": item["role"], "content": content}


def _as_chat_tool(tool: Any) -> Any:
    if isinstance(tool, dict) and tool.get("type") == "function" and "function" not in tool:
        function = {key: tool[key] for key in ("name", "description", "parameters") if key in tool}
        return {"type": "function", "function": function}
    return tool


def needs_fitting(fixups: Fixups, model: ModelConfig, path: str, body: dict[str, Any]) -> bool:
    if path == RESPONSES_PATH:
        return context.needs_fitting(fixups, model, CHAT_PATH, chat_view(body))
    return context.needs_fitting(fixups, model, path, body)


def refuse_certain_overflow(model: ModelConfig, path: str, body: dict[str, Any]) -> None:
    """``context.refuse_certain_overflow`` for any path."""
    if path == RESPONSES_PATH:
        context.refuse_certain_overflow(model, CHAT_PATH, chat_view(body))
    else:
        context.refuse_certain_overflow(model, path, body)


async def fit(
    engine: EngineClient, endpoint: Endpoint, model: ModelConfig, fixups: Fixups, path: str, body: dict[str, Any],
    failures: context.TokenizeFailures,
) -> tuple[dict[str, Any], dict[str, str]]:
    """``context.fit`` for any path: the body with its limit capped, and the headers that say so."""
    if path != RESPONSES_PATH:
        return await context.fit(engine, endpoint, model, fixups, path, body, failures)
    view = chat_view(body)
    fitted, headers = await context.fit(engine, endpoint, model, fixups, CHAT_PATH, view, failures)
    if fitted is view or fitted.get("max_tokens") == body.get(LIMIT):
        return body, headers
    return {**body, LIMIT: fitted["max_tokens"]}, headers
