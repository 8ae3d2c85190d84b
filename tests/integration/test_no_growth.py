"""Issue 20: nothing in sparkd grows per request, stream, disconnect, model restart or piece of client input.

A real daemon against real Podman and the fake engine, with the soak benchmark's probe on its
PYTHONPATH (``tests/bench/soak_site``: the event loop's tasks, the objects the collector tracks,
Python's allocated blocks, after a full collection).  The load is the soak benchmark's own mix
(``tests/bench/loadgen.py``): chats, streams, streams the client cuts, ``Connection: close``,
and invalid requests whose model names, endpoints and keys are new every time.  Four rounds warm
every path up (bounded caches fill, metric series appear); after each round the model is
stopped, so no engine connection stays pooled.  Then more rounds must leave the daemon where it
was: the same tasks, descriptors and metric series, and far less than one object per request.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from harness import REPO, Sparkd, engine_model
from sparkd.observe.operations import SAMPLE_EVERY_S

pytestmark = pytest.mark.podman

ROUND = 300
"""Requests per round."""
WARM_ROUNDS = 4
"""Enough for the bounded caches keyed by URLs (yarl's, urllib's: a few hundred entries) to be full."""
MEASURED_ROUNDS = 3
SLACK_OBJECTS = 300
"""Tracked objects the daemon may gain over the measured rounds (noise: pools, freelists): a third of
one per request; a leak of one object per request shows as 900."""
MIX = {"chat": 30, "stream": 15, "cut": 15, "close": 10, "bad_json": 5, "bad_type": 5, "unknown_model": 5,
       "unknown_endpoint": 5, "path_unknown": 5, "bad_key": 5}


def load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem + "_for_test", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loadgen = load_module(REPO / "tests" / "bench" / "loadgen.py")


async def probe(path: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(path, limit=16 * 1024 * 1024)
    try:
        writer.write(b'{"op": "sample"}\n')
        await writer.drain()
        answer: dict[str, Any] = json.loads(await reader.readline())
    finally:
        writer.close()
    assert "error" not in answer, answer
    return answer


async def metric_series(daemon: Sparkd) -> set[str]:
    async with daemon.admin_session() as session, session.get(daemon.admin_url + "/metrics") as response:
        text = await response.text()
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


async def one_round(daemon: Sparkd, seed: int) -> dict[str, Any]:
    answer = await loadgen.op_mix({
        "url": daemon.base_url, "headers": {}, "model": daemon.model("m"), "n": ROUND, "concurrency": 8,
        "weights": MIX, "seed": seed, "stream_tokens": 16,
    })
    assert not answer["unexpected"], answer
    status, body = await daemon.admin("POST", f"/api/models/{daemon.model('m')}/stop")
    assert status in (200, 202), body
    await daemon.wait_state("m", "stopped", timeout=60)
    await asyncio.sleep(0.5)  # the last client connections close
    return answer


async def state(daemon: Sparkd, probe_path: str) -> dict[str, Any]:
    assert daemon.process is not None
    inside = await probe(probe_path)
    return {
        "tasks": inside["tasks"], "objects": inside["gc_objects"], "blocks": inside["blocks"],
        "fds": len(os.listdir(f"/proc/{daemon.process.pid}/fd")), "threads": len(os.listdir(f"/proc/{daemon.process.pid}/task")),
        "series": await metric_series(daemon),
        "task_names": inside["task_names"],
    }


async def test_nothing_grows_per_request_stream_disconnect_restart_or_client_input(sparkd_factory, engine_image):
    env = {"FAKE_TOKEN_RATE": "1000", "FAKE_TOKENS": "16", "FAKE_LOAD_DELAY": "0"}
    daemon = sparkd_factory({"m": engine_model(engine_image, env=env)}, {"log": {"level": "info"}})
    probe_dir = tempfile.mkdtemp(prefix="sparkd-probe-")  # short: a unix socket path has 107 bytes
    probe_path = os.path.join(probe_dir, "probe.sock")
    try:
        await daemon.start(env={"PYTHONPATH": str(REPO / "tests" / "bench" / "soak_site"), "SPARKD_SOAK_PROBE": probe_path})
        began = time.monotonic()
        seed = 0
        # sparkd's memory sampler (its first run opens its Podman connection) runs once first.
        while seed < WARM_ROUNDS or time.monotonic() - began < SAMPLE_EVERY_S + 1:
            await one_round(daemon, seed)
            seed += 1
        before = await state(daemon, probe_path)
        for measured in range(seed, seed + MEASURED_ROUNDS):
            await one_round(daemon, measured)
        after = await state(daemon, probe_path)
    finally:
        if os.path.exists(probe_path):
            os.unlink(probe_path)
        os.rmdir(probe_dir)
    requests = ROUND * MEASURED_ROUNDS
    print(f"over {requests} requests: tasks {before['tasks']} -> {after['tasks']}, fds {before['fds']} -> {after['fds']}, "
          f"threads {before['threads']} -> {after['threads']}, "
          f"objects {after['objects'] - before['objects']:+d}, blocks {after['blocks'] - before['blocks']:+d}, "
          f"metric series {len(before['series'])} -> {len(after['series'])}")
    assert after["tasks"] == before["tasks"], (before["task_names"], after["task_names"])
    assert "trim_heap_forever" in after["task_names"], "the C heap's free pages go back to the system (allocator.py)"
    # A worker thread the pool adds (bounded: asyncio's default executor) keeps a Podman connection of its own.
    assert after["fds"] - before["fds"] <= max(0, after["threads"] - before["threads"]), (before, after)
    assert after["series"] == before["series"], sorted(after["series"] ^ before["series"])[:20]
    assert after["objects"] - before["objects"] < SLACK_OBJECTS, (before, after, requests)
    assert after["blocks"] - before["blocks"] < 3 * SLACK_OBJECTS, (before["blocks"], after["blocks"], requests)
