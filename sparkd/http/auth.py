"""Client keys: the keys file, and who a request is.

The keys file (``server.keys_file``, TOML, owned by the user sparkd runs as, mode 0600)::

    [keys.alice]
    key = "sk-sparkd-..."     # at least 16 characters, no whitespace
    role = "admin"            # "admin" (models and the admin API), "user" (default: models only)
                              # or "peer" (a head sparkd asking this node for worker leases, nothing else)

    [keys.ci]
    key = "sk-sparkd-..."
    models = ["qwen2.5-1.5b-instruct"]   # optional: only these models (names or aliases)
    loading_feedback = "reasoning"       # optional: how its streams show a model's loading ("off",
                                         # "content", "reasoning"), over the model's own setting

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
need ``peer``; ``/api/version`` takes ``admin`` or ``peer``.

A keyless request over TCP must name the server by address or as ``localhost``
in ``Host`` (``hosts.py``): under another name it may come from a web page that
pointed its own DNS name at this machine (DNS rebinding) and reads the answers,
which the CORS check cannot see (a browser sends no ``Origin`` on a same-origin
GET). Such a request gets a 403; a key, which no such page has, lifts the rule.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, get_args

from aiohttp import web

from ..config import Config, ModelConfig
from ..config.schema import LoadingFeedback
from ..config.validate import describe as describe_value
from ..errors import Forbidden, Unauthorized
from ..private_files import PrivateFileError, read_private_file
from .hosts import is_address_host
from .routing import shown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ADMIN = "admin"
USER = "user"
PEER = "peer"
ROLES = (ADMIN, USER, PEER)
MODEL_ROLES = frozenset({ADMIN, USER})
ADMIN_ROLES = frozenset({ADMIN})
PEER_ROLES = frozenset({PEER})
VERSION_ROLES = frozenset({ADMIN, PEER})
ALL_ROLES = frozenset(ROLES)
MIN_KEY_LENGTH = 16
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENTRY_FIELDS = frozenset({"key", "role", "models", "loading_feedback"})
LOADING_FEEDBACK = get_args(LoadingFeedback)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a named key, the anonymous client, or a client of the admin socket."""

    name: str
    role: str
    models: Optional[frozenset[str]] = None
    """Model names/aliases this key may use; None = all."""
    anonymous: bool = False
    """Sent no key (the anonymous client, the admin socket's client)."""
    loading_feedback: LoadingFeedback | None = None
    """How this key's streams show a model's loading; None = the model's ``loading_feedback``."""

    def feedback_for(self, model: ModelConfig) -> LoadingFeedback:
        return self.loading_feedback or model.loading_feedback

    def may_use(self, model: ModelConfig) -> bool:
        allowed = self.models
        return allowed is None or model.name in allowed or not allowed.isdisjoint(model.aliases)

    def check_model(self, model: ModelConfig) -> None:
        if not self.may_use(model):
            allowed = ", ".join(sorted(self.models or ())) or "none"
            raise Forbidden(
                f"the key {self.name!r} may not use model {model.name}; it may use: {allowed}. "
                "Ask the operator to add the model to the key's models list in the keys file",
                code="model_not_allowed",
            )


ANONYMOUS = Principal("anonymous", USER, anonymous=True)
"""A keyless TCP client that ``server.anonymous`` lets in: never an admin."""
ADMIN_SOCKET = Principal("admin-socket", ADMIN, anonymous=True)
"""A keyless client of the unix admin socket, whose file permissions already decided."""
PRINCIPAL = web.RequestKey("principal", Principal) if hasattr(web, "RequestKey") else "principal"


