"""The daemon's pulls: one at a time per model, in worker threads, with progress the API shows.

A pull asked for while one runs for the same model joins it.  Progress (bytes,
rate over the last seconds, ETA) is sampled from the cache on disk, which also
counts what an interrupted earlier pull left to resume.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from ..config import Config, ModelConfig
from .cache import CacheDirs, NoHostCache, Presence, cache_dirs, presence
from .disk import DiskTooSmall
from .hub import HubClient, HubError, PullCancelled
from .pull import PullCounters, done_bytes, pull
from .token import TokenFileError, read_token

log = structlog.get_logger("sparkd.weights")

SAMPLE_EVERY_S = 0.5
RATE_WINDOW_S = 10.0
PullState = Literal["pulling", "done", "failed"]


class WeightsUnavailable(Exception):
    """A model's weights cannot be had (no hf_model, no host cache, the pull failed)."""


@dataclass
class PullJob:
    model: str
    repo: str
    node: str = "local"
    outcome: PullState = "pulling"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    done_bytes: int = 0
    rate_bps: float | None = None
    error: str | None = None
    counters: PullCounters = field(default_factory=PullCounters)
    stop: threading.Event = field(default_factory=threading.Event)
    """Ends the pull's download at its next write (the daemon stops)."""
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    listeners: list[Callable[[PullJob], None]] = field(default_factory=list)
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The same pull on each peer of a multi-node model, as that peer reports it."""

    @property
    def total_bytes(self) -> int:
        return self.counters.total_bytes

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.done_bytes / self.total_bytes) if self.total_bytes else None

    @property
    def eta_s(self) -> float | None:
        if self.outcome != "pulling" or not self.rate_bps or not self.total_bytes:
            return None
        return max(0.0, (self.total_bytes - self.done_bytes) / self.rate_bps)

    def record(self, now: float, done: int) -> None:
        self.done_bytes = done
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()
        first_at, first_done = self.samples[0]
        if now - first_at >= 1.0:
            self.rate_bps = max(0.0, (done - first_done) / (now - first_at))

    def view(self) -> dict[str, Any]:
        eta = self.eta_s
        return {
            "model": self.model, "repo": self.repo, "node": self.node, "state": self.outcome,
            "phase": self.counters.phase, "file": self.counters.current,
            "files": self.counters.files, "files_done": self.counters.files_done,
            "done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
            "rate_bps": round(self.rate_bps, 1) if self.rate_bps is not None else None,
            "eta_s": round(eta, 1) if eta is not None else None,
            "started_at": self.started_at, "finished_at": self.finished_at, "error": self.error,
            "peers": list(self.peers.values()),
        }


@dataclass
class WeightService:
    config: Config
    peer_pull: Callable[[ModelConfig, PullJob], asyncio.Task[None]] | None = None
    """Starts and follows the same pull on each peer of a multi-node model (``cluster``), when configured."""
    peer_presence: Callable[[ModelConfig], Awaitable[list[str]]] | None = None
    """What the peers of a multi-node model lack of its weights (``["absent on node b"]``), when configured."""
    jobs: dict[str, PullJob] = field(default_factory=dict)
    """The last pull of each model (running, done or failed), as the status shows them."""
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def apply_config(self, config: Config) -> None:
        self.config = config

    def model(self, name: str) -> ModelConfig:
        model = self.config.models.get(name)
        if model is None:
            raise WeightsUnavailable(f"no model named {name!r} in the configuration; `sparkctl models` lists them")
        if not model.hf_model:
            raise WeightsUnavailable(f"model {name} names no hf_model: sparkd does not manage its weights")
        return model

    async def presence(self, model: ModelConfig) -> Presence | None:
        """The model's weights on disk; None for a model without ``hf_model``; raises ``WeightsUnavailable``
        when its container's cache is not mounted from the host."""
        if not model.hf_model:
            return None
        try:
            dirs = cache_dirs(model)
        except NoHostCache as error:
            raise WeightsUnavailable(str(error)) from None
        return await asyncio.to_thread(presence, dirs, model.hf_model)

    async def missing(self, model: ModelConfig) -> str | None:
        """Where the model's weights are not complete ("absent in the cache", "partial on node b"), None when they
        are complete here and on every peer of its nodes; raises ``WeightsUnavailable`` as ``presence``."""
        found = await self.presence(model)
        gaps = [f"{found.state} in the cache"] if found is not None and found.state != "complete" else []
        if found is not None and self.peer_presence is not None and len(model.nodes) > 1:
            gaps += await self.peer_presence(model)
        return "; ".join(gaps) or None

    async def presences(self, models: list[ModelConfig]) -> dict[str, dict[str, Any]]:
        """``{"weights": complete|partial|absent, "weights_bytes": n, "weights_repo": repo}`` of each model with
        ``hf_model`` (one worker thread for all of them), for ``/v1/models`` and ``sparkctl models``."""
        def read() -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for model in models:
                if not model.hf_model:
                    continue
                try:
                    seen = presence(cache_dirs(model), model.hf_model)
                except NoHostCache:
                    continue
                found[model.name] = {"weights": seen.state, "weights_bytes": seen.size, "weights_repo": model.hf_model}
            return found

        return await asyncio.to_thread(read)

    def running(self) -> list[PullJob]:
        return [job for job in self.jobs.values() if job.outcome == "pulling"]

    def start(self, name: str) -> PullJob:
        """The model's running pull, or a new one; raises ``WeightsUnavailable`` for a model it cannot pull."""
        return self.start_model(self.model(name))

    def start_model(self, model: ModelConfig) -> PullJob:
        """As ``start``, for a model table of its own (a peer's worker of a head's model, ``peers``)."""
        name = model.name
        job = self.jobs.get(name)
        if job is not None and job.outcome == "pulling":
            return job
        try:
            dirs = cache_dirs(model)
        except NoHostCache as error:
            raise WeightsUnavailable(str(error)) from None
        assert model.hf_model is not None
        job = PullJob(model=name, repo=model.hf_model)
        self.jobs[name] = job
        task = asyncio.get_running_loop().create_task(self._run(model, dirs, job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def wait(self, job: PullJob) -> None:
        """Until the pull ends; raises ``WeightsUnavailable`` with its failure."""
        await job.finished.wait()
        if job.outcome == "failed":
            raise WeightsUnavailable(job.error or f"the pull of model {job.model} failed")

    async def _run(self, model: ModelConfig, dirs: CacheDirs, job: PullJob) -> None:
        log.info("weights_pull_started", model=job.model, repo=job.repo, cache=str(dirs.weights))
        began = time.monotonic()
        peers = self.peer_pull(model, job) if self.peer_pull is not None and len(model.nodes) > 1 else None
        try:
            await self._pull_here(model, dirs, job)
            if peers is not None:
                await peers
        except (HubError, DiskTooSmall, TokenFileError, WeightsUnavailable, PullCancelled) as error:
            job.outcome, job.error = "failed", str(error)
            log.error("weights_pull_failed", model=job.model, repo=job.repo, error=str(error))
        except OSError as error:
            # The cache cannot be written (permissions, a full or read-only filesystem): say where.
            job.outcome, job.error = "failed", f"could not write the weights of {job.model} into {dirs.weights}: {error}"
            log.error("weights_pull_failed", model=job.model, repo=job.repo, error=job.error)
        else:
            job.outcome = "done"
            log.info("weights_pull_done", model=job.model, repo=job.repo, bytes=job.total_bytes,
                     took_s=round(time.monotonic() - began, 1))
        finally:
            if peers is not None and not peers.done():
                peers.cancel()
            if job.outcome == "pulling":  # cancelled (the daemon stops) or an error of sparkd's own
                job.outcome, job.error = "failed", job.error or f"the pull of {job.model} was interrupted; pull again to resume"
            job.finished_at = time.time()
            job.finished.set()
            self._tell(job)

    async def _pull_here(self, model: ModelConfig, dirs: CacheDirs, job: PullJob) -> None:
        weights = self.config.weights
        token = await asyncio.to_thread(read_token, weights.token_file)
        hub = HubClient(endpoint=weights.endpoint or None, token=token, stop=job.stop)
        assert model.hf_model is not None
        worker = asyncio.ensure_future(
            asyncio.to_thread(pull, model.name, hub, dirs, model.hf_model, weights.reserve_bytes, job.counters)
        )
        try:
            while not worker.done():
                await asyncio.wait({worker}, timeout=SAMPLE_EVERY_S)
                if job.counters.steps:
                    job.record(time.monotonic(), await asyncio.to_thread(done_bytes, job.counters.steps, job.repo))
                self._tell(job)
        except asyncio.CancelledError:
            job.stop.set()
            raise
        worker.result()

    def _tell(self, job: PullJob) -> None:
        for listener in list(job.listeners):
            listener(job)

    async def close(self) -> None:
        for job in self.running():
            job.stop.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
