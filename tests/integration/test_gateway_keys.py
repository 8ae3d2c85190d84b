"""Client keys against the running daemon: missing, wrong, revoked, wrong role, model not allowed, both header forms,
and no key ever in a log line (acceptance a of issue 4)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import aiohttp
import pytest

from harness import engine_model, write_keys

pytestmark = pytest.mark.podman


def new_key(name: str) -> str:
    return f"sk-test-{name}-{secrets.token_hex(16)}"


async def call(session, method, url, key=None, header="bearer", **kwargs):
    headers = dict(kwargs.pop("headers", {}))
    if key is not None:
        headers.update({"Authorization": f"Bearer {key}"} if header == "bearer" else {"x-api-key": key})
    async with session.request(method, url, headers=headers, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def wait_for_log(sparkd, event: str, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sparkd.logs().count(f"event={event}") >= count:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no {count}x {event} in the log:\n{sparkd.logs()[-2000:]}")


def assert_openai_error(status, body, expected_status, code):
    assert status == expected_status, body
    error = body["error"]
    assert set(error) >= {"message", "type", "code"} and error["code"] == code, body


async def test_keys_roles_models_reload_and_no_key_in_any_log(sparkd_factory, engine_image, podman, tmp_path):
    keys_path = tmp_path / "keys.toml"
    sparkd = sparkd_factory(
        {"a": engine_model(engine_image), "b": engine_model(engine_image)},
        {"server": {"keys_file": str(keys_path), "anonymous": "off"}},
    )
    root, alice, ci, carol = new_key("root"), new_key("alice"), new_key("ci"), new_key("carol")
    write_keys(keys_path, {"root": {"key": root, "role": "admin"}, "alice": {"key": alice}, "ci": {"key": ci, "models": [sparkd.model("b")]}})
    sparkd.admin_key = root
    await sparkd.start()
    base = sparkd.base_url
    chat = {"model": sparkd.model("a"), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    chat_b = {**chat, "model": sparkd.model("b")}
    async with aiohttp.ClientSession() as session:
        # missing and wrong keys: 401 in OpenAI's shape, even on the model list
        assert_openai_error(*await call(session, "POST", f"{base}/v1/chat/completions", json=chat), 401, "missing_api_key")
        assert_openai_error(*await call(session, "GET", f"{base}/v1/models"), 401, "missing_api_key")
        assert_openai_error(*await call(session, "POST", f"{base}/v1/chat/completions", new_key("wrong"), json=chat), 401, "invalid_api_key")
        assert_openai_error(*await call(session, "POST", f"{base}/v1/chat/completions", "x" * 64, header="x-api-key", json=chat), 401, "invalid_api_key")
        assert_openai_error(
            *await call(session, "POST", f"{base}/v1/chat/completions", headers={"Authorization": f"Basic {alice}"}, json=chat),
            401, "invalid_authorization_header",
        )
        # both header forms work
        status, body = await call(session, "POST", f"{base}/v1/chat/completions", alice, json=chat)
        assert status == 200, body
        status, body = await call(session, "POST", f"{base}/v1/chat/completions", alice, header="x-api-key", json=chat)
        assert status == 200, body
        # the engine got its own internal key, never the client's
        port = (await sparkd.model_status("a"))["port"]
        async with session.get(f"http://127.0.0.1:{port}/fake/state") as response:
            engine_headers = {k.lower(): v for k, v in (await response.json())["last_request_headers"].items()}
        assert engine_headers["authorization"].startswith("Bearer ") and alice not in engine_headers["authorization"]
        assert "x-api-key" not in engine_headers
        # a key limited to model b: b works, a is 403, the model list shows b only
        assert (await call(session, "POST", f"{base}/v1/chat/completions", ci, json=chat_b))[0] == 200
        assert (await call(session, "POST", f"{base}/v1/{sparkd.model('b')}/chat/completions", ci, json={**chat_b, "model": None}))[0] == 200
        status, body = await call(session, "POST", f"{base}/v1/chat/completions", ci, json=chat)
        assert_openai_error(status, body, 403, "model_not_allowed")
        assert "'ci' may not use model" in body["error"]["message"] and ci not in body["error"]["message"]
        assert_openai_error(*await call(session, "POST", f"{base}/v1/{sparkd.model('a')}/chat/completions", ci, json=chat), 403, "model_not_allowed")
        assert_openai_error(*await call(session, "GET", f"{base}/v1/models/{sparkd.model('a')}", ci), 403, "model_not_allowed")
        status, body = await call(session, "GET", f"{base}/v1/models", ci)
        assert [m["id"] for m in body["data"]] == [sparkd.model("b")]
        status, body = await call(session, "GET", f"{base}/v1/models", alice)
        assert {m["id"] for m in body["data"]} == {sparkd.model("a"), sparkd.model("b")}
        # the admin API wants the admin role; loopback without a key is no way in once an admin key exists
        assert_openai_error(*await call(session, "GET", f"{base}/api/status", alice), 403, "admin_role_required")
        assert_openai_error(*await call(session, "POST", f"{base}/api/models/{sparkd.model('a')}/stop", ci), 403, "admin_role_required")
        assert_openai_error(*await call(session, "GET", f"{base}/api/status"), 401, "missing_api_key")
        status, body = await call(session, "GET", f"{base}/api/status", root)
        assert status == 200 and root not in json.dumps(body) and alice not in json.dumps(body)
        # health checks need no key
        async with session.get(f"{base}/healthz") as response:
            assert response.status == 200

        # revoke alice, add carol, reload: alice is refused at once, carol works, the others are kept
        write_keys(keys_path, {"root": {"key": root, "role": "admin"}, "carol": {"key": carol}, "ci": {"key": ci, "models": [sparkd.model("b")]}})
        sparkd.reload()
        await wait_for_log(sparkd, "config_reloaded", 1)
        assert_openai_error(*await call(session, "POST", f"{base}/v1/chat/completions", alice, json=chat), 401, "invalid_api_key")
        assert (await call(session, "POST", f"{base}/v1/chat/completions", carol, json=chat))[0] == 200
        assert (await call(session, "GET", f"{base}/api/status", root))[0] == 200

        # a keys file that became group-readable is refused at reload: the previous keys stay in force
        keys_path.chmod(0o640)
        sparkd.reload()
        await wait_for_log(sparkd, "reload_rejected", 1)
        assert (await call(session, "POST", f"{base}/v1/chat/completions", carol, json=chat))[0] == 200
        assert "chmod 600" in sparkd.logs()
        keys_path.chmod(0o600)

    # no key, revoked or current, appears anywhere in the daemon's log or the engines' logs
    logs = sparkd.logs()
    for model in ("a", "b"):
        output = podman.containers.get(sparkd.container(model)).logs(stdout=True, stderr=True)
        logs += (output if isinstance(output, bytes) else b"".join(output)).decode(errors="replace")
    assert "event=auth_refused" in logs and "event=keys_loaded" in logs
    for key in (root, alice, ci, carol):
        assert key not in logs
        assert key[8:] not in logs  # not even without its prefix
    print(f"RESULT keys_in_logs 0 of {len(logs)} bytes searched")


async def test_start_is_refused_for_an_unsafe_or_missing_keys_file(sparkd_factory, engine_image, tmp_path):
    readable = tmp_path / "readable.toml"
    secret = new_key("readable")
    write_keys(readable, {"k": {"key": secret}}, mode=0o644)
    cases = [
        ({"keys_file": str(readable), "anonymous": "off"}, ["mode 0644", "chmod 600"]),
        ({"keys_file": str(tmp_path / "missing.toml"), "anonymous": "off"}, ["no such file", "server.anonymous"]),
    ]
    for index, (server, expected) in enumerate(cases):
        sparkd = sparkd_factory({"a": engine_model(engine_image)}, {"server": server}, name=f"refused{index}")
        await sparkd.start(wait=False)
        code = await asyncio.to_thread(sparkd.process.wait, 30)
        logs = sparkd.logs()
        assert code != 0, logs
        assert "event=startup_failed" in logs and all(text in logs for text in expected), logs
        assert secret not in logs


async def test_anonymous_loopback_serves_keyless_clients_but_refuses_a_dummy_key(sparkd_factory, engine_image, tmp_path):
    keys_path = tmp_path / "keys.toml"
    user = new_key("user")
    write_keys(keys_path, {"user": {"key": user}})
    sparkd = sparkd_factory({"a": engine_model(engine_image)}, {"server": {"keys_file": str(keys_path), "anonymous": "loopback"}})
    await sparkd.start()
    chat = {"model": sparkd.model("a"), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as session:
        assert (await call(session, "POST", f"{sparkd.base_url}/v1/chat/completions", json=chat))[0] == 200
        # a key that is not in the file is a 401 in every anonymous mode: it never falls back to keyless access
        assert_openai_error(*await call(session, "POST", f"{sparkd.base_url}/v1/chat/completions", "EMPTY", json=chat), 401, "invalid_api_key")
        assert (await call(session, "POST", f"{sparkd.base_url}/v1/chat/completions", user, json=chat))[0] == 200
        # no admin key exists, yet keyless TCP is never an admin (SSH-tunnel users arrive as 127.0.0.1 too)
        assert_openai_error(*await call(session, "GET", f"{sparkd.base_url}/api/status"), 401, "missing_api_key")
        assert (await call(session, "GET", f"{sparkd.base_url}/api/status", user))[0] == 403


async def test_keyless_access_under_a_dns_name_is_refused(sparkd_factory, engine_image, tmp_path):
    """DNS rebinding: a page whose name now resolves to this machine sends no Origin on a GET, but its name in Host."""
    keys_path = tmp_path / "keys.toml"
    user = new_key("user")
    write_keys(keys_path, {"user": {"key": user}})
    sparkd = sparkd_factory({"a": engine_model(engine_image)}, {"server": {"keys_file": str(keys_path), "anonymous": "loopback"}})
    await sparkd.start()
    base, port = sparkd.base_url, sparkd.port
    rebound = {"Host": f"evil.example:{port}"}
    async with aiohttp.ClientSession() as session:
        for path in ("/api/status", "/api/events", "/api/history", "/metrics", "/v1/models"):
            status, body = await call(session, "GET", base + path, headers=rebound)
            assert_openai_error(status, body, 403, "host_not_allowed")
            message = body["error"]["message"]
            assert "'evil.example:" in message and "IP address" in message and "Bearer <key>" in message, message
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1"):
            assert (await call(session, "GET", f"{base}/api/status", headers={"Host": host}))[0] == 401, host  # past Host: no admin
            assert (await call(session, "GET", f"{base}/v1/models", headers={"Host": host}))[0] == 200, host
        # a key lifts the rule (a rebinding page has none)
        assert (await call(session, "GET", f"{base}/v1/models", user, headers=rebound))[0] == 200
    await wait_for_log(sparkd, "auth_refused reason=host_not_allowed", 5)
