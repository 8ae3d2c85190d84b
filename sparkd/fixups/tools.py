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
    if body.get("tool_choice", "auto") != "auto" or has_tool_results(body.get("messages")):
        return body
    return {**body, "tool_choice": "required"}
