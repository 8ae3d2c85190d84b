"""Tool fixups: strip tool parameters for models without tool support, force tool use for models that need it.

Pure functions body → body (the same object when nothing changed); they never raise.
"""

from __future__ import annotations

from typing import Any

TOOL_KEYS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")
TOOL_RESULT_ROLES = frozenset({"tool", "function"})


def strip_tools(body: dict[str, Any]) -> dict[str, Any]:
    """Drop every tool parameter: the model's template or parser cannot handle them."""
    if not any(key in body for key in TOOL_KEYS):
        return body
    return {key: value for key, value in body.items() if key not in TOOL_KEYS}


def has_tool_results(messages: Any) -> bool:
    return isinstance(messages, list) and any(isinstance(m, dict) and m.get("role") in TOOL_RESULT_ROLES for m in messages)


def force_tool_choice(body: dict[str, Any]) -> dict[str, Any]:
    """``tool_choice: "required"`` when tools are offered, the client left the choice to the
    model (absent or ``"auto"``), and the conversation holds no tool result yet.

    Models such as Qwen-Coder otherwise answer in prose with a tool call inside it;
    after a tool result they must be free to answer in text. An explicit ``"none"``
    or a named function is the client's decision and is kept.
    """
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return body
    if is_anthropic_tools(tools):
        return _force_anthropic_tool_choice(body)
    if body.get("tool_choice", "auto") != "auto" or has_tool_results(body.get("messages")):
        return body
    return {**body, "tool_choice": "required"}


def is_anthropic_tools(tools: list[Any]) -> bool:
    """Anthropic's Messages API declares a tool as {name, input_schema}; OpenAI's as {type: function, ...}."""
    return any(isinstance(t, dict) and "input_schema" in t for t in tools)


def _has_anthropic_tool_results(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in m["content"])
        for m in messages
    )


def _force_anthropic_tool_choice(body: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's shape of the same rule: ``{"type": "any"}`` replaces an absent or ``auto`` choice."""
    choice = body.get("tool_choice")
    if choice is not None and not (isinstance(choice, dict) and choice.get("type") == "auto"):
        return body
    if _has_anthropic_tool_results(body.get("messages")):
        return body
    forced: dict[str, Any] = {"type": "any"}
    if isinstance(choice, dict) and "disable_parallel_tool_use" in choice:
        forced["disable_parallel_tool_use"] = choice["disable_parallel_tool_use"]
    return {**body, "tool_choice": forced}
