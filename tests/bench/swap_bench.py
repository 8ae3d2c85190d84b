"""swap (issue 3): how fast sparkd hands the GPU from model A to model B.

Two models that cannot share the GPU (budget 0.94, each claims 0.8).  Each round:
a streaming request on the model that holds the GPU (A); once its first chunk is
in, a request for the other model (B) arrives and must wait; A's stream ends (its
last byte is the start of the measurement), sparkd swaps, B answers.  The next
round goes the other way, so every round is one swap.

* ``swap_stop_start``: A's last byte → B's container ``start`` event in Podman's
  event stream (A is stopped, B started; the engine's own load time is excluded).
* ``swap_sleep_wake``: two sleep-capable models (``sleep_mode``; a sleeping model
  keeps a 0.1 claim): A's last byte → the first byte of B's answer at the client,
  i.e. A put to sleep (``POST /sleep``), B woken (``POST /wake_up``), probed ready
  and B's request proxied: the whole swap as a client sees it (the fake engine's
  sleep and wake are instant; a real vLLM adds its own 0.1-6 s wake time).  The
  first two rounds (B's cold start, then the first sleep of B) are warm-up.
  Container log timestamps are not used to split it: conmon glues partial lines,
  so a line can carry an earlier line's stamp.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from benchlib import (
    Bench,
    Result,
    container_events,
    direct_endpoint,
    engine_model,
    first_byte_request,
    first_event,
    percentile,
    sparkd_events,
    summary,
)

ROUNDS = 8
STREAM_TOKENS = 20


async def stream_until_done(session: aiohttp.ClientSession, url: str, model: str, first_chunk: asyncio.Event) -> float:
    """A streaming chat request; sets ``first_chunk`` on its first event; returns the wall time of its last byte."""
    body = {"model": model, "messages": [{"role": "user", "content": "stream please"}], "stream": True, "max_tokens": STREAM_TOKENS}
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"stream on {model}: {response.status} {await response.text()}")
        async for _ in response.content.iter_any():
            first_chunk.set()
        return time.time()


async def one_round(sparkd: Any, session: aiohttp.ClientSession, a: str, b: str) -> tuple[float, float]:
    """Stream on ``a``, queue a request for ``b`` meanwhile: (A's last byte, B's first byte), wall times."""
    url = sparkd.base_url + "/v1/chat/completions"
    first_chunk = asyncio.Event()
    streaming = asyncio.create_task(stream_until_done(session, url, sparkd.model(a), first_chunk))
    await first_chunk.wait()
    body = {"model": sparkd.model(b), "messages": [{"role": "user", "content": "your turn"}], "max_tokens": 4}
    t_first, _, status, payload = await first_byte_request(url, body)
    last_a = await streaming
    if status != 200:
        raise RuntimeError(f"request for {b} answered {status}: {payload[:300]!r}")
    if t_first < last_a:
        raise RuntimeError(f"{b} answered before {a}'s stream ended: the swap cut a running answer")
    return last_a, t_first


async def stop_start(bench: Bench, rounds: int) -> list[float]:
    env = {"FAKE_TOKEN_RATE": "100", "FAKE_LOAD_DELAY": "0.2"}
    models = {key: engine_model(bench.image, claim=0.8, env=env) for key in ("a", "b")}
    gaps: list[float] = []
    async with bench.sparkd("swap-stop", models, {"gpu": {"memory_budget": 0.94}}) as sparkd:
        async with aiohttp.ClientSession() as session:
            status, payload = await sparkd.chat(session, "a", "warm up")
            if status != 200:
                raise RuntimeError(f"first request: {status} {payload}")
            print(f"\n## stop/start: {rounds} swaps between {sparkd.model('a')} and {sparkd.model('b')} (each claims 0.8 of 0.94)")
            print(f"{'#':>3} {'from':>4} {'to':>3} {'swap (A last byte→B start)':>27} {'B answered':>11}  Podman events and sparkd state changes after A's last byte (ms)")
            current, other = "a", "b"
            for i in range(rounds):
                last_a, first_b = await one_round(sparkd, session, current, other)
                started, events = await first_event(bench, sparkd, other, "start", last_a)
                gap = (started - last_a) * 1000
                gaps.append(gap)
                events += [(t, "sparkd:" + e.removeprefix("model_"), m) for t, e, m in sparkd_events(sparkd, last_a - 1)]
                timeline = " ".join(
                    f"{m[len(sparkd.prefix) + 1:]}:{action}@{(t - last_a) * 1000:.0f}"
                    for t, action, m in sorted(events) if last_a - 0.02 <= t <= started
                )
                print(f"{i:3d} {current:>4} {other:>3} {gap:27.1f} {(first_b - last_a) * 1000:11.1f}  {timeline}", flush=True)
                current, other = other, current
    print(f"A last byte → B container start: {summary(gaps)}")
    return gaps


async def sleep_wake(bench: Bench, rounds: int) -> list[float]:
    env = {"FAKE_TOKEN_RATE": "100", "FAKE_LOAD_DELAY": "0.2"}
    models = {key: engine_model(bench.image, claim=0.8, sleep=True, sleep_gpu_memory=0.1, env=env) for key in ("a", "b")}
    gaps: list[float] = []
    async with bench.sparkd("swap-sleep", models, {"gpu": {"memory_budget": 0.94}}) as sparkd:
        async with aiohttp.ClientSession() as session:
            status, payload = await sparkd.chat(session, "a", "warm up")
            if status != 200:
                raise RuntimeError(f"first request: {status} {payload}")
            # Warm-up: B's cold start (A goes to sleep), then A wakes (B goes to sleep).
            await one_round(sparkd, session, "a", "b")
            await one_round(sparkd, session, "b", "a")
            began = time.time()
            before = {key: await engine_state(sparkd, bench, key) for key in ("a", "b")}
            print(f"\n## sleep/wake: {rounds} swaps between {sparkd.model('a')} and {sparkd.model('b')} (sleep claim 0.1)")
            print(f"{'#':>3} {'from':>4} {'to':>3} {'swap (A last byte→B first byte)':>32}  (ms)")
            current, other = "a", "b"
            for i in range(rounds):
                last_a, first_b = await one_round(sparkd, session, current, other)
                gap = (first_b - last_a) * 1000
                gaps.append(gap)
                print(f"{i:3d} {current:>4} {other:>3} {gap:32.1f}", flush=True)
                current, other = other, current
            after = {key: await engine_state(sparkd, bench, key) for key in ("a", "b")}
            starts = await asyncio.to_thread(container_events, bench.podman, began, sparkd.prefix, {"start", "died"})
    sleeps = sum(after[k]["sleeps"] - before[k]["sleeps"] for k in after)
    wakes = sum(after[k]["wakes"] - before[k]["wakes"] for k in after)
    print(f"engine counters over the measured rounds: {sleeps} sleeps, {wakes} wakes; container start/died events: {len(starts)}")
    if starts:
        print(f"  SUSPICIOUS: containers restarted during sleep/wake swaps: {starts}")
    print(f"A last byte → B first byte: {summary(gaps)}")
    return gaps


async def engine_state(sparkd: Any, bench: Bench, key: str) -> dict[str, Any]:
    direct = await direct_endpoint(sparkd, bench.podman, key)
    async with aiohttp.ClientSession() as session, session.get(direct.url + "/fake/state") as response:
        return await response.json()


async def run(bench: Bench, scale: float = 1.0) -> list[Result]:
    rounds = max(2, round(ROUNDS * scale))
    stop_gaps = await stop_start(bench, rounds)
    sleep_gaps = await sleep_wake(bench, rounds)
    return [
        Result("swap_stop_start", percentile(stop_gaps, 50), "ms"),
        Result("swap_sleep_wake", percentile(sleep_gaps, 50), "ms"),
    ]
