"""Which API paths a model's engine serves (``api_paths``), and the error for one it does not.

A request for an endpoint the engine lacks is refused before the engine; an engine's
own 404/405 for an API path (a route it does not have) is turned into the same error,
so the client learns the path, the model and what that model serves instead of a bare
``{"detail": "Not Found"}``.
"""

from __future__ import annotations

import json

from ..config import ModelConfig
from ..errors import NotFound


def serves(model: ModelConfig, path: str) -> bool:
    """``path`` is one of the model's API paths or below one (``/v1/responses/<id>``)."""
    return any(path == served or path.startswith(served + "/") for served in model.api_paths)


def unsupported(model: ModelConfig, path: str, method: str = "POST") -> NotFound:
    served = ", ".join(model.api_paths)
    return NotFound(
        f"model {model.name}: its engine does not serve {method} {path}; it serves {served}. "
        "Use one of those, or a model whose engine serves this API (GET /v1/models lists each model's endpoints)",
        code="unsupported_endpoint",
        extra={"endpoints": list(model.api_paths)},
    )


def is_missing_route(status: int, body: bytes) -> bool:
    """An engine's 404/405 that says the route does not exist, not an OpenAI error of the API
    (vLLM's 404 for an unknown model or response id carries an ``error`` object)."""
    if status not in (404, 405):
        return False
    try:
        payload = json.loads(body)
    except ValueError:
        return True
    return not (isinstance(payload, dict) and isinstance(payload.get("error"), dict))
