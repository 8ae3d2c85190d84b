"""fleet (issue 18): what forwarding a request to the peer sparkd that serves its model adds.

Two daemons on this machine: node B runs the model (the fake engine), node A has B as a peer and
no model of its own, so A forwards every request to B over the peer channel. The same request is
sent alternately straight to B and through A, on kept-alive connections, one at a time; the
difference of the medians is what the entry node's checks, placement and relay cost.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from benchlib import BENCH_KEY, Bench, Result, engine_model, percentile, summary

from harness import write_keys

REQUESTS = 300
PEER_KEY = "sk-sparkd-bench-fleet-peer-0123456789"


async def timed(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {BENCH_KEY}"}) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
    return (time.perf_counter() - started) * 1000


async def run(bench: Bench, scale: float = 1.0) -> list[Result]:
    n = max(20, round(REQUESTS * scale))
    poll = {"cluster": {"heartbeat_s": 1.0, "lease_timeout_s": 5, "devices": []}}
    async with bench.sparkd("fleet-b", {"m": engine_model(bench.image)}, {**poll, "server": {"anonymous": "off"}}) as b:
        write_keys(b.workdir / "keys.toml", {"bench": {"key": BENCH_KEY}, "node-a": {"key": PEER_KEY, "role": "peer"}})
        b.reload()
        key_file = bench.workdir / f"fleet-peer-{b.prefix}.key"
        key_file.write_text(PEER_KEY + "\n")
        key_file.chmod(0o600)
        peers = {"peers": {"b": {"url": b.base_url, "key_file": str(key_file), "address": "127.0.0.1", "insecure": True}}}
        async with bench.sparkd("fleet-a", {}, {**poll, **peers}) as a:
            model = b.model("m")
            body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
            stream = {**body, "stream": True}
            urls = {"direct": b.base_url + "/v1/chat/completions", "forwarded": a.base_url + "/v1/chat/completions"}
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + 30
                while True:  # A learns the model from B's list within a poll; B's reload takes its new keys
                    try:
                        await timed(session, urls["forwarded"], body)
                        break
                    except RuntimeError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                figures: dict[str, list[float]] = {f"{way} {kind}": [] for way in urls for kind in ("completion", "stream")}
                for _ in range(n):
                    for way, url in urls.items():
                        figures[f"{way} completion"].append(await timed(session, url, body))
                        figures[f"{way} stream"].append(await timed(session, url, stream))
    for name, values in figures.items():
        print(f"{name:>22}: {summary(values)}")
    added = percentile(figures["forwarded completion"], 50) - percentile(figures["direct completion"], 50)
    added_stream = percentile(figures["forwarded stream"], 50) - percentile(figures["direct stream"], 50)
    print(f"# {n} requests each way, alternating; forwarding adds {added:.2f} ms (completion), {added_stream:.2f} ms (stream) at the median")
    return [
        Result("fleet_direct_p50", percentile(figures["direct completion"], 50), "ms"),
        Result("fleet_forwarded_p50", percentile(figures["forwarded completion"], 50), "ms"),
        Result("fleet_forward_added_p50", added, "ms"),
        Result("fleet_forward_added_stream_p50", added_stream, "ms"),
    ]
