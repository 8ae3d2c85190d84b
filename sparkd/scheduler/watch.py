"""Readiness of models that are serving: a READY engine that stops answering is failed.

While a model starts, ``lifecycle`` probes its readiness path until it answers.
Afterwards only this watch does: every ``engine.readiness_check_s`` it probes each
serving model once; a model unanswered for ``engine.unresponsive_fail_s`` takes
the same way as a container that died while serving (``Scheduler.model_lost``):
it is failed, its container stopped, its lease share freed, and its requests get
the failure instead of waiting on a hung engine.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from ..engine.client import EngineClient
from .runner import ModelRunner
from .scheduler import Scheduler
from .state import ModelState

log = structlog.get_logger("sparkd.scheduler")

SERVING = (ModelState.READY, ModelState.DRAINING)
MAX_PROBE_S = 5.0


async def watch_serving_engines(scheduler: Scheduler, engine: EngineClient) -> None:
    answered: dict[str, float] = {}
    """Model → time.monotonic() of its engine's last answer (or of its becoming ready)."""
    while True:
        settings = scheduler.config.engine
        await asyncio.sleep(settings.readiness_check_s)
        serving = [r for r in scheduler.runners.values() if r.state in SERVING and r.endpoint is not None]
        probes = [
            engine.is_ready(r.endpoint, r.config.readiness_path, timeout=min(settings.readiness_check_s, MAX_PROBE_S))
            for r in serving
            if r.endpoint is not None
        ]
        results = await asyncio.gather(*probes)
        now = time.monotonic()
        for runner, ok in zip(serving, results, strict=True):
            since = max(answered.get(runner.name, 0.0), runner.ready_at or 0.0)
            if ok:
                answered[runner.name] = now
            elif settings.unresponsive_fail_s and runner.state in SERVING and now - since >= settings.unresponsive_fail_s:
                _fail(scheduler, runner, now - since, settings.unresponsive_fail_s)
        for name in [n for n in answered if n not in scheduler.runners]:
            del answered[name]


def _fail(scheduler: Scheduler, runner: ModelRunner, silent_s: float, limit: float) -> None:
    path = runner.config.readiness_path
    log.error("engine_unresponsive", model=runner.name, readiness_path=path, silent_s=round(silent_s, 1), limit_s=limit)
    scheduler.model_lost(
        runner.name,
        f"model {runner.name}: its engine has not answered {path} for {silent_s:.0f} s (engine.unresponsive_fail_s = {limit:g}); "
        f"it was stopped, the next request starts it again; see `sparkctl logs {runner.name}`",
    )
