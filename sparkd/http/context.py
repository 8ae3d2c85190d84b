"""Fit a request into its model's context: count the prompt, cap ``max_tokens``.

Runs once the engine is up (after ``scheduler.acquire``), and only when the cap
could matter (``tokens.worth_counting``: the high estimate of the prompt plus the
requested answer plus the estimate's margin exceeds ``max_model_len``). Then the
engine's ``/tokenize`` counts the prompt exactly, through the same chat template
and tools the request will use; when it cannot (an error, a timeout, a prompt
shape it does not take), the estimate stands in, and an estimate caps but never
refuses. A prompt that by exact count fills the context is refused with a 400
naming the limit, before the engine sees it.
"""

from __future__ import annotations

from typing import Any

import structlog

from ..config import ModelConfig
from ..engine.client import Endpoint, EngineClient, EngineError
from ..errors import BadRequest
from ..fixups import Fixups
from ..fixups.tokens import Budget, ContextOverflow, cap_max_tokens, worth_counting
from .anthropic import count_input_tokens

log = structlog.get_logger("sparkd.fixups")

# /v1/messages: Anthropic clients ask for large max_tokens (32 000 is common), which vLLM
# refuses with a 400 on a model whose context is smaller.
CAPPED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages"})
TOKENIZE_TIMEOUT_S = 10.0
CHAT_TOKENIZE_FIELDS = ("tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "chat_template")
CAPPED_HEADER = "X-Sparkd-Max-Tokens-Capped"


def needs_fitting(fixups: Fixups, model: ModelConfig, path: str, body: dict[str, Any]) -> bool:
    return bool(fixups.cap_max_tokens and model.max_model_len and path in CAPPED_PATHS and worth_counting(body, model.max_model_len))


async def fit(
    engine: EngineClient, endpoint: Endpoint, model: ModelConfig, fixups: Fixups, path: str, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The body with its limit capped to the context, and the response headers that say so."""
    assert model.max_model_len
    counted = await count_prompt(engine, endpoint, model.name, path, body)
    if counted is None:
        budget = Budget.estimated(body, model.max_model_len)
    else:
        budget = Budget(model.max_model_len, counted, True, fixups.context_margin)
    try:
        fixed, capped = cap_max_tokens(body, budget)
    except ContextOverflow:
        log.info("context_overflow", model=model.name, prompt_tokens=budget.prompt_tokens, max_model_len=budget.max_model_len)
        raise BadRequest(
            f"model {model.name} has a context of {budget.max_model_len} tokens (its max_model_len) and this request's "
            f"prompt alone is {budget.prompt_tokens} tokens (counted by the engine), so no answer fits. Shorten the "
            "conversation or the tool definitions, or use a model with a longer context (GET /v1/models lists max_model_len)",
            code="context_length_exceeded",
            extra={"param": "prompt" if path == "/v1/completions" else "messages"},
        ) from None
    if capped is None:
        return fixed, {}
    counted_how = "exact" if budget.exact else "estimate"
    log.info(
        "max_tokens_capped", model=model.name, requested=capped.requested, sent=capped.sent,
        prompt_tokens=budget.prompt_tokens, max_model_len=budget.max_model_len, counted=counted_how,
    )
    header = (
        f"requested={capped.requested} sent={capped.sent} prompt_tokens={budget.prompt_tokens} "
        f"max_model_len={budget.max_model_len} counted={counted_how}"
    )
    return fixed, {CAPPED_HEADER: header}


def anthropic_as_chat(body: dict[str, Any]) -> list[Any]:
    """A Messages API request's system prompt and messages as the chat messages /tokenize counts.

    Text blocks are the same in both APIs; a block /tokenize does not take (an image,
    a tool use) makes it refuse, and the estimate stands in.
    """
    messages = body.get("messages")
    system = body.get("system")
    if isinstance(system, list):
        system = "\n".join(block.get("text", "") for block in system if isinstance(block, dict))
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    return head + (messages if isinstance(messages, list) else [])


async def count_prompt(engine: EngineClient, endpoint: Endpoint, model: str, path: str, body: dict[str, Any]) -> int | None:
    """The prompt's tokens by the engine's own tokenizer and template, or None when it cannot say."""
    if path.endswith("/chat/completions"):
        payload: dict[str, Any] = {"model": model, "messages": body.get("messages")}
        payload.update((key, body[key]) for key in CHAT_TOKENIZE_FIELDS if body.get(key) is not None)
    elif path == "/v1/messages":
        counted = await count_input_tokens(engine, endpoint, model, body)  # vLLM's own count, tools and all
        if counted is not None:
            return counted
        payload = {"model": model, "messages": anthropic_as_chat(body)}
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return len(prompt)  # already token ids
        if not isinstance(prompt, str):
            return None  # a batch of prompts: the estimate covers the longest well enough
        payload = {"model": model, "prompt": prompt}
    try:
        answer = await engine.post_json(endpoint, "/tokenize", payload, timeout=TOKENIZE_TIMEOUT_S)
    except EngineError as error:
        log.warning("tokenize_failed", model=model, error=str(error)[:300], fallback="estimate")
        return None
    count = answer.get("count") if isinstance(answer, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        log.warning("tokenize_failed", model=model, error="no count in the answer", fallback="estimate")
        return None
    return count

