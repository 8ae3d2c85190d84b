"""Calling a peer sparkd's admin API (worker leases, heartbeats, version) with its admin key."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ..config import PeerConfig


class PeerError(Exception):
    """A peer refused or could not be reached; the message names the peer and the reason."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Peer:
    config: PeerConfig
    key: str

    @property
    def name(self) -> str:
        return self.config.name


def load_peers(peers: dict[str, PeerConfig]) -> dict[str, Peer]:
    """Read each peer's admin key from its key file (blocking: call in a thread)."""
    loaded = {}
    for name, peer in peers.items():
        path = Path(peer.key_file)
        try:
            key = path.read_text().strip()
        except OSError as error:
            raise PeerError(f"peer {name}: cannot read its admin key from {path}: {error.strerror or error}") from error
        if not key:
            raise PeerError(f"peer {name}: its key file {path} is empty")
        loaded[name] = Peer(peer, key)
    return loaded


class PeerClient:
    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def close(self) -> None:
        await self._session.close()

    def _ssl(self, peer: Peer) -> ssl.SSLContext | bool:
        if not peer.config.tls_verify:
            return False
        if peer.config.tls_ca:
            return ssl.create_default_context(cafile=peer.config.tls_ca)
        return True

    async def call(self, peer: Peer, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> Any:
        url = peer.config.url.rstrip("/") + path
        try:
            async with self._session.request(
                method,
                url,
                json=payload,
                headers={"Authorization": f"Bearer {peer.key}"},
                ssl=self._ssl(peer),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                body = await response.json(content_type=None) if response.content_length != 0 else None
                if response.status >= 400:
                    message = (body or {}).get("error", {}).get("message") if isinstance(body, dict) else None
                    retry = response.headers.get("Retry-After")
                    raise PeerError(
                        f"peer {peer.name} answered {response.status}: {message or response.reason}",
                        status=response.status,
                        retry_after=float(retry) if retry and retry.isdigit() else None,
                    )
                return body
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
            raise PeerError(f"peer {peer.name} at {peer.config.url} is unreachable: {type(error).__name__}: {error}") from error
