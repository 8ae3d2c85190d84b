"""Fixup profiles: which request fixups a model gets, as declarative data.

A model names its profile in its table (``profile = "gemma"``; no profile means
``default``). The built-in profiles below cover the seed's catalog; a
``[profiles.<name>]`` table in sparkd.toml adds one or replaces a built-in, and
may start from another with ``extends = "<name>"`` (keys it does not set come
from there). Every field of ``Profile`` is a key of such a table.

A profile compiles into ``Fixups``: an ordered tuple of pure steps body → body
plus the settings of the context cap, which needs a token count and so runs
later, in the request path (see ``tokens.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Literal

from .messages import alternate_roles, flatten_content, merge_system
from .reasoning import map_thinking
from .tokens import normalize_max_tokens, set_default_max_tokens
from .tools import force_tool_choice, strip_tools

ToolMode = Literal["full", "none", "force-required"]
Body = dict[str, Any]
Step = tuple[str, Callable[[Body], Body]]
DEFAULT_PROFILE = "default"


@dataclass(frozen=True)
class Profile:
    extends: str | None = None
    """Only in ``[profiles.<name>]`` tables: the profile whose values this one starts from."""
    description: str = ""
    tools: ToolMode | None = None
    """full: pass tool parameters through; none: strip them; force-required: ``tool_choice: required``
    when tools are offered and no tool result is in the conversation. Unset: the model's ``tools`` key."""
    cap_max_tokens: bool = True
    """Normalize ``max_tokens``/``max_completion_tokens`` (invalid values dropped) and cap them to the context."""
    context_margin: int = 32
    """Tokens kept free below ``max_model_len`` after an exact count."""
    default_max_tokens: int | None = None
    """``max_tokens`` to send when the client sends no valid limit (capped to the context like a client's)."""
    flatten_content: bool = False
    """Text-only content arrays become a plain string."""
    merge_system: bool = False
    """System/developer messages are merged into the first user turn."""
    alternate_roles: bool = False
    """Consecutive user (assistant) messages are merged; the conversation starts with a user turn."""
    thinking_flag: str | None = None
    """The ``chat_template_kwargs`` key that switches thinking (e.g. ``enable_thinking``); set from
    ``reasoning_effort``, ``reasoning.effort`` or ``thinking``."""
    thinking_default: bool | None = None
    """The thinking flag's value when the client says nothing (false = thinking off by default)."""


BUILTIN_PROFILES: dict[str, Profile] = {
    "default": Profile(description="cap max_tokens to the context; tools as the model's tools key says"),
    "passthrough": Profile(description="no fixups at all: the request reaches the engine as sent", tools="full", cap_max_tokens=False),
    "vision": Profile(description="as default; image content is kept as sent"),
    "small-no-tools": Profile(description="small models: tools stripped, text-only content flattened", tools="none", flatten_content=True),
    "coder-force-tools": Profile(
        description="coder models that answer tool calls in prose unless forced: tool_choice required until a tool result",
        tools="force-required",
    ),
    "qwen3-next": Profile(description="text-only content arrays flattened to a string", flatten_content=True),
    "gemma": Profile(
        description="no system role, strict user/assistant alternation: system merged into the first user turn, "
        "turns merged, text-only content flattened",
        merge_system=True,
        alternate_roles=True,
        flatten_content=True,
    ),
    "llama": Profile(description="strict user/assistant alternation repaired", alternate_roles=True),
    "thinking": Profile(
        description="reasoning_effort / reasoning.effort / thinking mapped to chat_template_kwargs.enable_thinking",
        thinking_flag="enable_thinking",
    ),
    "thinking-off": Profile(
        description="as thinking, and thinking off unless the client asks for it",
        thinking_flag="enable_thinking",
        thinking_default=False,
    ),
}


def expand_tables(tables: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``[profiles.<name>]`` tables with their ``extends`` chains resolved into full tables.

    Returns the expanded tables and, per table that could not be expanded, why
    (an unknown base, a cycle). Inside table X, ``extends = "Y"`` means the table
    Y when there is one (and Y is not X), else the built-in profile Y.
    """
    expanded: dict[str, dict[str, Any]] = {}
    problems: dict[str, str] = {}

    def expand(name: str, chain: tuple[str, ...]) -> dict[str, Any] | None:
        table = tables[name]
        if not isinstance(table, dict):
            return None
        base_name = table.get("extends")
        if base_name is None:
            return dict(table)
        if not isinstance(base_name, str):
            return dict(table)  # the type check of 'extends' reports it
        if base_name in tables and base_name != name:
            if base_name in chain:
                problems[name] = f"a cycle of extends: {' -> '.join((*chain, name, base_name))}"
                return None
            base = expand(base_name, (*chain, name))
            if base is None:
                problems.setdefault(name, f"its base profile {base_name!r} is invalid")
                return None
        elif base_name in BUILTIN_PROFILES:
            base = profile_table(BUILTIN_PROFILES[base_name])
        else:
            problems[name] = f"unknown profile {base_name!r} in extends (known: {', '.join(sorted({*BUILTIN_PROFILES, *tables}))})"
            return None
        base.pop("description", None)
        return {**base, **table}

    for name in tables:
        result = expand(name, ())
        if result is not None:
            expanded[name] = result
    return expanded, problems


def profile_table(profile: Profile) -> dict[str, Any]:
    """A profile as the table that would define it (unset optional keys left out)."""
    return {f.name: getattr(profile, f.name) for f in fields(Profile) if getattr(profile, f.name) is not None}


@dataclass(frozen=True)
class Fixups:
    """A profile compiled for one model: its body steps in order, and the cap's settings."""

    tools: ToolMode
    steps: tuple[Step, ...]
    cap_max_tokens: bool
    context_margin: int

    def apply(self, body: Body) -> tuple[Body, tuple[str, ...]]:
        """The fixed body (``body`` itself when no step changed it) and the names of the steps that did."""
        applied: list[str] = []
        for name, step in self.steps:
            fixed = step(body)
            if fixed is not body:
                applied.append(name)
                body = fixed
        return body, tuple(applied)


def compile_profile(profile: Profile, model_tools: ToolMode) -> Fixups:
    tools = profile.tools or model_tools
    steps: list[Step] = []
    if tools == "none":
        steps.append(("strip_tools", strip_tools))
    elif tools == "force-required":
        steps.append(("force_tool_choice", force_tool_choice))
    if profile.thinking_flag:
        steps.append(("map_thinking", partial(map_thinking, flag=profile.thinking_flag, default=profile.thinking_default)))
    if profile.flatten_content:
        steps.append(("flatten_content", flatten_content))
    if profile.merge_system:
        steps.append(("merge_system", merge_system))
    if profile.alternate_roles:
        steps.append(("alternate_roles", alternate_roles))
    if profile.cap_max_tokens:
        steps.append(("normalize_max_tokens", normalize_max_tokens))
    if profile.default_max_tokens is not None:
        steps.append(("default_max_tokens", partial(set_default_max_tokens, default=profile.default_max_tokens)))
    return Fixups(tools, tuple(steps), profile.cap_max_tokens, profile.context_margin)
