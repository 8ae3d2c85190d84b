"""waiting_body (issue 11): what a request waiting in the queue costs sparkd in memory.

A model loads for a long time (the fake engine's FAKE_LOAD_DELAY), so every request
for it waits in sparkd's queue. N chat requests of 8 MiB each (a long conversation:
many short messages, the shape whose parsed form is largest) are sent one after the
other; once all N wait, sparkd's RSS is read. The figure is the RSS growth per
waiting request, in MiB, next to the body's own 8 MiB. ``--rev`` measures another
commit the same way (before/after a change in how waiting bodies are held).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from benchlib import BENCH_KEY, Bench, Result, engine_model, memory_kb

REQUESTS = 8
BODY_BYTES = 8 * 1024 * 1024


def long_chat(model: str, size: int) -> bytes:
    messages = []
    total = 0
    index = 0
    while total < size:
        message = {"role": "user" if index % 2 == 0 else "assistant", "content": f"message {index}: the quick brown fox"}
        messages.append(message)
        total += len(json.dumps(message)) + 2
        index += 1
    return json.dumps({"model": model, "messages": messages, "max_tokens": 4}).encode()


async def run(bench: Bench, scale: float = 1.0) -> list[Result]:
    n = max(2, round(REQUESTS * scale))
    models = {"w": engine_model(bench.image, env={"FAKE_LOAD_DELAY": "600"})}
    async with bench.sparkd("waiting_body", models) as sparkd:
        pid = sparkd.process.pid
        body = long_chat(sparkd.model("w"), BODY_BYTES)
        headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
        before = memory_kb(pid)["VmRSS"]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            tasks = []
            for count in range(1, n + 1):
                tasks.append(asyncio.create_task(session.post(sparkd.base_url + "/v1/chat/completions", data=body, headers=headers)))
                deadline = time.monotonic() + 60
                while (await sparkd.model_status("w"))["queued"] < count:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"request {count} never reached the queue")
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            waiting = memory_kb(pid)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    per_request = (waiting["VmRSS"] - before) / 1024 / n
    print(f"{n} waiting requests of {len(body) / 2**20:.1f} MiB each ({len(json.loads(body)['messages'])} messages): "
          f"sparkd RSS {before / 1024:.1f} MiB before, {waiting['VmRSS'] / 1024:.1f} MiB while they wait, "
          f"peak {waiting['VmHWM'] / 1024:.1f} MiB")
    print(f"RSS per waiting request: {per_request:.1f} MiB for a {len(body) / 2**20:.1f} MiB body")
    return [Result("waiting_body_rss_per_request", per_request, "MiB")]
