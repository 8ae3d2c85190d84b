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
from ..config.load import MODEL_NAME, volume_error
from ..config.validate import describe
from ..errors import BadRequest, Conflict, NotFound
from ..runtime.spec import render
from ..scheduler.runner import ModelRunner
from ..scheduler.scheduler import Scheduler

log = structlog.get_logger("sparkd.cluster")

EXPIRY_CHECK_S = 1.0
MAX_HEARTBEAT_TIMEOUT_S = 3600.0


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
    def parse(cls, body: Any, config: Config) -> "WorkerRequest":
        """Check a head's request against this node's rules; a precise 400 otherwise."""
        if not isinstance(body, dict):
            raise BadRequest("a worker lease request is a JSON object")

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

        def strings(key: str, default: list[str] | None = None) -> list[str]:
            value = body.get(key, default)
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise refuse(key, "a list of strings")
            return value

        image = body.get("image")
        if not isinstance(image, str) or not image.strip():
            raise refuse("image", "an image reference")
        command = strings("command")
        if not command:
            raise refuse("command", "a non-empty list of strings")
        env = body.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise refuse("env", "a table of strings")
        volumes = strings("volumes", [])
        for volume in volumes:
            problem = volume_error(volume)
            if problem:
                raise BadRequest(f"worker lease request: volume {volume!r} is invalid ({problem})")
        gpu = body.get("gpu", True)
        if not isinstance(gpu, bool):
            raise refuse("gpu", "true or false")
        return cls(
            head=name("head"),
            model=name("model"),
            claim=number("claim", 0.0, config.gpu.memory_budget),
            image=image,
            command=tuple(command),
            env=dict(env),
            volumes=tuple(volumes),
            gpu=gpu,
            heartbeat_timeout_s=number("heartbeat_timeout_s", 1.0, MAX_HEARTBEAT_TIMEOUT_S),
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
        if model.name in self._scheduler.runners:
            raise Conflict(
                f"this node already has a model or worker named {model.name}: release that worker lease first "
                f"(or rename the model {request.model} on the head)",
                code="worker_exists",
            )
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
