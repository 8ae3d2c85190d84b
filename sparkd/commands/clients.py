"""``sparkd clients opencode|cline|cline-vscode``: client configuration generated from the catalog.

Only models that can run on this host are listed (``HostFacts``: the image is in
Podman, the CDI devices of GPU models are known, the encodings of models that need
them are verified, the same checks as ``sparkd doctor``); the rest are named on
stderr with what to fix, and ``--all`` lists every enabled model whatever the host has.
A client offered a model that cannot start only ever sees errors.

Each model's advertised context keeps the seed validator's safety margin
(``max(512, 10%)`` of ``max_model_len``), so a client that fills its window still
leaves room for the completion instead of overflowing the engine's context.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from typing import Any

from .. import encodingfiles
from ..config import Config, ModelConfig
from ..fixups.profiles import DEFAULT_PROFILE, ToolMode
from ..hardware import cdi
from .doctor import image_fix

DEFAULT_CONTEXT = 4096
MAX_OUTPUT = 8192
CLIENTS = ("opencode", "cline", "cline-vscode")
KEY_VARIABLE = "SPARKD_API_KEY"


def limits(model: ModelConfig) -> tuple[int, int]:
    """(context, output) token limits a client should use for ``model``."""
    window = model.max_model_len or DEFAULT_CONTEXT
    context = window - max(512, window // 10)
    return context, min(MAX_OUTPUT, context // 4)


@dataclass(frozen=True)
class HostFacts:
    """What this host has that models need to start."""

    images: frozenset[str]
    """The models' images that Podman has."""
    podman_error: str | None
    """Why Podman could not be asked (then no image counts as present)."""
    cdi_devices: frozenset[str]
    encoding_problems: tuple[str, ...]


def probe_host(config: Config) -> HostFacts:
    """Ask Podman, the CDI specs and the encodings directory (blocking; a command, not the daemon)."""
    from podman import PodmanClient

    wanted = sorted({model.image for model in config.enabled_models()})
    present: set[str] = set()
    error: str | None = None
    try:
        with PodmanClient(base_url=config.podman.url, timeout=10) as client:
            present = {image for image in wanted if client.images.exists(image)}
    except Exception as failure:  # noqa: BLE001 - any failure means "cannot tell"
        error = f"Podman does not answer at {config.podman.url} ({type(failure).__name__}: {failure})"
    needs_gpu = any(model.gpu for model in config.enabled_models())
    devices = frozenset(cdi.known_devices()[0]) if needs_gpu else frozenset()
    needs_encodings = any(model.encodings for model in config.enabled_models())
    problems = tuple(encodingfiles.problems(config.server.state_dir)) if needs_encodings else ()
    return HostFacts(frozenset(present), error, devices, problems)


def unavailable(config: Config, model: ModelConfig, host: HostFacts) -> str | None:
    """Why ``model`` cannot start on this host, with the fixes; None when it can."""
    reasons = []
    if model.image not in host.images:
        if host.podman_error:
            reasons.append(f"{host.podman_error}, so its image {model.image} cannot be checked (fix Podman, see `sparkd doctor`)")
        else:
            reasons.append(f"its image {model.image} is missing (fix: {image_fix(model.image)})")
    missing = [device for device in config.gpu.devices if device not in host.cdi_devices] if model.gpu else []
    if missing:
        reasons.append(f"it needs the GPU and no CDI spec provides {', '.join(missing)} (see `sparkd doctor`)")
    if model.encodings and host.encoding_problems:
        reasons.append("its tiktoken encodings are missing or damaged (fix: sudo sparkd encodings fetch)")
    return "; ".join(reasons) or None


def runnable_models(config: Config, host: HostFacts | None) -> tuple[list[ModelConfig], list[tuple[str, str]]]:
    """The enabled models that can run, and (name, reason) for those left out; every one when ``host`` is None."""
    kept: list[ModelConfig] = []
    left_out: list[tuple[str, str]] = []
    for model in config.enabled_models():
        reason = unavailable(config, model, host) if host is not None else None
        if reason is None:
            kept.append(model)
        else:
            left_out.append((model.name, reason))
    return kept, left_out


def effective_tools(config: Config, model: ModelConfig) -> ToolMode:
    """How a model treats tools once its profile applied: the profile's setting wins over the model's."""
    return config.profiles[model.profile or DEFAULT_PROFILE].tools or model.tools


def opencode(config: Config, base_url: str, models: list[ModelConfig] | None = None) -> dict[str, Any]:
    entries = {}
    for model in config.enabled_models() if models is None else models:
        context, output = limits(model)
        tool_call = effective_tools(config, model) != "none"
        entries[model.name] = {"name": model.name, "limit": {"context": context, "output": output}, "tool_call": tool_call}
    return {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "sparkd": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "sparkd",
                "options": {"baseURL": base_url, "apiKey": "{env:" + KEY_VARIABLE + "}"},
                "models": entries,
            }
        },
    }


def cline_cli(config: Config, base_url: str, models: list[ModelConfig] | None = None) -> str:
    """A shell script for the Cline CLI: ``cline auth`` for the first model, the others commented out.

    The CLI keeps one model per provider, so the script configures one; the key is
    read from ``$SPARKD_API_KEY`` when it runs, never written into the script.
    """
    chosen = config.enabled_models() if models is None else models
    lines = [
        "# Cline CLI (npm install -g cline): the OpenAI-compatible provider through sparkd.",
        f"# Set {KEY_VARIABLE} to your sparkd key first; run one of these (the CLI keeps one model).",
        "# The VS Code extension's settings: sparkd clients cline-vscode",
    ]
    for index, model in enumerate(chosen):
        command = " ".join(
            [shlex.join(["cline", "auth", "--provider", "openai-compatible", "--apikey"]), f'"${KEY_VARIABLE}"',
             shlex.join(["--modelid", model.name, "--baseurl", base_url])]
        )
        lines.append(command if index == 0 else "# " + command)
    if not chosen:
        lines.append("# (no model can run on this host: see the messages above, or pass --all)")
    return "\n".join(lines)


def cline_vscode(config: Config, base_url: str, models: list[ModelConfig] | None = None) -> dict[str, Any]:
    """The Cline VS Code extension's "OpenAI Compatible" provider settings, one block per model."""
    entries = []
    for model in config.enabled_models() if models is None else models:
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
            }
        )
    return {"cline": entries}


def run(config: Config, client: str, base_url: str, include_all: bool = False) -> int:
    host = None if include_all else probe_host(config)
    models, left_out = runnable_models(config, host)
    for name, reason in left_out:
        print(f"sparkd clients: left out {name}: {reason}", file=sys.stderr)
    if left_out:
        print(f"sparkd clients: {len(left_out)} model(s) cannot run on this host; --all lists them anyway", file=sys.stderr)
    if client == "opencode":
        print(json.dumps(opencode(config, base_url, models), indent=2))
    elif client == "cline":
        print(cline_cli(config, base_url, models))
    else:
        print(json.dumps(cline_vscode(config, base_url, models), indent=2))
    return 0
