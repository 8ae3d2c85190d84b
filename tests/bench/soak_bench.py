"""soak (issue 20): does sparkd grow under a long, mixed load?

One daemon, one model on the fake engine.  The load generator (its own process)
sends blocks of a fixed mix (``MIX``: non-streaming chat, streams read to the end,
streams the client cuts after two events, ``Connection: close`` requests, and
invalid requests whose model names, paths and keys are new every time: client
input that must never be remembered), ``CONCURRENCY`` at a time.  Every
``RESTART_EVERY`` requests the model is stopped through the admin API, and the next
block starts it again on demand (a start/stop cycle: events, log followers,
engine connections).  The load generator closes its connections at the end of
each block; then sparkd is sampled:

* from /proc: RSS (VmRSS), open descriptors, threads;
* from inside (``soak_site/sitecustomize.py``, a probe the benchmark puts on the
  daemon's PYTHONPATH, so sparkd needs no debug hook): after a full collection,
  the event loop's task count, ``sys.getallocatedblocks()`` and the collector's
  object count; with ``run.py --tracemalloc N``, tracemalloc's traced bytes and
  snapshots after the warm-up and at the end, whose difference (the growing
  allocation sites) is printed.

Slopes are least-squares fits over the samples after the warm-up, per 1000
requests.  At the end the daemon is left idle for ``IDLE_S`` and sampled again:
descriptors, threads and tasks must be back at their level after the warm-up.
"""

from __future__ import annotations

import asyncio
import json
import linecache
import os
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    HERE,
    Bench,
    LoadGen,
    Result,
    cpu_seconds,
    engine_model,
    machine_line,
    memory_kb,
)

REQUESTS = 100_000
WARMUP = 5_000
BLOCK = 1_000
RESTART_EVERY = 5_000
CONCURRENCY = 32
STREAM_TOKENS = 16
IDLE_S = 35.0
"""Idle time before the last sample: longer than sparkd's keep-alive toward engines (30 s), so pooled engine
connections have closed as they do on an idle daemon."""
SETTLE_S = 0.5
"""Pause before a sample: the connections just closed (the load generator's, the admin calls') are gone."""
WARMUP_MIN_S = 20.0
"""The warm-up lasts at least this long: sparkd's periodic loops (memory sample every 15 s, history flush every
10 s) have run and opened what they keep open."""
MIX = {
    "chat": 40, "stream": 20, "cut": 15, "close": 5,
    "bad_json": 4, "bad_type": 4, "unknown_model": 4, "unknown_endpoint": 3, "path_unknown": 3, "bad_key": 2,
}
"""Requests of each kind per 100 (kinds: tests/bench/loadgen.py MIX_KINDS)."""
TOP_SITES = 25


@dataclass
class Sample:
    requests: int
    rss_kb: int
    fds: int
    threads: int
    tasks: int | None
    blocks: int
    gc_objects: int
    traced: int | None
    task_names: dict[str, int]
    brk_kb: int
    """RSS of the [heap] mapping (glibc's main arena)."""
    anon_kb: int
    """RSS of the other anonymous mappings (pymalloc's arenas, other threads' malloc arenas, large blocks)."""
    malloc_in_use: int | None
    malloc_free: int | None


