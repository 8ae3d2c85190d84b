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


def test_a_download_stage_says_its_own_eta() -> None:
    from sparkd.engine.progress import DOWNLOAD_PHASE, LoadProgress
    from sparkd.http.loading import WaitView, describe_wait
    from sparkd.scheduler.state import ModelState

    pulling = LoadProgress(DOWNLOAD_PHASE, 0.45, "pulling org/tiny: 1.2 GB of 2.7 GB, 50.0 MB/s", eta_s=30.0)
    view = WaitView("m", ModelState.STARTING, pulling, busy_for_s=25.0, usual_load_s=95.0)
    # The download's ETA from its rate, not the model's usual load time.
    assert describe_wait(view) == "sparkd: loading m, downloading weights 45%, about 30 s left"


def test_pull_job_rate_and_eta_from_the_last_seconds() -> None:
    from sparkd.weights.service import PullJob

    job = PullJob(model="m", repo="org/tiny")
    job.counters.total_bytes = 1_000_000_000
    job.record(100.0, 0)
    assert job.rate_bps is None and job.eta_s is None  # no rate before a second has passed
    job.record(102.0, 100_000_000)
    assert job.rate_bps == 50_000_000 and job.eta_s == 18.0 and job.fraction == 0.1
    for second in range(3, 30):
        job.record(100.0 + second, 100_000_000 + (second - 2) * 10_000_000)
    assert job.rate_bps == pytest.approx(10_000_000)  # the window forgets the fast start
    job.outcome = "done"
    assert job.eta_s is None


def test_an_hf_model_engine_runs_with_the_hub_offline(tmp_path: Path) -> None:
    from sparkd.config import Config
    from sparkd.runtime.spec import render

    assert render(Config(), model(tmp_path)).env["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in render(Config(), ModelConfig(name="m", image="i")).env


def test_a_hub_answer_without_a_commit_hash_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from sparkd.weights import hub

    answer = SimpleNamespace(sha="../../../etc", siblings=[])
    monkeypatch.setattr(hub.HfApi, "model_info", lambda *args, **kwargs: answer)
    with pytest.raises(hub.HubError, match="no commit hash"):
        hub.HubClient(endpoint="http://127.0.0.1:9").listing("org/tiny")


async def test_a_cache_that_cannot_be_written_fails_the_pull_with_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparkd.config import Config
    from sparkd.weights import service

    def unwritable(*args: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "hf"))

    monkeypatch.setattr(service, "pull", unwritable)
    weights = service.WeightService(Config(models={"m": model(tmp_path)}))
    job = weights.start("m")
    with pytest.raises(service.WeightsUnavailable, match=r"could not write the weights of m into .*Permission denied"):
        await weights.wait(job)
    assert job.outcome == "failed" and weights.running() == []


def test_a_partial_blob_renamed_while_it_is_counted_counts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparkd.weights import pull
    from sparkd.weights.cache import CacheDirs

    blobs = tmp_path / repo_folder("org/tiny") / "blobs"
    blobs.mkdir(parents=True)
    gone = blobs / "abc.incomplete"  # listed, then renamed by the download before its size is read
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter([gone]))
    steps = [(RepoFile("model.safetensors", 100), tmp_path)]
    assert pull.done_bytes(steps, "org/tiny") == 0
    assert presence(CacheDirs(tmp_path, tmp_path), "org/tiny").state == "partial"


def test_one_writer_per_partial_blob(tmp_path: Path) -> None:
    import fcntl

    from sparkd.weights.hub import HubClient, HubError

    blob = tmp_path / "blobs" / ("a" * 64)
    blob.parent.mkdir()
    with (tmp_path / "blobs" / (blob.name + ".incomplete")).open("ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(HubError, match="another pull is downloading this file"):
            HubClient(endpoint="http://127.0.0.1:9")._transfer("http://127.0.0.1:9/x", blob, 10, "model.safetensors")
