"""The peer side: worker leases this sparkd grants to a head sparkd.

A head may only name a worker this node's own configuration describes
(``[workers.<model>]``: image, command, env, volumes, devices, GPU share) and
send the few values that table leaves open: the head's cluster address, its Ray
and engine ports (they fill ``{head_address}``, ``{ray_port}``, ``{head_port}``),
and its heartbeat timeout (at most ``MAX_HEARTBEAT_TIMEOUT_S``). Anything else in
a request is refused with a 400, so a peer key cannot choose what runs here.

A worker lease is admitted like a local model: it becomes a model of this
node's scheduler (``<model>.worker``), so it queues, evicts idle models or is
refused exactly as a request would be.  While the lease is held it counts as one
request in flight, so nothing on this node evicts it; it ends when the head
releases it or stops sending heartbeats.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..adminjson import WorkerLeaseView
from ..config import Config, ModelConfig
from ..config.schema import WorkerConfig
from ..config.validate import describe
from ..config.values import MODEL_NAME
from ..errors import BadRequest, Conflict, Forbidden, NotFound, ServiceUnavailable
from ..runtime.spec import render
from ..scheduler.runner import ModelRunner
from ..scheduler.scheduler import Scheduler
from .containersettings import fill

log = structlog.get_logger("sparkd.cluster")

EXPIRY_CHECK_S = 1.0
MAX_HEARTBEAT_TIMEOUT_S = 300.0
REQUEST_FIELDS = ("head", "model", "image", "head_address", "ray_port", "head_port", "heartbeat_timeout_s")


@dataclass
class WorkerLease:
    id: str
    head: str
    peer_key: str
    """The name of the peer key that asked (the head as this node knows it)."""
    model: str
    runner: ModelRunner
    timeout_s: float
    granted_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.monotonic)
    releasing: bool = False

    def view(self) -> WorkerLeaseView:
        return {
            "id": self.id,
            "head": self.head,
            "peer_key": self.peer_key,
            "model": self.model,
            "worker": self.runner.name,
            "state": self.runner.state.value,
            "claim": self.runner.claim,
            "granted_at": round(self.granted_at, 3),
            "heartbeat_age_s": round(time.monotonic() - self.last_heartbeat, 1),
            "releasing": self.releasing,
        }


@dataclass(frozen=True)
class WorkerRequest:
    """What a head may say in a worker lease request; the rest is this node's ``[workers.<model>]``."""

    head: str
    model: str
    head_address: str
    ray_port: int
    head_port: int
    heartbeat_timeout_s: float

    @classmethod
    def parse(cls, body: Any, config: Config) -> WorkerRequest:
        """Check a head's request against this node's configuration; a precise 400 otherwise."""
        if not isinstance(body, dict):
            raise BadRequest("a worker lease request is a JSON object")
        unknown = sorted(str(key)[:40] for key in body if key not in REQUEST_FIELDS)
        if unknown:
            raise BadRequest(
                f"worker lease request: {', '.join(repr(k) for k in unknown)} not accepted: a worker's image, command, "
                "env, volumes, devices and GPU share come from this node's [workers.<model>] table; a head sends only "
                + ", ".join(REQUEST_FIELDS),
                code="worker_field_not_allowed",
            )

        def refuse(key: str, expected: str) -> BadRequest:
            return BadRequest(f"worker lease request: '{key}' must be {expected}, found {describe(body.get(key))}")

        def name(key: str) -> str:
            value = body.get(key)
            if not isinstance(value, str) or not MODEL_NAME.match(value):
                raise refuse(key, "a name of letters, digits, '.', '_' or '-'")
            return value

        def number(key: str, low: float, high: float) -> float:
            value = body.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise refuse(key, f"a number within {low}-{high}")
            return float(value)

        def port(key: str) -> int:
            value = body.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                raise refuse(key, "a port within 1-65535")
            return value

        model = name("model")
        worker = config.workers.get(model)
        if worker is None:
            raise BadRequest(
                f"worker lease request: this node has no [workers.{model}] table, so it runs no worker for that model; "
                "describe the worker in this node's configuration (see docs/multi-node.md)",
                code="worker_not_configured",
            )
        image = body.get("image")
        if image is not None and image != worker.image:
            raise BadRequest(
                f"worker lease request: the head's image {describe(image)} is not this node's image for {model} "
                f"({worker.image!r} in [workers.{model}]); make the head's worker_image and this node's table agree",
                code="worker_image_mismatch",
            )
        address = body.get("head_address")
        try:
            ipaddress.ip_address(address if isinstance(address, str) else "")
        except ValueError:
            raise refuse("head_address", "the head's cluster-network IP address") from None
        return cls(
            head=name("head"),
            model=model,
            head_address=str(address),
            ray_port=port("ray_port"),
            head_port=port("head_port"),
            heartbeat_timeout_s=number("heartbeat_timeout_s", 1.0, MAX_HEARTBEAT_TIMEOUT_S),
        )


