"""proxy (issue 2): what sparkd adds to a request, compared with calling the same engine directly.

One daemon, one model backed by the fake engine (tokens paced at 100/s per stream).
The same engine process is called three ways from one load-generator process:

* ``direct``: on its published 127.0.0.1 port with its internal key;
* ``sparkd``: ``/v1/chat/completions`` on the daemon, the model named in the body;
* ``bare``: through tests/bench/bare_proxy.py, a minimal aiohttp relay (no auth,
  routing, queue or header rules): the yardstick for "no more than a bare pass-through";
* ``raw`` (streaming phase only): through tests/bench/raw_relay.py, bytes relayed
  verbatim from the upstream protocol to the client transport: the floor of what
  a Python relay pays per chunk;
* ``compare`` (streaming phase only, ``run.py --compare REV``): a second sparkd
  daemon running the sparkd of another revision, on its own engine container with
  the same settings: two implementations' per-chunk CPU in the same rounds.

Blocks of the three alternate, so drift on a shared machine hits all alike.  A
proxy's CPU time is read from /proc/<pid>/stat (utime + stime, all threads)
before and after its blocks; the RESULT figures are sparkd's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import (
    HERE,
    Bench,
    LoadGen,
    Profiler,
    Result,
    cpu_seconds,
    cpu_times,
    direct_endpoint,
    engine_model,
    machine_line,
    memory_kb,
    percentile,
    summary,
)

from harness import free_port

C1_REQUESTS = 2000
C1_BLOCK = 250
C32_REQUESTS = 6000
C32_BLOCK = 1500
STREAMS = 32
STREAM_TOKENS = 100
STREAM_ROUNDS = 3
STREAMS_PER_ROUND = 32 * 4
# A stream lasts about STREAM_TOKENS / 100 s: spread the 32 workers' first starts over it.
STAGGER_S = STREAM_TOKENS / 100 / STREAMS
TARGETS = ("direct", "bare", "sparkd")
STREAM_TARGETS = ("direct", "raw", "bare", "sparkd")
COMPARE = "compare"


def chat_body(model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello there"}]}
    if stream:
        body.update(stream=True, max_tokens=STREAM_TOKENS)
    else:
        body.update(max_tokens=16)
    return body


class Tally:
    """Per-target sums over the blocks of one phase."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {t: {"user": 0.0, "sys": 0.0, "engine": 0.0, "client": 0.0, "wall": 0.0, "n": 0,
                                                       "lat": [], "gaps": [], "ttfc": [], "chunks": 0} for t in (*STREAM_TARGETS, COMPARE)}

    def __getitem__(self, target: str) -> dict[str, Any]:
        return self.values[target]


async def start_relay(script: str, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(HERE / script), str(port), *args])
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{script} did not start") from None
            await asyncio.sleep(0.05)


async def run(bench: Bench, scale: float = 1.0) -> list[Result]:
    def scaled(n: int) -> int:
        return max(1, int(n * scale))

    models = {"p": engine_model(bench.image, env={"FAKE_TOKEN_RATE": "100", "FAKE_TOKENS": str(STREAM_TOKENS), "FAKE_LOAD_DELAY": "0"})}
    async with contextlib.AsyncExitStack() as stack:
        sparkd = await stack.enter_async_context(bench.sparkd("proxy", models))
        compare = None
        if bench.compare_source is not None:
            compare = await stack.enter_async_context(bench.sparkd(
                "proxy-compare", models, {"defaults": {"port_range": [29500, 29599]}}, source=bench.compare_source))
            async with aiohttp.ClientSession() as session:
                status, payload = await compare.chat(session, "p", "warm up")
            if status != 200:
                raise RuntimeError(f"first request to the compared daemon failed: {status} {payload}")
        pid = sparkd.process.pid
        model = sparkd.model("p")
        async with aiohttp.ClientSession() as session:
            status, payload = await sparkd.chat(session, "p", "warm up")
        if status != 200:
            raise RuntimeError(f"first request failed: {status} {payload}")
        direct = await direct_endpoint(sparkd, bench.podman, "p")
        relays = {
            "bare": await start_relay("bare_proxy.py", direct.url, direct.key),
            "raw": await start_relay("raw_relay.py", direct.url.rsplit(":", 1)[1], direct.key),
        }
        try:
            return await measure(bench, sparkd, pid, model, direct, relays, scaled, compare)
        finally:
            for process, _ in relays.values():
                process.terminate()
                process.wait(10)


def report_c1(c1: Tally, load_targets: tuple[str, ...], began: float) -> tuple[float, float]:
    """Print the concurrency-1 phase; the latency sparkd adds at p50 and p99 (ms)."""
    print(f"\n## concurrency 1, non-streaming chat, {c1['sparkd']['n']} requests per target ({time.perf_counter() - began:.1f} s)")
    for target in load_targets:
        print(f"  {target:7s} latency {summary(c1[target]['lat'])}")
    for target in ("bare", "sparkd"):
        added = {p: percentile(c1[target]["lat"], p) - percentile(c1["direct"]["lat"], p) for p in (50, 90, 99)}
        print(f"  added by {target}: p50 {added[50]:.3f} ms, p90 {added[90]:.3f} ms, p99 {added[99]:.3f} ms")
    added_p50 = percentile(c1["sparkd"]["lat"], 50) - percentile(c1["direct"]["lat"], 50)
    added_p99 = percentile(c1["sparkd"]["lat"], 99) - percentile(c1["direct"]["lat"], 99)
    return added_p50, added_p99


