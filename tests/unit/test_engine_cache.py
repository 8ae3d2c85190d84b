"""Engine compile caches: mounted from the state directory, keyed by image, shared by the models of one image."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import to_toml
from sparkd.config import ConfigError, load_config
from sparkd.runtime.spec import render

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, extra: dict | None = None):
    document = {
        "server": {"state_dir": "/var/lib/sparkd-test"},
        **(extra or {}),
        "models": {
            "a": {"image": "localhost/vllm:1", "gpu": False},
            "b": {"image": "localhost/vllm:1", "gpu": False},
            "c": {"image": "localhost/vllm:1", "gpu": False, "engine_cache": False},
        },
    }
    path = tmp_path / "sparkd.toml"
    path.write_text(to_toml(document))
    return load_config(path)


def test_models_of_one_image_share_the_cache_directories_of_that_image(tmp_path):
    config = _config(tmp_path)
    a, b = (render(config, config.models[name]) for name in ("a", "b"))
    mounts = a.cache_mounts("0123abcd")
    assert {m.target: m.source for m in mounts} == {
        "/root/.cache/vllm": "/var/lib/sparkd-test/engine-cache/0123abcd/root_.cache_vllm",
        "/tmp/torchinductor_root": "/var/lib/sparkd-test/engine-cache/0123abcd/tmp_torchinductor_root",
        "/root/.triton": "/var/lib/sparkd-test/engine-cache/0123abcd/root_.triton",
        "/root/.cache/flashinfer": "/var/lib/sparkd-test/engine-cache/0123abcd/root_.cache_flashinfer",
        "/root/.nv/ComputeCache": "/var/lib/sparkd-test/engine-cache/0123abcd/root_.nv_ComputeCache",
    }
    assert b.cache_mounts("0123abcd") == mounts
    assert a.cache_mounts("ffff0000") != mounts  # another image (another vLLM) never shares them
    volumes = a.create_kwargs(18001, "k", "0123abcd")["volumes"]
    assert volumes["/var/lib/sparkd-test/engine-cache/0123abcd/root_.cache_vllm"] == {"bind": "/root/.cache/vllm", "mode": "rw"}


def test_a_model_can_opt_out_and_the_paths_are_configurable(tmp_path):
    config = _config(tmp_path, {"engine_cache": {"paths": ["/cache/only"]}})
    assert render(config, config.models["c"]).cache_mounts("x") == ()
    assert [m.target for m in render(config, config.models["a"]).cache_mounts("x")] == ["/cache/only"]


@pytest.mark.parametrize("bad", ["relative/dir", "/a/../etc", "/a:/b"])
def test_a_cache_path_that_is_not_a_plain_absolute_directory_is_refused(tmp_path, bad):
    with pytest.raises(ConfigError) as refused:
        _config(tmp_path, {"engine_cache": {"paths": [bad]}})
    assert "engine_cache.paths[0]" in str(refused.value)


def test_the_shipped_configuration_persists_the_vllm_and_gpu_jit_caches():
    config = load_config(REPO / "etc" / "sparkd.toml")
    assert {"/root/.cache/vllm", "/tmp/torchinductor_root", "/root/.triton", "/root/.cache/flashinfer", "/root/.nv/ComputeCache"} <= set(config.engine_cache.paths)
    catalog = [m for m in config.models.values() if m.image.startswith(("localhost/sparkd/vllm", "nvcr.io"))]
    assert catalog and all(render(config, m).caches == config.engine_cache.paths for m in catalog)
