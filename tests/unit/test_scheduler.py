"""Scheduling decisions with an in-process fake of the container lifecycle.

The fake does the slow work with short sleeps instead of containers and
returns outcomes as the real Lifecycle does (the scheduler alone moves the
models' states), and records what ran when; the integration tests repeat the
important cases on real Podman.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from structlog.testing import capture_logs

from fake_lifecycle import FakeLifecycle
from sparkd.config import Config, GpuConfig, LifecycleConfig, ModelConfig
from sparkd.engine.progress import LoadProgress
from sparkd.errors import GatewayTimeout, ModelBusy, ModelUnavailable, ServiceUnavailable
from sparkd.scheduler import scheduler as scheduler_module
from sparkd.scheduler.events import (
    FailureCause,
    Idle,
    LoadFinished,
    OperatorAction,
    Progress,
    Requested,
    SwapFor,
    Transitioned,
)
from sparkd.scheduler.outcomes import StopFailed
from sparkd.scheduler.runner import Failure, ModelRunner
from sparkd.scheduler.scheduler import Scheduler
from sparkd.scheduler.state import ModelState


def config_with(models: list[ModelConfig], **lifecycle: object) -> Config:
    return Config(
        gpu=GpuConfig(devices=(), memory_budget=0.94),
        lifecycle=replace(LifecycleConfig(min_uptime_s=0, failure_backoff_s=0, queue_timeout_s=5), **lifecycle),
        models={m.name: m for m in models},
    )


def serving(scheduler: Scheduler) -> Scheduler:
    """As the daemon does once adoption is over."""
    scheduler.start_serving()
    return scheduler


def model(name: str, claim: float, lifecycle: str = "normal", **fields: object) -> ModelConfig:
    return ModelConfig(name=name, image="img", gpu_memory=claim, lifecycle=lifecycle, **fields)  # type: ignore[arg-type]


async def serve(scheduler: Scheduler, name: str, hold: float = 0.01) -> str:
    runner = await scheduler.acquire(name)
    try:
        await asyncio.sleep(hold)
        return runner.name
    finally:
        scheduler.release(runner)


@pytest.fixture
def fake(tmp_path):
    return FakeLifecycle(tmp_path)


async def test_cold_stampede_starts_the_model_once(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.5)]), fake))
    results = await asyncio.gather(*(serve(scheduler, "a") for _ in range(200)))
    assert results == ["a"] * 200
    assert fake.starts("a") == 1


async def test_alternating_requests_cost_one_swap(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.8), model("b", 0.8)]), fake))
    names = ["a", "b"] * 6
    results = await asyncio.gather(*(serve(scheduler, n) for n in names))
    assert sorted(results) == sorted(names)
    assert fake.starts() == 2  # a, then one swap to b
    assert not any({"a", "b"} <= running for running in fake.overlaps)


async def test_a_swap_is_not_starved_by_a_steady_stream_for_the_holder(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.8), model("b", 0.8)]), fake))
    await serve(scheduler, "a")
    stop = asyncio.Event()
    requests: list[asyncio.Task[str]] = []

    async def steady_a():
        while not stop.is_set():
            requests.append(asyncio.create_task(serve(scheduler, "a", hold=0.03)))
            await asyncio.sleep(0.01)

    feeder = asyncio.create_task(steady_a())
    await asyncio.sleep(0.05)
    served = await asyncio.wait_for(serve(scheduler, "b"), timeout=2)
    stop.set()
    await feeder
    await asyncio.gather(*requests, return_exceptions=True)
    assert served == "b"


async def test_in_flight_request_is_never_cut_by_a_swap(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.8), model("b", 0.8)]), fake))
    runner_a = await scheduler.acquire("a")
    b_task = asyncio.create_task(serve(scheduler, "b"))
    await asyncio.sleep(0.1)
    assert runner_a.state is ModelState.DRAINING
    assert not b_task.done()
    assert fake.starts("b") == 0
    scheduler.release(runner_a)
    assert await asyncio.wait_for(b_task, 2) == "b"
    assert fake.timeline.index(("stop", "a")) < fake.timeline.index(("start", "b"))


async def test_queue_full_gives_503_with_retry_after(fake):
    fake.start_delay = 0.3
    scheduler = serving(Scheduler(config_with([model("a", 0.5)], queue_size=2), fake))
    waiting = [asyncio.create_task(serve(scheduler, "a")) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(ServiceUnavailable) as caught:
        await serve(scheduler, "a")
    assert caught.value.retry_after and caught.value.code == "queue_full"
    await asyncio.gather(*waiting)


async def test_queue_timeout_gives_504_and_leaves_the_queue(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.8), model("b", 0.8)], queue_timeout_s=0.2), fake))
    holder = await scheduler.acquire("a")
    with pytest.raises(GatewayTimeout) as caught:
        await serve(scheduler, "b")
    assert "busy with a" in caught.value.message
    assert len(scheduler.queue) == 0
    await asyncio.sleep(0.05)
    assert holder.state is ModelState.READY  # the swap was called off
    scheduler.release(holder)


async def test_disconnected_waiter_leaves_the_queue(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.8), model("b", 0.8)]), fake))
    holder = await scheduler.acquire("a")
    waiter = asyncio.create_task(serve(scheduler, "b"))
    await asyncio.sleep(0.02)
    assert scheduler.queue.depth("b") == 1
    waiter.cancel()
    await asyncio.sleep(0.02)
    assert scheduler.queue.depth("b") == 0
    assert holder.state is ModelState.READY
    scheduler.release(holder)


async def test_exclusive_model_stops_utility_which_comes_back_after(fake):
    scheduler = serving(Scheduler(
        config_with([model("u", 0.05, "utility"), model("x", 0.94, "exclusive"), model("a", 0.5)]),
        fake,
    ))
    await asyncio.sleep(0.1)  # serving(): the utility model is brought up at start-up
    assert scheduler.runners["u"].state is ModelState.READY
    await serve(scheduler, "x")
    assert fake.timeline.index(("stop", "u")) < fake.timeline.index(("start", "x"))
    assert not any({"u", "x"} <= running for running in fake.overlaps)
    await scheduler.stop_model("x", timeout=2)
    await asyncio.sleep(0.1)
    assert scheduler.runners["u"].state is ModelState.READY
    assert fake.starts("u") == 2


async def test_failed_start_fails_waiters_with_the_log_line(fake):
    fake.failing["a"] = "RuntimeError: CUDA error: fake crash at start"
    scheduler = serving(Scheduler(config_with([model("a", 0.5)]), fake))
    results = await asyncio.gather(*(serve(scheduler, "a") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, ServiceUnavailable) for r in results)
    assert "fake crash at start" in results[0].message
    assert scheduler.lease.holders == {}
    del fake.failing["a"]
    assert await serve(scheduler, "a") == "a"  # the next request retries


async def test_failure_backoff_answers_at_once(fake):
    fake.failing["a"] = "boom"
    scheduler = serving(Scheduler(config_with([model("a", 0.5)], failure_backoff_s=30), fake))
    with pytest.raises(ServiceUnavailable):
        await serve(scheduler, "a")
    with pytest.raises(ServiceUnavailable) as caught:
        await asyncio.wait_for(serve(scheduler, "a"), 0.5)
    assert "boom" in caught.value.message
    assert fake.starts("a") == 1


async def test_reject_policy_names_the_busy_model(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.8), model("b", 0.8)], policy="reject"), fake))
    holder = await scheduler.acquire("a")
    with pytest.raises(ModelBusy) as caught:
        await serve(scheduler, "b")
    error = caught.value
    assert error.status == 429 and error.retry_after
    assert error.headers["X-Busy-Model"] == "a"
    assert error.extra["busy_model"] == "a" and error.extra["releases"] is True
    assert "busy_model_uptime_s" in error.extra and "busy_model_idle_s" in error.extra
    scheduler.release(holder)


async def test_sleep_capable_models_swap_by_sleeping(fake):
    sleepy = {"sleep_mode": True, "sleep_gpu_memory": 0.05}
    scheduler = serving(Scheduler(config_with([model("a", 0.8, **sleepy), model("b", 0.8, **sleepy)]), fake))
    await serve(scheduler, "a")
    await serve(scheduler, "b")
    assert scheduler.runners["a"].state is ModelState.SLEEPING
    assert scheduler.lease.holders["a"] == pytest.approx(0.05)
    await serve(scheduler, "a")
    assert ("wake", "a") in fake.timeline
    assert fake.starts() == 2  # each container started once; swaps were sleeps and wakes


async def test_idle_models_are_stopped_after_idle_time(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.5)], idle_stop_s=0.05), fake))
    await serve(scheduler, "a")
    await asyncio.sleep(0.1)
    scheduler.reap_idle()
    await asyncio.sleep(0.05)
    assert scheduler.runners["a"].state is ModelState.STOPPED
    assert scheduler.lease.holders == {}


async def test_min_uptime_protects_a_fresh_model(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.5)], idle_stop_s=0.01, min_uptime_s=60), fake))
    await serve(scheduler, "a")
    await asyncio.sleep(0.05)
    scheduler.reap_idle()
    await asyncio.sleep(0.02)
    assert scheduler.runners["a"].state is ModelState.READY


async def test_impossible_claim_is_refused(fake):
    scheduler = serving(Scheduler(config_with([model("p", 0.5, "pinned"), model("a", 0.8)]), fake))
    await serve(scheduler, "p")
    with pytest.raises(ServiceUnavailable) as caught:
        await serve(scheduler, "a")
    assert "pinned" in caught.value.message


async def test_a_request_in_the_same_tick_as_an_idle_stop_is_not_served_by_the_stopping_container(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.5)], idle_stop_s=0.01), fake))
    await serve(scheduler, "a")
    await asyncio.sleep(0.05)
    scheduler.reap_idle()
    assert scheduler.runners["a"].state is ModelState.STOPPING  # at once, before the stop task runs
    runner = await asyncio.wait_for(scheduler.acquire("a"), 2)
    assert runner.state is ModelState.READY and fake.starts("a") == 2
    scheduler.release(runner)


async def test_requests_wait_until_adoption_is_over(fake):
    scheduler = Scheduler(config_with([model("a", 0.5)]), fake)
    waiting = asyncio.create_task(serve(scheduler, "a"))
    await asyncio.sleep(0.1)
    assert not waiting.done() and fake.starts() == 0
    scheduler.start_serving()
    assert await asyncio.wait_for(waiting, 2) == "a"


async def test_an_impossible_claim_is_for_the_operator_and_has_no_retry_after(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.99)]), fake))
    with pytest.raises(ModelUnavailable) as caught:
        await serve(scheduler, "a")
    assert caught.value.retry_after is None and caught.value.code == "claim_impossible"
    assert "Retry-After" not in caught.value.response().headers


async def test_a_failure_retrying_cannot_fix_has_no_retry_after_and_a_transient_one_has(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.5)], failure_backoff_s=30), fake))
    runner = scheduler.runners["a"]
    runner.consecutive_failures = 1
    runner.failure = Failure("model a: image x not found: build it with `sparkd images build`", (), time.monotonic(),
                             needs_operator=True, code="image_missing")
    error = scheduler._failure_error(runner)
    assert error.status == 503 and error.code == "image_missing" and error.retry_after is None
    assert "sparkd images build" in error.message
    runner.failure = Failure("model a: its container exited during start with code 1", (), time.monotonic())
    error = scheduler._failure_error(runner)
    assert error.code == "model_failed" and error.retry_after is not None and error.retry_after >= 1


# -- one owner: the scheduler alone moves states and lease shares, and says so in typed events --


def recorded(scheduler: Scheduler) -> list:
    events: list = []
    scheduler.subscribe(events.append)
    return events


def moves(events: list, name: str) -> list[tuple[ModelState, ModelState, object]]:
    return [(e.old, e.new, e.cause) for e in events if isinstance(e, Transitioned) and e.model == name]


async def test_a_move_from_an_unexpected_state_is_logged_loudly_and_changes_nothing(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.5)], idle_stop_s=0.01), fake))
    await serve(scheduler, "a")
    await asyncio.sleep(0.03)
    scheduler.reap_idle()
    runner = scheduler.runners["a"]
    assert runner.state is ModelState.STOPPING
    with capture_logs() as logs:
        scheduler._stop(runner, Idle(0.01))  # a second STOPPING: a bug, not absorbed
    [refused] = [entry for entry in logs if entry["event"] == "transition_unexpected"]
    assert refused["log_level"] == "error" and refused["model"] == "a"
    assert refused["state"] == "stopping" and refused["new"] == "stopping"
    assert runner.state is ModelState.STOPPING
    await scheduler.wait_for_state(runner, {ModelState.STOPPED}, 2)
    assert fake.timeline.count(("stop", "a")) == 1


async def test_the_lease_share_follows_every_move(fake):
    sleepy = {"sleep_mode": True, "sleep_gpu_memory": 0.05}
    fake.failing["c"] = "CUDA error: boom"
    scheduler = serving(Scheduler(
        config_with([model("a", 0.8, **sleepy), model("b", 0.8, **sleepy), model("c", 0.3)], idle_stop_s=0.05), fake,
    ))
    seen: list[tuple[ModelState, float | None]] = []

    def check(event) -> None:
        if not isinstance(event, Transitioned):
            return
        runner = scheduler.runners[event.model]
        share = scheduler.lease.holders.get(event.model)
        seen.append((event.new, share))
        expected = {
            ModelState.STOPPED: None, ModelState.FAILED: None, ModelState.SLEEPING: runner.sleep_claim,
            ModelState.STARTING: runner.claim, ModelState.WAKING: runner.claim, ModelState.READY: runner.claim,
            ModelState.DRAINING: runner.claim,
        }
        if event.new in expected:
            assert share == expected[event.new], (event, share)
        assert scheduler.lease.claimed <= scheduler.lease.budget + 1e-9

    scheduler.subscribe(check)
    await serve(scheduler, "a")
    await serve(scheduler, "b")  # a sleeps
    await serve(scheduler, "a")  # b sleeps, a wakes
    with pytest.raises(ServiceUnavailable):
        await serve(scheduler, "c")  # fails to start: no share
    await asyncio.sleep(0.1)
    scheduler.reap_idle()  # a idle: stopped; b asleep and idle: stopped
    await asyncio.sleep(0.1)
    assert scheduler.lease.holders == {}
    assert {state for state, _ in seen} >= {
        ModelState.STARTING, ModelState.READY, ModelState.DRAINING, ModelState.SLEEPING, ModelState.WAKING,
        ModelState.STOPPING, ModelState.STOPPED, ModelState.FAILED,
    }


async def test_events_carry_structured_causes_and_one_load_record_per_start_and_wake(fake):
    sleepy = {"sleep_mode": True, "sleep_gpu_memory": 0.05}
    fake.failing["c"] = "CUDA error: boom"
    scheduler = serving(Scheduler(config_with([model("a", 0.8, **sleepy), model("b", 0.8), model("c", 0.1)]), fake))
    events = recorded(scheduler)
    await serve(scheduler, "a")
    await serve(scheduler, "b")
    woke_from = time.time()
    await serve(scheduler, "a")
    with pytest.raises(ServiceUnavailable):
        await serve(scheduler, "c")
    await scheduler.stop_model("a", timeout=2)
    S = ModelState
    assert moves(events, "a") == [
        (S.STOPPED, S.STARTING, Requested()), (S.STARTING, S.READY, Requested()),
        (S.READY, S.DRAINING, SwapFor("b")), (S.DRAINING, S.SLEEPING, SwapFor("b")),
        (S.SLEEPING, S.WAKING, Requested()), (S.WAKING, S.READY, Requested()),
        (S.READY, S.DRAINING, OperatorAction("stop")), (S.DRAINING, S.STOPPING, OperatorAction("stop")),
        (S.STOPPING, S.STOPPED, OperatorAction("stop")),
    ]
    assert moves(events, "b")[2:] == [
        (S.READY, S.DRAINING, SwapFor("a")), (S.DRAINING, S.STOPPING, SwapFor("a")), (S.STOPPING, S.STOPPED, SwapFor("a")),
    ]
    [(_, _, failure)] = [m for m in moves(events, "c") if m[1] is S.FAILED]
    assert isinstance(failure, FailureCause) and failure.log_lines == ("CUDA error: boom",)
    assert "exited during start" in failure.message
    loads = [(e.model, e.kind, e.outcome) for e in events if isinstance(e, LoadFinished)]
    assert loads == [("a", "start", "ready"), ("b", "start", "ready"), ("a", "wake", "ready"), ("c", "start", "failed")]
    wake = next(e for e in events if isinstance(e, LoadFinished) and e.kind == "wake")
    assert wake.began >= woke_from and 0 <= wake.took < 2 and wake.message == "requested"


async def test_load_progress_is_an_event_and_shown_only_while_starting(fake):
    progress = LoadProgress("loading weights", 0.5, "Loading safetensors checkpoint shards: 50%")
    await_ready = fake.await_ready

    async def ready_with_progress(runner, on_progress, launched):
        assert runner.endpoint is not None and runner.uptime() is not None  # the container runs: its port shows
        on_progress(progress)
        assert runner.progress == progress
        return await await_ready(runner, on_progress, launched)

    fake.await_ready = ready_with_progress
    scheduler = serving(Scheduler(config_with([model("a", 0.5)]), fake))
    events = recorded(scheduler)
    runner = await scheduler.acquire("a")
    assert [e.progress for e in events if isinstance(e, Progress)] == [progress]
    assert runner.progress is None  # cleared once ready
    scheduler.release(runner)


async def test_a_crashed_task_fails_its_model_stops_what_runs_and_frees_its_share(fake):
    async def crash(runner, on_progress, launched):
        raise RuntimeError("bug in the start path")

    fake.await_ready = crash
    losses: list[str] = []
    stop_after_loss = fake.stop_after_loss

    async def record_loss(runner, reason, *, kill=False):
        losses.append(reason)
        return await stop_after_loss(runner, reason, kill=kill)

    fake.stop_after_loss = record_loss
    scheduler = serving(Scheduler(config_with([model("a", 0.5)], failure_backoff_s=30), fake))
    with pytest.raises(ServiceUnavailable) as caught:
        await asyncio.wait_for(serve(scheduler, "a"), 2)
    assert "internal error while starting" in caught.value.message
    assert scheduler.runners["a"].state is ModelState.FAILED
    assert scheduler.lease.holders == {} and len(losses) == 1


async def test_a_failed_stop_keeps_the_share_while_the_container_may_run_and_is_retried(fake, monkeypatch):
    monkeypatch.setattr(scheduler_module, "STOP_RETRY_FIRST_S", 0.01)
    answers = [StopFailed("could not stop model a: Podman timed out", container_running=True)]
    stop = fake.stop

    async def flaky_stop(runner, reason):
        if answers:
            return answers.pop(0)
        return await stop(runner, reason)

    fake.stop = flaky_stop
    scheduler = serving(Scheduler(config_with([model("a", 0.5)], idle_stop_s=0.01), fake))
    await serve(scheduler, "a")
    await asyncio.sleep(0.03)
    scheduler.reap_idle()
    runner = scheduler.runners["a"]
    await asyncio.sleep(0.005)
    assert runner.state is ModelState.STOPPING and scheduler.lease.holders == {"a": 0.5}
    await scheduler.wait_for_state(runner, {ModelState.STOPPED}, 2)
    assert scheduler.lease.holders == {}


async def test_a_failed_stop_of_a_container_that_is_gone_fails_the_model_without_a_share(fake):
    async def failing_stop(runner, reason):
        return StopFailed("could not stop model a: no such container", container_running=False)

    fake.stop = failing_stop
    scheduler = serving(Scheduler(config_with([model("a", 0.5)]), fake))
    await serve(scheduler, "a")
    stopped = await scheduler.stop_model("a", timeout=2)
    assert stopped.state is ModelState.FAILED and scheduler.lease.holders == {}
    assert stopped.failure is not None and "no such container" in stopped.failure.message


@pytest.mark.parametrize(("unified", "concurrent_loads", "most_at_once"), [(True, 0, 1), (False, 0, 2), (True, 2, 2)])
async def test_loads_take_turns_on_unified_memory(tmp_path, unified, concurrent_loads, most_at_once):
    fake = FakeLifecycle(tmp_path, start_delay=0.1)
    config = replace(
        config_with([model("a", 0.3), model("u", 0.1, lifecycle="utility")]),
        gpu=GpuConfig(devices=(), memory_budget=0.94, concurrent_loads=concurrent_loads),
    )
    scheduler = Scheduler(config, fake, unified_memory=unified)
    loading: set[str] = set()
    at_once: list[int] = []

    def track(event: object) -> None:
        if isinstance(event, Transitioned):
            if event.new in (ModelState.STARTING, ModelState.WAKING):
                loading.add(event.model)
            else:
                loading.discard(event.model)
            at_once.append(len(loading))

    scheduler.subscribe(track)
    serving(scheduler)  # the utility model starts on its own
    waiting = asyncio.ensure_future(serve(scheduler, "a"))
    await asyncio.sleep(0.02)
    if most_at_once == 1:
        why = scheduler._why_waiting(scheduler.runners["a"])
        assert why == "waiting for u to finish loading (gpu.concurrent_loads = 1)", why
    assert await waiting == "a"
    assert max(at_once) == most_at_once, at_once
    assert scheduler.runners["u"].state is ModelState.READY


async def wait_for(condition, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_a_wedged_model_is_failed_then_started_again_on_its_own(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.5)]), fake))
    await serve(scheduler, "a")
    scheduler.model_lost("a", "model a: its engine is wedged", code="engine_wedged")
    runner = scheduler.runners["a"]
    await wait_for(lambda: fake.starts("a") == 2 and runner.state is ModelState.READY)
    assert runner.cause is not None and runner.cause.describe(runner.state) == "restarted after it was given up (engine_wedged)"
    assert ("kill", "a") in fake.timeline  # a wedged engine is killed: it would never finish a graceful stop
    assert "a" in fake.running  # then started again


async def test_a_model_the_memory_guard_gave_up_is_not_restarted(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.5)]), fake))
    await serve(scheduler, "a")
    scheduler.model_lost("a", "stopped by the memory guard", code="memory_guard")
    await wait_for(lambda: scheduler.runners["a"].state is ModelState.FAILED)
    await asyncio.sleep(0.1)
    assert fake.starts("a") == 1 and scheduler.runners["a"].state is ModelState.FAILED
    assert ("kill", "a") not in fake.timeline  # the guard killed it itself; the loss only cleans up


async def wedge_while_another_takes_its_place(scheduler: Scheduler) -> asyncio.Task[ModelRunner]:
    """a serves one request; c (which cannot share the GPU with it) asks, a drains for it; then a
    wedges: c takes the room a left, so a's restart does not fit."""
    held = await scheduler.acquire("a")
    c = asyncio.create_task(scheduler.acquire("c"))
    await wait_for(lambda: scheduler.runners["a"].state is ModelState.DRAINING)
    scheduler.model_lost("a", "model a: its engine is wedged", code="engine_wedged")
    scheduler.release(held)
    await asyncio.wait_for(asyncio.shield(c), 2)
    return c


