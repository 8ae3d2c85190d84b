"""What the scheduler shows the world: status snapshots and the STATUS= line."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..adminjson import ModelStatus, StatusSnapshot
from .runner import ModelRunner
from .state import ModelState

if TYPE_CHECKING:
    from .scheduler import Scheduler


def model_status(scheduler: Scheduler, runner: ModelRunner, now: float, now_wall: float) -> ModelStatus:
    uptime = runner.uptime(now_wall)
    progress = runner.progress
    failure = runner.failure
    eta = scheduler.lifecycle.load_times.eta(runner.name)
    loading_for = _loading_for(runner, now_wall)
    if progress is not None and progress.eta_s is not None and loading_for is not None:
        # Pulling its weights: the download's time left, then its usual load (when it has one).
        eta = loading_for + progress.eta_s + (eta or 0.0)
    return {
        "name": runner.name,
        "state": runner.state.value,
        "reason": runner.reason,
        "state_since": round(runner.state_since, 3),
        "lifecycle": runner.config.lifecycle,
        "claim": runner.claim,
        "configured_claim": runner.config.gpu_memory,
        "load_claim": runner.load_claim,
        "footprint": runner.footprint.view(),
        "claim_warnings": list(runner.claim_warnings),
        "sleep_level": runner.sleep_level if runner.config.sleep_mode else None,
        "sleep_claim": runner.sleep_claim if runner.config.sleep_mode else None,
        "holds": scheduler.lease.holders.get(runner.name, 0.0),
        "in_flight": runner.in_flight,
        "queued": scheduler.queue.depth(runner.name),
        "uptime_s": round(uptime, 1) if uptime is not None else None,
        "idle_s": round(runner.idle_for(now), 1) if runner.state is ModelState.READY else None,
        "progress": (
            {"phase": progress.phase, "fraction": progress.fraction, "line": progress.line} if progress else None
        ),
        "eta_s": round(eta, 1) if eta is not None else None,
        "loading_for_s": round(loading_for, 1) if loading_for is not None else None,
        "failure": (
            {"message": failure.message, "log_lines": list(failure.log_lines), "age_s": round(now - failure.at, 1)}
            if failure
            else None
        ),
        "stale_spec": runner.stale_spec,
        "container": runner.spec.name,
        "port": runner.endpoint.port if runner.endpoint else None,
        "quantum_s": _rounded(scheduler.quantum_of(runner)),
        "quantum_left_s": (
            round(max(0.0, runner.quantum.until - now), 1)
            if runner.quantum is not None and runner.state is ModelState.READY and runner.quantum.until > now else None
        ),
    }


def _loading_for(runner: ModelRunner, now_wall: float) -> float | None:
    """Seconds since its start (STARTING) or its pull (PULLING) began; None in other states."""
    if runner.state is ModelState.STARTING:
        return max(0.0, now_wall - runner.start_requested_at)
    if runner.state is ModelState.PULLING:
        return max(0.0, now_wall - runner.state_since)
    return None


def _rounded(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


def snapshot(scheduler: Scheduler) -> StatusSnapshot:
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
        "swap": {
            "policy": scheduler.config.lifecycle.swap_policy,
            "cost_factor": scheduler.config.lifecycle.swap_cost_factor,
            "min_uptime_s": scheduler.config.lifecycle.min_uptime_s,
        },
    }


def status_line(scheduler: Scheduler) -> str:
    """One line for systemd's STATUS=: ``ready: a, b | starting: c | queued: 3``."""
    by_state: dict[ModelState, list[str]] = {}
    for runner in scheduler.runners.values():
        by_state.setdefault(runner.state, []).append(runner.name)
    parts = [
        "ready: " + (", ".join(by_state.get(ModelState.READY, [])) or "-"),
        "starting: " + (", ".join(by_state.get(ModelState.STARTING, []) + by_state.get(ModelState.WAKING, [])) or "-"),
        *(["pulling: " + ", ".join(by_state[ModelState.PULLING])] if ModelState.PULLING in by_state else []),
        f"queued: {len(scheduler.queue)}",
    ]
    failed = by_state.get(ModelState.FAILED)
    if failed:
        parts.append("failed: " + ", ".join(failed))
    return " | ".join(parts)
