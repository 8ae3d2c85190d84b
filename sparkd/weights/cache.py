"""Where a model's weights live on this host, and whether they are there (complete, partial, absent).

The cache is huggingface_hub's layout (``models--<org>--<name>/{blobs,refs,snapshots}``)
in the host directory a model's container mounts at its Hugging Face cache; a model
whose args name vLLM's ``--download-dir`` reads its weight files from there instead,
and its config and tokenizer from the Hugging Face cache, so both are filled.
Presence reads only the disk: no network, usable by doctor, ``/v1/models`` and a start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from ..config import ModelConfig
from ..runtime.spec import parse_volume
from .selection import INDEX_SUFFIX, WEIGHT_FORMATS, is_weight, shard_names

DEFAULT_HF_HOME = "/root/.cache/huggingface"
DOWNLOAD_DIR_FLAG = "--download-dir"
COMPLETION_FILE = "config.json"
"""Pulled last: its presence says every file pulled before it is complete (see ``pull``)."""
PresenceState = Literal["complete", "partial", "absent"]


class NoHostCache(Exception):
    """The container's cache path is not mounted from the host: there is nowhere to pull to."""


@dataclass(frozen=True)
class CacheDirs:
    hub: Path
    """The host directory of the container's Hugging Face hub cache (config, tokenizer, templates)."""
    weights: Path
    """Where the weight files go: the host side of ``--download-dir``, else ``hub``."""

    def all(self) -> tuple[Path, ...]:
        return (self.hub,) if self.hub == self.weights else (self.hub, self.weights)


@dataclass(frozen=True)
class Presence:
    state: PresenceState
    size: int
    """Bytes of the repository's files on disk (partial downloads included)."""


def repo_folder(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


def container_paths(model: ModelConfig) -> tuple[str, str]:
    """(the container's hub cache, the container's weight directory) of ``model``."""
    hub = model.env.get("HF_HUB_CACHE") or f"{model.env.get('HF_HOME', DEFAULT_HF_HOME).rstrip('/')}/hub"
    weights = hub
    for index, arg in enumerate(model.args):
        if arg == DOWNLOAD_DIR_FLAG and index + 1 < len(model.args):
            weights = model.args[index + 1]
        elif arg.startswith(DOWNLOAD_DIR_FLAG + "="):
            weights = arg.split("=", 1)[1]
    return hub, weights


def host_path(model: ModelConfig, container_path: str) -> Path:
    """The host directory a container path of ``model`` is, through its volumes (the deepest mount wins)."""
    target = PurePosixPath(container_path)
    best: tuple[int, Path] | None = None
    for volume in model.volumes:
        mount = parse_volume(volume)
        mounted = PurePosixPath(mount.target)
        if (target == mounted or mounted in target.parents) and (best is None or len(mounted.parts) > best[0]):
            best = (len(mounted.parts), Path(mount.source) / target.relative_to(mounted))
    if best is None:
        raise NoHostCache(
            f"model {model.name}: its container path {container_path} is not mounted from the host, so pulled "
            f"weights would not reach the engine; add a volume for it (e.g. `/var/lib/sparkd/huggingface:"
            f"{DEFAULT_HF_HOME}` in [defaults] volumes)"
        )
    return best[1]


def cache_dirs(model: ModelConfig) -> CacheDirs:
    hub, weights = container_paths(model)
    return CacheDirs(hub=host_path(model, hub), weights=host_path(model, weights))


def snapshot(cache: Path, repo: str, revision: str = "main") -> Path | None:
    """The snapshot folder ``revision`` points at, else the newest one; None when there is none."""
    folder = cache / repo_folder(repo)
    ref = folder / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        if (folder / "snapshots" / commit).is_dir():
            return folder / "snapshots" / commit
    snapshots = folder / "snapshots"
    candidates = [p for p in snapshots.iterdir() if p.is_dir()] if snapshots.is_dir() else []
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def weights_complete(folder: Path | None) -> bool:
    """A snapshot holds a full checkpoint: every shard its index names, or a single weight file."""
    if folder is None:
        return False
    names = [p.name for p in folder.iterdir() if p.exists()]
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX) and is_weight(n)]
    for index in indexes:
        shards = shard_names((folder / index).read_text(errors="replace"))
        if shards and all((folder / shard).exists() for shard in shards):
            return True
    return not indexes and any(n.endswith(WEIGHT_FORMATS) for n in names)


def file_size(path: Path) -> int:
    """0 for a file gone meanwhile: a running pull renames its partial blob when the file is complete."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def bytes_on_disk(dirs: CacheDirs, repo: str) -> int:
    total = 0
    for cache in dirs.all():
        blobs = cache / repo_folder(repo) / "blobs"
        if blobs.is_dir():
            total += sum(file_size(p) for p in blobs.iterdir())
    return total


def presence(dirs: CacheDirs, repo: str) -> Presence:
    """Reads the disk: call it from a worker thread in the daemon."""
    size = bytes_on_disk(dirs, repo)
    hub_snapshot = snapshot(dirs.hub, repo)
    complete = (
        hub_snapshot is not None and (hub_snapshot / COMPLETION_FILE).exists()
        and weights_complete(snapshot(dirs.weights, repo))
    )
    if complete:
        return Presence("complete", size)
    started = any((cache / repo_folder(repo)).exists() for cache in dirs.all())
    return Presence("partial" if started else "absent", size)
