"""The shipped catalog (etc/sparkd.toml + etc/models.d) against the seed's model-catalog.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparkd.config import load_config
from sparkd.http.routing import ModelDirectory
from sparkd.runtime.spec import render

REPO = Path(__file__).resolve().parents[2]
SEED = json.loads((REPO / "tests" / "data" / "seed-model-catalog.json").read_text())
CONFIG = load_config(REPO / "etc" / "sparkd.toml")
SEED_MODELS = {m["name"]: m for m in SEED["models"]}


def arg_value(args: tuple[str, ...], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_every_seed_model_is_in_the_catalog():
    assert len(SEED_MODELS) == 27
    assert set(SEED_MODELS) <= set(CONFIG.models)


@pytest.mark.parametrize("name", sorted(SEED_MODELS))
def test_model_matches_the_seed(name):
    seed, model = SEED_MODELS[name], CONFIG.models[name]
    assert model.hf_model == seed["hf_model"]
    assert model.gpu_memory == pytest.approx(seed["gpu_memory_utilization"])
    assert model.max_model_len == seed["max_model_len"]
    assert model.lifecycle == seed["lifecycle"]
    assert model.tools == seed["tool_support"]
    assert model.multimodal == seed["multimodal"]
    seed_on = seed["enabled"] and not seed["experimental"] and not seed["disabled"]
    assert model.enabled == seed_on
    assert model.experimental == seed["experimental"]
    if not model.enabled:
        assert model.disabled_reason or model.experimental_reason, "an off model says why"


@pytest.mark.parametrize("name", sorted(SEED_MODELS))
def test_model_renders_a_valid_container_spec(name):
    model = CONFIG.models[name]
    spec = render(CONFIG, model)
    args = spec.command
    assert arg_value(args, "--served-model-name") == name
    assert arg_value(args, "--port") == str(spec.engine_port)  # the engine listens where sparkd publishes
    assert float(arg_value(args, "--gpu-memory-utilization")) == pytest.approx(model.gpu_memory)
    assert int(arg_value(args, "--max-model-len")) == model.max_model_len
    assert "nvidia.com/gpu=all" in spec.devices
    kwargs = spec.create_kwargs(host_port=18001, engine_key="internal-key")
    assert kwargs["environment"]["VLLM_API_KEY"] == "internal-key"
    assert kwargs["ports"] == {f"{spec.engine_port}/tcp": ("127.0.0.1", 18001)}
    assert "${" not in json.dumps(kwargs), "no unresolved compose interpolation"
    assert "63TestTOKEN0REPLACEME" not in json.dumps(kwargs), "the seed's shared key is gone"


def test_lifecycle_classes_as_the_seed():
    assert CONFIG.models["gpt-oss-120b"].lifecycle == "exclusive"
    assert CONFIG.models["qwen2.5-1.5b-instruct"].lifecycle == "utility"


def test_gpt_oss_models_get_the_encodings():
    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        spec = render(CONFIG, CONFIG.models[name])
        assert spec.env["TIKTOKEN_ENCODINGS_BASE"] == "/etc/encodings"
        assert {m.target for m in spec.mounts} >= {"/etc/encodings/cl100k_base.tiktoken", "/etc/encodings/o200k_base.tiktoken"}


def test_known_issues_are_readable_notes():
    assert "cudaErrorIllegalInstruction" in CONFIG.models["qwen3-next-80b-a3b-instruct-fp4"].experimental_reason
    assert "Incompatible" in CONFIG.models["nemotron-3-nano-30b-nvfp4"].disabled_reason
    assert any("32,768" in n and "OpenCode" in n for n in CONFIG.models["qwen2.5-coder-7b-instruct"].notes)
    assert any("OpenCode" in n and "tools" in n for n in CONFIG.models["llama-3.3-70b-instruct-fp4"].notes)


def test_seed_routing_gaps_are_closed():
    """The seed routed models through two tables (validator, waker) that disagreed; sparkd has one name per model."""
    directory = ModelDirectory(CONFIG)
    validator = SEED["gateway"]["request_validator"]["model_config"]
    waker = SEED["waker_defaults"]["models_json"]
    gaps = [m["name"] for m in SEED["models"] if not m["routing_86b747b"]["waker_resolution_matches_container_name"] or m["routing_86b747b"]["request_validator"] is None]
    assert {"mistral-nemo-instruct-2407", "deepseek-r1-distill-qwen-14b", "nemotron-3-nano-30b-nvfp4"} <= set(gaps)
    for name in gaps:
        model = directory.lookup(name)
        assert model is not None and render(CONFIG, model).name == f"sparkd-{name}"
    # Names one table routed to a service that never existed are simply not configured (404, not a dead route).
    phantoms = (set(validator) | set(waker)) - set(SEED_MODELS)
    assert phantoms == {"gemma-2-27b-it", "gemma-2-9b-it", "gemma-3-4b-it-qat", "nemotron-nano-12b-v2-vl"}
    assert all(directory.lookup(name) is None for name in phantoms)


def test_demo_model_needs_no_gpu():
    demo = CONFIG.models["smollm2-135m-cpu"]
    spec = render(CONFIG, demo)
    assert demo.enabled and not demo.gpu and demo.gpu_memory == 0
    assert spec.devices == () and spec.image == "localhost/sparkd/smollm2-cpu:latest"
