"""Calling a peer sparkd's API (worker leases, heartbeats, version) with the key it made for this head.

The key file is checked like the keys file (owner = the user sparkd runs as,
mode 0600); the URL is ``https://`` unless the peer table says ``insecure = true``
(config validation refuses it otherwise), which the daemon logs as a warning at start-up.
Redirects are not followed: the key goes to the configured URL only.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from ..config import PeerConfig
from ..private_files import PrivateFileError, read_private_file

log = structlog.get_logger("sparkd.cluster")


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
    """Read each peer's key (and CA) from their files (blocking: call in a thread)."""
    loaded = {}
    for name, peer in peers.items():
        path = Path(peer.key_file)
        try:
            key = read_private_file(path).decode("utf-8").strip()
        except FileNotFoundError:
            raise PeerError(f"peer {name}: its key file {path} does not exist; put the key the peer made for this head there (mode 0600)") from None
        except PrivateFileError as error:
            raise PeerError(f"peer {name}: its key file {path} cannot be used: {error}") from None
        except UnicodeDecodeError:
            raise PeerError(f"peer {name}: its key file {path} is not UTF-8 text") from None
        except OSError as error:
            raise PeerError(f"peer {name}: cannot read its key from {path}: {error.strerror or error}") from error
        if not key:
            raise PeerError(f"peer {name}: its key file {path} is empty")
        loaded[name] = Peer(peer, key, _ssl(peer))
    return loaded


def in_clear_text(peer: PeerConfig) -> bool:
    """The peer's key travels unencrypted (``insecure = true`` with an ``http://`` URL)."""
    return peer.url.startswith("http://")


def warn_insecure(peers: dict[str, PeerConfig]) -> None:
    """One warning at start-up per peer whose key crosses the network in clear text."""
    for peer in peers.values():
        if in_clear_text(peer):
            log.warning("peer_insecure", peer=peer.name, url=peer.url, reason="insecure = true: its key crosses the network in clear text")


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
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                if 300 <= response.status < 400:
                    target = response.headers.get("Location", "")[:200]
                    raise PeerError(
                        f"peer {peer.name} answered {response.status}, a redirect to {target!r}: sparkd sends the peer key "
                        "to the configured URL only; set the peer's url to the address it redirects to",
                        status=response.status,
                    )
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
