"""Sending one request to a peer sparkd and relaying its answer, through the engine proxy's relay.

The request goes to the peer's ``/api/fleet/v1/...`` with this node's peer key, the client's
validated query and headers (``engine/outbound.py``, the same path as toward a local engine) and the
key name it is for. A peer that cannot be reached, or answers with a refusal before any byte of an
answer went to the client, raises ``PeerFailed``: the caller may try another node. Any other answer
(a stream, a completion, the client's own mistake such as a 400) is the client's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from yarl import URL

from ..cluster.peers import Peer
from ..config.schema import EngineConfig
from ..engine.client import Endpoint
from ..engine.proxy import forward
from ..engine.usage import RequestRecord
from ..errors import BadGateway, GatewayTimeout

FORWARD_PREFIX = "/api/fleet"
"""A peer's route for forwarded requests: ``/api/fleet/v1/...`` (keys of role ``peer`` only)."""
REFUSALS = frozenset({300, 301, 302, 303, 307, 308, 401, 403, 429, 500, 502, 503, 504})
"""Answers that say the peer will not serve it (its key, its lease, its health): another node may."""
NOT_THERE = frozenset({"model_not_found", "not_served_here"})
MAX_MESSAGE = 300


@dataclass(frozen=True)
class PeerEndpoint(Endpoint):
    """A peer sparkd as the proxy's upstream: its URL, and this node's peer key as the credential."""

    url: str = ""

    @property
    def base_url(self) -> str:
        return self.url


class PeerFailed(Exception):
    """The peer could not be reached or refused; nothing went to the client yet."""

    def __init__(self, peer: str, reason: str, *, reachable: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.peer, self.reason, self.reachable, self.retry_after = peer, reason, reachable, retry_after


def endpoint_of(peer: Peer) -> tuple[PeerEndpoint, bool]:
    """The peer as an upstream, and whether the raw relay (plain HTTP) can reach it."""
    url = URL(peer.config.url)
    base = peer.config.url.rstrip("/")
    plain = url.scheme == "http" and url.path in ("", "/")
    return PeerEndpoint(port=url.port or 80, key=peer.key, host=url.host or "", url=base), plain


async def send(
    request: web.Request,
    session: aiohttp.ClientSession,
    peer: Peer,
    path: str,
    body: bytes,
    model: str,
    limits: EngineConfig,
    streaming: bool,
    record: RequestRecord,
    own_headers: Mapping[str, str],
) -> web.StreamResponse:
    """The peer's answer, relayed (a stream as it comes); ``PeerFailed`` when another node should be tried."""
    endpoint, plain = endpoint_of(peer)

    async def last_words() -> list[str]:
        return [f"the peer {peer.name} broke off its answer"]

    try:
        answer = await forward(
            request, session, endpoint, FORWARD_PREFIX + path, body, model, limits, None, streaming, record,
            last_words=last_words, own_headers=own_headers, raw_relay=plain,
        )
    except (BadGateway, GatewayTimeout) as error:
        cause = error.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else error.message
        raise PeerFailed(peer.name, f"unreachable at {peer.config.url} ({reason[:MAX_MESSAGE]})", reachable=False) from error
    if isinstance(answer, web.Response) and not answer.prepared:
        refusal = _refusal(answer)
        if refusal is not None:
            retry = answer.headers.get("Retry-After")
            raise PeerFailed(peer.name, refusal, reachable=True, retry_after=float(retry) if retry and retry.isdigit() else None)
    return answer


def _refusal(answer: web.Response) -> str | None:
    """Why the peer refused, or None for an answer that is the client's."""
    message, code = _error_of(answer.body if isinstance(answer.body, bytes) else b"")
    if answer.status in REFUSALS or (answer.status == 404 and code in NOT_THERE):
        where = f", a redirect to {answer.headers.get('Location', '')[:100]!r} (sparkd follows none)" if 300 <= answer.status < 400 else ""
        return f"refused with {answer.status}{where}: {message or answer.reason}"
    return None


def _error_of(body: bytes) -> tuple[str, str | None]:
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:MAX_MESSAGE].decode("utf-8", "replace"), None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return "", None
    message, code = error.get("message"), error.get("code")
    return (message[:MAX_MESSAGE] if isinstance(message, str) else ""), (code if isinstance(code, str) else None)
