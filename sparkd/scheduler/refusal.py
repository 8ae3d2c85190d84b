"""The reject policy's refusal: a 429 naming the model that holds the GPU and when it goes."""

from __future__ import annotations

import time

from ..errors import ModelBusy
from .runner import ModelRunner


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
