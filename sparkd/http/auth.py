"""Who a request is, given the client keys of the keys file (``config/keys.py``).

A client sends its key as ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.
Checking costs one SHA-256 of the presented key and one dict lookup, however
many keys there are; the stored digest is then compared with
``hmac.compare_digest``. Only digests are kept in memory; a key never appears in
a log line, an error or the status output (only its name does).

Who a request is (``identify``), in this order:

1. A presented key decides, on every transport and in every anonymous mode: a key
   in the file is its principal (role, model list); any other key is a 401. A bad
   key never falls back to anonymous access, so a model-restricted key cannot shed
   its restriction by sending garbage.
2. No key over the unix admin socket (``<runtime_dir>/sparkd.sock``, mode 0660:
   its file permissions decide): the admin principal. This is the only keyless
   admin access; ``sparkctl`` uses it.
3. No key over TCP: the anonymous principal (role ``user``) when
   ``server.anonymous`` allows it for the peer (``loopback`` = from this machine,
   ``any`` = from anywhere); otherwise a 401. The anonymous principal is never an
   admin: every SSH-tunnel user arrives as 127.0.0.1.

What a principal may reach (``authorize``): ``/v1/*`` needs role ``user`` or
``admin``; ``/api/*`` and ``/metrics`` need ``admin``; the worker-lease routes
and the fleet API (``/api/fleet/...``: requests another sparkd forwards, ``sparkd/fleet``) need
``peer``; ``/api/version`` takes ``admin`` or ``peer``.

A keyless request over TCP must name the server by address or as ``localhost``
in ``Host`` (``hosts.py``): under another name it may come from a web page that
pointed its own DNS name at this machine (DNS rebinding) and reads the answers,
which the CORS check cannot see (a browser sends no ``Origin`` on a same-origin
GET). Such a request gets a 403; a key, which no such page has, lifts the rule.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ..config import ModelConfig
from ..config.keys import ADMIN, PEER, USER, ClientKey, KeyLimits, digest_key, read_keys_file
from ..config.schema import LoadingFeedback
from ..errors import Forbidden, Unauthorized
from .hosts import is_address_host
from .routing import shown

MODEL_ROLES = frozenset({ADMIN, USER})
ADMIN_ROLES = frozenset({ADMIN})
PEER_ROLES = frozenset({PEER})
VERSION_ROLES = frozenset({ADMIN, PEER})
ALL_ROLES = frozenset({ADMIN, USER, PEER})


@dataclass(frozen=True)
class Principal:
    """Who is calling: a named key, the anonymous client, or a client of the admin socket."""

    name: str
    role: str
    models: frozenset[str] | None = None
    """Model names/aliases this key may use; None = all."""
    anonymous: bool = False
    """Sent no key (the anonymous client, the admin socket's client)."""
    loading_feedback: LoadingFeedback | None = None
    """How this key's streams show a model's loading; None = the model's ``loading_feedback``."""
    limits: KeyLimits = field(default_factory=KeyLimits)
    """The key's ``max_concurrent``, ``tokens_per_day`` and ``priority`` (none for keyless callers)."""
    via: str | None = None
    """A request a peer forwarded: the name of that peer's key (``name`` is the client's key at the entry node)."""

    def feedback_for(self, model: ModelConfig) -> LoadingFeedback:
        return self.loading_feedback or model.loading_feedback

    def may_use(self, model: ModelConfig) -> bool:
        return self.may_use_named(model.name, model.aliases)

    def may_use_named(self, name: str, aliases: Iterable[str] = ()) -> bool:
        """May use the model called ``name`` (with ``aliases``), wherever it runs."""
        allowed = self.models
        return allowed is None or name in allowed or not allowed.isdisjoint(aliases)

    def check_model(self, model: ModelConfig) -> None:
        self.check_model_named(model.name, model.aliases)

    def check_model_named(self, name: str, aliases: Iterable[str] = ()) -> None:
        if not self.may_use_named(name, aliases):
            allowed = ", ".join(sorted(self.models or ())) or "none"
            raise Forbidden(
                f"the key {self.name!r} may not use model {name}; it may use: {allowed}. "
                "Ask the operator to add the model to the key's models list in the keys file",
                code="model_not_allowed",
            )


ANONYMOUS = Principal("anonymous", USER, anonymous=True)
"""A keyless TCP client that ``server.anonymous`` lets in: never an admin."""
ADMIN_SOCKET = Principal("admin-socket", ADMIN, anonymous=True)
"""A keyless client of the unix admin socket, whose file permissions already decided."""
PRINCIPAL = web.RequestKey("principal", Principal) if hasattr(web, "RequestKey") else "principal"


class KeyRing:
    """The client keys, by the SHA-256 digest of each key."""

    def __init__(self, keys: Iterable[ClientKey] = ()) -> None:
        self._by_digest: dict[bytes, tuple[bytes, Principal]] = {
            key.digest: (key.digest, Principal(key.name, key.role, key.models, loading_feedback=key.loading_feedback, limits=key.limits))
            for key in keys
        }
        self.name_set = frozenset(principal.name for _, principal in self._by_digest.values())
        """The key names (for the per-key metrics, which know no other)."""

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def names(self) -> list[str]:
        return sorted(principal.name for _, principal in self._by_digest.values())

    def check(self, presented: str) -> Principal | None:
        """The principal whose key this is, or None."""
        digest = digest_key(presented)
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(digest, found[0]):
            return None
        return found[1]

    @classmethod
    def load(cls, path: str | Path, *, required: bool) -> KeyRing:
        """The keys of the keys file at ``path`` (``KeysFileError`` when it cannot be used)."""
        return cls(read_keys_file(path, required=required))


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries (Bearer or x-api-key), None when it carries none."""
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            raise Unauthorized(
                "the Authorization header must be 'Bearer <key>' (or send the key as x-api-key: <key>)",
                code="invalid_authorization_header",
            )
        return value
    key = headers.get("X-Api-Key")
    if key is not None:
        key = key.strip()
        if not key:
            raise Unauthorized("the x-api-key header is empty: send your sparkd key", code="invalid_api_key")
        return key
    return None


def via_unix_socket(request: Any) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and getattr(sock, "family", None) == getattr(socket, "AF_UNIX", None)


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def authenticate(keys: KeyRing, anonymous: str, request: Any) -> Principal:
    """Who sent ``request`` (see the module docstring), or a 401/403 in OpenAI's shape."""
    unix_socket = via_unix_socket(request)
    principal = identify(
        keys, anonymous, presented_key(request.headers), unix_socket=unix_socket, loopback=is_loopback(request.remote)
    )
    if principal.anonymous and not unix_socket:
        check_keyless_host(request.headers.get("Host"))
    return principal


def check_keyless_host(host: str | None) -> None:
    """Refuse a keyless request whose ``Host`` is a DNS name (see the module docstring).

    A request without ``Host`` passes: every browser sends one, and only a
    browser can carry a rebinding page's request.
    """
    if host is None or is_address_host(host):
        return
    raise Forbidden(
        f"keyless access must address sparkd by IP address or as localhost, not as {shown(host)}: "
        "a web page can point a DNS name at this machine (DNS rebinding). Use the machine's address "
        "(e.g. http://127.0.0.1:8009) or send a key ('Authorization: Bearer <key>')",
        code="host_not_allowed",
    )


def identify(keys: KeyRing, anonymous: str, key: str | None, *, unix_socket: bool, loopback: bool) -> Principal:
    """The principal of a request that presented ``key`` (None: no key), or ``Unauthorized``."""
    if key is not None:
        principal = keys.check(key)
        if principal is None:
            raise Unauthorized(
                "the API key is not valid: it is not in the sparkd keys file (it may have been revoked); "
                "check the key your client sends, or send none where keyless access is allowed",
                code="invalid_api_key",
            )
        return principal
    if unix_socket:
        return ADMIN_SOCKET
    if anonymous == "any" or (anonymous == "loopback" and loopback):
        return ANONYMOUS
    where = " (keyless access is allowed from the sparkd machine itself only)" if anonymous == "loopback" else ""
    raise Unauthorized(
        f"no API key{where}: send 'Authorization: Bearer <key>' or 'x-api-key: <key>' with a key from the sparkd keys file",
        code="missing_api_key",
    )


def authorize(principal: Principal, allowed: frozenset[str], what: str) -> None:
    """Refuse ``principal`` on a route for the roles ``allowed``: 401 for a keyless caller (a key would help), else 403."""
    if principal.role in allowed:
        return
    needed = " or ".join(f'"{role}"' for role in sorted(allowed))
    if principal.anonymous:
        raise Unauthorized(
            f"{what} needs a key with role {needed}: send 'Authorization: Bearer <key>'. Keyless admin access is "
            "the unix admin socket only (sparkctl on the sparkd machine uses it)",
            code="missing_api_key",
        )
    raise Forbidden(
        f"{what} needs a key with role {needed}; the key {principal.name!r} has role \"{principal.role}\"",
        code="admin_role_required" if allowed == ADMIN_ROLES else "role_not_allowed",
    )
