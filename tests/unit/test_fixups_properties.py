"""Properties of every fixup profile on arbitrary JSON (acceptance d of issue 4).

For every built-in profile, with every tool mode, on any JSON object and on
request-shaped ones: the fixups never raise, never raise ``max_tokens`` above
what the client asked, always leave valid JSON, are idempotent, and never
modify their input. The context cap is included, with an estimated budget and
with exact counts that leave room.
"""

from __future__ import annotations

import copy
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparkd.fixups import BUILTIN_PROFILES, compile_profile
from sparkd.fixups.tokens import Budget, ContextOverflow, cap_max_tokens, requested_limit, valid_limit

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIXUPS = [compile_profile(profile, tools) for profile in BUILTIN_PROFILES.values() for tools in ("full", "none", "force-required")]
# One profile with every step on, so each step meets every other.
EVERYTHING = compile_profile(
    BUILTIN_PROFILES["gemma"].__class__(
        tools="force-required", merge_system=True, alternate_roles=True, flatten_content=True,
        thinking_flag="enable_thinking", thinking_default=False, default_max_tokens=700,
    ),
    "full",
)
FIXUPS.append(EVERYTHING)

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=25)
limits = st.none() | st.integers(-10, 10**7) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4) | st.booleans()
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "other"]) | st.text(max_size=5) | st.integers()
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)})
image_part = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.just("data:image/png;base64,AAAA")})})
content = st.none() | st.text(max_size=60) | st.lists(text_part | image_part | json_values, max_size=4) | json_values
message = st.fixed_dictionaries(
    {"role": roles, "content": content},
    optional={"tool_calls": st.lists(json_values, max_size=2), "name": st.text(max_size=5), "tool_call_id": st.text(max_size=5)},
) | json_values
tools = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.text(max_size=8)})}), max_size=3)
requests = st.fixed_dictionaries(
    {"model": st.text(max_size=10) | json_values},
    optional={
        "messages": st.lists(message, max_size=6) | json_values,
        "prompt": st.text(max_size=50) | st.lists(st.integers(0, 1000), max_size=10) | json_values,
        "max_tokens": limits,
        "max_completion_tokens": limits,
        "tools": tools | json_values,
        "tool_choice": st.sampled_from(["auto", "none", "required"]) | json_values,
        "parallel_tool_calls": json_values,
        "functions": json_values,
        "function_call": json_values,
        "reasoning_effort": st.sampled_from(["none", "minimal", "low", "medium", "high"]) | json_values,
        "reasoning": st.fixed_dictionaries({}, optional={"effort": st.sampled_from(["low", "none"]), "enabled": st.booleans()}) | json_values,
        "thinking": st.booleans() | st.fixed_dictionaries({"type": st.sampled_from(["enabled", "disabled", "x"])}) | json_values,
        "chat_template_kwargs": st.dictionaries(st.sampled_from(["enable_thinking", "x"]), json_values, max_size=2) | json_values,
        "stream": json_values,
    },
)
bodies = requests | st.dictionaries(st.text(max_size=10), json_values, max_size=6)
fixups = st.sampled_from(FIXUPS)


def run(fix, body):
    fixed, _ = fix.apply(body)
    if fix.cap_max_tokens:
        fixed, _ = cap_max_tokens(fixed, Budget.estimated(fixed, 4096))
    return fixed


@SETTINGS
@given(fixups, bodies)
def test_never_raises_and_never_modifies_the_input(fix, body):
    before = copy.deepcopy(body)
    run(fix, body)
    assert body == before


@SETTINGS
@given(fixups, bodies)
def test_leaves_valid_json(fix, body):
    fixed = run(fix, body)
    assert isinstance(fixed, dict)
    assert json.loads(json.dumps(fixed, allow_nan=False)) == fixed


@SETTINGS
@given(fixups, bodies)
def test_is_idempotent(fix, body):
    once = run(fix, body)
    assert run(fix, once) == once


@SETTINGS
@given(fixups, bodies, st.integers(0, 5000), st.integers(1, 8192))
def test_never_raises_max_tokens_above_what_the_client_asked(fix, body, prompt_tokens, max_model_len):
    asked = requested_limit(body)
    fixed, _ = fix.apply(body)
    if fix.cap_max_tokens:  # as in the request path: the cap belongs to the profile
        try:
            fixed, _ = cap_max_tokens(fixed, Budget(max_model_len, prompt_tokens, True, fix.context_margin))
        except ContextOverflow:
            assert prompt_tokens >= max_model_len
            return
    sent = [valid_limit(fixed.get(k)) for k in ("max_tokens", "max_completion_tokens")]
    sent = [v for v in sent if v is not None]
    for key in ("max_tokens", "max_completion_tokens"):
        # A field is bounded by what the client put in that field (a profile without the
        # normalize step passes both through), or by its smallest limit when it was absent.
        sent_here, asked_here = valid_limit(fixed.get(key)), valid_limit(body.get(key))
        bound = asked_here if asked_here is not None else asked
        if sent_here is not None and bound is not None:
            assert sent_here <= bound
    if fix.cap_max_tokens:
        assert all(v <= max(1, max_model_len - prompt_tokens) for v in sent)
        # normalized: what is left is a valid integer, or null
        assert all(fixed.get(k) is None or type(fixed[k]) is int for k in ("max_tokens", "max_completion_tokens"))


@SETTINGS
@given(fixups, bodies, st.integers(0, 5000), st.integers(1, 8192))
def test_the_cap_is_idempotent_with_an_exact_count(fix, body, prompt_tokens, max_model_len):
    fixed, _ = fix.apply(body)
    budget = Budget(max_model_len, prompt_tokens, True, fix.context_margin)
    if not fix.cap_max_tokens:
        return
    try:
        once, _ = cap_max_tokens(fixed, budget)
    except ContextOverflow:
        return
    again, capped = cap_max_tokens(once, budget)
    assert again == once and capped is None
