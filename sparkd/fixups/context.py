"""Fit a request into its model's context: count the prompt, cap ``max_tokens``.

Runs once the engine is up (after ``scheduler.acquire``), and only when the cap
could matter (``tokens.worth_counting``: the high estimate of the prompt plus the
requested answer plus the estimate's margin exceeds ``max_model_len``). Then the
engine counts the prompt through the endpoint its model declares (``tokenize``):
vLLM's ``/tokenize`` exactly, through the same chat template and tools the request
will use; llama-cpp-python's ``/extras/tokenize/count``, which has no chat template,
counts the text exactly and an allowance (``TEMPLATE_TOKENS_*``) stands in for the
template's few tokens. When it cannot (``tokenize = "none"``, an error, a timeout,
a prompt shape it does not take), the estimates stand in: the high one caps, the
low one refuses. A prompt that fills the context (by count, or even by the low
estimate) is refused with a 400 ``context_length_exceeded`` before the engine sees it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..config import ModelConfig
from ..config.schema import TokenizeApi
from ..engine.client import Endpoint, EngineClient, EngineError
from ..errors import BadRequest
from ..http.anthropic import count_input_tokens
from .profiles import Fixups
from .tokens import Budget, ContextOverflow, cap_max_tokens, worth_counting

log = structlog.get_logger("sparkd.fixups")

# /v1/messages: Anthropic clients ask for large max_tokens (32 000 is common), which vLLM
# refuses with a 400 on a model whose context is smaller.
CAPPED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages"})
TOKENIZE_TIMEOUT_S = 10.0
TOKENIZE_PATHS: dict[TokenizeApi, str] = {"vllm": "/tokenize", "llama-cpp": "/extras/tokenize/count"}
CHAT_TOKENIZE_FIELDS = ("tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "chat_template")
CAPPED_HEADER = "X-Sparkd-Max-Tokens-Capped"
# ChatML-style templates (SmolLM2, Qwen) add "<|im_start|>role\n" and "<|im_end|>\n" per
# message and the generation prompt once: 8 per message covers them. SmolLM2's also adds
# a default system prompt (~20 tokens) when the chat has none: the base covers that.
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS_BASE = 32


@dataclass
class TokenizeFailures:
    """Models whose tokenize endpoint failed: logged once when it starts failing, once when it works again.

    One per daemon; a failing endpoint fails every request, and a warning per request buries the log.
    """

    failing: set[str] = field(default_factory=set)

    def failed(self, model: str, api: TokenizeApi, error: str) -> None:
        if model in self.failing:
            return
        self.failing.add(model)
        log.warning(
            "tokenize_failed", model=model, tokenize=api, error=error[:300], fallback="estimate",
            hint="set the model's tokenize to the engine's API (vllm, llama-cpp) or to none; logged once until it works again",
        )

    def worked(self, model: str) -> None:
        if model in self.failing:
            self.failing.discard(model)
            log.info("tokenize_recovered", model=model)


def needs_fitting(fixups: Fixups, model: ModelConfig, path: str, body: dict[str, Any]) -> bool:
    return bool(fixups.cap_max_tokens and model.max_model_len and path in CAPPED_PATHS and worth_counting(body, model.max_model_len))


def refuse_certain_overflow(model: ModelConfig, path: str, body: dict[str, Any]) -> None:
    """Refuse, before the engine is started or asked, a prompt whose LOW estimate already fills the context.

    No count can make such a prompt fit, so a cold model is not loaded (minutes on a
    GPU) just to refuse it. Call only when ``needs_fitting``.
    """
    assert model.max_model_len
    budget = Budget.estimated(body, model.max_model_len)
    if budget.overflows:
        raise overflow(model.name, budget, path)


def overflow(model: str, budget: Budget, path: str) -> BadRequest:
    """The 400 for a prompt that alone fills the context (``budget.overflows``)."""
    prompt_tokens = budget.prompt_tokens if budget.exact else budget.low_prompt_tokens
    counted_how = "counted by the engine" if budget.exact else "at least: sparkd's low estimate, before asking the engine"
    log.info(
        "context_overflow", model=model, prompt_tokens=prompt_tokens, max_model_len=budget.max_model_len,
        counted="exact" if budget.exact else "low_estimate",
    )
    return BadRequest(
        f"model {model} has a context of {budget.max_model_len} tokens (its max_model_len) and this request's "
        f"prompt alone is {prompt_tokens} tokens ({counted_how}), so no answer fits. Shorten the "
        "conversation or the tool definitions, or use a model with a longer context (GET /v1/models lists max_model_len)",
        code="context_length_exceeded",
        extra={"param": "prompt" if path == "/v1/completions" else "messages"},
    )


async def fit(
    engine: EngineClient, endpoint: Endpoint, model: ModelConfig, fixups: Fixups, path: str, body: dict[str, Any],
    failures: TokenizeFailures,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The body with its limit capped to the context, and the response headers that say so."""
    assert model.max_model_len
    counted = await count_prompt(engine, endpoint, model, path, body, failures)
    if counted is None:
        budget = Budget.estimated(body, model.max_model_len)
    else:
        budget = Budget(model.max_model_len, counted, True, fixups.context_margin)
    try:
        fixed, capped = cap_max_tokens(body, budget)
    except ContextOverflow:
        raise overflow(model.name, budget, path) from None
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


