"""The client keys file (``server.keys_file``): one frozen ``ClientKey`` per ``[keys.<name>]`` table.

The file (TOML, owned by the user sparkd runs as, mode 0600)::

    [keys.alice]
    key = "sk-sparkd-..."     # at least 16 characters, no whitespace
    role = "admin"            # "admin" (models and the admin API), "user" (default: models only)
                              # or "peer" (a head sparkd asking this node for worker leases, nothing else)

    [keys.ci]
    key = "sk-sparkd-..."
    models = ["qwen2.5-1.5b-instruct"]   # optional: only these models (names or aliases)
    loading_feedback = "reasoning"       # optional: how its streams show a model's loading ("off",
                                         # "content", "reasoning"), over the model's own setting
    max_concurrent = 2                   # optional: requests of this key in flight + waiting at most (429 past it)
    tokens_per_day = 200000              # optional: prompt + completion tokens per day (local time) at most
    priority = 10                        # optional (default 0): higher-priority waiters get the GPU first

Only each key's SHA-256 digest is kept; problems name the entry and never quote a key.
Who a request is, given these keys, is ``http/auth.py``'s concern.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from ..private_files import PrivateFileError, read_private_file
from .schema import Config, LoadingFeedback
from .validate import describe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ADMIN = "admin"
USER = "user"
PEER = "peer"
ROLES = (ADMIN, USER, PEER)
MIN_KEY_LENGTH = 16
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LIMIT_FIELDS = ("max_concurrent", "tokens_per_day", "priority")
ENTRY_FIELDS = frozenset({"key", "role", "models", "loading_feedback", *LIMIT_FIELDS})
MAX_PRIORITY = 1000
"""Priorities are integers in -MAX_PRIORITY..MAX_PRIORITY."""
LOADING_FEEDBACK: tuple[LoadingFeedback, ...] = get_args(LoadingFeedback)


def digest_key(key: str) -> bytes:
    """The SHA-256 digest a key is known by (a presented key is hashed the same way)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class KeyLimits:
    """What one key may take of the GPU's time (``max_concurrent``, ``tokens_per_day``, ``priority``)."""

    max_concurrent: int | None = None
    """Requests in flight plus waiting at most; None = no limit beyond ``lifecycle.queue_per_key``."""
    tokens_per_day: int | None = None
    """Prompt plus completion tokens per (local) day at most; None = no limit."""
    priority: int = 0
    """Higher goes first when the GPU changes hands; equal priorities are first come, first served."""


@dataclass(frozen=True)
class ClientKey:
    """One ``[keys.<name>]`` entry, its key kept only as a digest."""

    name: str
    role: str
    models: frozenset[str] | None
    """Model names/aliases this key may use; None = all."""
    digest: bytes = field(repr=False)
    loading_feedback: LoadingFeedback | None = None
    """How this key's streams show a model's loading; None = the model's ``loading_feedback``."""
    limits: KeyLimits = field(default_factory=KeyLimits)

    @classmethod
    def of(
        cls, name: str, key: str, role: str = USER, models: frozenset[str] | None = None,
        loading_feedback: LoadingFeedback | None = None, limits: KeyLimits | None = None,
    ) -> ClientKey:
        return cls(name, role, models, digest_key(key), loading_feedback, limits or KeyLimits())


