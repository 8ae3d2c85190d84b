"""``sparkd clients opencode|cline``: client configuration generated from the catalog.

Each model's advertised context keeps the seed validator's safety margin
(``max(512, 10%)`` of ``max_model_len``), so a client that fills its window still
leaves room for the completion instead of overflowing the engine's context.
"""

from __future__ import annotations

import json
from typing import Any

from ..config import Config, ModelConfig
from ..fixups.profiles import effective_tools

DEFAULT_CONTEXT = 4096
MAX_OUTPUT = 8192


def limits(model: ModelConfig) -> tuple[int, int]:
    """(context, output) token limits a client should use for ``model``."""
    window = model.max_model_len or DEFAULT_CONTEXT
    context = window - max(512, window // 10)
    return context, min(MAX_OUTPUT, context // 4)


def opencode(config: Config, base_url: str) -> dict[str, Any]:
    models = {}
    for model in config.enabled_models():
        context, output = limits(model)
        tool_call = effective_tools(config, model) != "none"
        entry: dict[str, Any] = {"name": model.name, "limit": {"context": context, "output": output}, "tool_call": tool_call}
        models[model.name] = entry
    return {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "sparkd": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "sparkd",
                "options": {"baseURL": base_url, "apiKey": "{env:SPARKD_API_KEY}"},
                "models": models,
            }
        },
    }


def cline(config: Config, base_url: str) -> dict[str, Any]:
    """Cline's "OpenAI Compatible" provider settings, one block per model."""
    entries = []
    for model in config.enabled_models():
        context, output = limits(model)
        entries.append(
            {
                "apiProvider": "openai",
                "openAiBaseUrl": base_url,
                "openAiApiKey": "<your sparkd key>",
                "openAiModelId": model.name,
                "openAiModelInfo": {
                    "contextWindow": context,
                    "maxTokens": output,
                    "supportsImages": model.multimodal,
                    "supportsPromptCache": False,
                },
                "notes": list(model.notes),
            }
        )
    return {"cline": entries}


def run(config: Config, client: str, base_url: str) -> int:
    document = opencode(config, base_url) if client == "opencode" else cline(config, base_url)
    print(json.dumps(document, indent=2))
    return 0