class Probe:
    """The soak_site probe inside the daemon: one unix-socket connection, JSON lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def call(self, command: dict[str, Any]) -> dict[str, Any]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.path), limit=16 * 1024 * 1024)
        assert self._reader is not None
        self._writer.write(json.dumps(command).encode() + b"\n")
        await self._writer.drain()
        answer: dict[str, Any] = json.loads(await self._reader.readline())
        if "error" in answer:
            raise RuntimeError(f"soak probe: {answer['error']}")
        return answer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def mapped_kb(pid: int) -> tuple[int, int]:
    """(RSS of [heap], RSS of the other anonymous mappings) in kB, from /proc/<pid>/smaps."""
    brk = anon = 0
    name = ""
    with open(f"/proc/{pid}/smaps") as handle:
        for line in handle:
            head = line.split()
            if not head[0].endswith(":") and "-" in head[0]:
                name = head[5] if len(head) > 5 else ""
            elif head[0] == "Rss:":
                if name == "[heap]":
                    brk += int(head[1])
                elif name == "":
                    anon += int(head[1])
    return brk, anon


def fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors by kind (socket, pipe, anon_inode:..., file)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if not target.startswith(("anon_inode:", "/")) else target
        kind = "file" if kind.startswith("/") else kind
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))


async def sample(probe: Probe, pid: int, requests: int) -> Sample:
    inside = await probe.call({"op": "sample"})  # collects garbage first: RSS is read after it
    brk, anon = mapped_kb(pid)
    malloc = inside["malloc"] or {}
    return Sample(
        brk_kb=brk, anon_kb=anon, malloc_in_use=malloc.get("in_use"), malloc_free=malloc.get("free"),
        requests=requests, rss_kb=memory_kb(pid)["VmRSS"], fds=open_fds(pid), threads=thread_count(pid),
        tasks=inside["tasks"], blocks=inside["blocks"], gc_objects=inside["gc_objects"], traced=inside["traced"],
        task_names=inside["task_names"],
    )


def slope_per_1k(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x, x in requests, per 1000 requests."""
    if len(points) < 2:
        return float("nan")
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return float("nan")
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread * 1000


def describe(s: Sample, extra: str = "") -> str:
    traced = f" traced {s.traced / 1024:.0f} kB" if s.traced is not None else ""
    return (f"{s.requests:>8} requests  RSS {s.rss_kb / 1024:7.2f} MB  fds {s.fds:4d}  threads {s.threads:3d}  "
            f"tasks {s.tasks}  blocks {s.blocks:>8}  objects {s.gc_objects:>7}  [heap] {s.brk_kb / 1024:.2f} anon "
            f"{s.anon_kb / 1024:.2f} MB  malloc used {(s.malloc_in_use or 0) / 1048576:.2f} free "
            f"{(s.malloc_free or 0) / 1048576:.2f} MB{traced}{extra}")


