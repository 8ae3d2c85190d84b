"""CORS for browser clients (VS Code webviews, local web UIs): an origin allowlist.

Patterns are origins with ``*`` wildcards: a trailing ``:*`` means "any port or
none" (``http://localhost:*`` allows ``http://localhost`` and
``http://localhost:5173``), any other ``*`` stands for one or more host
characters (``vscode-webview://*``), and ``*`` alone allows every origin.

A request from a browser carries ``Origin``. From an allowed origin (or the
server's own, addressed by IP or as localhost) it is served and its response, streamed ones
included, gets ``Access-Control-Allow-Origin`` plus the exposed headers (added
in ``on_response_prepare``, just before the headers are sent). A request from
any other origin is refused with a 403, so a web page cannot drive sparkd
through a user's browser, keyless loopback access included. ``OPTIONS`` is
answered here with a 204 and never needs a key (preflights carry none).
Requests without ``Origin`` (curl, SDKs, and a browser's same-origin GET) pass
through untouched; a keyless one of those must name this machine by address in
``Host`` (``auth.py``), or a rebinding page could read the answers.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from functools import lru_cache

from aiohttp import web

from ..errors import Forbidden
from .hosts import is_address_host

ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = (
    "Authorization", "Content-Type", "X-Api-Key", "X-Requested-With", "Cache-Control", "DNT", "User-Agent",
    "If-Modified-Since", "Range", "OpenAI-Organization", "OpenAI-Project", "OpenAI-Beta",
)
EXPOSE_HEADERS = "Content-Length, Content-Range, Retry-After, X-Sparkd-Max-Tokens-Capped, X-Sparkd-Fixups"
MAX_AGE = "600"
ORIGIN_KEY = web.RequestKey("cors_origin", str) if hasattr(web, "RequestKey") else "cors_origin"
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_HOST_CHARS = "[A-Za-z0-9.-]+"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def pattern_error(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable origin pattern, or None."""
    if pattern == "*":
        return None
    if not pattern or any(c.isspace() for c in pattern):
        return "empty or holds whitespace"
    scheme, sep, rest = pattern.partition("://")
    if not sep or not scheme or not rest:
        return "expected scheme://host[:port]"
    if "/" in rest:
        return "an origin has no path"
    return None


def _regex(pattern: str) -> str:
    if pattern == "*":
        return ".*"
    port_wildcard = pattern.endswith(":*")
    body = pattern[:-2] if port_wildcard else pattern
    regex = re.escape(body).replace(r"\*", _HOST_CHARS)
    return regex + ("(:[0-9]+)?" if port_wildcard else "")


@lru_cache(maxsize=8)
def compile_patterns(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    usable = [p for p in patterns if pattern_error(p) is None]
    return re.compile("^(?:" + "|".join(_regex(p) for p in usable) + ")$") if usable else None


def origin_allowed(origin: str, patterns: tuple[str, ...], host: str | None) -> bool:
    """``origin`` matches a pattern, or is the server's own origin (a page sparkd serves).

    The own-origin rule holds only for an address or ``localhost`` in ``Host``: a DNS
    name there may be a rebinding attack (a hostile page whose name now resolves to
    this machine); a name of this server's own goes into ``server.cors_origins``.
    """
    if host and origin.partition("://")[2] == host and is_address_host(host):
        return True
    regex = compile_patterns(patterns)
    return bool(regex and regex.match(origin))


def preflight_headers(origin: str, requested: str | None) -> dict[str, str]:
    allowed = list(ALLOW_HEADERS)
    if requested:
        known = {h.lower() for h in allowed}
        for name in (part.strip() for part in requested.split(",")):
            if _TOKEN.match(name) and name.lower() not in known:
                allowed.append(name)
                known.add(name.lower())
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Allow-Headers": ", ".join(allowed),
        "Access-Control-Max-Age": MAX_AGE,
        "Vary": "Origin",
    }


def cors_middleware(patterns: Callable[[], tuple[str, ...]]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The middleware; ``patterns()`` gives the current allowlist (it changes on reload)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            if request.method == "OPTIONS":
                return web.Response(status=204, headers={"Allow": ALLOW_METHODS})
            return await handler(request)
        if not origin_allowed(origin, patterns(), request.headers.get("Host")):
            return Forbidden(
                "this origin may not call sparkd from a browser: add it to server.cors_origins "
                "(the allowlist) and reload sparkd",
                code="origin_not_allowed",
            ).response()
        if request.method == "OPTIONS":
            headers = preflight_headers(origin, request.headers.get("Access-Control-Request-Headers"))
            return web.Response(status=204, headers=headers)
        request[ORIGIN_KEY] = origin
        return await handler(request)

    return middleware


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Allow the browser to read the answer (every response: JSON, errors and streams)."""
    origin = request.get(ORIGIN_KEY)
    if origin is None:
        return
    headers = response.headers
    for name in [h for h in headers if h.lower().startswith("access-control-")]:
        headers.popall(name, None)
    headers["Access-Control-Allow-Origin"] = origin
    headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    headers.add("Vary", "Origin")
