"""The request fixups, one pure function at a time, and the profiles that combine them."""

from __future__ import annotations

import copy

import pytest

from sparkd.fixups import BUILTIN_PROFILES, compile_profile
from sparkd.fixups.messages import alternate_roles, flatten_content, merge_system
from sparkd.fixups.profiles import Profile, expand_tables
from sparkd.fixups.reasoning import map_thinking
from sparkd.fixups.tokens import (
    Budget,
    ContextOverflow,
    cap_max_tokens,
    estimate_prompt_tokens,
    normalize_max_tokens,
    set_default_max_tokens,
    worth_counting,
)
from sparkd.fixups.tools import force_tool_choice, strip_tools

TOOLS = [{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]


def chat(*messages, **fields):
    return {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages], **fields}


# -- max_tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_tokens": 100}, {"max_tokens": 100}),
        ({"max_tokens": -1}, {}),
        ({"max_tokens": 0}, {}),
        ({"max_tokens": "100"}, {}),
        ({"max_tokens": True}, {}),
        ({"max_tokens": 1.5}, {}),
        ({"max_tokens": 64.0}, {"max_tokens": 64}),
        ({"max_tokens": None}, {"max_tokens": None}),
        ({"max_tokens": 300, "max_completion_tokens": 200}, {"max_tokens": 200, "max_completion_tokens": 200}),
        ({"max_tokens": -5, "max_completion_tokens": 200}, {"max_completion_tokens": 200}),
        ({"max_completion_tokens": float("inf")}, {}),
    ],
)
def test_normalize_max_tokens(fields, expected):
    body = {"model": "m", **fields}
    fixed = normalize_max_tokens(body)
    assert {k: v for k, v in fixed.items() if k != "model"} == expected
    assert all(type(v) is int for k, v in fixed.items() if k != "model" and v is not None)


def test_normalize_returns_the_same_object_when_nothing_changes():
    body = {"max_tokens": 10, "max_completion_tokens": 10}
    assert normalize_max_tokens(body) is body


def test_cap_with_an_exact_count_lowers_the_limit_and_says_so():
    body = {"max_tokens": 32000}
    fixed, capped = cap_max_tokens(body, Budget(32768, 31000, True, 32))
    assert fixed["max_tokens"] == 32768 - 31000 - 32
    assert capped.requested == 32000 and capped.sent == 1736
    assert body == {"max_tokens": 32000}  # the input is untouched


def test_cap_sets_both_keys_the_client_sent():
    fixed, capped = cap_max_tokens({"max_tokens": 5000, "max_completion_tokens": 5000}, Budget(4096, 1000, True))
    assert fixed == {"max_tokens": 3096, "max_completion_tokens": 3096} and capped.sent == 3096


def test_cap_leaves_a_fitting_request_alone_even_within_the_margin():
    body = {"max_tokens": 100}
    assert cap_max_tokens(body, Budget(4096, 1000, True, 32)) == (body, None)
    assert cap_max_tokens({}, Budget(4096, 1000, True)) == ({}, None)
    exact_fit = {"max_tokens": 3096}
    assert cap_max_tokens(exact_fit, Budget(4096, 1000, True, 32)) == (exact_fit, None)
    fixed, capped = cap_max_tokens({"max_tokens": 3097}, Budget(4096, 1000, True, 32))
    assert fixed["max_tokens"] == 3096 - 32 and capped.requested == 3097


def test_cap_never_uses_the_margin_to_refuse_a_prompt_that_fits():
    fixed, _ = cap_max_tokens({"max_tokens": 100}, Budget(4096, 4090, True, 32))
    assert fixed["max_tokens"] == 1


def test_exact_count_that_fills_the_context_is_an_overflow():
    with pytest.raises(ContextOverflow) as raised:
        cap_max_tokens({"max_tokens": 100}, Budget(32768, 35000, True))
    assert raised.value.budget.max_model_len == 32768
    with pytest.raises(ContextOverflow):
        cap_max_tokens({}, Budget(32768, 32768, True))


def test_an_estimate_caps_but_never_refuses():
    huge = chat(("user", "x" * 200_000), max_tokens=1000)
    budget = Budget.estimated(huge, 32768)
    assert budget.prompt_tokens > 32768 and not budget.exact
    assert cap_max_tokens(huge, budget) == (huge, None)
    small = chat(("user", "hello"), max_tokens=32768)
    fixed, capped = cap_max_tokens(small, Budget.estimated(small, 32768))
    # the seed's rule: max_model_len - estimate - max(512, 10 %)
    assert fixed["max_tokens"] == 32768 - estimate_prompt_tokens(small) - 3276
    assert capped.requested == 32768


