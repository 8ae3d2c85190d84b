"""The aiohttp application: routes plus the middlewares, outermost first:

- connections (``connections.py``): the request arrived whole, so its connection's header deadline stops;
- CORS (``cors.py``): answers preflights, refuses origins off the allowlist;
- errors: every error becomes OpenAI's JSON shape (Anthropic's on the Messages API routes, ``anthropic.py``);
- auth (``auth.py``): who is calling, and whether their role may use the route: ``/v1/*`` user or
  admin, ``/api/*`` and ``/metrics`` admin, worker leases and the fleet API peer (the status page's shell at ``/`` is
  static and public: its data comes from ``/api/events``).
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..cluster.workers import WorkerLeases
from ..engine.client import EngineClient
from ..errors import (
    ApiError,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
)
from ..fixups.context import TokenizeFailures
from ..fleet.coordinator import Fleet
from ..fleet.onbehalf import on_behalf
from ..fleet.relay import FORWARD_PREFIX
from ..observe.operations import Operations
from ..runtime.podman import PodmanRuntime
from ..scheduler.scheduler import Scheduler
from ..weights.peerpulls import WORKER_WEIGHTS_PATH
from ..weights.service import WeightService
from . import anthropic, cors
from .admin import AdminRoutes
from .appkeys import (
    ENGINE,
    FLEET,
    OPERATIONS,
    RECONCILED,
    RUNTIME,
    SCHEDULER,
    SNAPSHOT,
    TOKENIZE_FAILURES,
    WEIGHTS,
    WORKERS,
)
from .auth import (
    ADMIN_ROLES,
    ALL_ROLES,
    MODEL_ROLES,
    PEER_ROLES,
    PRINCIPAL,
    VERSION_ROLES,
    authenticate,
    authorize,
)
from .cluster import LEASE_PATH, VERSION_PATH, ClusterRoutes
from .connections import watch_requests
from .fleet import FleetRoutes
from .health import HealthRoutes
from .openai import OpenAIRoutes
from .operator import OpsRoutes
from .page import PAGE_PATHS, PageRoutes
from .routing import shown
from .snapshot import SnapshotHolder
from .weights import WeightRoutes

log = structlog.get_logger("sparkd.http")

# Answer without a key: liveness and readiness checks.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", *PAGE_PATHS})
"""Also the status page's shell: static HTML/JS/CSS without data (its data comes from /api/events)."""
# Request line and each header at most 16 KiB, at most 100 headers: beyond, aiohttp answers 400 itself.
HANDLER_ARGS = {"max_field_size": 16 * 1024, "max_line_size": 16 * 1024, "max_headers": 100}


