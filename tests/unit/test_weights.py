"""The weights package's pure parts: which files a pull takes, presence on disk, the disk check, the token file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sparkd.config import ModelConfig
from sparkd.weights import disk
from sparkd.weights.cache import NoHostCache, cache_dirs, presence, repo_folder
from sparkd.weights.disk import DiskTooSmall, check_space
from sparkd.weights.selection import RepoFile, index_file, select_files
from sparkd.weights.token import TokenFileError, read_token


def names(files: list[RepoFile]) -> list[str]:
    return [f.name for f in files]


def repo(*file_names: str) -> list[RepoFile]:
    return [RepoFile(name, 10) for name in file_names]


def test_safetensors_win_over_duplicate_formats() -> None:
    files = repo(
        "config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin", "model.onnx", "model.gguf",
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md", ".gitattributes",
        "onnx/model.onnx", "original/consolidated.safetensors", "special_tokens_map.json", "merges.txt", "vocab.json",
    )
    assert names(select_files(files)) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "special_tokens_map.json", "merges.txt", "vocab.json",
    ]


def test_sharded_checkpoint_takes_the_shards_its_index_names_only() -> None:
    files = repo(
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "consolidated.safetensors", "pytorch_model.bin.index.json",
        "pytorch_model-00001-of-00002.bin",
    )
    assert index_file(files) == "model.safetensors.index.json"
    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    assert names(select_files(files, index)) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    ]


def test_bin_checkpoint_when_there_is_no_safetensors() -> None:
    files = repo("config.json", "pytorch_model.bin", "tokenizer.model", "model.gguf")
    assert names(select_files(files)) == ["config.json", "pytorch_model.bin", "tokenizer.model"]


def model(tmp_path: Path, *args: str, **extra: object) -> ModelConfig:
    volumes = (f"{tmp_path}/hf:/root/.cache/huggingface", f"{tmp_path}/models:/models")
    return ModelConfig(name="m", image="i", args=args, hf_model="org/tiny", volumes=volumes, **extra)  # type: ignore[arg-type]


def fill(cache: Path, files: dict[str, bytes], commit: str = "c0ffee") -> None:
    folder = cache / repo_folder("org/tiny")
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        blob = folder / "blobs" / f"blob-{name}"
        blob.write_bytes(content)
        (snapshot / name).symlink_to(blob)


def test_cache_dirs_follow_the_volumes_and_download_dir(tmp_path: Path) -> None:
    dirs = cache_dirs(model(tmp_path))
    assert dirs.hub == dirs.weights == tmp_path / "hf" / "hub"
    dirs = cache_dirs(model(tmp_path, "--download-dir", "/models"))
    assert (dirs.hub, dirs.weights) == (tmp_path / "hf" / "hub", tmp_path / "models")
    with pytest.raises(NoHostCache, match="not mounted from the host"):
        cache_dirs(ModelConfig(name="m", image="i", hf_model="org/tiny"))


def test_presence_absent_partial_complete(tmp_path: Path) -> None:
    dirs = cache_dirs(model(tmp_path))
    assert presence(dirs, "org/tiny").state == "absent"
    fill(dirs.hub, {"model.safetensors": b"x" * 100})
    partial = presence(dirs, "org/tiny")
    assert (partial.state, partial.size) == ("partial", 100)
    fill(dirs.hub, {"config.json": b"{}"})
    complete = presence(dirs, "org/tiny")
    assert (complete.state, complete.size) == ("complete", 102)


def test_presence_of_a_sharded_checkpoint_needs_every_shard(tmp_path: Path) -> None:
    dirs = cache_dirs(model(tmp_path, "--download-dir", "/models"))
    index = json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}).encode()
    fill(dirs.weights, {"model.safetensors.index.json": index, "s1.safetensors": b"1"})
    fill(dirs.hub, {"config.json": b"{}"})
    assert presence(dirs, "org/tiny").state == "partial"
    fill(dirs.weights, {"s2.safetensors": b"2"})
    assert presence(dirs, "org/tiny").state == "complete"


def test_disk_check_refuses_with_sizes_and_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk, "free_bytes", lambda path: 5_000_000_000)
    check_space("m", tmp_path / "not" / "yet", 3_000_000_000, 1_000_000_000)
    with pytest.raises(DiskTooSmall) as refused:
        check_space("m", tmp_path, 4_500_000_000, 1_000_000_000)
    message = str(refused.value)
    assert "4.5 GB more" in message and "5.0 GB free" in message and "weights.reserve_bytes" in message


def test_free_bytes_looks_at_the_nearest_existing_directory(tmp_path: Path) -> None:
    assert disk.free_bytes(tmp_path / "a" / "b") == disk.shutil.disk_usage(tmp_path).free


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "hf-token"
    assert read_token(str(path)) is None  # no file: public repositories only
    path.write_text("hf_secret\n")
    path.chmod(0o600)
    assert read_token(str(path)) == "hf_secret"
    path.chmod(0o644)
    with pytest.raises(TokenFileError) as refused:
        read_token(str(path))
    assert "chmod 600" in str(refused.value) and "hf_secret" not in str(refused.value)
    os.chmod(path, 0o600)
    path.write_text("")
    assert read_token(str(path)) is None
