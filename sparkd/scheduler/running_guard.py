"""The memory guard over the models that run (``guard`` explains why it exists).

A loading model is watched by its own start (``Lifecycle``), which stops it first;
this loop covers the rest: under ``gpu.min_free`` with no load under way, the
running model whose container holds the most memory is killed and handed to
``Scheduler.model_lost``, which fails it and frees its share.
"""

from __future__ import annotations

import asyncio

import structlog

from ..hardware.memory import MemoryGauge, container_memory_bytes
from ..runtime.failures import RuntimeFailure
from ..runtime.podman import PodmanRuntime
from .guard import Tripped, guard_message
from .runner import ModelRunner
from .scheduler import Scheduler
from .state import ModelState

log = structlog.get_logger("sparkd.scheduler")

RUNNING_CHECK_S = 0.25
"""How often the models that run are checked; a load is checked at every readiness probe."""
SERVING = frozenset({ModelState.READY, ModelState.DRAINING, ModelState.SLEEPING})
LOADING = frozenset({ModelState.STARTING, ModelState.WAKING})


async def guard_running_models(scheduler: Scheduler, runtime: PodmanRuntime, gauge: MemoryGauge) -> None:
    """Kill the largest running model whenever free memory is under the floor and no load is to blame
    (a loading model is watched by its own start, which stops it first)."""
    while True:
        await asyncio.sleep(RUNNING_CHECK_S)
        floor = scheduler.config.gpu.min_free
        if not (gauge.unified and floor):
            continue
        reading = await gauge.read()
        if reading is None or reading.available_bytes >= floor:
            continue
        runners = scheduler.runners.values()
        if any(r.state in LOADING for r in runners):
            continue
        serving = [r for r in runners if r.state in SERVING]
        offender = await _largest(runtime, serving)
        if offender is None:
            continue
        runner, used = offender
        tripped = Tripped(available=reading.available_bytes, floor=floor, peak=used)
        # Given up first, so the streams the kill breaks are told why.
        scheduler.model_lost(runner.name, guard_message(runner.name, tripped, "running"), code="memory_guard")
        try:
            await runtime.kill(runner.spec.name)
        except RuntimeFailure as error:
            log.error("memory_guard_kill_failed", model=runner.name, error=str(error))
        log.error(
            "memory_guard_stopped", model=runner.name, doing="running", available_bytes=tripped.available,
            min_free=floor, container_bytes=used,
        )


async def _largest(runtime: PodmanRuntime, runners: list[ModelRunner]) -> tuple[ModelRunner, int] | None:
    """The runner whose container holds the most memory now."""
    largest: tuple[ModelRunner, int] | None = None
    for runner in runners:
        try:
            info = await runtime.inspect(runner.spec.name)
        except RuntimeFailure:
            continue
        if info is None or info.pid is None:
            continue
        used = await asyncio.to_thread(container_memory_bytes, info.pid)
        if used is not None and (largest is None or used > largest[1]):
            largest = (runner, used)
    return largest
