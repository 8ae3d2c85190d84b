"""A model whose weights are absent pulls them before it takes anything of the GPU.

Its download needs the disk and the network: while it runs the model is PULLING,
holds no lease share and no load slot, so the models that serve keep serving and
others still load; its waiters wait through it (the queue timeout counts anew
while it pulls); once the weights are in, the usual admission (swap, eviction,
load slot) runs.  A pull that cannot happen or fails tells the waiters why and
leaves nothing held.  With the in-process fake lifecycle (``absent``: the models
whose weights must be pulled, and how long that takes).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from structlog.testing import capture_logs

from fake_lifecycle import FakeLifecycle
from sparkd.config import Config, GpuConfig, LifecycleConfig, ModelConfig
from sparkd.engine.progress import DOWNLOAD_PHASE
from sparkd.errors import ModelUnavailable
from sparkd.http.loading import describe_wait, wait_view
from sparkd.scheduler.events import Transitioned, WeightsPulled
from sparkd.scheduler.scheduler import Scheduler
from sparkd.scheduler.state import ModelState
from sparkd.scheduler.status import model_status, status_line

S = ModelState
PULL_S = 0.6


def config_with(models: list[ModelConfig], **lifecycle: object) -> Config:
    return Config(
        gpu=GpuConfig(devices=(), memory_budget=0.94),
        lifecycle=replace(LifecycleConfig(min_uptime_s=0, failure_backoff_s=0, queue_timeout_s=5), **lifecycle),
        models={m.name: m for m in models},
    )


def model(name: str, claim: float) -> ModelConfig:
    return ModelConfig(name=name, image="img", gpu_memory=claim)


async def serve(scheduler: Scheduler, name: str) -> str:
    runner = await scheduler.acquire(name)
    try:
        await asyncio.sleep(0.01)
        return runner.name
    finally:
        scheduler.release(runner)


async def wait_for(condition: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def unified_scheduler(fake: FakeLifecycle, **lifecycle: object) -> Scheduler:
    """On unified memory: one load at a time (``gpu.concurrent_loads``); b does not fit beside a."""
    scheduler = Scheduler(
        config_with([model("a", 0.6), model("b", 0.6), model("c", 0.3)], **lifecycle), fake, unified_memory=True,
    )
    scheduler.start_serving()
    return scheduler


@pytest.fixture
def fake(tmp_path):
    return FakeLifecycle(tmp_path, absent={"b": PULL_S})


async def test_while_b_pulls_a_keeps_serving_c_loads_and_b_holds_nothing_then_b_is_admitted(fake):
    scheduler = unified_scheduler(fake)
    assert await serve(scheduler, "a") == "a"
    held_while_pulling: list[dict[str, float]] = []
    loaded_while_pulling: list[str] = []

    def watch(event: object) -> None:
        if scheduler.runners["b"].state is not S.PULLING:
            return
        held_while_pulling.append(dict(scheduler.lease.holders))
        if isinstance(event, Transitioned) and event.new is S.STARTING:
            loaded_while_pulling.append(event.model)

    scheduler.subscribe(watch)
    waiting_b = asyncio.ensure_future(serve(scheduler, "b"))
    await wait_for(lambda: scheduler.runners["b"].state is S.PULLING)
    # a serves, and c loads (the only load slot on unified memory is free) while b downloads.
    assert await serve(scheduler, "a") == "a"
    assert await serve(scheduler, "c") == "c"
    assert scheduler.runners["b"].state is S.PULLING
    assert scheduler.runners["a"].state is S.READY and scheduler.runners["c"].state is S.READY
    assert "b" not in scheduler.lease.holders
    assert await waiting_b == "b"
    assert held_while_pulling and all("b" not in held for held in held_while_pulling), held_while_pulling
    assert loaded_while_pulling == ["c"], loaded_while_pulling
    # Only after the pull: the swap that makes room for b, then its start.
    timeline = fake.timeline
    assert timeline.index(("pulled", "b")) < timeline.index(("stop", "a")) < timeline.index(("start", "b")), timeline
    assert fake.starts("b") == 1


async def test_the_moves_of_a_pull_hold_no_share_and_end_in_the_usual_start(fake):
    scheduler = unified_scheduler(fake)
    moves: list[tuple[S, S, float | None]] = []

    def track(event: object) -> None:
        if isinstance(event, Transitioned) and event.model == "b":
            moves.append((event.old, event.new, scheduler.lease.holders.get("b")))

    scheduler.subscribe(track)
    assert await serve(scheduler, "b") == "b"
    assert moves[:3] == [
        (S.STOPPED, S.PULLING, None),
        (S.PULLING, S.STOPPED, None),
        (S.STOPPED, S.STARTING, 0.6),
    ], moves
    pulled = scheduler.runners["b"]
    assert pulled.state is S.READY and pulled.progress is None


async def test_a_waiter_behind_a_pull_outlasts_the_queue_timeout(fake):
    scheduler = unified_scheduler(fake, queue_timeout_s=0.2)
    assert await asyncio.wait_for(serve(scheduler, "b"), 3) == "b"  # the pull takes 0.6 s


async def test_the_pull_shows_in_status_and_in_a_waiting_streams_comment(fake):
    scheduler = unified_scheduler(fake)
    assert await serve(scheduler, "a") == "a"
    waiting = asyncio.ensure_future(serve(scheduler, "b"))
    runner = scheduler.runners["b"]
    await wait_for(lambda: runner.state is S.PULLING and runner.progress is not None and runner.progress.fraction)
    now, now_wall = time.monotonic(), time.time()
    shown = model_status(scheduler, runner, now, now_wall)
    assert shown["state"] == "pulling" and shown["holds"] == 0.0
    assert shown["progress"] is not None and shown["progress"]["phase"] == DOWNLOAD_PHASE
    assert shown["eta_s"] is not None and shown["loading_for_s"] is not None
    view = wait_view(scheduler, "b", now_wall)
    assert view.container_running  # a stream's headers need not wait for a container
    line = describe_wait(view)
    assert line.startswith("sparkd: pulling the weights of b before it loads, downloading weights "), line
    assert "left" in line, line
    assert "pulling: b" in status_line(scheduler)
    assert await waiting == "b"


async def test_auto_pull_off_fails_the_waiters_with_weights_missing_and_takes_nothing(fake):
    fake.auto_pull = False
    scheduler = unified_scheduler(fake)
    assert await serve(scheduler, "a") == "a"
    with pytest.raises(ModelUnavailable) as caught:
        await asyncio.wait_for(serve(scheduler, "b"), 2)
    assert caught.value.code == "weights_missing" and caught.value.status == 503
    assert "sparkctl pull b" in caught.value.message and caught.value.retry_after is None
    assert scheduler.runners["a"].state is S.READY  # not evicted for a start that could not happen
    assert scheduler.runners["b"].state is S.STOPPED and scheduler.lease.holders == {"a": 0.6}
    assert ("stop", "a") not in fake.timeline and fake.starts("b") == 0
    # Once the weights are there (`sparkctl pull b`), the next request starts it.
    fake.absent.pop("b")
    assert await serve(scheduler, "b") == "b"


async def test_a_failed_pull_fails_the_waiters_with_weights_pull_failed_and_takes_nothing(fake):
    fake.pull_failing.add("b")
    scheduler = unified_scheduler(fake)
    assert await serve(scheduler, "a") == "a"
    waiters = [asyncio.ensure_future(serve(scheduler, "b")) for _ in range(2)]
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 3)
    assert all(isinstance(r, ModelUnavailable) and r.code == "weights_pull_failed" for r in results), results
    failed = scheduler.runners["b"]
    assert failed.state is S.FAILED and failed.failure is not None and failed.failure.code == "weights_pull_failed"
    assert scheduler.runners["a"].state is S.READY and scheduler.lease.holders == {"a": 0.6}
    assert ("stop", "a") not in fake.timeline and fake.starts("b") == 0


async def test_a_shutdown_mid_pull_ends_it_without_an_unexpected_move(fake):
    scheduler = unified_scheduler(fake)
    waiting = asyncio.ensure_future(serve(scheduler, "b"))
    await wait_for(lambda: scheduler.runners["b"].state is S.PULLING)
    with capture_logs() as logs:
        await scheduler.drain(0.1)
        await scheduler.stop_all()
    assert scheduler.runners["b"].state is S.STOPPED
    assert not [e for e in logs if e["event"] == "transition_unexpected"], logs
    with pytest.raises(Exception, match="shutting down"):
        await waiting


async def test_a_present_model_is_looked_at_once_per_start_without_a_pull(fake):
    fake.absent = {}  # b's weights are managed and present
    scheduler = unified_scheduler(fake)
    moves: list[Transitioned] = []
    scheduler.subscribe(lambda e: moves.append(e) if isinstance(e, Transitioned) and e.model == "b" else None)
    assert await serve(scheduler, "b") == "b"
    assert [(m.old, m.new) for m in moves][:2] == [(S.STOPPED, S.STARTING), (S.STARTING, S.READY)]
    assert not any(isinstance(m.cause, WeightsPulled) for m in moves)
    assert ("pull", "b") not in fake.timeline
