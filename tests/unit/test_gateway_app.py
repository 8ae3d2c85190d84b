"""The error middleware in-process: aiohttp's own refusals and unexpected failures become OpenAI-shaped JSON."""

from __future__ import annotations

from aiohttp import web

from sparkd.http.app import error_middleware


async def test_aiohttp_body_limit_and_a_crash_become_json(aiohttp_client):
    async def read(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="read")

    async def crash(request: web.Request) -> web.Response:
        raise RuntimeError("bug")

    app = web.Application(middlewares=[error_middleware], client_max_size=10)
    app.router.add_post("/read", read)
    app.router.add_get("/crash", crash)
    client = await aiohttp_client(app)
    response = await client.post("/read", data=b"x" * 100)
    assert response.status == 413 and response.content_type == "application/json"
    body = await response.json()
    assert body["error"]["code"] == "request_too_large" and "Maximum request body size 10 exceeded" in body["error"]["message"]
    response = await client.get("/crash")
    assert response.status == 500 and (await response.json())["error"]["code"] == "internal_error"
    response = await client.get("/nowhere")
    assert response.status == 404 and (await response.json())["error"]["code"] == "unknown_endpoint"
