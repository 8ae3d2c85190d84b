"""The status page at ``/``: plain HTML/JS/CSS shipped in the package, no build step, no CDN.

The page holds no data itself; its script streams ``/api/events`` (server-sent
events of the live status) and renders models, load progress, the queue, the
lease and recent failures as they change.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from ..errors import NotFound

STATIC = Path(__file__).with_name("static")
FILES = {
    "status.js": "text/javascript",
    "status.css": "text/css",
}
PAGE_PATHS = frozenset({"/", *(f"/static/{name}" for name in FILES)})
"""The page's shell: the same static bytes for everyone, so served without a key."""
SECURITY_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
}


class PageRoutes:
    def __init__(self) -> None:
        # Read once at start-up: serving the page never touches the disk.
        self._index = (STATIC / "index.html").read_bytes()
        self._files = {name: (STATIC / name).read_bytes() for name in FILES}

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{file}", self.static)

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._index, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS
        )

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        kind = FILES.get(name)
        if kind is None:
            raise NotFound("no such file on the status page", code="unknown_endpoint")
        return web.Response(body=self._files[name], content_type=kind, charset="utf-8", headers=SECURITY_HEADERS)
