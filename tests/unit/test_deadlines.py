"""The stall watch of a proxied request: which phase ran out, and only its own cancellation is absorbed."""

from __future__ import annotations

import asyncio
import time

import pytest

from sparkd.config.schema import EngineConfig
from sparkd.engine.deadlines import Phase, StallWatch


async def run_watched(config: EngineConfig, body) -> tuple[StallWatch, str, float]:
    """Run ``body(watch)`` in a task under a watch: (watch, how it ended, seconds)."""
    holder: list[StallWatch] = []

    async def request() -> str:
        task = asyncio.current_task()
        assert task is not None
        watch = StallWatch(config, task)
        holder.append(watch)
        try:
            await body(watch)
            return "finished"
        except asyncio.CancelledError:
            if watch.absorb():
                return "timed out"
            raise
        finally:
            watch.close()

    began = time.monotonic()
    outcome = await asyncio.create_task(request())
    return holder[0], outcome, time.monotonic() - began


async def test_each_phase_ends_at_its_own_limit():
    config = EngineConfig(response_head_timeout_s=0.4, idle_read_timeout_s=0.8, write_stall_timeout_s=0.2)

    async def stalls_writing(watch: StallWatch) -> None:
        watch.enter(Phase.WRITE)
        await asyncio.sleep(10)

    watch, outcome, took = await run_watched(config, stalls_writing)
    assert outcome == "timed out" and watch.expired is Phase.WRITE and 0.2 <= took < 0.5

    async def silent_engine(watch: StallWatch) -> None:
        watch.enter(Phase.READ)
        await asyncio.sleep(10)

    watch, outcome, took = await run_watched(config, silent_engine)
    assert outcome == "timed out" and watch.expired is Phase.READ and 0.8 <= took < 1.2


async def test_progress_keeps_a_request_alive_past_any_single_limit():
    config = EngineConfig(response_head_timeout_s=0.3, idle_read_timeout_s=0.3, write_stall_timeout_s=0.3)

    async def steady_stream(watch: StallWatch) -> None:
        for _ in range(10):  # 1 s in all, never 0.3 s in one phase
            watch.enter(Phase.READ)
            await asyncio.sleep(0.05)
            watch.enter(Phase.WRITE)
            await asyncio.sleep(0.05)

    watch, outcome, took = await run_watched(config, steady_stream)
    assert outcome == "finished" and watch.expired is None and took >= 1.0


async def test_zero_means_no_limit():
    config = EngineConfig(response_head_timeout_s=0, idle_read_timeout_s=0, write_stall_timeout_s=0.2)

    async def long_head(watch: StallWatch) -> None:
        await asyncio.sleep(0.6)

    _, outcome, _ = await run_watched(config, long_head)
    assert outcome == "finished"


async def test_a_cancellation_from_elsewhere_is_not_absorbed():
    config = EngineConfig(write_stall_timeout_s=0.2)

    async def client_goes_away_too(watch: StallWatch) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        watch.enter(Phase.WRITE)
        watch.since -= 1  # the stall is over its limit: the watch's next look cancels the task...
        loop.call_soon(watch._check)
        loop.call_soon(task.cancel)  # ...and, before the task runs again, the client's disconnect cancels it too
        await asyncio.sleep(10)

    with pytest.raises(asyncio.CancelledError):
        await run_watched(config, client_goes_away_too)