def report_c32(c32: Tally, load_targets: tuple[str, ...], proxy_pid: dict[str, int | None], began: float) -> float:
    """Print the concurrency-32 phase; sparkd's CPU per request (us)."""
    print(f"\n## concurrency 32, non-streaming chat, {c32['sparkd']['n']} requests per target ({time.perf_counter() - began:.1f} s)")
    for target in load_targets:
        t = c32[target]
        n = t["n"]
        proxy = (f"proxy {(t['user'] + t['sys']) / n * 1e6:.0f} us ({t['sys'] / n * 1e6:.0f} us in the kernel), "
                 if proxy_pid[target] else "")
        print(f"  {target:7s} {n / t['wall']:.0f} req/s, latency {summary(t['lat'])}")
        print(f"          CPU per request: {proxy}engine {t['engine'] / n * 1e6:.0f} us, "
              f"load generator {t['client'] / n * 1e6:.0f} us (busy {t['client'] / t['wall'] * 100:.0f}% of one core)")
    return float((c32["sparkd"]["user"] + c32["sparkd"]["sys"]) / c32["sparkd"]["n"] * 1e6)


def report_streams(st: Tally, stream_targets: tuple[str, ...], proxy_pid: dict[str, int | None],
                   began: float) -> tuple[float, float, float]:
    """Print the streaming phase; the inter-chunk p99 sparkd adds (ms), its CPU per chunk (us), the first chunk p50 it adds (ms)."""
    print(f"\n## streaming, {STREAMS} concurrent streams of {STREAM_TOKENS} tokens at 100 tokens/s, "
          f"{len(st['sparkd']['ttfc'])} streams per target ({time.perf_counter() - began:.1f} s)")
    for target in stream_targets:
        t = st[target]
        print(f"  {target:7s} {t['chunks']} chunks; load generator busy {t['client'] / t['wall'] * 100:.0f}% of one core")
        print(f"          inter-chunk {summary(t['gaps'])}")
        print(f"          first chunk {summary(t['ttfc'])}")
        if proxy_pid[target]:
            print(f"          proxy CPU {(t['user'] + t['sys']) / t['chunks'] * 1e6:.1f} us per chunk "
                  f"({t['sys'] / t['chunks'] * 1e6:.1f} us in the kernel; {(t['user'] + t['sys']) / t['wall'] * 100:.0f}% of one core)")
    added_gap_p99 = percentile(st["sparkd"]["gaps"], 99) - percentile(st["direct"]["gaps"], 99)
    cpu_per_chunk = (st["sparkd"]["user"] + st["sparkd"]["sys"]) / st["sparkd"]["chunks"] * 1e6
    added_ttfc = percentile(st["sparkd"]["ttfc"], 50) - percentile(st["direct"]["ttfc"], 50)
    for target in stream_targets[1:]:
        print(f"  added by {target}: inter-chunk p99 {percentile(st[target]['gaps'], 99) - percentile(st['direct']['gaps'], 99):.3f} ms, "
              f"first chunk p50 {percentile(st[target]['ttfc'], 50) - percentile(st['direct']['ttfc'], 50):.3f} ms")
    return added_gap_p99, cpu_per_chunk, added_ttfc


def report_compare(st: Tally, cpu_per_chunk: float, label: str) -> list[Result]:
    """Print sparkd's CPU per chunk beside the compared daemon's; the compared figure."""
    compare_per_chunk = (st[COMPARE]["user"] + st[COMPARE]["sys"]) / st[COMPARE]["chunks"] * 1e6
    print(f"# per chunk: sparkd {cpu_per_chunk:.1f} us, compare ({label}) {compare_per_chunk:.1f} us: "
          f"sparkd costs {(cpu_per_chunk / compare_per_chunk - 1) * 100:+.1f} %")
    return [Result("cpu_per_chunk_compare", compare_per_chunk, "us")]