class KeysFileError(Exception):
    """The keys file cannot be used; ``problems`` say why (never quoting a key)."""

    def __init__(self, path: str, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.path = path
        self.problems = problems

    def __str__(self) -> str:
        return f"keys file {self.path}: " + "; ".join(self.problems)


def keys_of(config: Config) -> tuple[ClientKey, ...]:
    """The keys file of ``config``; required (non-empty) unless anonymous access is on."""
    return read_keys_file(config.server.keys_file, required=config.server.anonymous == "off")


def read_keys_file(path: str | Path, *, required: bool, check_owner: bool = True) -> tuple[ClientKey, ...]:
    """Read and check the keys file. A missing file holds no keys unless ``required``;
    ``check_owner=False``: whoever owns it (``sparkd check-config`` checks it for the daemon's user).

    Raises ``KeysFileError`` for a file that is group/world-accessible, unreadable,
    not valid TOML or holds an invalid entry.
    """
    path = Path(path)
    try:
        raw = read_private_file(path, check_owner=check_owner)
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
        return ()
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
    return tuple(entries.values())


def parse_keys(document: dict[str, Any]) -> tuple[dict[str, ClientKey], list[str]]:
    """Entries of a parsed keys file and the problems found (which never quote a key)."""
    problems = [
        f"unknown section {section!r}: only [keys.<name>] tables belong here" for section in document if section != "keys"
    ]
    tables = document.get("keys", {})
    if not isinstance(tables, dict):
        return {}, [*problems, "'keys' must hold tables [keys.<name>]"]
    entries: dict[str, ClientKey] = {}
    seen: dict[bytes, str] = {}
    for name, table in tables.items():
        entry = _parse_entry(name, table, seen, problems)
        if entry is not None:
            entries[name] = entry
    return entries, problems


def _parse_entry(name: str, table: Any, seen: dict[bytes, str], problems: list[str]) -> ClientKey | None:
    """One ``[keys.<name>]`` table, or None with its first problem (and any unknown fields) in ``problems``."""
    where = f"keys.{name}"
    if not KEY_NAME.match(name):
        problems.append(f"{where}: a key name is letters, digits, '.', '_' or '-' (at most 64)")
        return None
    if not isinstance(table, dict):
        problems.append(f"{where}: expected a table with key, role and models")
        return None
    for unknown in sorted(set(table) - ENTRY_FIELDS):
        problems.append(f"{where}.{unknown}: unknown field (known: {', '.join(sorted(ENTRY_FIELDS))})")
    digest_or_problem = _key_digest(where, table.get("key"), seen)
    if isinstance(digest_or_problem, str):
        problems.append(digest_or_problem)
        return None
    seen[digest_or_problem] = name
    role = table.get("role", USER)
    models = table.get("models")
    feedback = table.get("loading_feedback")
    problem = _role_problem(where, role, models) or _feedback_problem(where, feedback)
    if problem is not None:
        problems.append(problem)
        return None
    limits = _parse_limits(where, table, problems)
    if limits is None:
        return None
    return ClientKey(name, role, frozenset(models) if models is not None else None, digest_or_problem, feedback, limits)


def _parse_limits(where: str, table: dict[str, Any], problems: list[str]) -> KeyLimits | None:
    """An entry's ``max_concurrent``, ``tokens_per_day`` and ``priority``, or None with every problem in ``problems``."""
    found = [
        _whole_number_problem(where, "max_concurrent", table.get("max_concurrent"), 1, None),
        _whole_number_problem(where, "tokens_per_day", table.get("tokens_per_day"), 1, None),
        _whole_number_problem(where, "priority", table.get("priority"), -MAX_PRIORITY, MAX_PRIORITY),
    ]
    found_problems = [problem for problem in found if problem is not None]
    if found_problems:
        problems.extend(found_problems)
        return None
    return KeyLimits(
        max_concurrent=table.get("max_concurrent"), tokens_per_day=table.get("tokens_per_day"), priority=table.get("priority", 0)
    )


def _whole_number_problem(where: str, name: str, value: Any, low: int, high: int | None) -> str | None:
    """The problem with an optional whole-number field (None: absent, or fine)."""
    if value is None:
        return None
    bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{where}.{name}: expected a whole number {bounds}, found {describe(value)}"
    if value < low or (high is not None and value > high):
        return f"{where}.{name}: expected a whole number {bounds}, found {value}"
    return None


def _key_digest(where: str, key: Any, seen: dict[bytes, str]) -> bytes | str:
    """The digest of an entry's key, or the problem with it."""
    if not isinstance(key, str):
        return f"{where}.key: expected a string" + (" (missing)" if key is None else f", found a {type(key).__name__}")
    if len(key) < MIN_KEY_LENGTH or any(c.isspace() or not c.isprintable() for c in key):
        return f"{where}.key: expected at least {MIN_KEY_LENGTH} printable characters without whitespace"
    digest = digest_key(key)
    if digest in seen:
        return f"{where}.key: the same key as keys.{seen[digest]}; every key must be distinct"
    return digest


def _role_problem(where: str, role: Any, models: Any) -> str | None:
    if role not in ROLES:
        return f"{where}.role: expected \"admin\", \"user\" or \"peer\", found {role!r}"
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        return f"{where}.models: expected an array of model names"
    if models is not None and role == PEER:
        return f"{where}.models: a peer key serves worker leases only (the [workers.<model>] tables decide which)"
    return None


def _feedback_problem(where: str, feedback: Any) -> str | None:
    if feedback is None or feedback in LOADING_FEEDBACK:
        return None
    choices = ", ".join(f'"{choice}"' for choice in LOADING_FEEDBACK)
    return f"{where}.loading_feedback: expected one of {choices}, found {describe(feedback)}"
