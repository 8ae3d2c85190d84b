"""recreate (issue 13): a re-created container starts from the compile caches sparkd keeps.

vLLM compiles its model with torch.compile at start-up (without --enforce-eager)
into ~/.cache/vllm, which dies with the container unless sparkd mounts it from
its state directory (``[engine_cache]``, ``state_dir/engine-cache/<image id>/``).
This benchmark runs the real vLLM image (tests/images/real_vllm, SmolLM2-135M on
the CPU) through sparkd:

1. first start: a fresh state directory, so nothing is cached: request → answer;
2. the model is stopped and its container removed, as a changed spec, a new
   image tag or ``sparkctl prepare`` would; the next request creates a new
   container from nothing but the image and sparkd's mounts: request → answer.

Figures: ``first_start_s``, ``recreated_start_s`` (request to answer, the load
dominating), and ``recreate_start_ratio`` = recreated / first (target ≤ 0.75).
The engine's own log says whether it compiled or loaded the compiled graph.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any

import aiohttp
from benchlib import Bench, Result

import realvllm


async def _timed_answer(session: aiohttp.ClientSession, sparkd: Any) -> float:
    began = time.perf_counter()
    status, body = await sparkd.chat(session, "r", "Say hello.", max_tokens=8)
    took = time.perf_counter() - began
    if status != 200:
        raise RuntimeError(f"the request for the real vLLM model failed ({status}): {body}")
    return took


def _compile_lines(container: str) -> list[str]:
    logs = subprocess.run(["podman", "logs", container], capture_output=True, text=True, check=False)
    text = logs.stdout + logs.stderr
    words = ("torch.compile take", "Compiling a graph", "ompiling model", "compiled graph", "AOT compiled",
             "Dynamo bytecode transform", "Warming up")
    return [line.strip()[-160:] for line in text.splitlines() if any(w in line for w in words)]


async def run(bench: Bench, scale: float = 1.0) -> list[Result]:
    tag, missing = realvllm.missing_reason(bench.podman)
    if missing:
        raise RuntimeError(missing)
    models = {"r": realvllm.model_table(tag)}  # no --enforce-eager: this is about compiling
    async with bench.sparkd("recreate", models) as sparkd:
        container = sparkd.container("r")
        print(f"# {tag}: cold start with an empty engine cache ({sparkd.workdir / 'state' / 'engine-cache'})")
        async with aiohttp.ClientSession() as session:
            first = await _timed_answer(session, sparkd)
            first_id = bench.podman.containers.get(container).id
            print(f"first start: {first:.1f} s; the engine said:")
            for line in _compile_lines(container):
                print(f"    {line}")
            async with session.post(f"{sparkd.base_url}/api/models/{sparkd.model('r')}/stop") as response:
                if response.status != 200:
                    raise RuntimeError(f"stopping the model failed: {response.status} {await response.text()}")
            await sparkd.wait_state("r", "stopped", timeout=60)
            await asyncio.to_thread(lambda: bench.podman.containers.get(container).remove(force=True))
            recreated = await _timed_answer(session, sparkd)
        if bench.podman.containers.get(container).id == first_id:
            raise RuntimeError("the container was not re-created")
        print(f"re-created container, start: {recreated:.1f} s; the engine said:")
        for line in _compile_lines(container):
            print(f"    {line}")
    return [
        Result("first_start_s", first, "s"),
        Result("recreated_start_s", recreated, "s"),
        Result("recreate_start_ratio", recreated / first, "ratio"),
    ]
