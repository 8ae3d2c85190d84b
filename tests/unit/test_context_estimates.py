"""The prompt estimates and the fit decision when the engine cannot count (issue 14, point 2)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from sparkd.config import ModelConfig
from sparkd.errors import BadRequest
from sparkd.fixups.context import TokenizeFailures, chat_text, refuse_certain_overflow
from sparkd.fixups.tokens import (
    Budget,
    ContextOverflow,
    cap_max_tokens,
    estimate_prompt_tokens,
    estimate_prompt_tokens_low,
)

# A 74 KB source file, as OpenCode attached in the report: SmolLM2's tokenizer makes ~18 750 tokens of it.
SOURCE = "".join(f"def function_{i}(argument):\n    return argument * {i} + len('text {i}')\n\n" for i in range(1300))


def chat(text: str, **extra: object) -> dict:
    return {"messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": text}], **extra}


def test_low_estimate_is_below_the_high_one_and_below_real_tokenizers() -> None:
    body = chat(SOURCE)
    low, high = estimate_prompt_tokens_low(body), estimate_prompt_tokens(body)
    assert low < high
    # No tokenizer packs more than 8 bytes per token over real text: the low estimate stays under any real count.
    assert low <= len(SOURCE.encode()) // 8 + 1
    assert low > 8192  # yet it is enough to see that this file cannot fit a 8192-token context


@pytest.mark.parametrize("run", [" " * 20000, "=" * 20000, "\n\t " * 5000])
def test_runs_that_tokenizers_merge_count_little_in_the_low_estimate(run: str) -> None:
    # BPE merges long runs of one character (indentation, ===== rules) into few tokens.
    assert estimate_prompt_tokens_low({"messages": [{"role": "user", "content": run}]}) <= max(8, len(run) // 50)


def test_low_estimate_counts_tools_tool_calls_system_and_prompt() -> None:
    text = "word " * 4000  # 20 000 bytes
    for body in (
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"description": text}}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": text}}]}]},
        {"system": text, "messages": []},
        {"prompt": text},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]},
    ):
        assert estimate_prompt_tokens_low(body) >= 20000 // 8 - 10, body


def test_an_image_does_not_raise_the_low_estimate() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}
    assert estimate_prompt_tokens_low(body) == 0
    assert estimate_prompt_tokens(body) > 1500


def test_estimate_refuses_only_when_even_the_low_estimate_fills_the_context() -> None:
    body = chat(SOURCE, max_tokens=100)
    budget = Budget.estimated(body, 8192)
    assert budget.overflows
    with pytest.raises(ContextOverflow):
        cap_max_tokens(body, budget)


def test_estimate_that_may_fit_passes_and_caps_by_the_high_estimate() -> None:
    text = "x y " * 5000  # 20 000 bytes: the high estimate (~8 500) says no room, the low one (~2 500) says it may fit
    body = chat(text, max_tokens=4000)
    budget = Budget.estimated(body, 8192)
    assert not budget.overflows and budget.room < 1
    assert cap_max_tokens(body, budget) == (body, None)  # the engine has the last word
    small = chat("Name a colour.", max_tokens=8000)
    fixed, capped = cap_max_tokens(small, Budget.estimated(small, 8192))
    assert capped is not None and fixed["max_tokens"] == capped.sent == 8192 - estimate_prompt_tokens(small) - 819


def test_exact_count_refuses_a_full_context_and_caps_otherwise() -> None:
    body = chat("hi", max_tokens=9000)
    with pytest.raises(ContextOverflow):
        cap_max_tokens(body, Budget(8192, 8192, True, 32))
    fixed, capped = cap_max_tokens(body, Budget(8192, 100, True, 32))
    assert capped is not None and fixed["max_tokens"] == 8192 - 100 - 32


def test_a_failing_tokenize_endpoint_is_logged_once_per_model_until_it_works() -> None:
    failures = TokenizeFailures()
    with capture_logs() as logs:
        for _ in range(5):
            failures.failed("a", "vllm", "POST /tokenize answered 404")
        failures.failed("b", "llama-cpp", "refused")
        failures.worked("a")
        failures.worked("a")
        failures.failed("a", "vllm", "again")
    events = [(entry["event"], entry["model"]) for entry in logs]
    assert events == [
        ("tokenize_failed", "a"), ("tokenize_failed", "b"), ("tokenize_recovered", "a"), ("tokenize_failed", "a"),
    ]


def test_chat_text_for_a_tokenizer_without_template() -> None:
    text, count = chat_text(
        [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
         {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}],
        [{"type": "function"}],
    ) or ("", 0)
    assert count == 2 and "one" in text and "two" in text and '"id": "c"' in text and '"function"' in text
    assert chat_text([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], None) is None
    assert chat_text("not a list", None) is None


def test_a_prompt_whose_low_estimate_fills_the_context_is_refused_before_any_engine() -> None:
    model = ModelConfig(name="small", image="i", max_model_len=8192)
    with pytest.raises(BadRequest) as refused:
        refuse_certain_overflow(model, "/v1/chat/completions", chat(SOURCE))
    assert refused.value.code == "context_length_exceeded"
    assert "has a context of 8192 tokens" in str(refused.value) and "low estimate" in str(refused.value)
    refuse_certain_overflow(model, "/v1/chat/completions", chat("x y " * 5000))  # may fit: the engine counts it
    long_context = ModelConfig(name="big", image="i", max_model_len=131072)
    refuse_certain_overflow(long_context, "/v1/chat/completions", chat(SOURCE))