def growing_sites(first: Path, last: Path, top: int) -> list[str]:
    """The allocation sites that grew most between two tracemalloc snapshots, with their stacks."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
              tracemalloc.Filter(False, "<unknown>")]
    before = tracemalloc.Snapshot.load(str(first)).filter_traces(ignore)
    after = tracemalloc.Snapshot.load(str(last)).filter_traces(ignore)
    lines = []
    grown = sorted((stat for stat in after.compare_to(before, "traceback") if stat.size_diff > 0), key=lambda stat: -stat.size_diff)
    for stat in grown[:top]:
        lines.append(f"  {stat.size_diff / 1024:+9.1f} kB {stat.count_diff:+7d} blocks (now {stat.size / 1024:.1f} kB in {stat.count})")
        for frame in list(stat.traceback)[-6:][::-1]:
            source = linecache.getline(frame.filename, frame.lineno).strip()
            lines.append(f"        {frame.filename}:{frame.lineno}  {source[:100]}")
    return lines


def plan(scale: float) -> tuple[int, int, int, int]:
    """(requests, warm-up requests, block, restart period) for a scale; restarts every few blocks."""
    total = max(2_000, round(REQUESTS * scale))
    block = BLOCK if total >= 20 * BLOCK else max(100, total // 20)
    warmup = max(2 * block, round(WARMUP * scale))
    restart = max(2 * block, round(RESTART_EVERY * scale) // block * block)
    return total, warmup, block, restart


async def run(bench: Bench, scale: float = 1.0) -> list[Result]:
    total, warmup, block, restart_every = plan(scale)
    env = {"FAKE_TOKEN_RATE": "1000", "FAKE_TOKENS": str(STREAM_TOKENS), "FAKE_LOAD_DELAY": "0"}
    models = {"soak": engine_model(bench.image, env=env)}
    probe_path = bench.workdir / f"soak-probe-{os.getpid()}.sock"
    daemon_env = {"PYTHONPATH": str(HERE / "soak_site"), "SPARKD_SOAK_PROBE": str(probe_path)}
    if bench.tracemalloc_frames:
        daemon_env["SPARKD_SOAK_TRACEMALLOC"] = str(bench.tracemalloc_frames)
    settings = {"lifecycle": {"queue_size": 4 * CONCURRENCY}}
    async with bench.sparkd("soak", models, settings, env=daemon_env) as sparkd:
        pid = sparkd.process.pid
        model = sparkd.model("soak")
        probe = Probe(probe_path)
        try:
            return await soak(bench, sparkd, probe, pid, model, total, warmup, block, restart_every)
        finally:
            probe.close()


async def soak(bench: Bench, sparkd: Any, probe: Probe, pid: int, model: str, total: int, warmup: int, block: int,
               restart_every: int) -> list[Result]:
    print(f"# sparkd pid {pid}, model {model}; {warmup} warm-up requests, then {total} in blocks of {block}, "
          f"concurrency {CONCURRENCY}; the model is stopped every {restart_every} requests; "
          f"tracemalloc {'on, ' + str(bench.tracemalloc_frames) + ' frames' if bench.tracemalloc_frames else 'off'}")
    print(f"# mix per 100 requests: {', '.join(f'{k} {w}' for k, w in MIX.items())}")
    fresh = await sample(probe, pid, 0)
    print("fresh   " + describe(fresh))
    statuses: dict[str, dict[str, int]] = {}
    unexpected: dict[str, dict[str, int]] = {}
    restarts = 0
    done = 0

    async def one_block(gen: LoadGen, n: int) -> float:
        nonlocal done
        cpu0 = cpu_seconds(pid)
        answer = await gen.call({"op": "mix", "url": sparkd.base_url, "headers": dict(sparkd.client_headers), "model": model,
                                 "n": n, "concurrency": CONCURRENCY, "weights": MIX, "seed": done,
                                 "stream_tokens": STREAM_TOKENS})
        done += n
        add_counts(statuses, answer["statuses"])
        add_counts(unexpected, answer["unexpected"])
        return (cpu_seconds(pid) - cpu0) / n * 1e6

    async def restart_model() -> None:
        nonlocal restarts
        code, body = await sparkd.admin("POST", f"/api/models/{model}/stop")
        if code not in (200, 202):
            raise RuntimeError(f"stopping {model}: {code} {body}")
        await sparkd.wait_state("soak", "stopped", timeout=60)
        restarts += 1

    snapshots: list[Path] = []
    samples: list[Sample] = []
    began = time.perf_counter()
    async with LoadGen() as gen:
        await gen.call({"op": "ping"})
        while done < warmup or time.perf_counter() - began < WARMUP_MIN_S:
            await one_block(gen, block)
            if done % restart_every == 0:
                await restart_model()
        await restart_model()  # the measured part starts as it ends below: no engine connection pooled
        await asyncio.sleep(SETTLE_S)
        start = await sample(probe, pid, done)
        samples.append(start)
        print("warm    " + describe(start, f"  ({time.perf_counter() - began:.0f} s)"))
        print(f"# descriptors after the warm-up: {fd_kinds(pid)}")
        if bench.tracemalloc_frames:
            snapshots.append(Path((await probe.call({"op": "snapshot", "path": str(bench.workdir / "soak-0.tracemalloc")}))["path"]))
        measured_from = done
        while done < measured_from + total:
            cpu_us = await one_block(gen, min(block, measured_from + total - done))
            restarted = ""
            if (done - measured_from) % restart_every == 0:
                await restart_model()
                restarted = "  (model restarted)"
            await asyncio.sleep(SETTLE_S)
            current = await sample(probe, pid, done)
            samples.append(current)
            print("        " + describe(current, f"  CPU {cpu_us:.0f} us/request{restarted}"), flush=True)
    wall = time.perf_counter() - began
    await asyncio.sleep(IDLE_S)
    idle = await sample(probe, pid, done)
    print("idle    " + describe(idle, f"  ({IDLE_S:g} s after the last request)"))
    print(f"# descriptors when idle: {fd_kinds(pid)}")
    if bench.tracemalloc_frames:
        snapshots.append(Path((await probe.call({"op": "snapshot", "path": str(bench.workdir / "soak-1.tracemalloc")}))["path"]))

    print(f"\n{done} requests in {wall:.0f} s ({done / wall:.0f} req/s), {restarts} model restarts; {machine_line()}")
    return report(bench, statuses, unexpected, samples, measured_from, start, idle, snapshots)


def add_counts(into: dict[str, dict[str, int]], seen_by_kind: dict[str, dict[str, int]]) -> None:
    """Add one block's counts per request kind and status to the run's."""
    for kind, seen in seen_by_kind.items():
        counts = into.setdefault(kind, {})
        for status, count in seen.items():
            counts[status] = counts.get(status, 0) + count


def report(bench: Bench, statuses: dict[str, dict[str, int]], unexpected: dict[str, dict[str, int]], samples: list[Sample],
           measured_from: int, start: Sample, idle: Sample, snapshots: list[Path]) -> list[Result]:
    """Print what the run saw and the slopes after the warm-up; the RESULT figures."""
    for kind in MIX:
        print(f"  {kind:17s} {statuses.get(kind, {})}")
    wrong = sum(sum(seen.values()) for seen in unexpected.values())
    if wrong:
        print(f"  UNEXPECTED statuses: {unexpected}")
    print(f"tasks after the warm-up by coroutine: {start.task_names}")
    print(f"tasks when idle at the end:          {idle.task_names}")

    points = [(s.requests - measured_from, s) for s in samples]
    rss_slope = slope_per_1k([(x, s.rss_kb) for x, s in points])
    fd_slope = slope_per_1k([(x, s.fds) for x, s in points])
    blocks_slope = slope_per_1k([(x, s.blocks) for x, s in points])
    objects_slope = slope_per_1k([(x, s.gc_objects) for x, s in points])
    parts: dict[str, list[tuple[float, float]]] = {
        "[heap] RSS": [(x, s.brk_kb) for x, s in points],
        "other anonymous RSS": [(x, s.anon_kb) for x, s in points],
        "malloc in use": [(x, (s.malloc_in_use or 0) / 1024) for x, s in points],
        "malloc free": [(x, (s.malloc_free or 0) / 1024) for x, s in points],
    }
    print("where the RSS slope is, per 1000 requests: " + ", ".join(f"{label} {slope_per_1k(values):.1f} kB" for label, values in parts.items()))
    print(f"after the warm-up: RSS {start.rss_kb / 1024:.2f} → {idle.rss_kb / 1024:.2f} MB, "
          f"blocks {start.blocks} → {idle.blocks}, objects {start.gc_objects} → {idle.gc_objects}")
    results = [
        Result("rss_slope_kb_per_1k_requests", rss_slope, "kB"),
        Result("fd_slope_per_1k_requests", fd_slope, "fds"),
        Result("blocks_slope_per_1k_requests", blocks_slope, "blocks"),
        Result("objects_slope_per_1k_requests", objects_slope, "objects"),
        Result("rss_growth", (idle.rss_kb - start.rss_kb) / 1024, "MB"),
        Result("fds_before", start.fds, "count"),
        Result("fds_after", idle.fds, "count"),
        Result("threads_before", start.threads, "count"),
        Result("threads_after", idle.threads, "count"),
        Result("tasks_before", start.tasks if start.tasks is not None else -1, "count"),
        Result("tasks_after", idle.tasks if idle.tasks is not None else -1, "count"),
        Result("soak_unexpected_statuses", wrong, "count"),
    ]
    if bench.tracemalloc_frames:
        heap_slope = slope_per_1k([(x, s.traced or 0) for x, s in points]) / 1024
        results.append(Result("heap_slope_kb_per_1k_requests", heap_slope, "kB"))
        print(f"\n## growing allocation sites (tracemalloc) between the warm-up and the end, top {TOP_SITES}")
        for line in growing_sites(snapshots[0], snapshots[1], TOP_SITES):
            print(line)
    return results
