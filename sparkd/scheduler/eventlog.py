"""The scheduler's events as structured log lines (journald, the console, JSON).

A move is ``model_<new state>`` (``model_starting``, ``model_ready``,
``model_failed``, ...) with the model, the previous state, the reason and the
cause's own fields; a failure is logged at error level with the engine's most
telling log lines; a finished load is ``load_finished``.  Progress is not
logged: the status page shows it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import structlog

from ..engine.lastwords import telling_lines
from .events import Cause, Event, FailureCause, LoadFinished, SleepFailed, Transitioned
from .state import ModelState

log = structlog.get_logger("sparkd.scheduler")


def log_event(event: Event) -> None:
    if isinstance(event, Transitioned):
        method = log.error if event.new is ModelState.FAILED else log.info
        method(
            f"model_{event.new.value}", model=event.model, previous=event.old.value, reason=event.reason,
            **cause_fields(event.cause),
        )
    elif isinstance(event, LoadFinished):
        log.info(
            "load_finished", model=event.model, kind=event.kind, outcome=event.outcome, took_s=round(event.took, 3),
        )


def cause_fields(cause: Cause) -> dict[str, Any]:
    """``cause=<kind>`` and the cause's fields, the log lines shortened to the telling ones."""
    inner = cause.then if isinstance(cause, SleepFailed) else cause
    fields: dict[str, Any] = {"cause": _kind(cause)}
    for field in dataclasses.fields(inner):
        if field.name in ("message", "then", "why"):
            continue  # the reason says it already
        fields[field.name] = getattr(inner, field.name)
    if isinstance(inner, FailureCause):
        del fields["log_lines"]
        fields["last_log"] = telling_lines(inner.log_lines, 3)
    return fields


def _kind(cause: Cause) -> str:
    """``SwapFor`` -> ``swap_for``."""
    name = type(cause).__name__
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))
