"""Restart safety: adopt the containers an earlier sparkd left running.

Matching, healthy containers keep serving, so a restart costs no model reload.
Strays (no enabled model of that name), stale-spec containers and those beyond
the budget (the most recently started are kept) are stopped: after a restart
nothing is in flight on them, so they are idle by definition.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from ..runtime.containers import ContainerInfo
from .lease import Lease
from .outcomes import NotAdoptable
from .runner import ModelRunner

if TYPE_CHECKING:
    from .scheduler import Scheduler

log = structlog.get_logger("sparkd.scheduler")


async def adopt_running(scheduler: Scheduler) -> None:
    lifecycle = scheduler.lifecycle
    runtime = lifecycle.runtime
    running = sorted(
        (info for info in await runtime.list_managed() if info.running),
        key=lambda info: info.started_at or 0.0,
        reverse=True,
    )
    # What the adopted models will hold, planned on a copy: the scheduler grants the real shares.
    ledger = Lease(scheduler.lease.budget, dict(scheduler.lease.holders))
    adopting: list[tuple[ModelRunner, ContainerInfo]] = []
    leftovers: list[tuple[ContainerInfo, str]] = []
    for info in running:
        runner = scheduler.runners.get(info.model or "")
        if runner is None:
            leftovers.append((info, "no enabled model of that name"))
        elif info.spec_hash != runner.spec.spec_hash:
            leftovers.append((info, "made from an older spec"))
        elif runner.config.spans:
            leftovers.append((info, "a multi-node model: its worker leases did not survive the restart"))
        elif not ledger.fits(runner.claim):
            leftovers.append((info, "beyond the GPU budget"))
        else:
            ledger.grant(runner.name, runner.claim)
            adopting.append((runner, info))
    outcomes = await asyncio.gather(*(lifecycle.adopt(runner, info) for runner, info in adopting))
    for (runner, info), outcome in zip(adopting, outcomes, strict=True):
        if isinstance(outcome, NotAdoptable):
            leftovers.append((info, "its engine cannot be reached"))
        else:
            scheduler.adopt(runner, outcome)
    for info, why in leftovers:
        log.info("container_not_adopted", container=info.name, reason=why)
    await asyncio.gather(*(runtime.stop(info.name, scheduler.config.lifecycle.stop_timeout_s) for info, _ in leftovers))
    scheduler.start_serving()  # utility models start once the adopted ones hold their shares
