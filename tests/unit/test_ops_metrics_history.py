"""Metrics and usage history driven by the real scheduler with an in-process fake lifecycle."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fake_lifecycle import FakeLifecycle
from sparkd.config import Config, GpuConfig, LifecycleConfig, ModelConfig
from sparkd.engine.client import Endpoint
from sparkd.engine.usage import NO_MODEL, RequestRecord, StreamTail, parse_usage
from sparkd.errors import ServiceUnavailable
from sparkd.observe.history import History, HistoryUnavailable
from sparkd.observe.metrics import Metrics
from sparkd.scheduler.outcomes import Adoption
from sparkd.scheduler.scheduler import Scheduler


def config_with(*models: ModelConfig) -> Config:
    return Config(
        gpu=GpuConfig(devices=(), memory_budget=0.94),
        lifecycle=LifecycleConfig(min_uptime_s=0, failure_backoff_s=0, queue_timeout_s=5),
        models={m.name: m for m in models},
    )


def model(name: str, claim: float, **fields: object) -> ModelConfig:
    return ModelConfig(name=name, image="img", gpu_memory=claim, **fields)  # type: ignore[arg-type]


async def serve(scheduler: Scheduler, name: str) -> None:
    runner = await scheduler.acquire(name)
    await asyncio.sleep(0.005)
    scheduler.release(runner)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def get(found, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


# -- usage parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (b'{"id":"x","usage":{"prompt_tokens":12,"total_tokens":20,"completion_tokens":8}}', (12, 8)),
        (b'{"object":"list","data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}', (5, 0)),  # embeddings
        (b'{"usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}}', (7, 3)),  # Responses API
        (
            (b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\n\ndata: [DONE]\n\n'),
            (4, 2),
        ),
        (b'data: {"choices":[{"delta":{"content":"usage"}}],"usage":null}\n\ndata: [DONE]\n\n', None),
        (b'{"choices":[]}', None),
        (b"", None),
    ],
)
def test_parse_usage(text, expected):
    assert parse_usage(text) == expected


@pytest.mark.parametrize(
    "reads",
    [
        # the usage chunk, then [DONE] and the chunked terminator in reads of their own
        [b'5a\r\ndata: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n\r\n',
         b"e\r\ndata: [DONE]\n\n\r\n", b"0\r\n\r\n"],
        # the usage object split across two reads, then [DONE] and the end
        [b'data: {"choices":[],"usage":{"prompt_tokens":7,', b'"completion_tokens":3}}\n\n', b"data: [DONE]\n\n", b""],
    ],
)
def test_a_stream_tail_keeps_the_usage_chunk_past_the_reads_that_follow_it(reads):
    tail = StreamTail()
    for data in [b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n', *reads]:
        tail.feed(data)
    assert parse_usage(tail.text) == (7, 3)


# -- metrics ------------------------------------------------------------------------------


async def test_transitions_count_starts_stops_failures_swaps_and_load_times(tmp_path):
    scheduler = Scheduler(config_with(model("a", 0.8), model("b", 0.8), model("c", 0.1)), FakeLifecycle(tmp_path, failing={"c": "CUDA error: boom"}))
    scheduler.start_serving()  # as the daemon does once adoption is over
    metrics = Metrics(scheduler, meminfo=str(tmp_path / "no-meminfo"))
    scheduler.subscribe(metrics.on_event)
    await serve(scheduler, "a")
    await serve(scheduler, "b")  # a is swapped out for b
    with pytest.raises(ServiceUnavailable) as failed:
        await serve(scheduler, "c")
    assert failed.value.code == "model_failed"
    found = samples(await metrics.render())
    assert get(found, "sparkd_container_starts_total", model="a") == 1
    assert get(found, "sparkd_container_starts_total", model="b") == 1
    assert get(found, "sparkd_container_stops_total", model="a") == 1
    assert get(found, "sparkd_container_stops_total", model="b") == 0
    assert get(found, "sparkd_container_failures_total", model="c") == 1
    assert get(found, "sparkd_swaps_total", model="a", for_model="b") == 1
    assert get(found, "sparkd_model_load_duration_seconds_count", model="a", kind="start") == 1
    assert get(found, "sparkd_model_state", model="b", state="ready") == 1
    assert get(found, "sparkd_model_state", model="a", state="stopped") == 1
    assert get(found, "sparkd_lease_budget_ratio") == 0.94
    assert get(found, "sparkd_lease_claimed_ratio") == pytest.approx(0.8)
    assert get(found, "sparkd_lease_share_ratio", model="b") == pytest.approx(0.8)
    assert get(found, "sparkd_requests_in_flight", model="b") == 0
    assert get(found, "sparkd_queue_limit") == 1024
    assert not any(name.endswith("_created") for name, _ in found)


async def test_wakes_are_timed_once_and_a_sleep_for_another_model_is_a_swap(tmp_path):
    sleepy = {"sleep_mode": True, "sleep_gpu_memory": 0.05}
    scheduler = Scheduler(config_with(model("a", 0.8, **sleepy), model("b", 0.8, **sleepy)), FakeLifecycle(tmp_path))
    scheduler.start_serving()
    metrics = Metrics(scheduler, meminfo=str(tmp_path / "no-meminfo"))
    scheduler.subscribe(metrics.on_event)
    await serve(scheduler, "a")
    await serve(scheduler, "b")  # a sleeps for b
    await serve(scheduler, "a")  # b sleeps for a, a wakes
    found = samples(await metrics.render())
    assert get(found, "sparkd_swaps_total", model="a", for_model="b") == 1
    assert get(found, "sparkd_swaps_total", model="b", for_model="a") == 1
    assert get(found, "sparkd_model_load_duration_seconds_count", model="a", kind="wake") == 1
    assert get(found, "sparkd_model_load_duration_seconds_count", model="a", kind="start") == 1
    assert get(found, "sparkd_container_starts_total", model="a") == 1


async def test_request_done_counts_status_latency_and_tokens(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemFree:        1000 kB\nMemAvailable:   65536000 kB\n")
    scheduler = Scheduler(config_with(model("a", 0.5)), FakeLifecycle(tmp_path))
    scheduler.start_serving()  # as the daemon does once adoption is over
    metrics = Metrics(scheduler, meminfo=str(meminfo))
    record = RequestRecord()
    started = time.monotonic()
    record.first_byte = started + 0.2
    record.usage = (10, 5)
    metrics.request_done("a", 200, started, record, started + 1.5)
    metrics.request_done("a", 200, started, None, started + 0.1)
    metrics.request_done("a", 503, started, None, started + 0.1)
    metrics.request_done(NO_MODEL, 404, started, None, started + 0.001)
    found = samples(await metrics.render())
    assert get(found, "sparkd_requests_total", model="a", status="200") == 2
    assert get(found, "sparkd_requests_total", model="a", status="503") == 1
    assert get(found, "sparkd_requests_total", model=NO_MODEL, status="404") == 1
    assert get(found, "sparkd_request_duration_seconds_count", model="a") == 3
    assert get(found, "sparkd_request_duration_seconds_bucket", model="a", le="1.0") == 2
    assert get(found, "sparkd_time_to_first_byte_seconds_count", model="a") == 1
    assert get(found, "sparkd_time_to_first_byte_seconds_bucket", model="a", le="0.25") == 1
    assert get(found, "sparkd_tokens_total", model="a", kind="prompt") == 10
    assert get(found, "sparkd_tokens_total", model="a", kind="completion") == 5
    assert get(found, "sparkd_host_memory_available_bytes") == 65536000 * 1024
    assert get(found, "sparkd_host_memory_total_bytes") == 131072000 * 1024
    assert metrics.drain_usage() == {"a": [3, 1, 10, 5], NO_MODEL: [1, 1, 0, 0]}
    assert metrics.drain_usage() == {}


# -- history ----------------------------------------------------------------------------------


async def test_history_records_sessions_loads_usage_and_survives_reopening(tmp_path):
    path = tmp_path / "state" / "history.sqlite3"
    scheduler = Scheduler(config_with(model("a", 0.8), model("b", 0.8), model("c", 0.1)), FakeLifecycle(tmp_path, failing={"c": "CUDA error: boom"}))
    scheduler.start_serving()  # as the daemon does once adoption is over
    history = History(path)
    await history.open()
    scheduler.subscribe(history.on_event)
    await serve(scheduler, "a")
    history.record_memory("a", 10 * 2**30, 2**30, None)
    history.record_memory("a", 12 * 2**30, 2**29, None)
    await history.flush({"a": [3, 1, 30, 12]})
    await serve(scheduler, "b")  # swaps a out
    with pytest.raises(ServiceUnavailable) as failed:
        await serve(scheduler, "c")
    assert failed.value.code == "model_failed"
    await history.flush({"a": [2, 0, 20, 8], "b": [1, 0, 5, 5]})  # a's session has ended: counted per day only
    data = await history.query()
    assert data["models"]["a"]["loads"] == 1 and data["models"]["a"]["load_s"]["median"] >= 0
    assert data["models"]["c"]["failed_loads"] == 1
    assert data["models"]["a"]["requests"] == 5 and data["models"]["a"]["tokens"] == 70
    a_session = next(s for s in data["sessions"] if s["model"] == "a")
    assert a_session["end_state"] == "stopped" and a_session["end_reason"] == "swapped out for b"
    assert a_session["peak_host_used_bytes"] == 12 * 2**30 and a_session["peak_container_bytes"] == 2**30
    assert a_session["requests"] == 3
    b_session = next(s for s in data["sessions"] if s["model"] == "b")
    assert b_session["running"] and b_session["ended_at"] is None
    c_session = next(s for s in data["sessions"] if s["model"] == "c")
    assert c_session["end_state"] == "failed" and "exited during start" in c_session["end_reason"]
    [today] = [d for d in data["daily"] if d["model"] == "a"]
    assert (today["requests"], today["errors"], today["prompt_tokens"], today["completion_tokens"]) == (5, 1, 50, 20)
    failed = next(load for load in data["loads"] if load["model"] == "c")
    assert failed["outcome"] == "failed" and "exited during start" in failed["message"]
    await history.close()

    # A new sparkd reads it back; b's session was left open (its container "kept") and is
    # closed once the new daemon finds it gone.
    again = History(path)
    await again.open()
    assert (await again.query("a"))["sessions"][0]["end_reason"] == "swapped out for b"
    await again.close_stale(running=set())
    data = await again.query("b")
    assert data["sessions"][0]["end_reason"].startswith("gone when sparkd restarted")
    assert data["sessions"][0]["ended_at"] is not None
    await again.close()


async def test_a_sessions_last_requests_count_in_it_whatever_the_subscription_order(tmp_path):
    scheduler = Scheduler(config_with(model("a", 0.8), model("b", 0.8)), FakeLifecycle(tmp_path))
    scheduler.start_serving()
    metrics = Metrics(scheduler, meminfo=str(tmp_path / "no-meminfo"))
    history = History(tmp_path / "history.sqlite3", pending_usage=metrics.take_usage)
    await history.open()
    scheduler.subscribe(history.on_event)  # before the metrics: the order does not matter
    scheduler.subscribe(metrics.on_event)
    await serve(scheduler, "a")
    now = time.monotonic()
    metrics.request_done("a", 200, now, None, now)
    metrics.request_done("a", 500, now, None, now)
    await serve(scheduler, "b")  # a's session ends: its last two requests count in it
    [a_session] = (await history.query("a"))["sessions"]
    assert not a_session["running"] and a_session["requests"] == 2
    assert metrics.take_usage("a") is None  # taken once, not counted again by the next flush
    await history.close()


async def test_history_reuses_an_open_session_for_an_adopted_container(tmp_path):
    path = tmp_path / "history.sqlite3"
    scheduler = Scheduler(config_with(model("a", 0.5)), FakeLifecycle(tmp_path))
    scheduler.start_serving()  # as the daemon does once adoption is over
    history = History(path)
    await history.open()
    scheduler.subscribe(history.on_event)
    await serve(scheduler, "a")
    await history.close()
    # The next sparkd adopts the running container: STOPPED -> READY continues the session.
    scheduler2 = Scheduler(config_with(model("a", 0.5)), FakeLifecycle(tmp_path))
    scheduler2.start_serving()  # as the daemon does once adoption is over
    again = History(path)
    await again.open()
    scheduler2.subscribe(again.on_event)
    adoption = Adoption(container="sparkd-a", endpoint=Endpoint(port=1, key="k"), started_at=time.time(), serving=True)
    scheduler2.adopt(scheduler2.runners["a"], adoption)
    await again.close_stale({"a"})
    data = await again.query("a")
    assert len(data["sessions"]) == 1 and data["sessions"][0]["running"]
    await again.close()


async def test_history_refuses_a_newer_schema_and_reports_it(tmp_path):
    path = tmp_path / "history.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    db.commit()
    db.close()
    history = History(path)
    with pytest.raises(HistoryUnavailable, match="newer sparkd") as refused:
        await history.open()
    assert str(path) in str(refused.value) and "Move the file aside" in str(refused.value)
    await history.close()  # the daemon's shutdown path after a refused start
