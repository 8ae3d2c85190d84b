"""Client keys: the keys file, the per-request check, and who a request is."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from multidict import CIMultiDict

from harness import write_keys
from sparkd.config import ModelConfig
from sparkd.config.keys import KeysFileError
from sparkd.errors import Forbidden, Unauthorized
from sparkd.http.auth import (
    ADMIN_ROLES,
    ADMIN_SOCKET,
    ANONYMOUS,
    MODEL_ROLES,
    PEER_ROLES,
    VERSION_ROLES,
    KeyRing,
    authenticate,
    authorize,
    identify,
    presented_key,
)

ALICE = "sk-alice-" + "a" * 32
BOB = "sk-bob-" + "b" * 32


def ring(tmp_path: Path, keys: dict, mode: int = 0o600) -> KeyRing:
    path = tmp_path / "keys.toml"
    write_keys(path, keys, mode)
    return KeyRing.load(path, required=True)


def request(headers=None, remote="192.168.1.20", family=socket.AF_INET):
    sock = SimpleNamespace(family=family)
    transport = SimpleNamespace(get_extra_info=lambda name: sock if name == "socket" else None)
    return SimpleNamespace(headers=headers or {}, remote=remote, transport=transport)


def test_keys_file_roles_and_models(tmp_path):
    keys = ring(tmp_path, {"alice": {"key": ALICE, "role": "admin"}, "bob": {"key": BOB, "models": ["small"]}})
    alice, bob = keys.check(ALICE), keys.check(BOB)
    assert (alice.name, alice.role, alice.models) == ("alice", "admin", None)
    assert (bob.name, bob.role, bob.models) == ("bob", "user", frozenset({"small"}))
    assert keys.check("sk-alice-" + "a" * 31 + "b") is None and keys.check("") is None
    assert keys.names == ["alice", "bob"]


def test_model_allowlist_by_name_or_alias(tmp_path):
    bob = ring(tmp_path, {"bob": {"key": BOB, "models": ["tiny"]}}).check(BOB)
    small = ModelConfig(name="small", image="i", aliases=("tiny",))
    other = ModelConfig(name="other", image="i")
    assert bob.may_use(small) and not bob.may_use(other)
    with pytest.raises(Forbidden) as refused:
        bob.check_model(other)
    assert "may not use model other" in refused.value.message and BOB not in refused.value.message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o700 | 0o004])
def test_a_group_or_world_accessible_keys_file_is_refused(tmp_path, mode):
    with pytest.raises(KeysFileError) as refused:
        ring(tmp_path, {"alice": {"key": ALICE}}, mode)
    text = str(refused.value)
    assert "chmod 600" in text and f"{mode:04o}" in text and ALICE not in text


def test_missing_or_empty_keys_file(tmp_path):
    assert len(KeyRing.load(tmp_path / "none.toml", required=False)) == 0
    with pytest.raises(KeysFileError, match=r"no such file.*server\.anonymous"):
        KeyRing.load(tmp_path / "none.toml", required=True)
    with pytest.raises(KeysFileError, match="holds no"):
        ring(tmp_path, {})


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"alice": {"key": "short"}}, "at least 16"),
        ({"alice": {"key": "has space in the middle!!"}}, "without whitespace"),
        ({"alice": {"key": 12345678901234567890}}, "expected a string"),
        ({"alice": {"role": "admin"}}, "(missing)"),
        ({"alice": {"key": ALICE, "role": "root"}}, "expected \"admin\", \"user\" or \"peer\""),
        ({"alice": {"key": ALICE, "models": "small"}}, "array of model names"),
        ({"alice": {"key": ALICE, "colour": "red"}}, "unknown field"),
        ({"alice": {"key": ALICE}, "bob": {"key": ALICE}}, "the same key as keys.alice"),
        ({"bad name": {"key": ALICE}}, "a key name is"),
    ],
)
def test_invalid_entries_are_named_without_quoting_the_key(tmp_path, keys, problem):
    with pytest.raises(KeysFileError) as refused:
        ring(tmp_path, keys)
    text = str(refused.value)
    assert problem in text
    assert ALICE not in text and "12345678901234567890" not in text and "has space" not in text


def test_invalid_toml(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text("[keys.alice\nkey = 'x'")
    path.chmod(0o600)
    with pytest.raises(KeysFileError, match="not valid TOML"):
        KeyRing.load(path, required=True)


def test_presented_key_in_both_header_forms():
    assert presented_key({"Authorization": f"Bearer {ALICE}"}) == ALICE
    assert presented_key({"Authorization": f"bearer   {ALICE} "}) == ALICE
    assert presented_key({"X-Api-Key": ALICE}) == ALICE
    assert presented_key({}) is None
    for bad in ({"Authorization": f"Basic {ALICE}"}, {"Authorization": "Bearer "}, {"X-Api-Key": " "}):
        with pytest.raises(Unauthorized) as refused:
            presented_key(bad)
        assert ALICE not in refused.value.message


def test_authenticate_with_keys_only(tmp_path):
    keys = ring(tmp_path, {"alice": {"key": ALICE, "role": "admin"}})
    assert authenticate(keys, "off", request({"Authorization": f"Bearer {ALICE}"})).name == "alice"
    assert authenticate(keys, "off", request(CIMultiDict({"x-api-key": ALICE}))).name == "alice"
    with pytest.raises(Unauthorized, match="no API key") as missing:
        authenticate(keys, "off", request())
    assert missing.value.code == "missing_api_key"
    with pytest.raises(Unauthorized, match="not valid") as wrong:
        authenticate(keys, "off", request({"Authorization": "Bearer sk-wrong-key-000000000000"}))
    assert wrong.value.code == "invalid_api_key"
    with pytest.raises(Unauthorized):  # loopback is no exception for the models when anonymous is off
        authenticate(keys, "off", request(remote="127.0.0.1"))


def test_anonymous_access_by_peer(tmp_path):
    keys = ring(tmp_path, {"alice": {"key": ALICE, "role": "admin"}, "bob": {"key": BOB, "models": ["small"]}})
    assert authenticate(keys, "loopback", request(remote="127.0.0.1")) is ANONYMOUS
    assert authenticate(keys, "loopback", request(remote="::1")) is ANONYMOUS
    # a key that is not in the file is a 401 in every mode, never a fallback to anonymous; a known key decides
    for mode in ("off", "loopback", "any"):
        with pytest.raises(Unauthorized) as wrong:
            authenticate(keys, mode, request({"Authorization": "Bearer EMPTY"}, remote="127.0.0.1"))
        assert wrong.value.code == "invalid_api_key"
    assert authenticate(keys, "loopback", request({"Authorization": f"Bearer {BOB}"}, remote="127.0.0.1")).name == "bob"
    with pytest.raises(Unauthorized, match="from the sparkd machine itself only"):
        authenticate(keys, "loopback", request(remote="192.168.1.20"))
    assert authenticate(keys, "any", request(remote="192.168.1.20")) is ANONYMOUS
    assert ANONYMOUS.role == "user" and ADMIN_SOCKET.role == "admin"


def test_keyless_access_needs_an_address_in_host(tmp_path):
    """A DNS name in Host may be a rebinding page's: keyless requests over TCP must use an address."""
    keys = ring(tmp_path, {"bob": {"key": BOB}})
    for host in ("127.0.0.1:8009", "127.0.0.1", "localhost:8009", "localhost", "[::1]:8009", "192.168.1.5:8009"):
        assert authenticate(keys, "loopback", request({"Host": host}, remote="127.0.0.1")) is ANONYMOUS, host
    for host in ("evil.example:8009", "evil.example", "localhost.evil.example:8009", "127.0.0.1.evil.example"):
        with pytest.raises(Forbidden) as refused:
            authenticate(keys, "loopback", request({"Host": host}, remote="127.0.0.1"))
        assert refused.value.code == "host_not_allowed" and refused.value.status == 403
        assert "IP address" in refused.value.message and "Bearer <key>" in refused.value.message
    with pytest.raises(Forbidden):  # anonymous from the LAN too
        authenticate(keys, "any", request({"Host": "evil.example:8009"}))
    # a key lifts the rule; a unix-socket client is no browser; a request without Host is none either
    assert authenticate(keys, "loopback", request({"Host": "evil.example", "Authorization": f"Bearer {BOB}"}, remote="127.0.0.1")).name == "bob"
    unix = request({"Host": "sparkd"}, remote="", family=socket.AF_UNIX)
    assert authenticate(keys, "off", unix) is ADMIN_SOCKET
    assert authenticate(keys, "loopback", request(remote="127.0.0.1")) is ANONYMOUS


