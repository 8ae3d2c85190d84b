"""``max_tokens`` / ``max_completion_tokens``: normalize, and cap so prompt + answer fit the context.

Normalizing needs only the body. Capping needs the prompt's length in tokens,
which the caller supplies as a ``Budget``: counted exactly by the engine's
``/tokenize`` (``exact=True``) or, when the engine cannot count, estimated here
(``estimate_prompt_tokens``, deliberately on the high side, as the seed's validator did).

The rule for when a count is worth an engine round trip (``worth_counting``):
only when the estimate says prompt + requested answer + the estimate's safety
margin could exceed ``max_model_len``. Below that the request fits whatever the
exact count is, and it passes untouched.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

LIMIT_KEYS = ("max_tokens", "max_completion_tokens")
# The seed's estimate: characters / 2.5 + 20 per message + 500, 1500 per image;
# here UTF-8 bytes instead of characters, so CJK text is not underestimated.
BYTES_PER_TOKEN = 2.5
TOKENS_PER_MESSAGE = 20
TOKENS_BASE = 500
TOKENS_PER_IMAGE = 1500
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})


def valid_limit(value: Any) -> Optional[int]:
    """A usable token limit: a positive integer (an integral float counts); anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 1 else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and value >= 1:
        return int(value)
    return None


def requested_limit(body: dict[str, Any]) -> Optional[int]:
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


def _content_units(content: Any) -> tuple[int, int]:
    """(UTF-8 bytes of text, number of images) in a message content or prompt."""
    if isinstance(content, str):
        return _units(content), 0
    units = images = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                units += _units(part)
            elif isinstance(part, dict):
                if part.get("type") in IMAGE_PART_TYPES:
                    images += 1
                text = part.get("text")
                if isinstance(text, str):
                    units += _units(text)
            elif isinstance(part, int) and not isinstance(part, bool):
                units += 3  # a token id: at least one token, even after the division
    return units, images


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A high estimate of the prompt's tokens from the body alone (no tokenizer)."""
    units = images = count = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            count += 1
            if isinstance(message, dict):
                u, i = _content_units(message.get("content"))
                units += u
                images += i
                calls = message.get("tool_calls")
                if calls:
                    units += _json_units(calls)
    u, i = _content_units(body.get("prompt"))
    units += u
    images += i
    tools = body.get("tools")
    if tools:
        units += _json_units(tools)
    return math.ceil(units / BYTES_PER_TOKEN) + TOKENS_PER_MESSAGE * count + TOKENS_BASE + TOKENS_PER_IMAGE * images


def _json_units(value: Any) -> int:
    try:
        return len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
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

    @property
    def room(self) -> int:
        """The largest answer that fits (zero or less: none does)."""
        return self.max_model_len - self.prompt_tokens - (0 if self.exact else self.margin)

    @property
    def cap(self) -> int:
        """What a limit that does not fit is lowered to."""
        return max(1, self.room - self.margin) if self.exact else self.room

    @classmethod
    def estimated(cls, body: dict[str, Any], max_model_len: int) -> "Budget":
        return cls(max_model_len, estimate_prompt_tokens(body), False, estimate_margin(max_model_len))


class ContextOverflow(ValueError):
    """The prompt alone fills the model's context (known from an exact count)."""

    def __init__(self, budget: Budget) -> None:
        super().__init__(f"prompt of {budget.prompt_tokens} tokens leaves no room in a context of {budget.max_model_len}")
        self.budget = budget


@dataclass(frozen=True)
class Capped:
    requested: int
    sent: int


def cap_max_tokens(body: dict[str, Any], budget: Budget) -> tuple[dict[str, Any], Optional[Capped]]:
    """Cap the (normalized) limit so prompt + answer fit.

    A limit that fits is left alone. One that does not is lowered to ``budget.cap``.
    An exact count that leaves no room raises ``ContextOverflow``; an estimate never
    refuses (the engine has the last word) and caps only while it leaves room.
    Returns the body and, when a client's value was lowered, what it was and what was sent.
    """
    room = budget.room
    if room < 1:
        if budget.exact:
            raise ContextOverflow(budget)
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
