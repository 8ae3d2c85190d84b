"""contention (issue 17): two people, two models that cannot share the GPU, one GPU.

Two models (each claims 0.8 of a 0.94 budget); the fake engine loads in 2 s and streams an
answer in 0.2 s (4 tokens at 20/s).  Two clients each send requests to their own model one
after another, back to back, for a fixed period.  The run is made twice in one go: with the
swap quantum (``lifecycle.swap_policy = "quantum"``, ``swap_cost_factor`` 4, ``min_uptime_s`` 0,
so the quantum is 4 x the measured load time) and with plain FIFO swaps (``"fifo"``: the
policy before issue 17, where a model is evicted as soon as its requests are done).

* ``swap_time_fraction``: the time models spent loading (the history's loads in the period)
  divided by the wall time of the period;
* ``max_wait_s``: the longest a request waited for its model (the ``queued_ms`` of sparkd's
  ``request_done`` lines in the period: from its arrival until it was sent to the engine);
* ``answered_a`` / ``answered_b``: requests each client got answered (status 200).

The figures of the FIFO run carry the suffix ``_fifo``.  Target (issue 17 acceptance b):
swap_time_fraction <= 0.25 with the quantum, both clients answered, max_wait_s <= quantum +
load time + one answer, where the quantum and the load time are the largest sparkd used
(its ``swap_quantum_began`` lines: ``quantum_s``, and ``swap_s``, the measured load time of
a swap-in from the holder's draining to ready, which the quantum is 4 times); the bound is
printed beside the figure, as are the clients' own request times (their answers included).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from datetime import datetime
from typing import Any

import aiohttp
from benchlib import Bench, Result, engine_model, summary

PERIOD_S = 45.0
LOAD_DELAY_S = 2.0
ANSWER_TOKENS = 4
TOKEN_RATE = 20  # 4 tokens at 20/s: a 0.2 s answer
ANSWER_S = ANSWER_TOKENS / TOKEN_RATE


async def client(session: aiohttp.ClientSession, url: str, model: str, until: float) -> tuple[int, list[float], list[int]]:
    """Back-to-back streamed requests for ``model`` until ``until``: (answered, request times, other statuses)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": ANSWER_TOKENS}
    answered, times, failures = 0, [], []
    while time.monotonic() < until:
        sent = time.monotonic()
        async with session.post(url, json=body) as response:
            await response.read()
            status = response.status
        times.append(time.monotonic() - sent)
        if status == 200:
            answered += 1
        else:
            failures.append(status)
    return answered, times, failures


def log_lines(sparkd: Any, event: str, since: float) -> list[dict[str, Any]]:
    """The daemon's JSON log lines of ``event`` logged after ``since`` (wall clock)."""
    found = []
    for line in sparkd.logs().splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        at = datetime.fromisoformat(str(entry.get("timestamp", "")).replace("Z", "+00:00")).timestamp()
        if entry.get("event") == event and at >= since:
            found.append(entry)
    return found


async def one_policy(bench: Bench, policy: str, period: float) -> dict[str, Any]:
    env = {"FAKE_LOAD_DELAY": str(LOAD_DELAY_S), "FAKE_TOKEN_RATE": str(TOKEN_RATE)}
    models = {key: engine_model(bench.image, claim=0.8, env=env) for key in ("a", "b")}
    settings = {"gpu": {"memory_budget": 0.94},
                "lifecycle": {"swap_policy": policy, "swap_cost_factor": 4.0, "min_uptime_s": 0}}
    async with bench.sparkd(f"contention-{policy}", models, settings) as sparkd:
        url = sparkd.base_url + "/v1/chat/completions"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            status, payload = await sparkd.chat(session, "a", "warm up")  # a holds the GPU, one load measured
            if status != 200:
                raise RuntimeError(f"warm-up: {status} {payload}")
            began_wall, began = time.time(), time.monotonic()
            until = began + period
            (answered_a, times_a, failed_a), (answered_b, times_b, failed_b) = await asyncio.gather(
                client(session, url, sparkd.model("a"), until), client(session, url, sparkd.model("b"), until)
            )
            wall = time.monotonic() - began
            ended_wall = began_wall + wall
        code, history = await sparkd.admin("GET", "/api/history?limit=1000&days=1")
        if code != 200:
            raise RuntimeError(f"/api/history: {code} {history}")
        status_doc = await sparkd.status()
        waits = [entry["queued_ms"] / 1000 for entry in log_lines(sparkd, "request_done", began_wall)]
        quanta = log_lines(sparkd, "swap_quantum_began", began_wall - 60)
    loads = [row for row in history["loads"] if row["kind"] == "start" and row["started_at"] + row["duration_s"] > began_wall]
    loading = sum(min(row["started_at"] + row["duration_s"], ended_wall) - max(row["started_at"], began_wall) for row in loads)
    load_times = [row["duration_s"] for row in loads if row["outcome"] == "ready"]
    quantum = max([q["quantum_s"] for q in quanta] + [(m.get("quantum_s") or 0.0) for m in status_doc["models"]])
    swap = max([q["swap_s"] for q in quanta], default=0.0)
    load = statistics.median(load_times) if load_times else LOAD_DELAY_S
    result = {
        "swap_time_fraction": loading / wall, "max_wait_s": max(waits, default=0.0), "answered_a": answered_a,
        "answered_b": answered_b, "loads": len(loads), "quantum": quantum, "load": swap, "wall": wall,
    }
    print(f"\n## policy {policy}: {wall:.1f} s, {len(loads)} loads (engine load median {load:.2f} s), {loading:.1f} s loading; "
          f"longest wait for a model {result['max_wait_s']:.2f} s")
    print(f"client a: {answered_a} answered, request times {summary([t * 1000 for t in times_a])}"
          + (f", failed: {failed_a}" if failed_a else ""))
    print(f"client b: {answered_b} answered, request times {summary([t * 1000 for t in times_b])}"
          + (f", failed: {failed_b}" if failed_b else ""))
    if policy == "quantum":
        bound = quantum + swap + ANSWER_S
        verdict = "within" if result["max_wait_s"] <= bound else "ABOVE"
        shown = ", ".join(f"{q['model'][-1]} {q['quantum_s']:.1f} s (swap {q['swap_s']:.2f} s)" for q in quanta)
        print(f"quanta: {shown}")
        print(f"max wait {result['max_wait_s']:.2f} s is {verdict} the bound quantum + load time + one answer = "
              f"{quantum:.2f} + {swap:.2f} + {ANSWER_S:.2f} = {bound:.2f} s; swap time fraction "
              f"{result['swap_time_fraction']:.3f} (target <= 0.25)")
    return result


async def run(bench: Bench, scale: float = 1.0) -> list[Result]:
    period = max(15.0, PERIOD_S * scale)
    quantum = await one_policy(bench, "quantum", period)
    fifo = await one_policy(bench, "fifo", period)
    results = []
    for suffix, figures in (("", quantum), ("_fifo", fifo)):
        results += [
            Result("swap_time_fraction" + suffix, figures["swap_time_fraction"], "ratio"),
            Result("max_wait_s" + suffix, figures["max_wait_s"], "s"),
            Result("answered_a" + suffix, figures["answered_a"], "count"),
            Result("answered_b" + suffix, figures["answered_b"], "count"),
        ]
    results.append(Result("quantum_s", quantum["quantum"], "s"))
    results.append(Result("max_wait_bound_s", quantum["quantum"] + quantum["load"] + ANSWER_S, "s"))
    return results
