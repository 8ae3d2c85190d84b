"""Errors a client can see, in OpenAI's shape: ``{"error": {"message", "type", "code"}}``.

Every message says what failed and what to do next; ``Retry-After`` is set where
waiting would help.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web


class ApiError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "param": None, "code": self.code}
        error.update(self.extra)
        return {"error": error}

    def response(self) -> web.Response:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return web.Response(
            status=self.status,
            body=json.dumps(self.body()).encode(),
            content_type="application/json",
            headers=headers,
        )


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ApiError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(ApiError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class Conflict(ApiError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class ModelDisabled(ApiError):
    status = 409
    type = "invalid_request_error"
    code = "model_disabled"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ModelBusy(ApiError):
    """Reject policy: another model holds the GPU."""

    status = 429
    type = "rate_limit_error"
    code = "model_busy"


class TooManyRequests(ApiError):
    """One caller's own limit (not the server's capacity): it should send less."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class BadGateway(ApiError):
    status = 502
    type = "server_error"
    code = "engine_error"


class ServiceUnavailable(ApiError):
    status = 503
    type = "server_error"
    code = "unavailable"


class ModelUnavailable(ServiceUnavailable):
    """The model cannot run until an operator acts (the message says how): retrying cannot help, so no Retry-After."""

    code = "model_unavailable"


class GatewayTimeout(ApiError):
    status = 504
    type = "server_error"
    code = "timeout"
