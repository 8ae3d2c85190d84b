"""``max_tokens`` / ``max_completion_tokens``: normalize, and cap so prompt + answer fit the context.

Normalizing needs only the body. Capping needs the prompt's length in tokens,
which the caller supplies as a ``Budget``: counted exactly by the engine's
``/tokenize`` (``exact=True``) or, when the engine cannot count, estimated here
(``estimate_prompt_tokens``, deliberately on the high side, as the seed's validator did).
An estimate caps by the high side; it refuses only when even the low side
(``estimate_prompt_tokens_low``) fills the context, so a prompt that cannot fit
never reaches an engine that would fail it mid-stream.

The rule for when a count is worth an engine round trip (``worth_counting``):
only when the estimate says prompt + requested answer + the estimate's safety
margin could exceed ``max_model_len``. Below that the request fits whatever the
exact count is, and it passes untouched.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LIMIT_KEYS = ("max_tokens", "max_completion_tokens")
# The seed's estimate: characters / 2.5 + 20 per message + 500, 1500 per image;
# here UTF-8 bytes instead of characters, so CJK text is not underestimated.
BYTES_PER_TOKEN = 2.5
TOKENS_PER_MESSAGE = 20
TOKENS_BASE = 500
TOKENS_PER_IMAGE = 1500
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
# The low estimate: no tokenizer's token covers more than 8 bytes of text on average
# once runs (indentation, "=====" rules, repeated letters), which BPE merges into
# long tokens, count as one byte; images and template tokens count nothing.
LOW_BYTES_PER_TOKEN = 8
RUNS = re.compile(r"\s{2,}|(.)\1{2,}", re.DOTALL)


def valid_limit(value: Any) -> int | None:
    """A usable token limit: a positive integer (an integral float counts); anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 1 else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and value >= 1:
        return int(value)
    return None


def requested_limit(body: dict[str, Any]) -> int | None:
    """The smallest valid limit the client sent, or None."""
    first = valid_limit(body.get("max_tokens"))
    second = valid_limit(body.get("max_completion_tokens"))
    if first is None or second is None:
        return second if first is None else first
    return min(first, second)


def _clean(value: Any) -> bool:
    return value is None or (type(value) is int and value >= 1)


def normalize_max_tokens(body: dict[str, Any]) -> dict[str, Any]:
    """Drop invalid limits (negative, zero, strings, ...); when both keys are sent, both get the smaller value.

    ``null`` means "no limit" in OpenAI's API and is kept as sent.
    """
    first, second = body.get("max_tokens"), body.get("max_completion_tokens")
    if _clean(first) and _clean(second) and (first is None or second is None or first == second):
        return body  # the common case, without allocating anything
    present = [k for k in LIMIT_KEYS if body.get(k) is not None]
    target = requested_limit(body)
    out = {k: v for k, v in body.items() if k not in present}
    for key in present:
        if valid_limit(body[key]) is not None:
            out[key] = target
    return out


