"""CORS against the running daemon: allowed and refused origins, preflight, streamed answers, exposed headers
(acceptance b of issue 4)."""

from __future__ import annotations

import secrets

import aiohttp
import pytest

from harness import engine_model, write_keys

pytestmark = pytest.mark.podman

ALLOWED = ["http://localhost:5173", "http://127.0.0.1:3000", "http://localhost", "vscode-webview://0a1b2c3d4e5f"]
REFUSED = ["http://evil.example", "https://localhost:5173", "http://localhost.evil.example", "null", "http://localhost%0d%0aX-Evil:%201"]


async def test_cors_allowlist_preflight_and_streams(sparkd_factory, engine_image, tmp_path):
    keys_path = tmp_path / "keys.toml"
    key = f"sk-test-{secrets.token_hex(16)}"
    write_keys(keys_path, {"web": {"key": key}})
    sparkd = sparkd_factory({"a": engine_model(engine_image)}, {"server": {"keys_file": str(keys_path), "anonymous": "off"}})
    await sparkd.start()
    url = f"{sparkd.base_url}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {key}"}
    chat = {"model": sparkd.model("a"), "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3}
    async with aiohttp.ClientSession() as session:
        for origin in ALLOWED:
            # preflight: no key needed, 204, methods and headers (the SDK's own included)
            async with session.options(
                url,
                headers={"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"},
            ) as response:
                assert response.status == 204, await response.text()
                assert response.headers["Access-Control-Allow-Origin"] == origin
                assert "POST" in response.headers["Access-Control-Allow-Methods"]
                allowed = response.headers["Access-Control-Allow-Headers"].lower()
                assert "authorization" in allowed and "x-api-key" in allowed and "x-stainless-os" in allowed
            # a JSON answer, a streamed answer and an error can all be read by the page
            async with session.post(url, json=chat, headers={**auth, "Origin": origin}) as response:
                assert response.status == 200
                assert response.headers["Access-Control-Allow-Origin"] == origin
                exposed = response.headers["Access-Control-Expose-Headers"]
                assert "Retry-After" in exposed and "X-Sparkd-Max-Tokens-Capped" in exposed
                assert "Origin" in response.headers.get("Vary", "")
            async with session.post(url, json={**chat, "stream": True}, headers={**auth, "Origin": origin}) as response:
                assert response.status == 200 and response.content_type == "text/event-stream"
                assert response.headers["Access-Control-Allow-Origin"] == origin
                assert b"[DONE]" in await response.read()
            async with session.post(url, json={**chat, "model": "nope"}, headers={**auth, "Origin": origin}) as response:
                assert response.status == 404
                assert response.headers["Access-Control-Allow-Origin"] == origin
            async with session.post(url, json=chat, headers={"Origin": origin}) as response:
                assert response.status == 401 and response.headers["Access-Control-Allow-Origin"] == origin

        for origin in REFUSED:
            async with session.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST"}) as response:
                assert response.status == 403
                assert "Access-Control-Allow-Origin" not in response.headers
                assert (await response.json())["error"]["code"] == "origin_not_allowed"
            # even with a valid key: a page from this origin may not drive sparkd
            async with session.post(url, json=chat, headers={**auth, "Origin": origin}) as response:
                assert response.status == 403
                assert "Access-Control-Allow-Origin" not in response.headers and "X-Evil" not in response.headers
                body = await response.json()
                assert body["error"]["code"] == "origin_not_allowed" and "server.cors_origins" in body["error"]["message"]

        # no Origin (curl, SDKs): no CORS headers at all; OPTIONS still answers 204
        async with session.post(url, json=chat, headers=auth) as response:
            assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers
        async with session.options(url) as response:
            assert response.status == 204 and "POST" in response.headers["Allow"]
        # the server's own origin (a page it serves) is same-origin, not a cross-origin caller
        own = f"http://127.0.0.1:{sparkd.port}"
        async with session.get(f"{sparkd.base_url}/v1/models", headers={**auth, "Origin": own}) as response:
            assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == own
        # ... but not under a DNS name, which a hostile page can rebind to this machine
        rebound = f"evil.example:{sparkd.port}"
        async with session.post(url, json=chat, headers={**auth, "Origin": f"http://{rebound}", "Host": rebound}) as response:
            assert response.status == 403 and (await response.json())["error"]["code"] == "origin_not_allowed"


async def test_configured_origins_replace_the_defaults(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image)}, {"server": {"cors_origins": ["https://chat.example.com", "https://*.lan.example"]}})
    await sparkd.start()
    url = f"{sparkd.base_url}/v1/models"
    async with aiohttp.ClientSession() as session:
        for origin, status in (("https://chat.example.com", 200), ("https://box.lan.example", 200), ("http://localhost:5173", 403)):
            async with session.get(url, headers={"Origin": origin}) as response:
                assert response.status == status, origin
                assert (response.headers.get("Access-Control-Allow-Origin") == origin) is (status == 200)
