"""The aiohttp application: routes plus the middleware that turns every error into OpenAI's shape."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Awaitable, Callable

import structlog
from aiohttp import web

from ..errors import ApiError, Forbidden, MethodNotAllowed, NotFound, PayloadTooLarge
from .admin import AdminRoutes
from .health import HealthRoutes
from .openai import OpenAIRoutes

if TYPE_CHECKING:
    from ..daemon import Daemon

log = structlog.get_logger("sparkd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(daemon: "Daemon") -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, admin_guard],
        client_max_size=daemon.config.server.max_body_bytes,
        handler_args={"max_field_size": 16 * 1024, "max_line_size": 16 * 1024},
    )
    HealthRoutes(daemon).add_to(app)
    OpenAIRoutes(daemon).add_to(app)
    AdminRoutes(daemon).add_to(app)
    return app


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except web.HTTPRequestEntityTooLarge as error:
        return PayloadTooLarge(
            f"the request body is larger than the limit of {error.max_size} bytes (server.max_body_bytes)"
        ).response()
    except web.HTTPMethodNotAllowed as error:
        allowed = ", ".join(sorted(error.allowed_methods))
        return MethodNotAllowed(f"{request.method} is not allowed on this endpoint; use {allowed}", headers={"Allow": allowed}).response()
    except web.HTTPNotFound:
        return NotFound("no such endpoint: sparkd serves /v1/... (OpenAI API), /healthz, /readyz and /api/...", code="unknown_endpoint").response()
    except web.HTTPException as error:
        if error.status < 400:
            raise
        refusal = ApiError(error.reason or "request refused", code=f"http_{error.status}")
        refusal.status = error.status
        refusal.type = "invalid_request_error" if error.status < 500 else "server_error"
        return refusal.response()


@web.middleware
async def admin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Until admin keys are configured, the admin API answers loopback clients only."""
    if request.path.startswith("/api/") and not is_loopback(request.remote):
        raise Forbidden("the admin API answers only on the local machine; use sparkctl or an SSH tunnel")
    return await handler(request)


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False
