"""Which model a request is for: the body's ``model`` or the path form ``/v1/<model>/...``.

Model names are only ever looked up in the configuration; a name that is not
configured never reaches a container name, a URL, a header or a log line —
error messages show a sanitized copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import Config, ModelConfig
from ..errors import BadRequest, ModelDisabled, NotFound

_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
# First path segments after /v1/ that are OpenAI/vLLM endpoints, not a model name.
ENDPOINT_ROOTS = frozenset(
    {"chat", "completions", "embeddings", "responses", "models", "audio", "images", "moderations", "rerank", "score",
     "classify", "pooling", "messages", "tokenize", "detokenize", "files", "batches"}
)
# The ones sparkd forwards with POST (/v1/models is answered by sparkd itself).
PROXIED_ROOTS = ENDPOINT_ROOTS - {"models"}
MAX_SHOWN = 64


@dataclass(frozen=True)
class Target:
    model: ModelConfig
    path: str
    """The engine path to call, e.g. ``/v1/chat/completions``."""


class ModelDirectory:
    """Configured models by name and alias."""

    def __init__(self, config: Config) -> None:
        self.models = config.models
        self._names: dict[str, str] = {}
        for name, model in config.models.items():
            self._names[name] = name
            for alias in model.aliases:
                self._names[alias] = name

    def lookup(self, name: str) -> ModelConfig | None:
        canonical = self._names.get(name)
        return self.models[canonical] if canonical else None

    def resolve(self, name: object) -> ModelConfig:
        """The enabled model called ``name`` (or an alias), or a precise 400/404/409."""
        if not isinstance(name, str):
            raise BadRequest(
                f"'model' must be a string naming a model, found {type(name).__name__}; "
                "GET /v1/models lists the models",
                code="invalid_model",
            )
        if not name:
            raise BadRequest("'model' is empty; GET /v1/models lists the models", code="invalid_model")
        model = self.lookup(name)
        if model is None:
            raise NotFound(
                f"model {shown(name)} is not configured on this server; GET /v1/models lists the models",
                code="model_not_found",
            )
        if not model.enabled:
            reason = model.disabled_reason or model.experimental_reason or "it is disabled in the configuration"
            kind = "experimental and off" if model.experimental else "disabled"
            raise ModelDisabled(
                f"model {model.name} is {kind}: {reason}. Enable it with enabled = true in its [models.{model.name}] "
                "table if you accept that",
            )
        return model


def target(directory: ModelDirectory, tail: str, body_model: object) -> Target:
    """Resolve ``/v1/<tail>`` and the body's model into the model and the engine path.

    Only the engine endpoints in ``PROXIED_ROOTS`` are forwarded: anything else is a
    404 here and never reaches an engine.
    """
    name, path = requested(tail, body_model)
    return Target(model=directory.resolve(name), path=path)


def requested(tail: str, body_model: object) -> tuple[object, str]:
    """The model name a request for ``/v1/<tail>`` asks for (not yet looked up) and its engine path,
    or a 400/404 for a path sparkd does not forward."""
    segments = tail.split("/")
    for segment in segments:
        if not _SEGMENT.match(segment) or segment in (".", ".."):
            raise NotFound(f"no such endpoint: /v1/{shown(tail)}", code="unknown_endpoint")
    if len(segments) >= 2 and segments[0] not in ENDPOINT_ROOTS:
        _check_endpoint(segments[1:], tail)
        return segments[0], "/v1/" + "/".join(segments[1:])
    _check_endpoint(segments, tail)
    if body_model is None:
        raise BadRequest(
            "the request names no model: set 'model' in the JSON body, or use the path form /v1/<model>/...",
            code="missing_model",
        )
    return body_model, "/v1/" + tail


def _check_endpoint(segments: list[str], tail: str) -> None:
    if segments[0] not in PROXIED_ROOTS:
        raise NotFound(
            f"no such endpoint: POST /v1/{shown(tail)}; sparkd forwards /v1/" + ", /v1/".join(sorted(PROXIED_ROOTS)) + " (and their sub-paths)",
            code="unknown_endpoint",
        )


def shown(text: str) -> str:
    """A name as it may appear in a message: printable ASCII only, bounded length."""
    cleaned = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text[:MAX_SHOWN])
    return repr(cleaned + ("..." if len(text) > MAX_SHOWN else ""))
