"""``GET /metrics``: Prometheus metrics of the request path, the models and the lease.

Two kinds of figures:

* **events** (counters, histograms) are updated as things happen: a request ends
  (``request_done``, called once per request from the request path) or the
  scheduler emits an event (``on_event``: a move, a finished load);
* **levels** (in flight, queued, model states, the lease, host memory) are read
  from the scheduler when Prometheus scrapes, so they cost the request path
  nothing.

Every label value is a configured model name, an HTTP status code or a fixed
word, never client input, so the number of series stays bounded.  The per-key
series (``sparkd_key_*``) are labelled by key *name*, only for the names of the
keys file (and the fixed ``anonymous`` and ``admin-socket`` callers): a name it
does not hold (a peer's forwarded request, say) never creates a series.

``request_finished`` is the one entry point for a finished request's usage: the
per-model and per-key counters, and the per-key usage the history and the key
limits read (``KeyUsage``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from ..engine.usage import RequestRecord
from ..hardware.memory import parse_meminfo
from ..scheduler.events import Event, LoadFinished, Transitioned, swap_target
from ..scheduler.state import ModelState
from .keyusage import KeyUsage, UsageCounts

if TYPE_CHECKING:
    from ..hardware.memory import MemoryGauge
    from ..scheduler.scheduler import Scheduler

CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # no *_created series: they double the output and nobody graphs them

FIXED_CALLERS = frozenset({"anonymous", "admin-socket"})
"""Callers without a key in the keys file that still get their own series."""
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
LOAD_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 900, 1800)


class Metrics:
    def __init__(
        self, scheduler: Scheduler, memory: MemoryGauge | None = None, meminfo: str = "/proc/meminfo",
        known_keys: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        """``known_keys``: the key names of the keys file in force (a reload changes them)."""
        self.scheduler = scheduler
        self._known_keys = known_keys or frozenset
        self.key_usage = KeyUsage()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sparkd_requests", "Requests on the OpenAI endpoint, by model and HTTP status", ["model", "status"], registry=r
        )
        self.ttfb = Histogram(
            "sparkd_time_to_first_byte_seconds",
            "From the request's arrival to the first byte of its answer (queueing and model start included)",
            ["model"], buckets=TTFB_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            "sparkd_request_duration_seconds", "From the request's arrival to the end of its answer", ["model"],
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "sparkd_tokens", "Tokens the engines reported in their usage (kind: prompt or completion)", ["model", "kind"],
            registry=r,
        )
        self.key_requests = Counter(
            "sparkd_key_requests", "Requests by key name (never the key), model and outcome (ok or error)",
            ["key", "model", "outcome"], registry=r,
        )
        self.key_tokens = Counter(
            "sparkd_key_tokens", "Tokens the engines reported, by key name, model and kind (prompt or completion)",
            ["key", "model", "kind"], registry=r,
        )
        self.key_queue_wait = Counter(
            "sparkd_key_queue_wait_seconds", "Seconds requests waited for their model, by key name and model",
            ["key", "model"], registry=r,
        )
        self.starts = Counter("sparkd_container_starts", "Model container starts", ["model"], registry=r)
        self.stops = Counter("sparkd_container_stops", "Model containers stopped", ["model"], registry=r)
        self.failures = Counter("sparkd_container_failures", "Model failures (failed start, crash, failed stop)", ["model"], registry=r)
        self.load_duration = Histogram(
            "sparkd_model_load_duration_seconds", "How long a model took to become ready (kind: start or wake)",
            ["model", "kind"], buckets=LOAD_BUCKETS, registry=r,
        )
        self.swaps = Counter(
            "sparkd_swaps", "Models stopped or put to sleep to make room for another (model: the one that went)",
            ["model", "for_model"], registry=r,
        )
        self.connections_refused = Counter(
            "sparkd_connections_refused", "TCP connections closed by sparkd's bounds (reason: max_connections, header_timeout)",
            ["reason"], registry=r,
        )
        for reason in ("max_connections", "header_timeout"):
            self.connections_refused.labels(reason)  # present at 0 before the first refusal
        self._levels = _Levels(self, memory, Path(meminfo))
        r.register(self._levels)
        self._request_children: dict[tuple[str, int], tuple[Any, ...]] = {}
        self._known: set[str] = set()
        self.usage_pending: dict[str, list[int]] = {}
        """Per model [requests, errors, prompt tokens, completion tokens] since the last ``drain_usage``."""
        for name in scheduler.runners:
            self._know(name)

    # -- events ------------------------------------------------------------------

    def _know(self, model: str) -> None:
        """Create a model's series at zero so rate() works from its first event."""
        if model in self._known:
            return
        self._known.add(model)
        self.starts.labels(model)
        self.stops.labels(model)
        self.failures.labels(model)

    def on_event(self, event: Event) -> None:
        """Scheduler listener: count starts, stops, failures, swaps and load times."""
        if isinstance(event, LoadFinished):
            if event.outcome == "ready":
                self.load_duration.labels(event.model, event.kind).observe(max(0.0, event.took))
            return
        if not isinstance(event, Transitioned):
            return  # progress news
        name, state = event.model, event.new
        self._know(name)
        if state is ModelState.STARTING:
            self.starts.labels(name).inc()
        elif state is ModelState.STOPPED and event.old is not ModelState.PULLING:  # a pull ended: nothing ran
            self.stops.labels(name).inc()
        elif state is ModelState.FAILED:
            self.failures.labels(name).inc()
        for_model = swap_target(event.cause)
        if state in (ModelState.STOPPING, ModelState.SLEEPING) and for_model is not None:
            self.swaps.labels(name, for_model).inc()

    def request_done(self, model: str, status: int, started: float, record: RequestRecord | None, now: float) -> None:
        """One request ended (any status). ``started``/``now`` are time.monotonic()."""
        children = self._request_children.get((model, status))
        if children is None:
            children = (
                self.requests.labels(model, str(status)), self.duration.labels(model), self.ttfb.labels(model),
                self.tokens.labels(model, "prompt"), self.tokens.labels(model, "completion"),
            )
            self._request_children[(model, status)] = children
        counter, duration, ttfb, prompt_tokens, completion_tokens = children
        counter.inc()
        duration.observe(now - started)
        pending = self.usage_pending.get(model)
        if pending is None:
            pending = self.usage_pending[model] = [0, 0, 0, 0]
        pending[0] += 1
        if status >= 400:
            pending[1] += 1
        if record is None:
            return
        if record.first_byte is not None:
            ttfb.observe(record.first_byte - started)
        usage = record.usage
        if usage is not None:
            prompt, completion = usage
            prompt_tokens.inc(prompt)
            completion_tokens.inc(completion)
            pending[2] += prompt
            pending[3] += completion

    def request_finished(self, key: str, status: int, started: float, record: RequestRecord, now: float) -> None:
        """The one place a finished request's usage is counted: per model (``request_done``), per key name
        (the ``sparkd_key_*`` series, for known names only) and in ``key_usage`` (history, daily limits).

        ``key``: the caller's key name, never the key; ``started``/``now``: time.monotonic().
        """
        self.request_done(record.model, status, started, record, now)
        prompt, completion = record.usage or (0, 0)
        error = status >= 400 or record.stream_error is not None
        self.key_usage.record(key, record.model, UsageCounts(1, int(error), prompt, completion, record.queued_s))
        if key not in FIXED_CALLERS and key not in self._known_keys():
            return  # not a name of the keys file: no series of its own
        self.key_requests.labels(key, record.model, "error" if error else "ok").inc()
        if record.usage is not None:
            self.key_tokens.labels(key, record.model, "prompt").inc(prompt)
            self.key_tokens.labels(key, record.model, "completion").inc(completion)
        if record.queued_s:
            self.key_queue_wait.labels(key, record.model).inc(record.queued_s)

    def take_usage(self, model: str) -> list[int] | None:
        """Hand one model's counts to the history now (its session is ending)."""
        return self.usage_pending.pop(model, None)

    def drain_usage(self) -> dict[str, list[int]]:
        """Hand the per-model request/token counts since the last call to the history."""
        pending, self.usage_pending = self.usage_pending, {}
        return pending

    # -- exposition ---------------------------------------------------------------

    async def render(self) -> bytes:
        """The text exposition; host memory is read in a worker thread first."""
        await self._levels.refresh()
        return generate_latest(self.registry)


