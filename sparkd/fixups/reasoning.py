"""Reasoning controls → the chat template's thinking flag.

Clients say "think" or "don't think" in several dialects: OpenAI's
``reasoning_effort``, the Responses API's ``reasoning: {"effort"}`` (also sent to
chat completions by some clients, with OpenRouter's ``{"enabled": bool}``), and
Anthropic's top-level ``thinking``. Hybrid-thinking models (Qwen3, GLM, ...) read
one boolean from ``chat_template_kwargs`` instead (``enable_thinking`` for most).
"""

from __future__ import annotations

from typing import Any

EFFORT_OFF = frozenset({"none"})


def _effort(value: Any) -> bool | None:
    if isinstance(value, str) and value:
        return value.lower() not in EFFORT_OFF
    return None


def requested_thinking(body: dict[str, Any]) -> bool | None:
    """What the client asked for: True (think), False (don't), None (said nothing we understand)."""
    thinking = body.get("thinking")
    if isinstance(thinking, bool):
        return thinking
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled"):
        return bool(thinking["type"] == "enabled")
    effort = _effort(body.get("reasoning_effort"))
    if effort is not None:
        return effort
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict):
        enabled = reasoning.get("enabled")
        if isinstance(enabled, bool):
            return enabled
        return _effort(reasoning.get("effort"))
    return None


def map_thinking(body: dict[str, Any], flag: str, default: bool | None) -> dict[str, Any]:
    """Set ``chat_template_kwargs[flag]`` from the client's reasoning controls, else to ``default``.

    A flag the client set in ``chat_template_kwargs`` itself always wins; a
    ``chat_template_kwargs`` that is not an object is left alone.
    """
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        return body
    if kwargs is not None and flag in kwargs:
        return body
    wanted = requested_thinking(body)
    if wanted is None:
        wanted = default
    if wanted is None:
        return body
    return {**body, "chat_template_kwargs": {**(kwargs or {}), flag: wanted}}