def worker_model(config: Config, worker: WorkerConfig, request: WorkerRequest) -> ModelConfig:
    """The worker as a model of this node's scheduler: this node's table, the head's values filled in."""
    values = {"head_address": request.head_address, "ray_port": str(request.ray_port), "head_port": str(request.head_port)}
    return ModelConfig(
        name=f"{request.model}.worker",
        image=worker.image,
        command=fill(worker.command, values),
        env=dict(worker.env),
        volumes=worker.volumes,
        devices=worker.devices,
        gpu=worker.gpu,
        gpu_memory=worker.gpu_memory,
        readiness_path="",  # a Ray worker serves no HTTP: running is ready
        shm_size=config.defaults.shm_size,
        ulimits=dict(config.defaults.ulimits),
    )


class WorkerLeases:
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._leases: dict[str, WorkerLease] = {}
        self._granting: Counter[str] = Counter()
        """Grants under way per peer key: they count against its bound while they wait."""

    @property
    def config(self) -> Config:
        return self._scheduler.config

    async def grant(self, request: WorkerRequest, peer_key: str) -> WorkerLease:
        """Admit the worker through this node's scheduler and start it; holds until released."""
        config = self.config
        worker = config.workers[request.model]
        if worker.heads and peer_key not in worker.heads:
            raise Forbidden(
                f"the peer key {peer_key!r} may not ask for a worker for {request.model}: [workers.{request.model}] "
                f"heads lists {', '.join(worker.heads)}",
                code="head_not_allowed",
            )
        held = sum(1 for lease in self._leases.values() if lease.peer_key == peer_key) + self._granting[peer_key]
        limit = config.cluster.max_leases_per_head
        if held >= limit:
            raise ServiceUnavailable(
                f"the head with peer key {peer_key!r} holds {held} worker leases on this node, the most "
                f"cluster.max_leases_per_head ({limit}) allows; release one first",
                code="too_many_worker_leases",
                retry_after=int(config.cluster.lease_timeout_s),
            )
        model = worker_model(config, worker, request)
        if model.name in self._scheduler.runners:
            raise Conflict(
                f"this node already has a model or worker named {model.name}: release that worker lease first "
                f"(or rename the model {request.model} on the head)",
                code="worker_exists",
            )
        runner = self._scheduler.add_transient(model, render(config, model, role="worker"))
        log.info("worker_lease_requested", head=request.head, peer_key=peer_key, model=request.model, claim=model.gpu_memory)
        self._granting[peer_key] += 1
        try:
            await self._scheduler.acquire(model.name)
        except BaseException:
            await self._scheduler.remove_transient(model.name)
            raise
        finally:
            self._granting[peer_key] -= 1
        lease = WorkerLease(str(uuid.uuid4()), request.head, peer_key, request.model, runner, request.heartbeat_timeout_s)
        self._leases[lease.id] = lease
        log.info("worker_lease_granted", lease=lease.id, head=request.head, peer_key=peer_key, model=request.model, worker=runner.name)
        return lease

    def heartbeat(self, lease_id: str, peer_key: str) -> WorkerLease:
        lease = self._get(lease_id, peer_key)
        lease.last_heartbeat = time.monotonic()
        return lease

    async def release(self, lease_id: str, reason: str, peer_key: str | None = None) -> None:
        """Stop the worker and free its share; the lease stays listed (releasing) until it is gone.

        ``peer_key``: the key of the head asking; a head may only release its own leases.
        """
        lease = self._get(lease_id, peer_key)
        lease.releasing = True
        log.info("worker_lease_released", lease=lease_id, head=lease.head, model=lease.model, reason=reason)
        self._scheduler.release(lease.runner)
        try:
            await self._scheduler.remove_transient(lease.runner.name)
        finally:
            del self._leases[lease_id]

    def leases(self) -> list[WorkerLease]:
        return list(self._leases.values())

    async def run_expiry(self) -> None:
        """Release leases whose head stopped sending heartbeats (the head died or lost the network)."""
        while True:
            await asyncio.sleep(EXPIRY_CHECK_S)
            now = time.monotonic()
            for lease in list(self._leases.values()):
                if not lease.releasing and now - lease.last_heartbeat > lease.timeout_s:
                    log.warning("worker_lease_expired", lease=lease.id, head=lease.head, model=lease.model, timeout_s=lease.timeout_s)
                    try:
                        await self.release(lease.id, f"no heartbeat from head {lease.head} for {lease.timeout_s:.0f}s")
                    except Exception as error:  # noqa: BLE001 - the expiry loop must outlive one bad release
                        log.error("worker_lease_release_failed", lease=lease.id, error=str(error))

    async def release_all(self, reason: str) -> None:
        await asyncio.gather(*(self.release(lease.id, reason) for lease in list(self._leases.values()) if not lease.releasing))

    def _get(self, lease_id: str, peer_key: str | None) -> WorkerLease:
        lease = self._leases.get(lease_id)
        # Another head's lease looks like no lease at all: lease ids are not to be probed.
        if lease is None or lease.releasing or (peer_key is not None and lease.peer_key != peer_key):
            raise NotFound(f"no worker lease {lease_id[:40]!r} on this node (released, or expired without heartbeats)", code="lease_not_found")
        return lease
