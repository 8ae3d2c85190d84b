"""stampede (issue 3): 1000 concurrent requests for a cold model.

All 1000 arrive (from the load-generator process, 1000 connections at once)
while the model is stopped; the engine loads for 2 s, so they all wait in
sparkd's queue, then are proxied together.  Counted: Podman ``start`` events of
the model's container (single flight: must be 1), answers with HTTP 200 (must
be 1000), and sparkd's peak resident memory (VmHWM, the kernel's high-water
mark of the process; the daemon is fresh, so it is the stampede's peak).
"""

from __future__ import annotations

import asyncio
import time

from benchlib import Bench, LoadGen, Result, engine_model, first_event, memory_kb, percentile, sparkd_events, summary

REQUESTS = 1000
LOAD_DELAY_S = 2.0


async def run(bench: Bench, scale: float = 1.0) -> list[Result]:
    n = max(10, round(REQUESTS * scale))
    models = {"s": engine_model(bench.image, env={"FAKE_LOAD_DELAY": str(LOAD_DELAY_S)})}
    async with bench.sparkd("stampede", models, {"lifecycle": {"queue_size": max(1024, 2 * n)}}) as sparkd:
        pid = sparkd.process.pid
        model = sparkd.model("s")
        before = memory_kb(pid)
        print(f"# sparkd pid {pid}: RSS {before['VmRSS'] / 1024:.1f} MB, peak so far {before['VmHWM'] / 1024:.1f} MB before the stampede")
        samples: list[tuple[float, int]] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                samples.append((time.perf_counter(), memory_kb(pid)["VmRSS"]))
                await asyncio.sleep(0.05)

        body = {"model": model, "messages": [{"role": "user", "content": "stampede"}], "max_tokens": 8}
        async with LoadGen() as gen:
            await gen.call({"op": "ping"})
            sampler = asyncio.create_task(sample())
            answer = await gen.call({"op": "burst", "url": sparkd.base_url + "/v1/chat/completions", "headers": {},
                                     "body": body, "n": n, "timeout": 120})
            began_wall = answer["began_wall"]
            stop.set()
            await sampler
        after = memory_kb(pid)
        _, events = await first_event(bench, sparkd, "s", "start", began_wall)
        transitions = sparkd_events(sparkd, began_wall)
    starts = [t for t, action, m in events if m == model and action == "start"]
    answered = answer["statuses"].get("200", 0)
    peak_mb = after["VmHWM"] / 1024
    print(f"{n} requests sent at once; answers by status: {answer['statuses']}; took {answer['wall_s']:.2f} s "
          f"(load generator CPU {answer['cpu_s']:.2f} s)")
    print(f"latency {summary(answer['lat'])}")
    ready = next((t for t, e, m in transitions if e == "model_ready"), None)
    if ready is not None:
        print(f"model ready {ready - began_wall:.2f} s after the first request; last answer {answer['wall_s']:.2f} s; "
              f"so the {n} answers took {answer['wall_s'] - (ready - began_wall):.2f} s after ready")
    print("sparkd state changes: " + ", ".join(f"{e}+{t - began_wall:.2f}s" for t, e, _ in transitions))
    print("Podman events: " + ", ".join(f"{a}+{t - began_wall:.2f}s" for t, a, m in events if m == model))
    peak_sample = max((kb for _, kb in samples), default=0) / 1024
    print(f"sparkd RSS: before {before['VmRSS'] / 1024:.1f} MB, after {after['VmRSS'] / 1024:.1f} MB, "
          f"sampled peak {peak_sample:.1f} MB, VmHWM {peak_mb:.1f} MB")
    if answer["lat"]:
        print(f"median answer at {percentile(answer['lat'], 50) / 1000:.2f} s")
    return [
        Result("stampede_starts", len(starts), "count"),
        Result("stampede_answered", answered, "count"),
        Result("stampede_peak_rss", peak_mb, "MB"),
    ]
