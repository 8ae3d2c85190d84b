"""Load progress parsing and the memory gauge used to wait for reclaimed memory."""

from __future__ import annotations

import asyncio
import time

import pytest

from sparkd.engine.progress import parse_line
from sparkd.hardware.memory import MemoryGauge, parse_meminfo, parse_nvidia_smi


@pytest.mark.parametrize(
    "line, phase, fraction",
    [
        ("Loading safetensors checkpoint shards:  50% Completed | 2/4 [00:02<00:02,  1.00s/it]", "loading weights", 0.5),
        ("Loading safetensors checkpoint shards: 100% Completed | 15/15 [01:02<00:00]", "loading weights", 1.0),
        ("Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  37%|███▋      | 25/67 [00:03<00:05]", "capturing CUDA graphs", 25 / 67),
        ("INFO 11-27 [gpu_worker.py] Available KV cache memory: 61.2 GiB", "profiling memory", None),
        ("INFO:     Application startup complete.", "ready", None),
        ("Downloading 'model-00001-of-00004.safetensors'", "downloading weights", None),
    ],
)
def test_vllm_log_lines_give_progress(line, phase, fraction):
    progress = parse_line(line)
    assert progress is not None and progress.phase == phase
    if fraction is None:
        assert progress.fraction is None
    else:
        assert progress.fraction == pytest.approx(fraction)


# Lines of vLLM 0.32's real start-up (the CPU build in tests/images/real_vllm), as sparkd reads them.
REAL_VLLM_032 = [
    (("(EngineCore pid=24) INFO 12-01 15:09:42 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: "
     "model='/opt/model/SmolLM2-135M-Instruct', download_dir=None, load_format=auto"), None),
    (("(APIServer pid=1) WARNING 12-01 14:37:37 [vllm.py:1703] Enforce eager set, disabling torch.compile, "
     "CUDAGraphs, and JIT kernel warmup."), None),
    ("Loading safetensors checkpoint shards:   0% Completed | 0/1 [00:00<?, ?it/s]", ("loading weights", 0.0)),
    ("(Worker pid=37) INFO 12-01 14:38:09 [default_loader.py:501] Loading weights took 1.32 seconds", ("loading weights", None)),
    (("(EngineCore pid=24) INFO 12-01 14:38:10 [kv_cache_utils.py:2327] CPU KV cache size: 46,592 tokens, "
     "Maximum concurrency for 4,096 tokens per request: 11.38x"), ("profiling memory", None)),
    ("(EngineCore pid=24) INFO 12-01 14:39:40 [backends.py:622] Dynamo bytecode transform time: 9.81 s", ("compiling", None)),
    ("(Worker pid=37) INFO 12-01 14:51:30 [cpu_model_runner.py:87] Warming up model for the compilation...", ("compiling", None)),
    (("(Worker pid=37) INFO 12-01 14:53:27 [decorators.py:743] [backbone] saved AOT compiled function to "
     "/root/.cache/vllm/torch_compile_cache/torch_aot_compile/4295cd1c"), ("compiling", None)),
    ("(APIServer pid=1) INFO 12-01 14:38:19 [entry.py:140] Starting vLLM server on http://0.0.0.0:8000", ("starting API server", None)),
    ("INFO:     Application startup complete.", ("ready", None)),
]


@pytest.mark.parametrize("line,expected", REAL_VLLM_032)
def test_the_real_vllm_032_start_up_lines(line, expected):
    progress = parse_line(line)
    assert (progress.phase, progress.fraction) == expected if expected else progress is None, progress


def test_unrelated_lines_say_nothing():
    assert parse_line("INFO 11-27 12:00:00 [api_server.py] vLLM API server version 0.11") is None


def test_nvidia_smi_parsing_discrete_and_unified():
    reading = parse_nvidia_smi("1024, 81920\n")
    assert reading is not None and reading.fraction == pytest.approx((81920 - 1024) / 81920)
    assert parse_nvidia_smi("[N/A], [N/A]\n") is None  # GB10: no per-GPU memory numbers


def test_meminfo_parsing():
    reading = parse_meminfo("MemTotal:       131072000 kB\nMemFree: 1 kB\nMemAvailable:    65536000 kB\n")
    assert reading is not None and reading.fraction == pytest.approx(0.5)
    assert parse_meminfo("garbage") is None


async def test_wait_for_returns_once_memory_is_back(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1000 kB\nMemAvailable: 100 kB\n")
    gauge = MemoryGauge("meminfo", meminfo=str(meminfo))

    async def release_later():
        await asyncio.sleep(0.3)
        meminfo.write_text("MemTotal: 1000 kB\nMemAvailable: 900 kB\n")

    began = time.monotonic()
    releaser = asyncio.create_task(release_later())
    waited = await gauge.wait_for(0.8, timeout=5)
    await releaser
    assert 0.25 <= waited < 2 and time.monotonic() - began < 2


async def test_wait_for_is_bounded(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1000 kB\nMemAvailable: 100 kB\n")
    waited = await MemoryGauge("meminfo", meminfo=str(meminfo)).wait_for(0.8, timeout=0.3)
    assert 0.3 <= waited < 1.0


async def test_no_probe_means_no_wait():
    gauge = MemoryGauge("auto", nvidia_smi=None)
    await gauge.resolve()
    assert gauge.mode == "none"
    assert await gauge.wait_for(0.9, timeout=5) < 0.05
