"""Issue 16: measured footprints on a discrete GPU, from nvidia-smi's figures per process.

No GPU here, so ``nvidia-smi`` is a stand-in on the daemon's PATH that answers the two
queries sparkd makes as the driver would: ``--query-gpu=memory.used,memory.total`` and
``--query-compute-apps=pid,used_memory``, reporting every fake-engine process on the machine
as a GPU process holding its resident memory (the engines' ``FAKE_READY_MB`` knob really
allocates it).  Everything else is real: the containers, their cgroups, and sparkd's matching
of the reported processes to the container it measures — other tests' engines running on
the machine at the same time are reported too and must not be counted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import aiohttp
import pytest

from harness import engine_model

pytestmark = pytest.mark.podman

MIB = 1024 * 1024
GPU_TOTAL_MIB = 65536

NVIDIA_SMI = f'''#!/usr/bin/env python3
import os, sys

def apps():
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{{pid}}/cmdline", "rb") as f:
                if b"fake_vllm" not in f.read():
                    continue
            with open(f"/proc/{{pid}}/status") as f:
                rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        yield int(pid), rss // 1024

if "--query-compute-apps=pid,used_memory" in sys.argv:
    for pid, mib in apps():
        print(f"{{pid}}, {{mib}}")
elif "--query-gpu=memory.used,memory.total" in sys.argv:
    print(f"{{sum(m for _, m in apps())}}, {GPU_TOTAL_MIB}")
else:
    sys.exit(2)
'''


def stand_in_nvidia_smi(directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    tool = directory / "nvidia-smi"
    tool.write_text(NVIDIA_SMI)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


async def test_a_discrete_gpu_measures_each_containers_own_processes(sparkd_factory, engine_image, tmp_path):
    claim = 0.001  # 66 MiB of the stand-in's 64 GiB: far below what the engine holds
    sparkd = sparkd_factory(
        {
            "a": engine_model(engine_image, claim=claim, env={"FAKE_READY_MB": "300", "FAKE_LOAD_MB": "350", "FAKE_LOAD_DELAY": "2"}),
            "b": engine_model(engine_image, claim=claim, env={"FAKE_READY_MB": "20"}),
        },
        {"gpu": {"memory_probe": "nvidia-smi", "memory_budget": 0.9}},
    )
    await sparkd.start(env=stand_in_nvidia_smi(tmp_path / "bin"))
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "b"))[0] == 200  # another engine, reported by the tool too
        assert (await sparkd.chat(session, "a"))[0] == 200
    a, b = await sparkd.model_status("a"), await sparkd.model_status("b")
    measured = a["footprint"]
    assert measured["total_bytes"] == GPU_TOTAL_MIB * MIB  # the GPU's memory, not the host's
    # a's own processes only: its 300 MB and the interpreter, not b's engine nor any other test's.
    assert 300 * MIB <= measured["ready_bytes"] < 400 * MIB, measured
    assert measured["peak_bytes"] >= 350 * MIB, measured  # sampled during the 2 s load (at most once a second)
    assert b["footprint"]["ready_bytes"] < 100 * MIB, b["footprint"]
    assert a["claim"] == pytest.approx(measured["ready_bytes"] / (GPU_TOTAL_MIB * MIB)) and a["configured_claim"] == claim
    assert a["claim_warnings"] and "set gpu_memory = " in a["claim_warnings"][0], a
    print(
        f"\ndiscrete GPU (stand-in nvidia-smi): a peak {measured['peak_bytes'] / MIB:.0f} MiB, "
        f"ready {measured['ready_bytes'] / MIB:.0f} MiB; b ready {b['footprint']['ready_bytes'] / MIB:.0f} MiB"
    )
