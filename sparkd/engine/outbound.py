"""The one validated place where a client's request becomes a request toward an engine.

Everything of the client's that goes into the engine's request line or headers
passes here: the path (already checked by routing), the raw query string (byte
for byte as the client sent it, never percent-decoded: a decoded ``%0D%0A``
would split the request line), and the forwarded headers.  Anything that would
put CR, LF, a space or another byte outside visible ASCII into a request line
or a header is refused with a 400 before any connection to the engine exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from multidict import CIMultiDict
from yarl import URL

from ..errors import BadRequest
from .client import Endpoint

MAX_QUERY = 4096
"""Bytes of query string passed to an engine; no OpenAI route takes more than a few."""
MAX_SHOWN = 40

_TARGET = re.compile(r"[\x21-\x7e]*")
"""A request-target: visible ASCII only (RFC 9112 §3.2; no space, CR, LF, NUL, DEL, non-ASCII)."""
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A header name (RFC 9110 §5.6.2 token)."""
_FIELD_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?|")
"""A header value: visible ASCII, with spaces and tabs only inside (RFC 9110 §5.5, without obs-text)."""

# Hop-by-hop headers (RFC 9110 §7.6.1), the client's credentials, and the ones sparkd sets itself
# (the body is re-sent decoded and as JSON, so its encoding and type are sparkd's to say).
_NOT_FORWARDED = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Content-Type", "Content-Encoding", "Authorization",
        "X-Api-Key", "Cookie", "Origin", "Referer", "Expect",
        # Who a forwarded request is for: only sparkd sets these, toward a peer (sparkd/fleet/onbehalf.py).
        "X-Sparkd-Key-Name", "X-Sparkd-Forwarded-By",
    )
)
JSON = "application/json"


@dataclass(frozen=True)
class EngineRequest:
    """A request for an engine whose every byte has been checked."""

    url: URL
    """Sent as given (``encoded=True``): yarl must not re-quote the client's query."""
    headers: CIMultiDict[str]


def shown(text: str) -> str:
    """A client's text as an error message may show it: escaped, bounded."""
    return repr(text[:MAX_SHOWN]) + ("..." if len(text) > MAX_SHOWN else "")


def engine_target(path: str, raw_path: str) -> str:
    """``path`` plus the query string of the client's raw request-target, unchanged, or a 400."""
    _, has_query, query = raw_path.partition("?")
    query = query.partition("#")[0]
    if len(query) > MAX_QUERY:
        raise BadRequest(
            f"the query string is {len(query)} bytes long; sparkd forwards at most {MAX_QUERY} bytes: "
            "send the parameters in the JSON body",
            code="invalid_query",
        )
    if not _TARGET.fullmatch(query):
        raise BadRequest(
            f"the query string {shown(query)} holds a byte a request line cannot carry (a space, a control "
            "character or a non-ASCII byte); percent-encode it",
            code="invalid_query",
        )
    if not _TARGET.fullmatch(path) or not path.startswith("/"):
        raise BadRequest(f"the path {shown(path)} cannot be forwarded to an engine", code="invalid_path")
    return path + ("?" + query if has_query and query else "")


def engine_headers(client_headers: Iterable[tuple[str, str]], endpoint: Endpoint, json_body: bool) -> CIMultiDict[str]:
    """The client's end-to-end headers, each checked, plus the engine's key (and ``Content-Type`` of a JSON body)."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in client_headers:
        if name.lower() in _NOT_FORWARDED:
            continue
        if not _TOKEN.fullmatch(name):
            raise BadRequest(f"the header name {shown(name)} is not a valid HTTP token", code="invalid_header")
        if not _FIELD_VALUE.fullmatch(value):
            raise BadRequest(
                f"the value of header {shown(name)} holds a control character or a non-ASCII byte, which sparkd "
                "does not forward; send visible ASCII (percent- or base64-encode other text)",
                code="invalid_header",
            )
        headers.add(name, value)
    headers["Authorization"] = endpoint.auth_header
    if json_body:
        # The body was parsed as JSON whatever the client called it (curl -d says form-urlencoded);
        # vLLM refuses any other type.
        headers["Content-Type"] = JSON
    return headers


def engine_request(
    path: str, raw_path: str, client_headers: Iterable[tuple[str, str]], endpoint: Endpoint,
    own_headers: Mapping[str, str] | None = None,
) -> EngineRequest:
    """The validated request for ``endpoint``: its URL (raw query kept) and headers, or a 400.
    ``own_headers``: sparkd's own (a forwarded request's key name), added after the client's are checked."""
    target = engine_target(path, raw_path)
    headers = engine_headers(client_headers, endpoint, json_body=True)
    headers.update(own_headers or {})
    return EngineRequest(url=URL(endpoint.base_url + target, encoded=True), headers=headers)
