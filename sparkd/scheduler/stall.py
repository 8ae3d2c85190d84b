"""Wedged engines: running requests, and no token moves.

A GB10 engine can wedge with ``/health`` and ``/v1/models`` still green; the
honest signal is its own counters: ``vllm:generation_tokens_total`` (and
``vllm:prompt_tokens_total``, which moves during a long prefill) frozen while
``vllm:num_requests_running`` is above zero.  Such a model, frozen for
``lifecycle.stall_s``, takes the way of a container that died while serving
(``Scheduler.model_lost``): failed, its container stopped, its share freed; its
requests end with the reason, and sparkd starts it again as soon as it fits.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from ..engine.client import EngineClient, EngineError
from .runner import ModelRunner
from .scheduler import Scheduler
from .state import ModelState

log = structlog.get_logger("sparkd.scheduler")

SERVING = (ModelState.READY, ModelState.DRAINING)
MAX_CHECK_S = 5.0
MIN_CHECK_S = 0.25
METRICS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Counters:
    tokens: float
    """Prompt plus generation tokens processed so far."""
    running: float


def parse_counters(text: str) -> Counters | None:
    """The token counters and running requests in a vLLM ``/metrics`` text; None when it has none
    (not a vLLM engine: nothing to judge it by)."""
    values = {"vllm:generation_tokens_total": 0.0, "vllm:prompt_tokens_total": 0.0, "vllm:num_requests_running": 0.0}
    seen = False
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if not rest:
            name, _, rest = line.partition(" ")
        if name not in values:
            continue
        try:
            values[name] += float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        seen = name == "vllm:generation_tokens_total" or seen
    if not seen:
        return None
    tokens = values["vllm:generation_tokens_total"] + values["vllm:prompt_tokens_total"]
    return Counters(tokens=tokens, running=values["vllm:num_requests_running"])


async def watch_for_stalls(scheduler: Scheduler, engine: EngineClient) -> None:
    moved: dict[str, tuple[float, float]] = {}
    """Model → (its token count, time.monotonic() it last moved or last ran nothing)."""
    while True:
        stall_s = scheduler.config.lifecycle.stall_s
        await asyncio.sleep(max(MIN_CHECK_S, min(stall_s / 4, MAX_CHECK_S)) if stall_s else MAX_CHECK_S)
        if not stall_s:
            moved.clear()
            continue
        serving = [r for r in scheduler.runners.values() if r.state in SERVING and r.endpoint is not None]
        readings = await asyncio.gather(*(_counters(engine, r) for r in serving))
        now = time.monotonic()
        for runner, counters in zip(serving, readings, strict=True):
            last = moved.get(runner.name)
            if counters is None or counters.running == 0 or last is None or counters.tokens != last[0]:
                moved[runner.name] = (counters.tokens if counters else 0.0, now)
            elif now - max(last[1], runner.ready_at or 0.0) >= stall_s and runner.state in SERVING:
                del moved[runner.name]
                _fail(scheduler, runner, now - last[1], counters, stall_s)
        for name in [n for n in moved if n not in scheduler.runners]:
            del moved[name]


async def _counters(engine: EngineClient, runner: ModelRunner) -> Counters | None:
    if runner.endpoint is None:
        return None
    try:
        return parse_counters(await engine.get_text(runner.endpoint, "/metrics", timeout=METRICS_TIMEOUT_S))
    except EngineError:
        return None  # no answer is the readiness watch's business (engine.unresponsive_fail_s)


def _fail(scheduler: Scheduler, runner: ModelRunner, frozen_s: float, counters: Counters, limit: float) -> None:
    log.error("engine_wedged", model=runner.name, frozen_s=round(frozen_s, 1), running=counters.running, limit_s=limit)
    scheduler.model_lost(
        runner.name,
        f"model {runner.name}: its engine is wedged: vllm:generation_tokens_total has not moved for {frozen_s:.0f} s "
        f"while {counters.running:.0f} requests were running (lifecycle.stall_s = {limit:g}); it was stopped "
        f"and is being started again; see `sparkctl logs {runner.name}` for why it wedged",
        code="engine_wedged",
    )