# The auth decision as one table: (anonymous mode, key, transport) -> the principal's name or the refusal's
# status, then that principal on each route class. Keys: none, wrong, user, admin, restricted user, peer.
KEYS = {"user": BOB, "admin": ALICE, "restricted": "sk-ci-" + "c" * 32, "peer": "sk-head-" + "d" * 32}
IDENTIFY = {
    # mode,       key,     transport:  tcp loopback, tcp LAN,    unix socket
    ("off", None): ("401", "401", "admin-socket"),
    ("off", "wrong"): ("401", "401", "401"),
    ("loopback", None): ("anonymous", "401", "admin-socket"),
    ("loopback", "wrong"): ("401", "401", "401"),
    ("any", None): ("anonymous", "anonymous", "admin-socket"),
    ("any", "wrong"): ("401", "401", "401"),
}
for _mode in ("off", "loopback", "any"):
    for _key in KEYS:
        IDENTIFY[(_mode, _key)] = (_key, _key, _key)  # a valid key is itself everywhere
# principal -> status on (models, admin API, worker leases, version)
AUTHORIZE = {
    "anonymous": (200, 401, 401, 401),
    "admin-socket": (200, 200, 401, 200),
    "user": (200, 403, 403, 403),
    "restricted": (200, 403, 403, 403),
    "admin": (200, 200, 403, 200),
    "peer": (403, 403, 200, 200),
}
ROUTES = (MODEL_ROLES, ADMIN_ROLES, PEER_ROLES, VERSION_ROLES)


