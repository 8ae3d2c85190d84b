"""Issue 7 acceptance e: the status page in headless Chromium (Debian's), updating live."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from harness import engine_model, write_keys
from opskit import CHROMIUM, Browser

pytestmark = [
    pytest.mark.podman,
    pytest.mark.skipif(not __import__("os").path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: tests/setup/host.sh installs it"),
]


def row(model: str, selector: str = "") -> str:
    return f"document.querySelector('tr[data-model={json.dumps(model)}] {selector}'.trim())"


async def test_status_page_renders_models_and_shows_a_start_live(sparkd_factory, engine_image, tmp_path):
    sparkd = sparkd_factory(
        {
            "a": engine_model(engine_image, claim=0.5, env={"FAKE_LOAD_DELAY": "3"}),
            "b": engine_model(engine_image, claim=0.3, lifecycle="pinned"),
            "c": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "0.3", "FAKE_CRASH_AT_START": "1"}),
        }
    )
    # The page's data is the admin API: over TCP it needs an admin key (keyless admin is the unix socket only).
    admin = "sk-test-page-admin-0123456789abcdef"
    write_keys(sparkd.workdir / "keys.toml", {"ops": {"key": admin, "role": "admin"}})
    await sparkd.start()
    a, b, c = sparkd.model("a"), sparkd.model("b"), sparkd.model("c")
    async with aiohttp.ClientSession() as session, Browser() as browser:
        async with session.get(sparkd.base_url + "/") as response:
            assert response.status == 200 and response.content_type == "text/html"
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            assert "http" not in (await response.text()).replace("http-equiv", "")  # no CDN, nothing external

        await browser.goto(sparkd.base_url + "/")
        await browser.wait_until("!document.getElementById('auth').hidden")
        await browser.evaluate(
            f"document.getElementById('auth-key').value = {json.dumps(admin)};"
            "document.getElementById('auth-form').requestSubmit()"
        )
        await browser.wait_until("document.querySelectorAll('#model-rows tr').length === 3")
        states = await browser.evaluate("[...document.querySelectorAll('#model-rows tr')].map(r => [r.dataset.model, r.dataset.state])")
        assert states == [[a, "stopped"], [b, "stopped"], [c, "stopped"]]
        assert await browser.evaluate("document.getElementById('connection').textContent") == "live"
        assert "claimed 0.00 of a budget of 0.94" in await browser.evaluate("document.getElementById('lease-text').textContent")
        await browser.evaluate("window.sparkdTestMarker = 'same page'")  # gone if the page reloads

        # A start shows up live: starting with its load progress, then ready, with no reload.
        start = asyncio.create_task(sparkd.admin("POST", f"/api/models/{a}/start"))
        await browser.wait_until(f"{row(a)}.dataset.state === 'starting'", timeout=10)
        # The engine's log lines become the phase and its percentage (first load: no ETA yet).
        progress = await browser.wait_until(f"(t => t && t.includes('%') && t)({row(a, '.progress-text')}?.textContent)", timeout=10)
        assert "loading weights" in progress or "CUDA graphs" in progress, progress
        shot = await browser.screenshot(tmp_path / "status-page-starting.png")
        print(f"screenshot (starting): {shot}")
        await browser.wait_until(f"{row(a)}.dataset.state === 'ready'", timeout=30)
        assert (await start)[0] == 200
        assert await browser.evaluate("window.sparkdTestMarker") == "same page"
        assert "claimed 0.50" in await browser.evaluate("document.getElementById('lease-text').textContent")
        events = await browser.evaluate("document.getElementById('events').textContent")
        assert f"{a} stopped → starting" in events and f"{a} starting → ready" in events

        # A failed start appears under recent failures with the engine's last log lines.
        async with session.post(f"{sparkd.base_url}/v1/chat/completions", json={"model": c, "messages": [{"role": "user", "content": "x"}]}) as response:
            assert response.status == 503
        failure = await browser.wait_until(
            f"document.querySelector('#failures .failure[data-model={json.dumps(c)}]')?.textContent", timeout=15
        )
        assert "fake crash at start" in failure, failure
        assert await browser.evaluate(f"{row(c)}.dataset.state") == "failed"
        assert await browser.evaluate("window.sparkdTestMarker") == "same page"
        shot = await browser.screenshot(tmp_path / "status-page.png")
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 10_000