async def test_a_wedge_restart_evicts_nothing_and_waits_until_the_model_fits(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.5), model("c", 0.5)]), fake))
    c = (await wedge_while_another_takes_its_place(scheduler)).result()
    await asyncio.sleep(0.1)
    assert c.state is ModelState.READY  # a's restart made nothing leave
    assert scheduler.runners["a"].state is ModelState.FAILED and fake.starts("a") == 1
    scheduler.release(c)
    await scheduler.stop_model("c", 5)  # room again: the restart happens now
    await wait_for(lambda: scheduler.runners["a"].state is ModelState.READY)
    assert fake.starts("a") == 2


async def test_an_operator_stop_calls_off_a_pending_wedge_restart(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.5), model("c", 0.5)]), fake))
    c = (await wedge_while_another_takes_its_place(scheduler)).result()
    await scheduler.stop_model("a", 5)
    assert scheduler.runners["a"].state is ModelState.STOPPED
    scheduler.release(c)
    await scheduler.stop_model("c", 5)
    await asyncio.sleep(0.1)
    assert scheduler.runners["a"].state is ModelState.STOPPED and fake.starts("a") == 1


async def test_a_stopped_or_failed_model_keeps_no_endpoint_nor_start_time(fake):
    scheduler = serving(Scheduler(config_with([model("a", 0.5)]), fake))
    await serve(scheduler, "a")
    runner = scheduler.runners["a"]
    assert runner.endpoint is not None and runner.ready_at is not None
    await scheduler.stop_model("a", 5)
    assert (runner.endpoint, runner.started_at, runner.ready_at, runner.progress) == (None, None, None, None)
    await serve(scheduler, "a")
    scheduler.model_lost("a", "stopped by the memory guard", code="memory_guard")
    await wait_for(lambda: runner.state is ModelState.FAILED)
    assert (runner.endpoint, runner.started_at, runner.ready_at) == (None, None, None)