async def measure(bench: Bench, sparkd: Any, pid: int, model: str, direct: Any,
                  relays: dict[str, tuple[subprocess.Popen[bytes], str]], scaled: Any, compare: Any = None) -> list[Result]:
    path = "/v1/chat/completions"
    targets = {"direct": (direct.url + path, direct.headers), "sparkd": (sparkd.base_url + path, dict(sparkd.client_headers))}
    targets.update({name: (url + path, {}) for name, (_, url) in relays.items()})
    proxy_pid = {"direct": None, "sparkd": pid, **{name: process.pid for name, (process, _) in relays.items()}}
    stream_targets, load_targets = STREAM_TARGETS, TARGETS
    if compare is not None:
        # The compared daemon serves every phase too: both daemons have the same history (heap, GC
        # generations, metrics) when their streams are measured.
        load_targets = (*TARGETS, COMPARE)
        targets[COMPARE] = (compare.base_url + path, dict(compare.client_headers))
        proxy_pid[COMPARE] = compare.process.pid
        stream_targets = (*STREAM_TARGETS, COMPARE)
        print(f"# compare: sparkd pid {compare.process.pid} on {compare.base_url} running {bench.compare_label}")
    loop = "uvloop" if "uvloop" in Path(f"/proc/{pid}/maps").read_text() else "asyncio's default loop"
    print(f"# sparkd pid {pid} on {sparkd.base_url} ({loop}); engine pid {direct.pid} on {direct.url}; model {model}; "
          + "; ".join(f"{name} relay pid {process.pid} on {url}" for name, (process, url) in relays.items()))

    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(3)
    idle_us_per_s = (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0) * 1e6
    print(f"# sparkd idle CPU: {idle_us_per_s:.0f} us/s (background tasks; 10 ms tick resolution; included below)")

    async with LoadGen() as gen:

        async def block(tally: Tally, target: str, command: dict[str, Any]) -> dict[str, Any]:
            url, headers = targets[target]
            if target == COMPARE:  # the compared daemon names its model with its own prefix
                command = {**command, "body": {**command["body"], "model": compare.model("p")}}
            proxy = proxy_pid[target]
            u0, k0 = cpu_times(proxy) if proxy else (0.0, 0.0)
            e0 = cpu_seconds(direct.pid)
            answer = await gen.call({"target": target, "url": url, "headers": headers, **command})
            u1, k1 = cpu_times(proxy) if proxy else (0.0, 0.0)
            if answer["errors"]:
                raise RuntimeError(f"{target}: failed requests {answer['errors']}")
            t = tally[target]
            t["user"] += u1 - u0
            t["sys"] += k1 - k0
            t["engine"] += cpu_seconds(direct.pid) - e0
            t["client"] += answer["cpu_s"]
            t["wall"] += answer["wall_s"]
            t["lat"] += answer.get("lat", [])
            t["gaps"] += answer.get("gaps", [])
            t["ttfc"] += answer.get("ttfc", [])
            t["chunks"] += answer.get("chunks", 0)
            return answer

        def load(n: int, concurrency: int) -> dict[str, Any]:
            return {"op": "load", "body": chat_body(model, False), "n": n, "concurrency": concurrency}

        def streams(n: int) -> dict[str, Any]:
            return {"op": "stream", "body": chat_body(model, True), "streams": n, "concurrency": STREAMS, "stagger_s": STAGGER_S}

        # -- warm-up: connection pools, code paths, the engine's caches
        warm = Tally()
        for target in load_targets:
            await block(warm, target, load(scaled(300), 1))
            await block(warm, target, load(scaled(1000), 32))
        for target in stream_targets:
            await block(warm, target, streams(STREAMS))

        # -- concurrency 1: latency
        c1 = Tally()
        began = time.perf_counter()
        while c1["sparkd"]["n"] < scaled(C1_REQUESTS):
            for target in load_targets:
                n = min(C1_BLOCK, scaled(C1_REQUESTS))
                await block(c1, target, load(n, 1))
                c1[target]["n"] += n
        added_p50, added_p99 = report_c1(c1, load_targets, began)

        # -- concurrency 32: CPU per request
        c32 = Tally()
        began = time.perf_counter()
        async with Profiler(bench.profile_dir, pid, "proxy_c32"):
            while c32["sparkd"]["n"] < scaled(C32_REQUESTS):
                for target in load_targets:
                    n = min(C32_BLOCK, scaled(C32_REQUESTS))
                    await block(c32, target, load(n, 32))
                    c32[target]["n"] += n
        cpu_per_request = report_c32(c32, load_targets, proxy_pid, began)

        # -- streaming: 32 streams at 100 tokens/s each
        st = Tally()
        began = time.perf_counter()
        async with Profiler(bench.profile_dir, pid, "proxy_stream"):
            for _ in range(STREAM_ROUNDS):
                for target in stream_targets:
                    await block(st, target, streams(max(STREAMS, scaled(STREAMS_PER_ROUND))))
        added_gap_p99, cpu_per_chunk, added_ttfc = report_streams(st, stream_targets, proxy_pid, began)

    print(f"\n# sparkd peak RSS after the run: {memory_kb(pid)['VmHWM'] / 1024:.1f} MB; {machine_line()}")
    compared = [] if compare is None else report_compare(st, cpu_per_chunk, bench.compare_label)
    return [
        Result("added_p50_c1", added_p50, "ms"),
        Result("added_p99_c1", added_p99, "ms"),
        Result("cpu_per_request_c32", cpu_per_request, "us"),
        Result("added_interchunk_p99", added_gap_p99, "ms"),
        Result("cpu_per_chunk", cpu_per_chunk, "us"),
        Result("added_ttfc_p50", added_ttfc, "ms"),
        *compared,
    ]
