"""The pure logic of sharing one GPU between keys (issue 17): keys-file limits, queue order by
priority, the swap quantum's decision, the per-key day counts and limits, the key metrics' bounds.

The same behaviour end to end, on real Podman, is tests/integration/test_fair_sharing.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace

import pytest
from prometheus_client import generate_latest

from fake_lifecycle import FakeLifecycle
from sparkd.config import Config, GpuConfig, LifecycleConfig, ModelConfig
from sparkd.config.keys import KeyLimits, parse_keys
from sparkd.engine.usage import RequestRecord
from sparkd.errors import TooManyRequests
from sparkd.http.auth import KeyRing, Principal
from sparkd.http.keylimits import KeyGate
from sparkd.observe.keyusage import KeyUsage, UsageCounts, local_day, seconds_to_midnight
from sparkd.observe.metrics import Metrics
from sparkd.scheduler.quantum import WORK_GRACE_S, Quantum, protected_until, quantum_length
from sparkd.scheduler.queue import QueueLimits, Waiter, WaitQueue
from sparkd.scheduler.scheduler import Scheduler
from sparkd.scheduler.state import ModelState

KEY = "sk-test-0123456789abcdef"


def entry(**fields: object) -> dict[str, object]:
    return {"keys": {"bob": {"key": KEY, **fields}}}


# -- keys file ---------------------------------------------------------------------------------


def test_limits_are_read_from_the_keys_file():
    entries, problems = parse_keys(entry(max_concurrent=2, tokens_per_day=5000, priority=-3))
    assert problems == []
    assert entries["bob"].limits == KeyLimits(max_concurrent=2, tokens_per_day=5000, priority=-3)
    ring = KeyRing(entries.values())
    principal = ring.check(KEY)
    assert principal is not None and principal.limits.priority == -3
    assert ring.name_set == frozenset({"bob"})


def test_a_key_without_limits_has_none_and_priority_zero():
    entries, problems = parse_keys(entry())
    assert problems == [] and entries["bob"].limits == KeyLimits(None, None, 0)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"max_concurrent": 0}, "keys.bob.max_concurrent: expected a whole number of at least 1, found 0"),
        ({"max_concurrent": "2"}, "keys.bob.max_concurrent: expected a whole number of at least 1, found string '2'"),
        ({"max_concurrent": True}, "keys.bob.max_concurrent: expected a whole number of at least 1, found boolean True"),
        ({"tokens_per_day": 1.5}, "keys.bob.tokens_per_day: expected a whole number of at least 1, found number 1.5"),
        ({"tokens_per_day": -1}, "keys.bob.tokens_per_day: expected a whole number of at least 1, found -1"),
        ({"priority": 1001}, "keys.bob.priority: expected a whole number from -1000 to 1000, found 1001"),
        ({"priority": "high"}, "keys.bob.priority: expected a whole number from -1000 to 1000, found string 'high'"),
    ],
)
def test_a_bad_limit_is_refused_naming_the_key_and_field(fields, problem):
    entries, problems = parse_keys(entry(**fields))
    assert problem in problems
    assert "bob" not in entries
    assert all(KEY not in p for p in problems)


def test_every_bad_limit_of_an_entry_is_listed_and_unknown_fields_name_the_known_ones():
    _, problems = parse_keys(entry(max_concurrent=0, priority="x", max_concurent=3))
    assert any(p.startswith("keys.bob.max_concurrent:") for p in problems)
    assert any(p.startswith("keys.bob.priority:") for p in problems)
    unknown = next(p for p in problems if p.startswith("keys.bob.max_concurent:"))
    assert "max_concurrent" in unknown and "tokens_per_day" in unknown and "priority" in unknown


# -- the queue's order -------------------------------------------------------------------------


async def test_higher_priority_groups_come_first_and_equals_keep_their_arrival_order():
    queue = WaitQueue(QueueLimits(size=10, body_bytes=1000, per_key=10))
    queue.push(Waiter("a", key="guest", priority=0))
    queue.push(Waiter("b", key="guest", priority=0))
    queue.push(Waiter("c", key="guest", priority=0))
    assert queue.models() == ["a", "b", "c"]
    queue.push(Waiter("c", key="family", priority=5))
    assert queue.models() == ["c", "a", "b"]
    assert queue.priority("c") == 5 and queue.priority("a") == 0 and queue.priority("none") == 0
    queue.push(Waiter("b", key="family", priority=5))
    assert queue.models() == ["b", "c", "a"]  # b's group began before c's: first among the 5s


# -- the quantum's decision --------------------------------------------------------------------


def test_the_quantum_is_the_larger_of_min_uptime_and_factor_times_load():
    assert quantum_length(30.0, 4.0, 2.0) == 30.0
    assert quantum_length(0.0, 4.0, 2.5) == 10.0
    assert quantum_length(5.0, 4.0, None) == 5.0


def test_the_quantum_protects_a_model_with_work_against_equal_or_lower_priority():
    quantum = Quantum(length_s=10.0, until=110.0, priority=0)
    busy = {"now": 100.0, "in_flight": 1, "queued": 0, "last_used": 90.0}
    assert protected_until(quantum, **busy, challenger_priority=0) == 110.0
    assert protected_until(quantum, **busy, challenger_priority=-5) == 110.0
    assert protected_until(quantum, **{**busy, "in_flight": 0, "queued": 2}, challenger_priority=0) == 110.0


def test_a_higher_priority_waiter_an_expired_quantum_or_no_work_ends_the_protection():
    quantum = Quantum(length_s=10.0, until=110.0, priority=0)
    assert protected_until(quantum, now=100.0, in_flight=1, queued=0, last_used=90.0, challenger_priority=1) is None
    assert protected_until(quantum, now=110.0, in_flight=1, queued=0, last_used=90.0, challenger_priority=0) is None
    assert protected_until(None, now=100.0, in_flight=1, queued=0, last_used=90.0, challenger_priority=0) is None
    idle = protected_until(quantum, now=100.0, in_flight=0, queued=0, last_used=100.0 - WORK_GRACE_S, challenger_priority=0)
    assert idle is None


def test_between_two_requests_of_a_client_the_model_still_has_work():
    quantum = Quantum(length_s=10.0, until=110.0, priority=0)
    just_ended = protected_until(quantum, now=100.0, in_flight=0, queued=0, last_used=99.9, challenger_priority=0)
    assert just_ended == pytest.approx(99.9 + WORK_GRACE_S)  # decided again once the grace is over


# -- usage per key and day ---------------------------------------------------------------------


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def test_todays_tokens_start_again_at_local_midnight():
    clock = Clock(time.mktime((2026, 3, 10, 23, 59, 0, 0, 0, -1)))
    usage = KeyUsage(clock)
    usage.record("bob", "a", UsageCounts(1, 0, 10, 20, 0.5))
    usage.record("bob", "b", UsageCounts(1, 1, 5, 0, 0.0))
    usage.record("eve", "a", UsageCounts(1, 0, 100, 100, 0.0))
    assert usage.tokens_today("bob") == 35
    assert usage.seconds_to_reset() == pytest.approx(60.0, abs=1)
    clock.at += 120
    assert usage.tokens_today("bob") == 0
    assert usage.today() == []
    drained = usage.drain()  # what the history still has to write keeps its own day
    assert {(r["day"], r["key"], r["model"]) for r in drained} == {
        ("2026-03-10", "bob", "a"), ("2026-03-10", "bob", "b"), ("2026-03-10", "eve", "a"),
    }
    assert usage.drain() == []


def test_todays_counts_from_the_history_count_after_a_restart():
    now = time.time()
    usage = KeyUsage(lambda: now)
    row = {"day": local_day(now), "key": "bob", "model": "a", "requests": 3, "errors": 0, "prompt_tokens": 40,
           "completion_tokens": 60, "queue_wait_s": 1.0}
    usage.remember_today([row, {**row, "day": "2001-01-01", "prompt_tokens": 999}])  # type: ignore[list-item]
    assert usage.tokens_today("bob") == 100
    assert usage.drain() == []  # already in the history: not written twice


def test_seconds_to_midnight_is_at_least_one():
    midnight = time.mktime((2026, 3, 11, 0, 0, 0, 0, 0, -1))
    assert seconds_to_midnight(midnight - 0.2) == 1.0
    assert seconds_to_midnight(midnight) == pytest.approx(86400, abs=3601)  # a DST day may be 23 or 25 h


# -- the key gate ---------------------------------------------------------------------------


def test_max_concurrent_counts_the_keys_requests_and_frees_a_place_when_one_ends():
    gate = KeyGate(KeyUsage())
    bob = Principal("bob", "user", limits=KeyLimits(max_concurrent=2))
    with gate.admit(bob), gate.admit(bob):
        with pytest.raises(TooManyRequests) as refused, gate.admit(bob):
            pass
        assert refused.value.code == "key_max_concurrent"
        assert "max_concurrent" in refused.value.message and refused.value.retry_after
        with gate.admit(Principal("eve", "user", limits=KeyLimits(max_concurrent=1))):
            pass  # another key's count is its own
    assert gate.active("bob") == 0
    with gate.admit(bob):
        assert gate.active("bob") == 1


def test_tokens_per_day_refuses_with_retry_after_until_midnight():
    clock = Clock(time.mktime((2026, 3, 10, 22, 0, 0, 0, 0, -1)))
    usage = KeyUsage(clock)
    gate = KeyGate(usage)
    bob = Principal("bob", "user", limits=KeyLimits(tokens_per_day=100))
    usage.record("bob", "a", UsageCounts(1, 0, 60, 39, 0.0))
    gate.check(bob)
    usage.record("bob", "a", UsageCounts(1, 0, 0, 1, 0.0))
    with pytest.raises(TooManyRequests) as refused:
        gate.check(bob)
    assert refused.value.code == "key_tokens_per_day"
    assert refused.value.retry_after == pytest.approx(7200, abs=1)
    assert "tokens_per_day" in refused.value.message and "100" in refused.value.message
    assert refused.value.response().headers["Retry-After"] == "7200"
    clock.at += 7201
    gate.check(bob)  # a new day


# -- key metrics stay bounded -----------------------------------------------------------------


def config_with(models: list[ModelConfig], **lifecycle: object) -> Config:
    return Config(
        gpu=GpuConfig(devices=(), memory_budget=0.94),
        lifecycle=replace(LifecycleConfig(min_uptime_s=0, failure_backoff_s=0, queue_timeout_s=30), **lifecycle),
        models={m.name: m for m in models},
    )


def model(name: str, claim: float) -> ModelConfig:
    return ModelConfig(name=name, image="img", gpu_memory=claim)


def finished(model_name: str, usage: tuple[int, int] | None) -> RequestRecord:
    record = RequestRecord()
    record.model, record.usage, record.queued_s = model_name, usage, 0.25
    return record


async def test_key_series_exist_for_configured_names_only(tmp_path):
    scheduler = Scheduler(config_with([model("a", 0.5)]), FakeLifecycle(tmp_path))
    metrics = Metrics(scheduler, meminfo=str(tmp_path / "no-meminfo"), known_keys=lambda: frozenset({"bob"}))
    now = time.monotonic()
    metrics.request_finished("bob", 200, now, finished("a", (7, 11)), now)
    metrics.request_finished("anonymous", 500, now, finished("a", None), now)
    metrics.request_finished("someone-else", 200, now, finished("a", (1, 1)), now)
    text = generate_latest(metrics.registry).decode()
    assert 'sparkd_key_requests_total{key="bob",model="a",outcome="ok"} 1.0' in text
    assert 'sparkd_key_tokens_total{key="bob",kind="completion",model="a"} 11.0' in text
    assert 'sparkd_key_requests_total{key="anonymous",model="a",outcome="error"} 1.0' in text
    assert "someone-else" not in text
    assert metrics.key_usage.tokens_today("bob") == 18
    assert 'sparkd_requests_total{model="a",status="200"} 2.0' in text  # the per-model counters as before


# -- priority and the quantum in the scheduler (fake lifecycle; real Podman: the integration test) ----


async def hold_then_release(scheduler: Scheduler, name: str, priority: int, order: list[str], hold: float = 0.01) -> None:
    runner = await scheduler.acquire(name, key=name, priority=priority)
    order.append(name)
    await asyncio.sleep(hold)
    scheduler.release(runner)


async def test_at_a_swap_the_higher_priority_waiter_is_served_first(tmp_path):
    fake = FakeLifecycle(tmp_path)
    scheduler = Scheduler(config_with([model("a", 0.8), model("b", 0.8), model("c", 0.8)], swap_policy="fifo"), fake)
    scheduler.start_serving()
    holder = await scheduler.acquire("a")
    order: list[str] = []
    low = asyncio.create_task(hold_then_release(scheduler, "b", 0, order))
    await asyncio.sleep(0.05)
    high = asyncio.create_task(hold_then_release(scheduler, "c", 5, order))
    await asyncio.sleep(0.05)
    assert scheduler.queue.models() == ["c", "b"]
    scheduler.release(holder)
    await asyncio.wait_for(asyncio.gather(low, high), 5)
    assert order == ["c", "b"]
    assert fake.timeline.index(("start", "c")) < fake.timeline.index(("start", "b"))


async def test_the_quantum_keeps_a_model_with_work_and_fifo_does_not(tmp_path):
    for policy, b_waits in (("quantum", True), ("fifo", False)):
        fake = FakeLifecycle(tmp_path / policy)
        scheduler = Scheduler(config_with([model("a", 0.8), model("b", 0.8)], swap_policy=policy, min_uptime_s=60), fake)
        scheduler.start_serving()
        runner = await scheduler.acquire("a")  # swapped in for this request: its quantum begins
        assert (runner.quantum is not None) is (policy == "quantum")
        b = asyncio.create_task(hold_then_release(scheduler, "b", 0, []))
        await asyncio.sleep(0.1)
        assert (runner.state is ModelState.READY) is b_waits
        if b_waits:
            again = scheduler.acquire_now("a")  # a keeps serving its own client meanwhile
            assert again is runner
            scheduler.release(again)
        scheduler.release(runner)
        await asyncio.wait_for(b, 5)  # out of work (the grace passed): b gets the GPU
        assert fake.starts("b") == 1


async def test_a_higher_priority_waiter_evicts_a_model_in_its_quantum(tmp_path):
    fake = FakeLifecycle(tmp_path)
    scheduler = Scheduler(config_with([model("a", 0.8), model("b", 0.8)], min_uptime_s=60), fake)
    scheduler.start_serving()
    runner = await scheduler.acquire("a", priority=0)
    b = asyncio.create_task(hold_then_release(scheduler, "b", 3, []))
    await asyncio.sleep(0.1)
    assert runner.state is ModelState.DRAINING  # no quantum against a higher priority
    scheduler.release(runner)
    await asyncio.wait_for(b, 5)


# -- sparkd check-config reads the keys file -----------------------------------------------------


def test_check_config_lists_a_bad_limit_of_the_keys_file(tmp_path):
    import subprocess
    import sys

    keys = tmp_path / "keys.toml"
    config = tmp_path / "sparkd.toml"
    config.write_text(
        f'[server]\nkeys_file = "{keys}"\n[models.alpha]\nimage = "img"\ngpu = false\n'
    )

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sparkd", "check-config", "--config", str(config), "--no-images"],
                              check=False, capture_output=True, text=True)

    keys.write_text(f'[keys.bob]\nkey = "{KEY}"\ntokens_per_day = 0\npriority = 5000\n')
    keys.chmod(0o600)
    result = check()
    assert result.returncode == 1
    assert "keys.bob.tokens_per_day: expected a whole number of at least 1, found 0" in result.stderr
    assert "keys.bob.priority: expected a whole number from -1000 to 1000, found 5000" in result.stderr
    assert KEY not in result.stdout + result.stderr
    keys.write_text(f'[keys.bob]\nkey = "{KEY}"\ntokens_per_day = 1000\npriority = 5\n')
    result = check()
    assert result.returncode == 0, result.stderr
    if os.geteuid() == 0:
        # As installed: owned by the user sparkd runs as, checked by root. Its owner is the daemon's to
        # check; its mode is not.
        os.chown(keys, 65534, 65534)
        result = check()
        assert result.returncode == 0, result.stderr
        keys.chmod(0o644)
        result = check()
        assert result.returncode == 1 and "chmod 600" in result.stderr, result.stderr


def test_a_stream_waiting_behind_a_quantum_is_told_so():
    from sparkd.http.loading import HolderView, WaitView, describe_wait

    view = WaitView("b", ModelState.STOPPED, holders=(HolderView("a", ModelState.READY, 1, quantum_left_s=7.4),))
    assert describe_wait(view) == "sparkd: b is queued, waiting for a, whose swap quantum keeps the GPU up to 7 s more while it has work"
    plain = WaitView("b", ModelState.STOPPED, holders=(HolderView("a", ModelState.READY, 0),))
    assert describe_wait(plain) == "sparkd: b is queued, waiting for a to free the GPU"
