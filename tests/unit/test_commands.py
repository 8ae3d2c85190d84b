"""Operator commands that need no daemon: encodings, client configs, image recipes."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sparkd import encodings
from sparkd.commands import clients
from sparkd.commands import encodings as encodings_command
from sparkd.config import Config, ModelConfig
from sparkd.images import RECIPES, containerfiles_dir, recipe_for
from sparkd.runtime.spec import render


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local HTTP mirror serving fake .tiktoken files; the published hashes are patched to match."""
    root = tmp_path / "mirror"
    root.mkdir()
    patched = []
    for encoding in encodings.ENCODINGS:
        data = f"fake {encoding.file}\n".encode()
        (root / encoding.file).write_bytes(data)
        patched.append(encodings.Encoding(encoding.file, hashlib.sha256(data).hexdigest()))
    monkeypatch.setattr(encodings, "ENCODINGS", tuple(patched))

    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_verifies_and_is_idempotent(tmp_path, mirror, capsys):
    root, url = mirror
    state = tmp_path / "state"
    assert encodings_command.check(str(state)) == 1
    assert encodings_command.fetch(str(state), url) == 0
    assert encodings_command.check(str(state)) == 0
    assert encodings_command.fetch(str(state), url) == 0
    assert "already verified" in capsys.readouterr().out


def test_fetch_refuses_a_corrupt_download(tmp_path, mirror, capsys):
    root, url = mirror
    (root / encodings.ENCODINGS[0].file).write_bytes(b"tampered")
    state = tmp_path / "state"
    assert encodings_command.fetch(str(state), url) == 1
    assert "is not the published" in capsys.readouterr().err
    assert not (encodings.directory(str(state)) / encodings.ENCODINGS[0].file).exists()


def test_models_needing_encodings_get_the_read_only_mounts():
    config = Config(models={})
    model = ModelConfig(name="gpt-oss-20b", image="img", encodings=True)
    spec = render(config, model)
    targets = {m.target: m for m in spec.mounts}
    for encoding in encodings.ENCODINGS:
        mount = targets[f"/etc/encodings/{encoding.file}"]
        assert mount.read_only and mount.source == f"/var/lib/sparkd/encodings/{encoding.file}"
    assert spec.env["TIKTOKEN_ENCODINGS_BASE"] == "/etc/encodings"


def catalog() -> Config:
    return Config(
        models={
            "big": ModelConfig(name="big", image="i", max_model_len=131072, tools="full"),
            "coder": ModelConfig(name="coder", image="i", max_model_len=32768, tools="force-required"),
            "vision": ModelConfig(name="vision", image="i", max_model_len=4096, tools="none", multimodal=True),
            "off": ModelConfig(name="off", image="i", max_model_len=4096, enabled=False),
        }
    )


def test_opencode_config_lists_every_enabled_model_within_its_context():
    document = clients.opencode(catalog(), "http://spark:8009/v1")
    provider = document["provider"]["sparkd"]
    assert provider["options"]["baseURL"] == "http://spark:8009/v1"
    assert set(provider["models"]) == {"big", "coder", "vision"}
    for name, entry in provider["models"].items():
        window = catalog().models[name].max_model_len
        # OpenCode's context is the whole window (prompt + output): keep the seed's margin below max_model_len.
        assert entry["limit"]["context"] <= window - max(512, window // 10)
        assert 0 < entry["limit"]["output"] < entry["limit"]["context"]
    assert provider["models"]["vision"]["tool_call"] is False


def test_a_profile_that_strips_tools_is_advertised_without_tools():
    config = Config(models={"small": ModelConfig(name="small", image="i", max_model_len=8192, tools="full", profile="small-no-tools")})
    assert clients.opencode(config, "http://x/v1")["provider"]["sparkd"]["models"]["small"]["tool_call"] is False


def test_cline_config_lists_every_enabled_model():
    entries = clients.cline(catalog(), "http://spark:8009/v1")["cline"]
    assert [e["openAiModelId"] for e in entries] == ["big", "coder", "vision"]
    assert all(e["openAiModelInfo"]["contextWindow"] < catalog().models[e["openAiModelId"]].max_model_len for e in entries)
    assert entries[2]["openAiModelInfo"]["supportsImages"] is True


def test_every_recipe_has_a_containerfile():
    for recipe in RECIPES:
        assert (containerfiles_dir() / recipe.name / "Containerfile").is_file(), recipe
        assert recipe_for(recipe.image) is recipe


def test_clients_cli_prints_json(tmp_path):
    config = tmp_path / "sparkd.toml"
    config.write_text('[models.m]\nimage = "x"\nmax_model_len = 8192\n')
    result = subprocess.run(
        [sys.executable, "-m", "sparkd", "clients", "opencode", "--config", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["provider"]["sparkd"]["options"]["baseURL"] == "http://127.0.0.1:8009/v1"
    assert Path(config).exists()
