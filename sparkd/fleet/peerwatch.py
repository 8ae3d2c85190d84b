"""What each peer serves, kept fresh by asking its ``GET /api/fleet/models`` (with the peer key).

One loop per peer, every ``cluster.heartbeat_s``. A peer's answer is checked like any input: model
names must be valid names (they become request bodies and log fields here), states short words; what
does not fit is left out. A forward that cannot reach a peer marks it unreachable at once, so the next
request does not wait for the next poll to fall back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..adminjson import PeerView
from ..cluster.peers import Peer, PeerClient, PeerError
from ..config.values import MODEL_NAME
from .relay import FORWARD_PREFIX

log = structlog.get_logger("sparkd.fleet")

MODELS_PATH = FORWARD_PREFIX + "/models"
"""A peer's list of the models it runs itself (``http/fleet.py``)."""
MAX_MODELS = 1000
MAX_STATE = 32


@dataclass(frozen=True)
class RemoteModel:
    """A model a peer serves itself, as it said."""

    name: str
    state: str
    fits: bool
    aliases: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    max_model_len: int | None = None


@dataclass
class PeerState:
    name: str
    url: str
    reachable: bool | None = None
    """None until the first answer (or failure)."""
    version: str | None = None
    node: str | None = None
    """The peer's name for itself."""
    error: str = ""
    checked_at: float | None = None
    models: dict[str, RemoteModel] = field(default_factory=dict)

    def view(self) -> PeerView:
        return {
            "name": self.name, "url": self.url, "reachable": self.reachable, "version": self.version, "node": self.node,
            "error": self.error or None, "age_s": None if self.checked_at is None else round(time.monotonic() - self.checked_at, 1),
            "models": [{"name": m.name, "state": m.state} for m in sorted(self.models.values(), key=lambda m: m.name)],
        }


def parse_models(body: Any) -> tuple[str | None, str | None, dict[str, RemoteModel]]:
    """(version, node, models) from a peer's answer; entries that are not well-formed are dropped."""
    if not isinstance(body, dict):
        return None, None, {}
    version = _short(body.get("sparkd"))
    node = body.get("node") if isinstance(body.get("node"), str) and MODEL_NAME.match(body["node"]) else None
    models: dict[str, RemoteModel] = {}
    entries = body.get("models")
    for entry in entries[:MAX_MODELS] if isinstance(entries, list) else []:
        model = _parse_entry(entry)
        if model is not None:
            models[model.name] = model
    return version, node, models


def _parse_entry(entry: Any) -> RemoteModel | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not MODEL_NAME.fullmatch(entry["id"]):
        return None
    aliases = tuple(a for a in entry.get("aliases") or () if isinstance(a, str) and MODEL_NAME.fullmatch(a))
    endpoints = tuple(p for p in entry.get("endpoints") or () if isinstance(p, str) and p.startswith("/v1/") and len(p) < 100)
    length = entry.get("max_model_len")
    return RemoteModel(
        entry["id"], _short(entry.get("state")) or "unknown", entry.get("fits") is True, aliases, endpoints,
        length if isinstance(length, int) and not isinstance(length, bool) else None,
    )


def _short(value: Any) -> str | None:
    return value[:MAX_STATE] if isinstance(value, str) and value.isprintable() else None


class PeerWatch:
    """The last known state of every peer."""

    def __init__(self, peers: dict[str, Peer], client: PeerClient, interval_s: float) -> None:
        self._peers, self._client, self._interval = peers, client, interval_s
        self.states = {name: PeerState(name, peer.config.url) for name, peer in peers.items()}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(peer)) for peer in self._peers.values()]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def refresh(self, peer: Peer) -> None:
        state = self.states[peer.name]
        try:
            body = await self._client.call(peer, "GET", MODELS_PATH, timeout=max(2.0, self._interval * 2))
        except PeerError as error:
            self.mark_unreachable(peer.name, str(error))
            return
        version, node, models = parse_models(body)
        if state.reachable is not True:
            log.info("peer_reachable", peer=peer.name, version=version, models=len(models))
        state.reachable, state.version, state.node, state.models, state.error = True, version, node, models, ""
        state.checked_at = time.monotonic()

    def mark_unreachable(self, name: str, reason: str) -> None:
        state = self.states[name]
        if state.reachable is not False:
            log.warning("peer_unreachable", peer=name, reason=reason)
        state.reachable, state.error, state.checked_at = False, reason, time.monotonic()

    async def _watch(self, peer: Peer) -> None:
        while True:
            await self.refresh(peer)
            await asyncio.sleep(self._interval)
