"""Issue 20: what sparkd keeps in memory has a size limit, whatever clients and engines send.

The soak benchmark (``tests/bench/run.py soak``) measures the whole daemon; these pin the
limits of the records one by one, so none can come back unbounded.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from sparkd.engine.usage import NO_MODEL, RequestRecord
from sparkd.observe.metrics import Metrics
from sparkd.observe.operations import RECENT_EVENTS, RECENT_FAILURES, StatusHub
from sparkd.runtime.containerlogs import FOLLOW_BACKLOG_LINES, MAX_LINE_CHARS, Backlog, clip_line
from sparkd.scheduler.events import FailureCause, Requested, Transitioned
from sparkd.scheduler.loadtimes import KEEP, LoadTimes
from sparkd.scheduler.state import ModelState


def test_a_long_line_is_cut_with_a_count_of_what_was_left_out() -> None:
    assert clip_line("short") == "short"
    assert clip_line("x" * MAX_LINE_CHARS) == "x" * MAX_LINE_CHARS
    cut = clip_line("y" * 1_000_000)
    assert cut == "y" * MAX_LINE_CHARS + f" [... {1_000_000 - MAX_LINE_CHARS} more characters]"


async def test_a_followed_log_holds_at_most_its_backlog_for_a_slow_reader() -> None:
    backlog = Backlog()
    for number in range(3 * FOLLOW_BACKLOG_LINES):
        backlog.put(f"line {number}")
    assert len(backlog) == FOLLOW_BACKLOG_LINES
    lines = await backlog.take(0.1)
    assert lines[0] == f"--- sparkd: {2 * FOLLOW_BACKLOG_LINES} lines left out: the reader was slower than the log ---"
    assert lines[1:] == [f"line {n}" for n in range(2 * FOLLOW_BACKLOG_LINES, 3 * FOLLOW_BACKLOG_LINES)]
    assert len(backlog) == 0
    backlog.put("after")
    assert await backlog.take(0.1) == ["after"], "the count of dropped lines is reported once"


async def test_the_backlog_waits_for_a_line_or_the_end() -> None:
    backlog = Backlog()
    assert await backlog.take(0.05) == []
    asyncio.get_running_loop().call_later(0.05, backlog.put, "late")
    assert await backlog.take(5) == ["late"]
    asyncio.get_running_loop().call_later(0.05, backlog.end)
    assert await backlog.take(5) == []
    assert backlog.ended


async def test_the_status_hub_keeps_its_recent_events_and_failures_bounded() -> None:
    hub = StatusHub()
    failure = FailureCause("boom", ("CUDA error",) * 20)
    for number in range(5000):
        model = f"m{number % 7}"
        hub.on_event(Transitioned(model, ModelState.STOPPED, ModelState.STARTING, Requested(), float(number)))
        hub.on_event(Transitioned(model, ModelState.STARTING, ModelState.FAILED, failure, float(number)))
    assert len(hub.recent) == RECENT_EVENTS
    assert len(hub.failures) == RECENT_FAILURES


async def test_requests_for_unknown_models_add_no_metric_series() -> None:
    """Every refused request counts under one model label; statuses are a small fixed set."""
    scheduler = SimpleNamespace(runners={"real": SimpleNamespace()})
    metrics = Metrics(scheduler)  # type: ignore[arg-type]

    def series() -> int:
        per_request = (metrics.requests, metrics.duration, metrics.ttfb, metrics.tokens)
        return sum(len(family.samples) for metric in per_request for family in metric.collect())

    for status in (400, 401, 404):
        metrics.request_done(NO_MODEL, status, 0.0, RequestRecord(), 0.01)
    before = series()
    for number in range(3000):
        metrics.request_done(NO_MODEL, (400, 401, 404)[number % 3], 0.0, RequestRecord(), 0.01)
    assert series() == before


async def test_load_times_keep_the_last_few_per_model(tmp_path) -> None:
    times = LoadTimes(tmp_path / "load-times.json")
    for number in range(10 * KEEP):
        await times.record("m", float(number))
    reread = LoadTimes(tmp_path / "load-times.json")
    reread.load()
    assert reread.eta("m") == (9 * KEEP + 10 * KEEP - 1) / 2, "the median of the last KEEP load times"