class _Levels(Collector):
    """Gauges read at scrape time from the scheduler, the lease and /proc/meminfo."""

    def __init__(self, metrics: Metrics, memory: MemoryGauge | None, meminfo: Path) -> None:
        self._metrics = metrics
        self._memory = memory
        self._meminfo = meminfo
        self._host: tuple[float, float] | None = None
        self._gpu_fraction: float | None = None

    async def refresh(self) -> None:
        self._host = await asyncio.to_thread(self._read_meminfo)
        reading = await self._memory.read() if self._memory is not None else None
        self._gpu_fraction = reading.fraction if reading is not None else None

    def _read_meminfo(self) -> tuple[float, float] | None:
        try:
            reading = parse_meminfo(self._meminfo.read_text())
        except OSError:
            return None
        return (reading.available * 1024, reading.total * 1024) if reading else None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # levels come and go with the configuration: no fixed description

    def collect(self) -> Iterator[GaugeMetricFamily]:
        scheduler = self._metrics.scheduler
        info = GaugeMetricFamily("sparkd_info", "sparkd's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        in_flight = GaugeMetricFamily("sparkd_requests_in_flight", "Requests being answered by a model", labels=["model"])
        queued = GaugeMetricFamily("sparkd_requests_queued", "Requests waiting for a model", labels=["model"])
        state = GaugeMetricFamily("sparkd_model_state", "1 for the state each model is in", labels=["model", "state"])
        progress = GaugeMetricFamily(
            "sparkd_model_load_progress_ratio", "Load progress (0-1) of a starting model, from its log", labels=["model"]
        )
        claim = GaugeMetricFamily("sparkd_model_claim_ratio", "Each model's configured claim on the GPU lease", labels=["model"])
        share = GaugeMetricFamily("sparkd_lease_share_ratio", "The lease share each model holds now", labels=["model"])
        holders = scheduler.lease.holders
        for name, runner in scheduler.runners.items():
            in_flight.add_metric([name], runner.in_flight)
            queued.add_metric([name], scheduler.queue.depth(name))
            for each in ModelState:
                state.add_metric([name, each.value], 1 if runner.state is each else 0)
            if runner.progress is not None and runner.progress.fraction is not None:
                progress.add_metric([name], runner.progress.fraction)
            claim.add_metric([name], runner.claim)
            share.add_metric([name], holders.get(name, 0.0))
        yield from (in_flight, queued, state, progress, claim, share)
        yield GaugeMetricFamily("sparkd_queue_depth", "Requests waiting for any model", value=len(scheduler.queue))
        yield GaugeMetricFamily("sparkd_queue_limit", "The wait queue's size (lifecycle.queue_size)", value=scheduler.queue.limit)
        yield GaugeMetricFamily(
            "sparkd_queue_body_bytes", "Bytes of request bodies held by waiting requests (limit: lifecycle.queue_body_bytes)",
            value=scheduler.queue.body_bytes,
        )
        yield GaugeMetricFamily("sparkd_lease_budget_ratio", "The GPU lease budget (gpu.memory_budget)", value=scheduler.lease.budget)
        yield GaugeMetricFamily("sparkd_lease_claimed_ratio", "The sum of the shares held now", value=scheduler.lease.claimed)
        if self._host is not None:
            available, total = self._host
            yield GaugeMetricFamily(
                "sparkd_host_memory_available_bytes", "MemAvailable of the host (the DGX Spark's unified memory)", value=available
            )
            yield GaugeMetricFamily("sparkd_host_memory_total_bytes", "MemTotal of the host", value=total)
        if self._gpu_fraction is not None:
            yield GaugeMetricFamily(
                "sparkd_gpu_memory_available_ratio",
                "Available fraction of GPU memory as the reclaim probe sees it (gpu.memory_probe)",
                value=self._gpu_fraction,
            )
