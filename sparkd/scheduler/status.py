"""What the scheduler shows the world: status snapshots, the STATUS= line, busy refusals."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..errors import ModelBusy
from .runner import ModelRunner
from .state import ModelState

if TYPE_CHECKING:
    from .scheduler import Scheduler


def model_status(scheduler: "Scheduler", runner: ModelRunner, now: float, now_wall: float) -> dict[str, Any]:
    uptime = runner.uptime(now_wall)
    progress = runner.progress
    failure = runner.failure
    eta = scheduler.lifecycle.load_times.eta(runner.name)
    return {
        "name": runner.name,
        "state": runner.state.value,
        "reason": runner.reason,
        "state_since": round(runner.state_since, 3),
        "lifecycle": runner.config.lifecycle,
        "claim": runner.claim,
        "holds": scheduler.lease.holders.get(runner.name, 0.0),
        "in_flight": runner.in_flight,
        "queued": scheduler.queue.depth(runner.name),
        "uptime_s": round(uptime, 1) if uptime is not None else None,
        "idle_s": round(runner.idle_for(now), 1) if runner.state is ModelState.READY else None,
        "progress": (
            {"phase": progress.phase, "fraction": progress.fraction, "line": progress.line} if progress else None
        ),
        "eta_s": round(eta, 1) if eta is not None else None,
        "loading_for_s": (
            round(now_wall - runner.start_requested_at, 1) if runner.state is ModelState.STARTING else None
        ),
        "failure": (
            {"message": failure.message, "log_lines": list(failure.log_lines), "age_s": round(now - failure.at, 1)}
            if failure
            else None
        ),
        "stale_spec": runner.stale_spec,
        "container": runner.spec.name,
        "port": runner.endpoint.port if runner.endpoint else None,
    }


def snapshot(scheduler: "Scheduler") -> dict[str, Any]:
    now, now_wall = time.monotonic(), time.time()
    lease = scheduler.lease
    return {
        "models": [model_status(scheduler, r, now, now_wall) for r in scheduler.runners.values()],
        "lease": {
            "budget": lease.budget,
            "claimed": round(lease.claimed, 4),
            "free": round(lease.free, 4),
            "holders": dict(lease.holders),
        },
        "queue": {"depth": len(scheduler.queue), "limit": scheduler.queue.limit, "models": scheduler.queue.models()},
    }


def status_line(scheduler: "Scheduler") -> str:
    """One line for systemd's STATUS=: ``ready: a, b | starting: c | queued: 3``."""
    by_state: dict[ModelState, list[str]] = {}
    for runner in scheduler.runners.values():
        by_state.setdefault(runner.state, []).append(runner.name)
    parts = [
        "ready: " + (", ".join(by_state.get(ModelState.READY, [])) or "-"),
        "starting: " + (", ".join(by_state.get(ModelState.STARTING, []) + by_state.get(ModelState.WAKING, [])) or "-"),
        f"queued: {len(scheduler.queue)}",
    ]
    failed = by_state.get(ModelState.FAILED)
    if failed:
        parts.append("failed: " + ", ".join(failed))
    return " | ".join(parts)


def busy_refusal(requested: ModelRunner, busy: ModelRunner, default_idle_stop_s: float) -> ModelBusy:
    """The reject policy's 429, naming the model that holds the GPU and when it goes."""
    now = time.monotonic()
    idle_limit = busy.config.idle_stop_s or default_idle_stop_s
    releases = busy.config.lifecycle not in ("pinned", "utility")
    release_in = max(0.0, idle_limit - busy.idle_for(now)) if releases else None
    uptime = busy.uptime() or 0.0
    idle = busy.idle_for(now)
    when = f"in about {release_in:.0f}s if it stays idle" if release_in is not None else "never automatically"
    return ModelBusy(
        f"the GPU is busy with model {busy.name} (up {uptime:.0f}s, idle {idle:.0f}s, {busy.in_flight} in flight); "
        f"{requested.name} can start once it is released: {when}",
        retry_after=release_in if release_in else 60,
        headers={
            "X-Busy-Model": busy.name,
            "X-Busy-Model-Uptime": str(round(uptime)),
            "X-Busy-Model-Idle": str(round(idle)),
        },
        extra={
            "busy_model": busy.name,
            "busy_model_uptime_s": round(uptime, 1),
            "busy_model_idle_s": round(idle, 1),
            "busy_model_in_flight": busy.in_flight,
            "releases": releases,
            "releases_in_s": round(release_in, 1) if release_in is not None else None,
            "requested_model": requested.name,
        },
    )