def _units(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _runs_collapsed_units(text: str) -> int:
    return _units(RUNS.sub(" ", text))


def _content_units(content: Any, units_of: Callable[[str], int]) -> tuple[int, int]:
    """(UTF-8 bytes of text, number of images) in a message content or prompt."""
    if isinstance(content, str):
        return units_of(content), 0
    units = images = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                units += units_of(part)
            elif isinstance(part, dict):
                if part.get("type") in IMAGE_PART_TYPES:
                    images += 1
                text = part.get("text")
                if isinstance(text, str):
                    units += units_of(text)
            elif isinstance(part, int) and not isinstance(part, bool):
                units += 3  # a token id: at least one token, even after the division
    return units, images


@dataclass(frozen=True)
class PromptSize:
    text_units: int
    """UTF-8 bytes of the prompt's text (messages, tool calls, tools), as ``units_of`` measures them."""
    messages: int
    images: int


def _prompt_size(body: dict[str, Any], units_of: Callable[[str], int]) -> PromptSize:
    units = images = count = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            count += 1
            if isinstance(message, dict):
                u, i = _content_units(message.get("content"), units_of)
                units += u
                images += i
                calls = message.get("tool_calls")
                if calls:
                    units += _json_units(calls, units_of)
    units += _content_units(body.get("system"), units_of)[0]  # the Messages API's system prompt
    u, i = _content_units(body.get("prompt"), units_of)
    units += u
    images += i
    tools = body.get("tools")
    if tools:
        units += _json_units(tools, units_of)
    return PromptSize(units, count, images)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A high estimate of the prompt's tokens from the body alone (no tokenizer)."""
    size = _prompt_size(body, _units)
    return (
        math.ceil(size.text_units / BYTES_PER_TOKEN) + TOKENS_PER_MESSAGE * size.messages + TOKENS_BASE
        + TOKENS_PER_IMAGE * size.images
    )


def estimate_prompt_tokens_low(body: dict[str, Any]) -> int:
    """A low estimate of the prompt's tokens: fewer than any tokenizer counts for this text."""
    return _prompt_size(body, _runs_collapsed_units).text_units // LOW_BYTES_PER_TOKEN


def _json_units(value: Any, units_of: Callable[[str], int] = _units) -> int:
    try:
        return units_of(json.dumps(value, ensure_ascii=False))
    except (TypeError, ValueError):
        return 0


def estimate_margin(max_model_len: int) -> int:
    """Room kept free when the prompt was only estimated: max(512, 10 % of the context), as the seed did."""
    return max(512, max_model_len // 10)


def set_default_max_tokens(body: dict[str, Any], default: int) -> dict[str, Any]:
    """``max_tokens = default`` when the client sent no valid limit (the cap may lower it later)."""
    if requested_limit(body) is not None:
        return body
    return {**body, "max_tokens": default}


def worth_counting(body: dict[str, Any], max_model_len: int) -> bool:
    """Whether the cap could matter, i.e. an exact count is worth a round trip to the engine.

    The estimate is high, so when estimate + requested answer + margin fits in the
    context, the real request fits too and is left alone.
    """
    wanted = requested_limit(body) or 0
    return estimate_prompt_tokens(body) + wanted + estimate_margin(max_model_len) > max_model_len


@dataclass(frozen=True)
class Budget:
    """The context a request has: ``max_model_len`` and the prompt's tokens (counted or estimated)."""

    max_model_len: int
    prompt_tokens: int
    exact: bool
    margin: int = 0
    """Exact count: tokens kept free below the limit when a value has to be capped anyway.
    Estimate: the estimate's uncertainty, kept free always."""
    low_prompt_tokens: int | None = None
    """Estimate only: the low estimate, which refuses a prompt that fills the context by itself."""

    @property
    def room(self) -> int:
        """The largest answer that fits (zero or less: none does)."""
        return self.max_model_len - self.prompt_tokens - (0 if self.exact else self.margin)

    @property
    def cap(self) -> int:
        """What a limit that does not fit is lowered to."""
        return max(1, self.room - self.margin) if self.exact else self.room

    @classmethod
    def estimated(cls, body: dict[str, Any], max_model_len: int) -> Budget:
        return cls(
            max_model_len, estimate_prompt_tokens(body), False, estimate_margin(max_model_len),
            estimate_prompt_tokens_low(body),
        )

    @property
    def overflows(self) -> bool:
        """The prompt alone fills the context: by the exact count, or by the low estimate."""
        if self.exact:
            return self.prompt_tokens >= self.max_model_len
        return self.low_prompt_tokens is not None and self.low_prompt_tokens >= self.max_model_len


class ContextOverflow(ValueError):
    """The prompt alone fills the model's context (by an exact count, or by the low estimate)."""

    def __init__(self, budget: Budget) -> None:
        super().__init__(f"prompt of {budget.prompt_tokens} tokens leaves no room in a context of {budget.max_model_len}")
        self.budget = budget


@dataclass(frozen=True)
class Capped:
    requested: int
    sent: int


def cap_max_tokens(body: dict[str, Any], budget: Budget) -> tuple[dict[str, Any], Capped | None]:
    """Cap the (normalized) limit so prompt + answer fit.

    A limit that fits is left alone. One that does not is lowered to ``budget.cap``.
    A prompt that alone fills the context (``Budget.overflows``) raises ``ContextOverflow``;
    otherwise an estimate caps only while it leaves room and leaves the rest to the engine.
    Returns the body and, when a client's value was lowered, what it was and what was sent.
    """
    if budget.overflows:
        raise ContextOverflow(budget)
    room = budget.room
    if room < 1:
        return body, None
    requested = requested_limit(body)
    if requested is None or requested <= room:
        return body, None
    limit = budget.cap
    out = dict(body)
    for key in LIMIT_KEYS:
        if valid_limit(body.get(key)) is not None:
            out[key] = limit
    return out, Capped(requested, limit)
