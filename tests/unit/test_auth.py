"""Client keys: the keys file, the per-request check, and who a request is."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from multidict import CIMultiDict

from harness import write_keys
from sparkd.config import ModelConfig
from sparkd.errors import Forbidden, Unauthorized
from sparkd.http.auth import ANONYMOUS_LOCAL, ANONYMOUS_REMOTE, KeyRing, KeysFileError, authenticate, presented_key

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
    assert keys.names == ["alice", "bob"] and keys.has_admin


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
    with pytest.raises(KeysFileError, match="no such file.*server.anonymous"):
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
        ({"alice": {"key": ALICE, "role": "root"}}, "expected \"admin\" or \"user\""),
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
    assert authenticate(keys, "loopback", request(remote="127.0.0.1")) is ANONYMOUS_LOCAL
    assert authenticate(keys, "loopback", request(remote="::1")) is ANONYMOUS_LOCAL
    # a client that must send some key works keyless too; a known key always decides
    assert authenticate(keys, "loopback", request({"Authorization": "Bearer EMPTY"}, remote="127.0.0.1")) is ANONYMOUS_LOCAL
    assert authenticate(keys, "loopback", request({"Authorization": f"Bearer {BOB}"}, remote="127.0.0.1")).name == "bob"
    with pytest.raises(Unauthorized, match="from the sparkd machine itself only"):
        authenticate(keys, "loopback", request(remote="192.168.1.20"))
    assert authenticate(keys, "any", request(remote="192.168.1.20")) is ANONYMOUS_REMOTE
    assert not ANONYMOUS_REMOTE.is_admin and ANONYMOUS_LOCAL.is_admin


def test_keyless_access_needs_an_address_in_host(tmp_path):
    """A DNS name in Host may be a rebinding page's: keyless requests over TCP must use an address."""
    keys = ring(tmp_path, {"bob": {"key": BOB}})
    for host in ("127.0.0.1:8009", "127.0.0.1", "localhost:8009", "localhost", "[::1]:8009", "192.168.1.5:8009"):
        assert authenticate(keys, "loopback", request({"Host": host}, remote="127.0.0.1")) is ANONYMOUS_LOCAL, host
    for host in ("evil.example:8009", "evil.example", "localhost.evil.example:8009", "127.0.0.1.evil.example"):
        with pytest.raises(Forbidden) as refused:
            authenticate(keys, "loopback", request({"Host": host}, remote="127.0.0.1"), admin_route=True)
        assert refused.value.code == "host_not_allowed" and refused.value.status == 403
        assert "IP address" in refused.value.message and "Bearer <key>" in refused.value.message
    with pytest.raises(Forbidden):  # anonymous from the LAN too
        authenticate(keys, "any", request({"Host": "evil.example:8009"}))
    # a key lifts the rule; a unix-socket client is no browser; a request without Host is none either
    assert authenticate(keys, "loopback", request({"Host": "evil.example", "Authorization": f"Bearer {BOB}"}, remote="127.0.0.1")).name == "bob"
    unix = request({"Host": "sparkd"}, remote="", family=socket.AF_UNIX)
    assert authenticate(keys, "off", unix, admin_route=True) is ANONYMOUS_LOCAL
    assert authenticate(keys, "loopback", request(remote="127.0.0.1")) is ANONYMOUS_LOCAL


def test_admin_api_from_this_machine(tmp_path):
    with_admin = ring(tmp_path, {"alice": {"key": ALICE, "role": "admin"}})
    users_only = ring(tmp_path, {"bob": {"key": BOB}})
    local = request(remote="127.0.0.1")
    # no admin key exists: the admin API answers loopback clients, as before keys existed
    assert authenticate(users_only, "off", local, admin_route=True) is ANONYMOUS_LOCAL
    with pytest.raises(Unauthorized):
        authenticate(with_admin, "off", local, admin_route=True)
    with pytest.raises(Unauthorized):
        authenticate(users_only, "off", request(remote="10.0.0.5"), admin_route=True)
    # a unix socket's file permissions are its access control
    unix = request(remote="", family=socket.AF_UNIX)
    assert authenticate(with_admin, "off", unix, admin_route=True) is ANONYMOUS_LOCAL

