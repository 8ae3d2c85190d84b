#!/usr/bin/env python3
"""A bare aiohttp pass-through proxy: the yardstick sparkd's proxy figures are compared with.

    bare_proxy.py PORT ENGINE_URL ENGINE_KEY

Every ``POST /v1/...`` goes to the engine with its key; a ``text/event-stream``
answer is relayed chunk by chunk (``iter_any`` → ``write``), anything else is
read whole and answered.  No auth, routing, queue, headers filtering or error
mapping: what any aiohttp relay costs at least, on the same machine and load.
"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web


def main() -> None:
    port, engine, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]

    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
        )

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json"), "Authorization": f"Bearer {key}"}
        async with request.app["session"].post(engine + request.path, data=body, headers=headers) as upstream:
            if upstream.content_type == "text/event-stream":
                response = web.StreamResponse(status=upstream.status, headers={"Content-Type": upstream.headers["Content-Type"]})
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
            payload = await upstream.read()
            return web.Response(status=upstream.status, body=payload, content_type=upstream.content_type)

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/v1/{tail:.+}", relay)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