def test_estimate_is_high_and_counts_images_tools_and_non_ascii():
    plain = estimate_prompt_tokens(chat(("user", "a" * 1000)))
    assert plain == 400 + 20 + 500
    assert estimate_prompt_tokens(chat(("user", "é" * 1000))) == 800 + 20 + 500
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}}, {"type": "text", "text": "a" * 10}]}
    assert estimate_prompt_tokens({"messages": [image]}) == 4 + 20 + 500 + 1500
    assert estimate_prompt_tokens(chat(("user", "a"), tools=TOOLS)) > estimate_prompt_tokens(chat(("user", "a")))
    assert estimate_prompt_tokens({"prompt": [1, 2, 3]}) == 4 + 500
    assert estimate_prompt_tokens({"prompt": "\ud800"}) >= 500  # a lone surrogate from JSON never raises


def test_counting_is_only_worth_it_near_the_limit():
    assert not worth_counting(chat(("user", "hi"), max_tokens=1000), 131072)
    assert not worth_counting(chat(("user", "hi")), 4096)
    assert worth_counting(chat(("user", "hi"), max_tokens=4096), 4096)
    assert worth_counting(chat(("user", "x" * 80_000)), 32768)


def test_default_max_tokens_only_when_the_client_sent_none():
    assert set_default_max_tokens({"max_tokens": 5}, 512) == {"max_tokens": 5}
    assert set_default_max_tokens({}, 512) == {"max_tokens": 512}
    assert set_default_max_tokens({"max_tokens": -1}, 512) == {"max_tokens": 512}


# -- tools --------------------------------------------------------------------------------


def test_strip_tools_drops_every_tool_parameter():
    body = chat(("user", "hi"), tools=TOOLS, tool_choice="auto", parallel_tool_calls=True, functions=[{}], function_call="auto")
    assert strip_tools(body) == chat(("user", "hi"))
    plain = chat(("user", "hi"))
    assert strip_tools(plain) is plain


def test_force_tool_choice_until_a_tool_result_arrives():
    body = chat(("user", "list files"), tools=TOOLS)
    assert force_tool_choice(body)["tool_choice"] == "required"
    assert force_tool_choice({**body, "tool_choice": "auto"})["tool_choice"] == "required"
    after = {**body, "messages": body["messages"] + [{"role": "tool", "tool_call_id": "1", "content": "a.txt"}]}
    assert force_tool_choice(after) is after
    for choice in ("none", {"type": "function", "function": {"name": "read"}}, "required"):
        explicit = {**body, "tool_choice": choice}
        assert force_tool_choice(explicit) is explicit
    no_tools = chat(("user", "hi"))
    assert force_tool_choice(no_tools) is no_tools
    assert force_tool_choice({**no_tools, "tools": []})["tools"] == []


# -- messages -----------------------------------------------------------------------------


def test_merge_system_into_the_first_user_turn():
    body = chat(("system", "Be brief."), ("developer", "Use English."), ("user", "Hi"), ("assistant", "Hello"))
    assert merge_system(body)["messages"] == [
        {"role": "user", "content": "Be brief.\n\nUse English.\n\nHi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_merge_system_with_array_content_and_without_a_user_turn():
    body = {"messages": [{"role": "system", "content": [{"type": "text", "text": "Rules"}]}, {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    assert merge_system(body)["messages"][0]["content"] == [{"type": "text", "text": "Rules"}, {"type": "image_url", "image_url": {}}]
    assert merge_system(chat(("system", "Only rules")))["messages"] == [{"role": "user", "content": "Only rules"}]


def test_system_before_an_assistant_turn_becomes_the_first_user_turn():
    body = chat(("system", "S"), ("assistant", "Welcome"), ("user", "q"))
    assert merge_system(body)["messages"] == [{"role": "user", "content": "S"}, {"role": "assistant", "content": "Welcome"}, {"role": "user", "content": "q"}]


def test_a_late_system_message_becomes_a_user_turn():
    body = chat(("user", "a"), ("assistant", "b"), ("system", "c"))
    assert merge_system(body)["messages"][2] == {"role": "user", "content": "c"}


def test_alternate_roles_merges_runs_and_starts_with_the_user():
    body = chat(("system", "S"), ("assistant", "Welcome"), ("user", "a"), ("user", "b"), ("assistant", "c"), ("assistant", "d"))
    assert alternate_roles(body)["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "Welcome"},
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "c\n\nd"},
    ]
    good = chat(("user", "a"), ("assistant", "b"))
    assert alternate_roles(good) is good


def test_alternate_roles_keeps_tool_calls_apart():
    calls = {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "read", "arguments": "{}"}}]}
    body = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "thinking"}, calls]}
    assert alternate_roles(body) is body