class KeysFileError(Exception):
    """The keys file cannot be used; ``problems`` say why (never quoting a key)."""

    def __init__(self, path: str, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.path = path
        self.problems = problems

    def __str__(self) -> str:
        return f"keys file {self.path}: " + "; ".join(self.problems)


class KeyEntry(NamedTuple):
    key: str
    role: str
    models: frozenset[str] | None
    loading_feedback: LoadingFeedback | None = None


class KeyRing:
    """The client keys, by the SHA-256 digest of each key."""

    def __init__(self, entries: Mapping[str, KeyEntry | tuple[str, str, frozenset[str] | None]] | None = None) -> None:
        """``entries``: name → (key, role, models or None[, loading_feedback])."""
        self._by_digest: dict[bytes, tuple[bytes, Principal]] = {}
        for name, fields in (entries or {}).items():
            entry = KeyEntry(*fields)
            digest = _digest(entry.key)
            principal = Principal(name, entry.role, entry.models, loading_feedback=entry.loading_feedback)
            self._by_digest[digest] = (digest, principal)

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def names(self) -> list[str]:
        return sorted(principal.name for _, principal in self._by_digest.values())

    def check(self, presented: str) -> Principal | None:
        """The principal whose key this is, or None."""
        digest = _digest(presented)
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(digest, found[0]):
            return None
        return found[1]

    @classmethod
    def load(cls, path: str | Path, *, required: bool) -> "KeyRing":
        """Read and check the keys file. A missing file is an empty ring unless ``required``.

        Raises ``KeysFileError`` for a file that is group/world-accessible, unreadable,
        not valid TOML or holds an invalid entry.
        """
        path = Path(path)
        try:
            raw = read_private_file(path)
        except FileNotFoundError:
            if required:
                raise KeysFileError(
                    str(path),
                    [
                        (
                            "no such file, and server.anonymous = \"off\" would refuse every request; create it with "
                            "[keys.<name>] tables (key, role, models) and mode 600, or set server.anonymous"
                        )
                    ],
                ) from None
            return cls()
        except PrivateFileError as error:
            raise KeysFileError(str(path), [str(error)]) from None
        try:
            document = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise KeysFileError(str(path), ["not UTF-8 text"]) from None
        except tomllib.TOMLDecodeError as error:
            raise KeysFileError(str(path), [f"not valid TOML: {error}"]) from None
        entries, problems = parse_keys(document)
        if not problems and required and not entries:
            problems.append(
                "it holds no [keys.<name>] table, and server.anonymous = \"off\" would refuse every request; add a key or set server.anonymous"
            )
        if problems:
            raise KeysFileError(str(path), problems)
        return cls(entries)


def parse_keys(document: dict[str, Any]) -> tuple[dict[str, KeyEntry], list[str]]:
    """Entries of a parsed keys file and the problems found (which never quote a key)."""
    problems: list[str] = []
    entries: dict[str, KeyEntry] = {}
    for section in document:
        if section != "keys":
            problems.append(f"unknown section {section!r}: only [keys.<name>] tables belong here")
    tables = document.get("keys", {})
    if not isinstance(tables, dict):
        return {}, problems + ["'keys' must hold tables [keys.<name>]"]
    seen: dict[bytes, str] = {}
    for name, table in tables.items():
        where = f"keys.{name}"
        if not KEY_NAME.match(name):
            problems.append(f"{where}: a key name is letters, digits, '.', '_' or '-' (at most 64)")
            continue
        if not isinstance(table, dict):
            problems.append(f"{where}: expected a table with key, role and models")
            continue
        for unknown in sorted(set(table) - ENTRY_FIELDS):
            problems.append(f"{where}.{unknown}: unknown field (known: key, role, models, loading_feedback)")
        key = table.get("key")
        if not isinstance(key, str):
            problems.append(f"{where}.key: expected a string" + (" (missing)" if key is None else f", found a {type(key).__name__}"))
            continue
        if len(key) < MIN_KEY_LENGTH or any(c.isspace() or not c.isprintable() for c in key):
            problems.append(f"{where}.key: expected at least {MIN_KEY_LENGTH} printable characters without whitespace")
            continue
        digest = _digest(key)
        if digest in seen:
            problems.append(f"{where}.key: the same key as keys.{seen[digest]}; every key must be distinct")
            continue
        seen[digest] = name
        role = table.get("role", USER)
        if role not in ROLES:
            problems.append(f"{where}.role: expected \"admin\", \"user\" or \"peer\", found {role!r}")
            continue
        models = table.get("models")
        if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
            problems.append(f"{where}.models: expected an array of model names")
            continue
        if models is not None and role == PEER:
            problems.append(f"{where}.models: a peer key serves worker leases only (the [workers.<model>] tables decide which)")
            continue
        feedback = table.get("loading_feedback")
        if feedback is not None and feedback not in LOADING_FEEDBACK:
            choices = ", ".join(f'"{choice}"' for choice in LOADING_FEEDBACK)
            problems.append(f"{where}.loading_feedback: expected one of {choices}, found {describe_value(feedback)}")
            continue
        entries[name] = KeyEntry(key, role, frozenset(models) if models is not None else None, feedback)
    return entries, problems


def load_keys(config: Config) -> KeyRing:
    """The keys file of ``config``; required (non-empty) unless anonymous access is on."""
    return KeyRing.load(config.server.keys_file, required=config.server.anonymous == "off")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


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
