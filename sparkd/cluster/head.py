"""The head side: worker leases for a multi-node model, held while it runs.

Before the head's container starts, every peer in the model's ``nodes`` is asked
for a worker lease (in parallel); the model starts only when all are granted.
While it runs, heartbeats keep the leases; a peer that stops answering for
``cluster.lease_timeout_s`` fails the model with that peer's name.  Stopping the
model (idle, swap, shutdown) releases every lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

import structlog

from ..adminjson import NodeView
from ..config import Config, ModelConfig
from .peers import Peer, PeerClient, PeerError

log = structlog.get_logger("sparkd.cluster")

LOCAL = "local"


class WorkerLeaseRequest(TypedDict):
    """The JSON a head posts to a peer's /api/worker-leases (checked there by ``WorkerRequest.parse``)."""

    head: str
    model: str
    image: str
    head_address: str
    ray_port: int
    head_port: int | None
    heartbeat_timeout_s: float


@dataclass
class HeldLease:
    peer: Peer
    lease_id: str
    last_ok: float = field(default_factory=time.monotonic)


class WorkersUnavailable(Exception):
    """A peer refused or could not grant a worker lease; the message names it and says why."""


class HeadCoordinator:
    def __init__(
        self,
        config: Config,
        peers: dict[str, Peer],
        client: PeerClient,
        on_peer_lost: Callable[[str, str], None],
    ) -> None:
        self.config = config
        self.peers = peers
        self._client = client
        self._on_peer_lost = on_peer_lost
        self._held: dict[str, list[HeldLease]] = {}
        self._heartbeats: dict[str, asyncio.Task[None]] = {}


    @property
    def client(self) -> PeerClient:
        """The client of the peer API, for other calls to the same peers (the weights of a multi-node model)."""
        return self._client

    def peer_nodes(self, model: ModelConfig) -> list[str]:
        return [node for node in model.nodes if node != LOCAL]

    def worker_request(self, model: ModelConfig) -> WorkerLeaseRequest:
        """All a head may say to a peer: which model, and the values the peer's own worker table leaves open."""
        return {
            "head": self.config.server.instance,
            "model": model.name,
            "image": model.worker_image or model.image,
            "head_address": self.config.cluster.address,
            "ray_port": self.config.cluster.ray_port,
            "head_port": model.port,
            "heartbeat_timeout_s": self.config.cluster.lease_timeout_s,
        }

    async def acquire(self, model: ModelConfig) -> None:
        """Hold a worker lease on every peer of ``model``, or none (raises ``WorkersUnavailable``)."""
        body = self.worker_request(model)
        names = self.peer_nodes(model)
        timeout = self.config.lifecycle.queue_timeout_s + (model.start_timeout_s or self.config.lifecycle.start_timeout_s)
        results = await asyncio.gather(
            *(self._client.call(self.peers[n], "POST", "/api/worker-leases", body, timeout=timeout) for n in names),
            return_exceptions=True,
        )
        held = [HeldLease(self.peers[n], r["id"]) for n, r in zip(names, results, strict=True) if isinstance(r, dict) and "id" in r]
        failures = [(n, r) for n, r in zip(names, results, strict=True) if isinstance(r, BaseException)]
        if failures:
            await self._release_leases(model.name, held, "another peer refused")
            detail = "; ".join(str(error) for _, error in failures)
            raise WorkersUnavailable(f"model {model.name} needs workers on {', '.join(names)}: {detail}")
        self._held[model.name] = held
        for lease in held:
            log.info("worker_lease_held", model=model.name, peer=lease.peer.name, lease=lease.lease_id)
        self._heartbeats[model.name] = asyncio.get_running_loop().create_task(self._heartbeat(model.name))

    async def release(self, model: str, reason: str) -> None:
        task = self._heartbeats.pop(model, None)
        if task is not None:
            task.cancel()
        await self._release_leases(model, self._held.pop(model, []), reason)

    def nodes_view(self, model: ModelConfig) -> list[NodeView]:
        """Each node's part in ``model``, for status."""
        held = {lease.peer.name: lease for lease in self._held.get(model.name, [])}
        view: list[NodeView] = []
        for node in model.nodes:
            if node == LOCAL:
                view.append({"node": LOCAL, "role": "head", "address": self.config.cluster.address})
                continue
            lease = held.get(node)
            view.append(
                {
                    "node": node,
                    "role": "worker",
                    "address": self.peers[node].config.address if node in self.peers else None,
                    "lease": lease.lease_id if lease else None,
                    "heartbeat_age_s": round(time.monotonic() - lease.last_ok, 1) if lease else None,
                }
            )
        return view

    async def _release_leases(self, model: str, leases: list[HeldLease], reason: str) -> None:
        async def release_one(lease: HeldLease) -> None:
            try:
                await self._client.call(lease.peer, "DELETE", f"/api/worker-leases/{lease.lease_id}", timeout=60)
                log.info("worker_lease_returned", model=model, peer=lease.peer.name, reason=reason)
            except PeerError as error:
                # The peer releases it on its own once heartbeats stop.
                log.warning("worker_lease_return_failed", model=model, peer=lease.peer.name, error=str(error))

        await asyncio.gather(*(release_one(lease) for lease in leases))

    async def _heartbeat(self, model: str) -> None:
        """Keep the leases of ``model`` until one is lost; a bug in one round is logged and the next round runs."""
        while True:
            await asyncio.sleep(self.config.cluster.heartbeat_s)
            try:
                lost = await self._heartbeat_round(model)
            except Exception:  # the leases must outlive one bad round, or the peers expire them
                log.exception("worker_heartbeat_crashed", model=model)
                continue
            if lost is not None:
                self._on_peer_lost(model, lost)
                return

    async def _heartbeat_round(self, model: str) -> str | None:
        """One heartbeat to each peer of ``model``; the reason when a lease is lost, else None."""
        cluster = self.config.cluster
        for lease in self._held.get(model, []):
            try:
                await self._client.call(lease.peer, "POST", f"/api/worker-leases/{lease.lease_id}/heartbeat", timeout=cluster.heartbeat_s)
                lease.last_ok = time.monotonic()
                continue
            except Exception as error:  # any failure counts as a missed heartbeat, never ends the task
                silent = time.monotonic() - lease.last_ok
                if isinstance(error, PeerError):
                    log.warning("worker_heartbeat_failed", model=model, peer=lease.peer.name, error=str(error), silent_s=round(silent, 1))
                else:
                    log.exception("worker_heartbeat_failed", model=model, peer=lease.peer.name, silent_s=round(silent, 1))
                if isinstance(error, PeerError) and error.status == 404:
                    return f"peer {lease.peer.name} lost its worker lease for {model}"
                if silent > cluster.lease_timeout_s:
                    return f"peer {lease.peer.name} has not answered heartbeats for {silent:.0f}s ({error})"
        return None
