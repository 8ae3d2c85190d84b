"""Who may use the operator surfaces once keys exist: the unix socket (no key), admin keys, and not user keys."""

from __future__ import annotations

import json
import os
import secrets

import aiohttp
import pytest

from harness import engine_model, write_keys
from opskit import CHROMIUM, Browser, ctl, run_ctl

pytestmark = pytest.mark.podman


def new_key(name: str) -> str:
    return f"sk-test-{name}-{secrets.token_hex(16)}"


@pytest.fixture
async def keyed(sparkd_factory, engine_image, tmp_path):
    """A daemon with an admin and a user key, and no keyless access (the shipped setting)."""
    keys_path = tmp_path / "keys.toml"
    sparkd = sparkd_factory({"a": engine_model(engine_image)}, {"server": {"keys_file": str(keys_path), "anonymous": "off"}})
    admin, user = new_key("admin"), new_key("user")
    write_keys(keys_path, {"ops": {"key": admin, "role": "admin"}, "alice": {"key": user}})
    sparkd.admin_key = admin
    await sparkd.start()
    return sparkd, admin, user


async def test_sparkctl_over_the_socket_needs_no_key_and_over_http_needs_an_admin_key(keyed, tmp_path):
    sparkd, admin, user = keyed
    code, out, _ = await ctl(sparkd, "status")
    assert code == 0 and sparkd.model("a") in out
    code, out, _ = await run_ctl("--url", sparkd.base_url, "status", "--json", env={"SPARKD_ADMIN_KEY": admin})
    assert code == 0 and json.loads(out)["models"][0]["name"] == sparkd.model("a")
    key_file = tmp_path / "admin.key"
    key_file.write_text(admin + "\n")
    key_file.chmod(0o600)
    code, out, _ = await run_ctl("--url", sparkd.base_url, "--key-file", str(key_file), "status", "--json", env={"SPARKD_ADMIN_KEY": ""})
    assert code == 0 and json.loads(out)["models"][0]["name"] == sparkd.model("a")
    # never from argv: every local user reads it in ps
    for argv in (["--key", admin], [f"--key={admin}"]):
        code, out, err = await run_ctl("--url", sparkd.base_url, *argv, "status")
        assert code == 2 and "--key is not accepted" in err and "SPARKD_ADMIN_KEY" in err and "--key-file" in err, err
        assert admin not in out + err
    key_file.chmod(0o644)
    code, _, err = await run_ctl("--url", sparkd.base_url, "--key-file", str(key_file), "status")
    assert code == 2 and "mode 0644" in err and "chmod 600" in err and admin not in err, err
    code, _, err = await run_ctl("--url", sparkd.base_url, "status", env={"SPARKD_ADMIN_KEY": user})
    assert code == 1 and "(403)" in err and 'role "admin"' in err
    code, _, err = await run_ctl("--url", sparkd.base_url, "status", env={"SPARKD_ADMIN_KEY": ""})
    assert code == 1 and "(401)" in err and "SPARKD_ADMIN_KEY or a file with --key-file" in err


async def test_metrics_events_and_the_page_shell(keyed):
    sparkd, admin, user = keyed
    async with aiohttp.ClientSession() as session:
        for path in ("/metrics", "/api/events", "/api/history", "/api/models"):
            async with session.get(sparkd.base_url + path) as response:
                assert response.status == 401, path
            async with session.get(sparkd.base_url + path, headers={"Authorization": f"Bearer {user}"}) as response:
                assert response.status == 403, path
                assert (await response.json())["error"]["code"] == "admin_role_required"
        async with session.get(sparkd.base_url + "/metrics", headers={"Authorization": f"Bearer {admin}"}) as response:
            assert response.status == 200 and "sparkd_lease_budget_ratio" in await response.text()
        # The page's shell is the same static file for everyone; its data needs the key.
        for path in ("/", "/static/status.js", "/static/status.css"):
            async with session.get(sparkd.base_url + path) as response:
                assert response.status == 200, path
        async with session.get(sparkd.base_url + "/static/other.js") as response:
            assert response.status == 401  # not part of the shell: not public either


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: tests/setup/host.sh installs it")
async def test_the_page_asks_for_an_admin_key_and_then_goes_live(keyed, tmp_path):
    sparkd, admin, user = keyed
    async with Browser() as browser:
        await browser.goto(sparkd.base_url + "/")
        await browser.wait_until("!document.getElementById('auth').hidden")
        assert "no API key" in await browser.evaluate("document.getElementById('auth-message').textContent")
        await browser.evaluate(
            f"document.getElementById('auth-key').value = {json.dumps(user)};"
            "document.getElementById('auth-form').requestSubmit()"
        )
        await browser.wait_until("document.getElementById('auth-message').textContent.includes('role')")
        await browser.evaluate(
            f"document.getElementById('auth-key').value = {json.dumps(admin)};"
            "document.getElementById('auth-form').requestSubmit()"
        )
        await browser.wait_until("document.getElementById('connection').textContent === 'live'")
        await browser.wait_until(f"!!document.querySelector('tr[data-model={json.dumps(sparkd.model('a'))}]')")
        assert await browser.evaluate("document.getElementById('auth').hidden")
        shot = await browser.screenshot(tmp_path / "status-page-with-key.png")
        print(f"screenshot: {shot}")