def test_the_auth_decision_table(tmp_path):
    keys = ring(
        tmp_path,
        {
            "user": {"key": KEYS["user"]},
            "admin": {"key": KEYS["admin"], "role": "admin"},
            "restricted": {"key": KEYS["restricted"], "models": ["small"]},
            "peer": {"key": KEYS["peer"], "role": "peer"},
        },
    )
    transports = ({"loopback": True, "unix_socket": False}, {"loopback": False, "unix_socket": False}, {"loopback": False, "unix_socket": True})
    checked = 0
    for (mode, key_name), expected_row in IDENTIFY.items():
        presented = None if key_name is None else KEYS.get(key_name, "sk-wrong-" + "w" * 32)
        for transport, expected in zip(transports, expected_row, strict=True):
            cell = (mode, key_name, transport)
            if expected == "401":
                with pytest.raises(Unauthorized):
                    identify(keys, mode, presented, **transport)
                checked += 1
                continue
            principal = identify(keys, mode, presented, **transport)
            assert principal.name == expected, cell
            for allowed, status in zip(ROUTES, AUTHORIZE[expected], strict=True):
                if status == 200:
                    authorize(principal, allowed, "route")
                else:
                    with pytest.raises(Unauthorized if status == 401 else Forbidden):
                        authorize(principal, allowed, "route")
                checked += 1
    assert checked == 12 + 42 * 4  # the 401 cells, and each route of the 42 identified ones


def test_a_peer_key_is_valid_and_carries_no_model_list(tmp_path):
    keys = ring(tmp_path, {"head": {"key": KEYS["peer"], "role": "peer"}})
    assert keys.check(KEYS["peer"]).role == "peer"
    with pytest.raises(KeysFileError, match="a peer key serves worker leases only"):
        ring(tmp_path, {"head": {"key": KEYS["peer"], "role": "peer", "models": ["x"]}})
    with pytest.raises(KeysFileError, match='"admin", "user" or "peer"'):
        ring(tmp_path, {"head": {"key": KEYS["peer"], "role": "root"}})


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_keys_file_owned_by_another_user_is_refused(tmp_path):
    path = tmp_path / "keys.toml"
    write_keys(path, {"bob": {"key": BOB}})
    os.chown(path, 65534, 65534)
    with pytest.raises(KeysFileError) as refused:
        KeyRing.load(path, required=True)
    assert "owned by uid 65534" in str(refused.value) and "chown" in str(refused.value) and BOB not in str(refused.value)