def test_flatten_text_only_content_keeps_images():
    text_only = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache_control": {}}]}
    with_image = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}
    fixed = flatten_content({"messages": [text_only, with_image]})
    assert fixed["messages"] == [{"role": "user", "content": "a\nb"}, with_image]
    assert flatten_content({"messages": [with_image]})["messages"][0] is with_image


# -- reasoning ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"reasoning_effort": "high"}, True),
        ({"reasoning_effort": "low"}, True),
        ({"reasoning_effort": "none"}, False),
        ({"reasoning": {"effort": "medium"}}, True),
        ({"reasoning": {"enabled": False}}, False),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, True),
        ({"thinking": {"type": "disabled"}}, False),
        ({"thinking": True}, True),
        ({"thinking": False, "reasoning_effort": "high"}, False),
        ({}, False),  # the default
        ({"reasoning_effort": 3}, False),
    ],
)
def test_map_thinking(fields, expected):
    fixed = map_thinking({"messages": [], **fields}, "enable_thinking", False)
    assert fixed["chat_template_kwargs"] == {"enable_thinking": expected}


def test_the_clients_own_template_flag_wins_and_other_kwargs_stay():
    body = {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "none"}
    assert map_thinking(body, "enable_thinking", False) is body
    fixed = map_thinking({"chat_template_kwargs": {"x": 1}, "reasoning_effort": "low"}, "enable_thinking", None)
    assert fixed["chat_template_kwargs"] == {"x": 1, "enable_thinking": True}
    silent = {"messages": []}
    assert map_thinking(silent, "enable_thinking", None) is silent
    odd = {"chat_template_kwargs": "yes"}
    assert map_thinking(odd, "enable_thinking", False) is odd


# -- profiles -----------------------------------------------------------------------------


def test_profiles_compile_in_order_and_report_what_applied():
    gemma = compile_profile(BUILTIN_PROFILES["gemma"], "none")
    assert [name for name, _ in gemma.steps] == ["strip_tools", "flatten_content", "merge_system", "alternate_roles", "normalize_max_tokens"]
    body = chat(("system", "S"), ("user", "a"), ("user", "b"), max_tokens=-1, tools=TOOLS)
    before = copy.deepcopy(body)
    fixed, applied = gemma.apply(body)
    assert applied == ("strip_tools", "merge_system", "alternate_roles", "normalize_max_tokens")
    assert fixed == {"model": "m", "messages": [{"role": "user", "content": "S\n\na\n\nb"}]}
    assert body == before


def test_profile_tools_override_the_models_and_unset_follows_it():
    assert compile_profile(BUILTIN_PROFILES["default"], "none").tools == "none"
    assert compile_profile(BUILTIN_PROFILES["coder-force-tools"], "full").tools == "force-required"
    assert compile_profile(BUILTIN_PROFILES["passthrough"], "none").steps == ()


def test_default_profile_passes_a_clean_request_as_the_same_object():
    body = chat(("user", "hi"), max_tokens=10, stream=True)
    fixed, applied = compile_profile(BUILTIN_PROFILES["default"], "full").apply(body)
    assert fixed is body and applied == ()


def test_profile_tables_extend_builtins_and_each_other():
    tables = {
        "mine": {"extends": "gemma", "thinking_flag": "enable_thinking"},
        "yours": {"extends": "mine", "flatten_content": False, "description": "x"},
        "default": {"extends": "default", "default_max_tokens": 256},
        "loop1": {"extends": "loop2"},
        "loop2": {"extends": "loop1"},
        "bad": {"extends": "nope"},
    }
    expanded, problems = expand_tables(tables)
    assert Profile(**expanded["yours"]) == Profile(
        extends="mine", description="x", merge_system=True, alternate_roles=True, flatten_content=False, thinking_flag="enable_thinking"
    )
    assert expanded["default"]["default_max_tokens"] == 256 and expanded["default"]["cap_max_tokens"] is True
    assert problems["loop1"] == "a cycle of extends: loop2 -> loop1 -> loop2"
    assert problems["loop2"] == "a cycle of extends: loop1 -> loop2 -> loop1"
    assert "unknown profile 'nope'" in problems["bad"]
