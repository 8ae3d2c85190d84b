"""Operator commands that need no daemon: encodings, client configs, image recipes."""

from __future__ import annotations

import hashlib
import http.server
import json
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sparkd import encodingfiles
from sparkd.commands import clients
from sparkd.commands import encodings as encodings_command
from sparkd.config import Config, ModelConfig
from sparkd.imagerecipes import RECIPES, containerfiles_dir, recipe_for
from sparkd.runtime.spec import render


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local HTTP mirror serving fake .tiktoken files; the published hashes are patched to match."""
    root = tmp_path / "mirror"
    root.mkdir()
    patched = []
    for encoding in encodingfiles.ENCODINGS:
        data = f"fake {encoding.file}\n".encode()
        (root / encoding.file).write_bytes(data)
        patched.append(encodingfiles.Encoding(encoding.file, hashlib.sha256(data).hexdigest()))
    monkeypatch.setattr(encodingfiles, "ENCODINGS", tuple(patched))

    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_verifies_and_is_idempotent(tmp_path, mirror, capsys):
    _root, url = mirror
    state = tmp_path / "state"
    assert encodings_command.check(str(state)) == 1
    assert encodings_command.fetch(str(state), url) == 0
    assert encodings_command.check(str(state)) == 0
    assert encodings_command.fetch(str(state), url) == 0
    assert "already verified" in capsys.readouterr().out


def test_fetch_refuses_a_corrupt_download(tmp_path, mirror, capsys):
    root, url = mirror
    (root / encodingfiles.ENCODINGS[0].file).write_bytes(b"tampered")
    state = tmp_path / "state"
    assert encodings_command.fetch(str(state), url) == 1
    assert "is not the published" in capsys.readouterr().err
    assert not (encodingfiles.directory(str(state)) / encodingfiles.ENCODINGS[0].file).exists()


def test_models_needing_encodings_get_the_read_only_mounts():
    config = Config(models={})
    model = ModelConfig(name="gpt-oss-20b", image="img", encodings=True)
    spec = render(config, model)
    targets = {m.target: m for m in spec.mounts}
    for encoding in encodingfiles.ENCODINGS:
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


def test_cline_vscode_settings_list_every_enabled_model_with_the_extensions_keys_only():
    entries = clients.cline_vscode(catalog(), "http://spark:8009/v1")["cline"]
    assert [e["openAiModelId"] for e in entries] == ["big", "coder", "vision"]
    assert all(e["openAiModelInfo"]["contextWindow"] < catalog().models[e["openAiModelId"]].max_model_len for e in entries)
    assert entries[2]["openAiModelInfo"]["supportsImages"] is True
    for entry in entries:  # the keys of the extension's "OpenAI Compatible" provider, nothing it does not know (notes)
        assert set(entry) == {"apiProvider", "openAiBaseUrl", "openAiApiKey", "openAiModelId", "openAiModelInfo"}
        assert set(entry["openAiModelInfo"]) == {"contextWindow", "maxTokens", "supportsImages", "supportsPromptCache"}


def test_cline_cli_script_runs_cline_auth_for_the_first_model_and_offers_the_others():
    script = clients.cline_cli(catalog(), "http://spark:8009/v1")
    commands = [line for line in script.splitlines() if "cline auth" in line]
    assert [line.startswith("#") for line in commands] == [False, True, True]
    words = shlex.split(commands[0])
    assert words == [
        "cline", "auth", "--provider", "openai-compatible", "--apikey", "$SPARKD_API_KEY", "--modelid", "big",
        "--baseurl", "http://spark:8009/v1",
    ]
    assert '"$SPARKD_API_KEY"' in commands[0]  # expanded by the shell that runs it, never written into the script
    assert "--modelid coder" in commands[1] and "--modelid vision" in commands[2]


def test_cline_cli_script_quotes_what_the_shell_would_split():
    for url in ("http://spark:8009/v1; rm -rf ~", "http://x KEY y/v1", "http://x/$HOME/v1"):
        script = clients.cline_cli(catalog(), url, [catalog().models["big"]])
        command = next(line for line in script.splitlines() if line.startswith("cline auth"))
        assert shlex.split(command)[-1] == url and shlex.split(command)[5] == "$SPARKD_API_KEY"
    assert "no model" in clients.cline_cli(catalog(), "http://x/v1", [])


def host(images=("i",), podman_error=None, devices=("nvidia.com/gpu=all",), encoding_problems=()) -> clients.HostFacts:
    return clients.HostFacts(frozenset(images), podman_error, frozenset(devices), tuple(encoding_problems))


def test_only_models_this_host_can_run_are_listed():
    config = Config(
        models={
            "ready": ModelConfig(name="ready", image="present", gpu=False),
            "noimage": ModelConfig(name="noimage", image="absent", gpu=False),
            "gpu": ModelConfig(name="gpu", image="present", gpu=True),
            "gptoss": ModelConfig(name="gptoss", image="present", gpu=False, encodings=True),
            "off": ModelConfig(name="off", image="present", gpu=False, enabled=False),
        }
    )
    facts = host(images=("present",), devices=(), encoding_problems=("o200k_base.tiktoken is missing",))
    kept, left_out = clients.runnable_models(config, facts)
    assert [m.name for m in kept] == ["ready"]
    reasons = dict(left_out)
    assert set(reasons) == {"noimage", "gpu", "gptoss"}
    assert "absent is missing" in reasons["noimage"] and "podman pull absent" in reasons["noimage"]
    assert "CDI" in reasons["gpu"] and "nvidia.com/gpu=all" in reasons["gpu"]
    assert "sparkd encodings fetch" in reasons["gptoss"]
    assert clients.runnable_models(config, host(images=("present", "absent")))[0][-1].name == "gptoss"
    # --all: every enabled model, whatever the host has
    assert [m.name for m in clients.runnable_models(config, None)[0]] == ["ready", "noimage", "gpu", "gptoss"]
    document = clients.opencode(config, "http://x/v1", kept)
    assert list(document["provider"]["sparkd"]["models"]) == ["ready"]


def test_without_podman_no_image_counts_as_present_and_the_reason_says_why():
    config = Config(models={"m": ModelConfig(name="m", image="present", gpu=False)})
    kept, left_out = clients.runnable_models(config, host(images=(), podman_error="Podman does not answer at unix:///x"))
    assert kept == [] and "Podman does not answer" in left_out[0][1]


def test_every_recipe_has_a_containerfile():
    for recipe in RECIPES:
        assert (containerfiles_dir() / recipe.name / "Containerfile").is_file(), recipe
        assert recipe_for(recipe.image) is recipe


def test_clients_cli_prints_json(tmp_path):
    config = tmp_path / "sparkd.toml"
    config.write_text('[models.m]\nimage = "localhost/sparkd-test/no-such-image:none"\nmax_model_len = 8192\n')
    command = [sys.executable, "-m", "sparkd", "clients", "opencode", "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["provider"]["sparkd"]["options"]["baseURL"] == "http://127.0.0.1:8009/v1"
    assert document["provider"]["sparkd"]["models"] == {}  # its image is nowhere: left out, and stderr says why
    assert "left out m:" in result.stderr and "--all" in result.stderr
    listed = subprocess.run([*command, "--all"], capture_output=True, text=True, check=False)
    assert list(json.loads(listed.stdout)["provider"]["sparkd"]["models"]) == ["m"] and listed.stderr == ""
    assert Path(config).exists()
