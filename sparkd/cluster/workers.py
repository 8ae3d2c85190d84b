"""The peer side: worker leases this sparkd grants to a head sparkd.

A worker lease is admitted like a local model: it becomes a model of this
node's scheduler (``<model>.worker``), so it queues, evicts idle models or is
refused exactly as a request would be.  While the lease is held it counts as one
request in flight, so nothing on this node evicts it; it ends when the head
releases it or stops sending heartbeats.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..config import Config, ModelConfig
from ..errors import BadRequest, NotFound
from ..runtime.spec import render
from ..scheduler.runner import ModelRunner
from ..scheduler.scheduler import Scheduler

log = structlog.get_logger("sparkd.cluster")

EXPIRY_CHECK_S = 1.0


@dataclass
class WorkerLease:
    id: str
    head: str
    model: str
    runner: ModelRunner
    timeout_s: float
    granted_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.monotonic)
    releasing: bool = False

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "head": self.head,
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
    head: str
    model: str
    claim: float
    image: str
    command: tuple[str, ...]
    env: dict[str, str]
    volumes: tuple[str, ...]
    gpu: bool
    heartbeat_timeout_s: float

    @classmethod
    def parse(cls, body: Any) -> "WorkerRequest":
        if not isinstance(body, dict):
            raise BadRequest("a worker lease request is a JSON object")

        def field_of(name: str, kind: type | tuple[type, ...]) -> Any:
            value = body.get(name)
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise BadRequest(f"worker lease request: '{name}' must be {getattr(kind, '__name__', kind)}")
            return value

        command = field_of("command", list)
        env = field_of("env", dict)
        volumes = body.get("volumes", [])
        if not all(isinstance(c, str) for c in command) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise BadRequest("worker lease request: 'command' must be strings and 'env' a table of strings")
        if not isinstance(volumes, list) or not all(isinstance(v, str) for v in volumes):
            raise BadRequest("worker lease request: 'volumes' must be a list of strings")
        return cls(
            head=field_of("head", str),
            model=field_of("model", str),
            claim=float(field_of("claim", (int, float))),
            image=field_of("image", str),
            command=tuple(command),
            env=dict(env),
            volumes=tuple(volumes),
            gpu=bool(body.get("gpu", True)),
            heartbeat_timeout_s=float(field_of("heartbeat_timeout_s", (int, float))),
        )


def worker_model(config: Config, request: WorkerRequest) -> ModelConfig:
    """The worker as a model of this node's scheduler."""
    return ModelConfig(
        name=f"{request.model}.worker",
        image=request.image,
        command=request.command,
        env=request.env,
        volumes=request.volumes,
        gpu=request.gpu,
        gpu_memory=request.claim,
        readiness_path="",  # a Ray worker serves no HTTP: running is ready
        shm_size=config.defaults.shm_size,
        ulimits=dict(config.defaults.ulimits),
    )


class WorkerLeases:
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._leases: dict[str, WorkerLease] = {}

    @property
    def config(self) -> Config:
        return self._scheduler.config

    async def grant(self, request: WorkerRequest) -> WorkerLease:
        """Admit the worker through this node's scheduler and start it; holds until released."""
        model = worker_model(self.config, request)
        if any(lease.runner.name == model.name for lease in self._leases.values()):
            raise BadRequest(f"this node already runs a worker for {request.model}; release that lease first")
        runner = self._scheduler.add_transient(model, render(self.config, model, role="worker"))
        log.info("worker_lease_requested", head=request.head, model=request.model, claim=request.claim)
        try:
            await self._scheduler.acquire(model.name)
        except BaseException:
            await self._scheduler.remove_transient(model.name)
            raise
        lease = WorkerLease(str(uuid.uuid4()), request.head, request.model, runner, request.heartbeat_timeout_s)
        self._leases[lease.id] = lease
        log.info("worker_lease_granted", lease=lease.id, head=request.head, model=request.model, worker=runner.name)
        return lease

    def heartbeat(self, lease_id: str) -> WorkerLease:
        lease = self._get(lease_id)
        lease.last_heartbeat = time.monotonic()
        return lease

    async def release(self, lease_id: str, reason: str) -> None:
        """Stop the worker and free its share; the lease stays listed (releasing) until it is gone."""
        lease = self._get(lease_id)
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

    def _get(self, lease_id: str) -> WorkerLease:
        lease = self._leases.get(lease_id)
        if lease is None or lease.releasing:
            raise NotFound(f"no worker lease {lease_id[:40]!r} on this node (released, or expired without heartbeats)", code="lease_not_found")
        return lease