def chat_text(messages: Any, tools: Any) -> tuple[str, int] | None:
    """A chat's text as one string for a tokenizer without a chat template, and its number of messages.

    None when a part has no text to count (an image): the estimate stands in.
    """
    if not isinstance(messages, list):
        return None
    pieces: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            return None
        pieces.append(str(message.get("role", "")))
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                if not isinstance(text, str):
                    return None
                pieces.append(text)
        elif isinstance(content, str):
            pieces.append(content)
        elif content is not None:
            return None
        if message.get("tool_calls"):
            pieces.append(json.dumps(message["tool_calls"], ensure_ascii=False))
    if tools:
        pieces.append(json.dumps(tools, ensure_ascii=False))
    return "\n".join(pieces), len(messages)


async def count_prompt(
    engine: EngineClient, endpoint: Endpoint, model: ModelConfig, path: str, body: dict[str, Any], failures: TokenizeFailures
) -> int | None:
    """The prompt's tokens by the engine's own tokenizer, or None when it cannot say."""
    api = model.tokenize
    if api == "none":
        return None
    chat = path.endswith("/chat/completions") or path == "/v1/messages"
    messages = anthropic_as_chat(body) if path == "/v1/messages" else body.get("messages")
    overhead = 0
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return len(prompt)  # already token ids
        if not isinstance(prompt, str):
            return None  # a batch of prompts: the estimate covers the longest well enough
        payload: dict[str, Any] = {"model": model.name, "prompt": prompt}
    elif api == "vllm":
        if path == "/v1/messages":
            counted = await count_input_tokens(engine, endpoint, model.name, body)  # vLLM's own count, tools and all
            if counted is not None:
                return counted
        payload = {"model": model.name, "messages": messages}
        if path != "/v1/messages":
            payload.update((key, body[key]) for key in CHAT_TOKENIZE_FIELDS if body.get(key) is not None)
    else:
        text = chat_text(messages, body.get("tools"))
        if text is None:
            return None
        prompt, message_count = text
        overhead = TEMPLATE_TOKENS_BASE + TEMPLATE_TOKENS_PER_MESSAGE * message_count
        payload = {"model": model.name, "prompt": prompt}
    if api == "llama-cpp":
        payload = {"model": model.name, "input": payload["prompt"]}
    try:
        answer = await engine.post_json(endpoint, TOKENIZE_PATHS[api], payload, timeout=TOKENIZE_TIMEOUT_S)
    except EngineError as error:
        failures.failed(model.name, api, str(error))
        return None
    count = answer.get("count") if isinstance(answer, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        failures.failed(model.name, api, "no count in the answer")
        return None
    failures.worked(model.name)
    return count + overhead
