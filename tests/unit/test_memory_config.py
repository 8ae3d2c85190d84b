"""Issue 16 acceptance c and points 1-3: the new keys, their checks, and what they render to."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from sparkd.config import ConfigError, load_config
from sparkd.config.schema import ModelConfig
from sparkd.runtime.spec import render
from sparkd.scheduler.footprint import Footprint
from sparkd.scheduler.runner import ModelRunner

GIB = 1024**3


def write(tmp_path: Path, model_lines: str, gpu_lines: str = "", args: str = '["--port", "8000"]') -> Path:
    path = tmp_path / "sparkd.toml"
    path.write_text(textwrap.dedent(f"""
        [gpu]
        {gpu_lines}
        [models.alpha]
        image = "localhost/sparkd-test-engine:latest"
        args = {args}
        gpu_memory = 0.5
        sleep_gpu_memory = 0.05
        {model_lines}
        """))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(p) for p in caught.value.problems]


def test_the_new_keys_load(tmp_path):
    config = load_config(write(
        tmp_path, "sleep_mode = true\nsleep_level = 1\nkv_cache_bytes = 8589934592",
        "min_free = 8589934592\nconcurrent_loads = 2",
    ))
    assert (config.gpu.min_free, config.gpu.concurrent_loads) == (8 * GIB, 2)
    model = config.models["alpha"]
    assert (model.sleep_level, model.kv_cache_bytes, model.source) == (1, 8 * GIB, str(tmp_path / "sparkd.toml"))
    defaults = load_config(write(tmp_path, ""))
    assert (defaults.gpu.min_free, defaults.gpu.concurrent_loads) == (4 * GIB, 0)
    assert defaults.models["alpha"].sleep_level is None


@pytest.mark.parametrize(("lines", "gpu", "expected"), [
    ("kv_cache_bytes = 2", "args", "either kv_cache_bytes or --kv-cache-memory-bytes"),
    ("sleep_mode = true\nsleep_level = 3", "", "models.alpha.sleep_level: expected 1 (weights offloaded to CPU memory) or 2"),
    ('sleep_mode = true\nsleep_level = "deep"', "", "models.alpha.sleep_level: expected an integer"),
    ("sleep_level = 2", "", "models.alpha.sleep_level: expected set together with sleep_mode = true"),
    ("kv_cache_bytes = 0", "", "models.alpha.kv_cache_bytes: expected a positive number of bytes"),
    ("", "min_free = -1", "gpu.min_free: expected"),
    ("", "concurrent_loads = -2", "gpu.concurrent_loads: expected"),
    ("", 'min_free = "4GiB"', "gpu.min_free: expected an integer"),
])
def test_bad_values_name_their_key(tmp_path, lines, gpu, expected):
    if gpu == "args":
        found = problems(write(tmp_path, lines, args='["--kv-cache-memory-bytes=1"]'))
    else:
        found = problems(write(tmp_path, lines, gpu))
    assert any(expected in problem for problem in found), found


def test_check_config_refuses_a_bad_sleep_level_naming_it(tmp_path):
    path = write(tmp_path, "sleep_mode = true\nsleep_level = 3")
    result = subprocess.run([sys.executable, "-m", "sparkd", "check-config", "--no-images", "--config", str(path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "models.alpha.sleep_level: expected 1 (weights offloaded to CPU memory) or 2 (weights discarded), found integer 3" in result.stderr


def test_sparkd_adds_the_sleep_mode_flag_its_env_and_the_kv_cache_size(tmp_path):
    config = load_config(write(tmp_path, "sleep_mode = true\nkv_cache_bytes = 4294967296"))
    spec = render(config, config.models["alpha"])
    assert spec.command[-3:] == ("--kv-cache-memory-bytes", "4294967296", "--enable-sleep-mode")
    assert spec.env["VLLM_SERVER_DEV_MODE"] == "1"
    given = replace(config.models["alpha"], args=("--port", "8000", "--enable-sleep-mode"), env={"VLLM_SERVER_DEV_MODE": "0"})
    spec = render(config, given)
    assert spec.command.count("--enable-sleep-mode") == 1 and spec.env["VLLM_SERVER_DEV_MODE"] == "0"  # the operator's own wins
    plain = render(config, replace(config.models["alpha"], sleep_mode=False, kv_cache_bytes=None))
    assert "--enable-sleep-mode" not in plain.command and "VLLM_SERVER_DEV_MODE" not in plain.env


def runner(model: ModelConfig, unified: bool, footprint: Footprint | None = None) -> ModelRunner:
    made = ModelRunner(config=model, spec=None, unified_memory=unified)  # type: ignore[arg-type]
    if footprint is not None:
        made.footprint = footprint
    return made


def test_the_sleep_level_and_the_claim_asleep_follow_the_memory():
    model = ModelConfig(name="m", image="i", gpu_memory=0.5, sleep_mode=True, sleep_gpu_memory=0.05)
    assert runner(model, unified=True).sleep_level == 2 and runner(model, unified=False).sleep_level == 1
    assert runner(model, unified=True).sleep_claim == 0.05  # level 2: the weights are discarded
    level1 = replace(model, sleep_level=1)
    assert runner(level1, unified=True).sleep_claim == 0.5  # level 1 on unified memory keeps the weights in the pool
    assert runner(level1, unified=False).sleep_claim == 0.05  # on a discrete GPU they go to host memory
    # After a sleep, its measured release decides (at least the configured claim); a measurement at
    # another level says nothing about this one.
    measured = Footprint(asleep=30 * GIB, sleep_level=1, total=100 * GIB)
    assert runner(level1, unified=True, footprint=measured).sleep_claim == 0.3
    assert runner(model, unified=True, footprint=measured).sleep_claim == 0.05
    tiny = Footprint(asleep=1 * GIB, sleep_level=2, total=100 * GIB)
    assert runner(model, unified=True, footprint=tiny).sleep_claim == 0.05
