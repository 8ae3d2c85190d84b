"""Calling a peer sparkd's admin API (worker leases, heartbeats, version) with its admin key."""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ..config import PeerConfig


class PeerError(Exception):
    """A peer refused or could not be reached; the message names the peer and the reason."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Peer:
    config: PeerConfig
    key: str = field(repr=False)
    ssl: ssl.SSLContext | bool = field(default=True, repr=False)
    """TLS for calls to this peer: a context for a private CA, False when verification is off."""

    @property
    def name(self) -> str:
        return self.config.name


def load_peers(peers: dict[str, PeerConfig]) -> dict[str, Peer]:
    """Read each peer's admin key (and CA) from their files (blocking: call in a thread)."""
    loaded = {}
    for name, peer in peers.items():
        path = Path(peer.key_file)
        try:
            key = path.read_text().strip()
        except OSError as error:
            raise PeerError(f"peer {name}: cannot read its admin key from {path}: {error.strerror or error}") from error
        if not key:
            raise PeerError(f"peer {name}: its key file {path} is empty")
        loaded[name] = Peer(peer, key, _ssl(peer))
    return loaded


def _ssl(peer: PeerConfig) -> ssl.SSLContext | bool:
    if not peer.tls_verify:
        return False
    if peer.tls_ca:
        try:
            return ssl.create_default_context(cafile=peer.tls_ca)
        except (OSError, ssl.SSLError) as error:
            raise PeerError(f"peer {peer.name}: cannot use its CA file {peer.tls_ca}: {error}") from error
    return True


class PeerClient:
    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def close(self) -> None:
        await self._session.close()

    async def call(self, peer: Peer, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> Any:
        url = peer.config.url.rstrip("/") + path
        try:
            async with self._session.request(
                method,
                url,
                json=payload,
                headers={"Authorization": f"Bearer {peer.key}"},
                ssl=peer.ssl,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                text = await response.text()
                try:
                    body = json.loads(text) if text else None
                except ValueError:
                    body = None
                if response.status >= 400:
                    error = body.get("error") if isinstance(body, dict) else None
                    message = error.get("message") if isinstance(error, dict) else text[:200] or response.reason
                    raise PeerError(f"peer {peer.name} answered {response.status}: {message}", status=response.status)
                if text and body is None:
                    raise PeerError(f"peer {peer.name} answered {response.status} with a body that is not JSON: {text[:200]!r}")
                return body
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise PeerError(f"peer {peer.name} at {peer.config.url} is unreachable: {type(error).__name__}: {error}") from error
