"""Talking to an engine container on 127.0.0.1: readiness, tokenize, sleep/wake.

One ``aiohttp.ClientSession`` (one keep-alive connection pool) serves every
engine; the proxy uses the same session for client requests.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass(frozen=True)
class Endpoint:
    """Where a running engine answers, and the internal key it requires."""

    port: int
    key: str = field(repr=False)
    host: str = "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def auth_header(self) -> str:
        return f"Bearer {self.key}"


class EngineError(Exception):
    """An engine call failed (refused, timed out, or answered an error)."""


class EngineClient:
    def __init__(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True),
            # Generations may run for many minutes: only connecting is bounded.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        await self.session.close()

    async def is_ready(self, endpoint: Endpoint, path: str, timeout: float = 2.0) -> bool:
        """True when the engine answers ``path`` with 200 (vLLM refuses connections until it is up)."""
        try:
            async with self.session.get(
                endpoint.base_url + path,
                headers={"Authorization": endpoint.auth_header},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def get_text(self, endpoint: Endpoint, path: str, timeout: float = 5.0, limit: int = 4 * 1024 * 1024) -> str:
        """The body of ``GET path`` (at most ``limit`` bytes: an engine's /metrics is tens of kB)."""
        try:
            async with self.session.get(
                endpoint.base_url + path,
                headers={"Authorization": endpoint.auth_header},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                body = await response.content.read(limit)
                if response.status >= 400:
                    raise EngineError(f"GET {path} answered {response.status}")
                return body.decode("utf-8", "replace")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            raise EngineError(f"GET {path} failed: {type(error).__name__}: {error}") from error

    async def post_json(self, endpoint: Endpoint, path: str, payload: Any | None = None, timeout: float = 30.0) -> Any:
        try:
            async with self.session.post(
                endpoint.base_url + path,
                json=payload,
                headers={"Authorization": endpoint.auth_header},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                body = await response.read()
                if response.status >= 400:
                    raise EngineError(f"POST {path} answered {response.status}: {body[:300].decode('utf-8', 'replace')}")
                if not body:
                    return None
                try:
                    return await response.json(content_type=None)
                except ValueError:
                    return body.decode("utf-8", "replace")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            raise EngineError(f"POST {path} failed: {type(error).__name__}: {error}") from error