def build_app(
    snapshot: SnapshotHolder,
    *,
    scheduler: Scheduler,
    engine: EngineClient,
    runtime: PodmanRuntime,
    operations: Operations,
    workers: WorkerLeases,
    tokenize_failures: TokenizeFailures,
    reconciled: asyncio.Event,
    fleet: Fleet,
    weights: WeightService | None = None,
) -> web.Application:
    """The application; each route takes the services it uses from the app's keys (``appkeys.py``)."""
    app = web.Application(
        middlewares=[
            watch_requests, cors.cors_middleware(lambda: snapshot.current.config.server.cors_origins), error_middleware,
            auth_middleware(snapshot),
        ],
        client_max_size=snapshot.current.config.server.max_body_bytes,
        handler_args=HANDLER_ARGS,
    )
    app[SNAPSHOT], app[SCHEDULER], app[ENGINE], app[RUNTIME] = snapshot, scheduler, engine, runtime
    app[OPERATIONS], app[WORKERS], app[TOKENIZE_FAILURES], app[RECONCILED] = operations, workers, tokenize_failures, reconciled
    app[FLEET] = fleet
    app[WEIGHTS] = weights or WeightService(snapshot.current.config)
    app.on_response_prepare.append(cors.on_response_prepare)
    HealthRoutes().add_to(app)
    openai_routes = OpenAIRoutes()
    openai_routes.add_to(app)
    FleetRoutes(openai_routes.proxy).add_to(app)
    AdminRoutes().add_to(app)
    ClusterRoutes().add_to(app)
    OpsRoutes().add_to(app)
    PageRoutes().add_to(app)
    WeightRoutes().add_to(app)
    return app


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Anthropic clients read errors in Anthropic's shape only (the auth refusals too).
    # (A request a peer forwarded, /api/fleet/v1/..., is answered in the shape its client expects.)
    anthropic_path = anthropic.is_anthropic_path(request.path.removeprefix(FORWARD_PREFIX))
    render = anthropic.error_response if anthropic_path else ApiError.response
    try:
        return await handler(request)
    except ApiError as error:
        return render(error)
    except web.HTTPRequestEntityTooLarge as error:
        # aiohttp's text: "Maximum request body size N exceeded." (the exception has no max_size attribute)
        return render(PayloadTooLarge(f"the request body is too large: {error.text} (server.max_body_bytes)"))
    except web.HTTPMethodNotAllowed as error:
        allowed = ", ".join(sorted(error.allowed_methods))
        return render(MethodNotAllowed(f"{request.method} is not allowed on this endpoint; use {allowed}", headers={"Allow": allowed}))
    except web.HTTPNotFound:
        return render(NotFound("no such endpoint: sparkd serves /v1/... (OpenAI API), /healthz, /readyz and /api/...", code="unknown_endpoint"))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        refusal = ApiError(error.reason or "request refused", code=f"http_{error.status}")
        refusal.status = error.status
        refusal.type = "invalid_request_error" if error.status < 500 else "server_error"
        return render(refusal)
    except ConnectionError:
        raise  # the client went away: nobody to answer
    except Exception:  # a bug must cost one request a 500, never the daemon
        log.exception("request_failed", method=request.method, path=shown(request.path))
        if request.writer is not None and request.writer.output_size > 0:
            raise  # an answer is under way already: aiohttp closes the connection
        return render(ApiError(
            "sparkd failed on this request (an internal error, logged as request_failed); "
            "retry, and report it if it happens again"
        ))


def auth_middleware(snapshot: SnapshotHolder) -> Middleware:
    """Who is calling (``request[PRINCIPAL]``); 401 without a valid key, 403 when the key's role may not use the route."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        allowed, what = route_access(request)
        try:
            current = snapshot.current
            principal = authenticate(current.keys, current.config.server.anonymous, request)
            authorize(principal, allowed, what)
        except (Unauthorized, Forbidden) as refusal:
            log.info("auth_refused", reason=refusal.code, remote=request.remote, path=shown(request.path))
            raise
        request[PRINCIPAL] = on_behalf(principal, request.headers)
        return await handler(request)

    return middleware


def route_access(request: web.Request) -> tuple[frozenset[str], str]:
    """The roles that may use the request's route, and how to name the route in a refusal."""
    if isinstance(request.match_info.http_exception, web.HTTPNotFound):
        # No such route: every authenticated caller gets the same 404 (whether worker leases exist
        # on this node is no secret of one role).
        return ALL_ROLES, "this endpoint"
    paths = [request.path]
    resource = request.match_info.route.resource
    if resource is not None:
        paths.append(resource.canonical)
    if any(path == LEASE_PATH or path.startswith(LEASE_PATH + "/") for path in paths):
        return PEER_ROLES, "a worker lease"
    if any(path.startswith(FORWARD_PREFIX + "/") for path in paths):
        return PEER_ROLES, "the fleet API (requests forwarded by a peer sparkd)"
    if any(path.startswith(WORKER_WEIGHTS_PATH + "/") for path in paths):
        return PEER_ROLES, "a worker's weights"
    if VERSION_PATH in paths:
        return VERSION_ROLES, "the version endpoint"
    if any(path.startswith(("/api/", "/metrics")) for path in paths):
        return ADMIN_ROLES, "the admin API"
    return MODEL_ROLES, "the OpenAI API"
