"""One model's pull, from the hub's file list to the last file: blocking, run in a worker thread.

Order matters: the weights first, the small files after them and ``config.json``
last, so a cache whose snapshot holds ``config.json`` is complete (``cache.presence``)
without a manifest of sparkd's own, and a cache vLLM filled itself reads the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .cache import COMPLETION_FILE, CacheDirs, file_size, repo_folder, snapshot
from .disk import check_space
from .hub import HubClient, Listing, PullCancelled, write_ref
from .selection import RepoFile, index_file, is_weight, select_files


@dataclass
class PullCounters:
    """What the worker thread tells the event loop (plain attributes: one writer, readers tolerate a stale value)."""

    total_bytes: int = 0
    files: int = 0
    files_done: int = 0
    phase: str = "listing"
    current: str = ""
    steps: list[tuple[RepoFile, Path]] = field(default_factory=list)


def plan(hub: HubClient, dirs: CacheDirs, repo: str, listing: Listing) -> list[tuple[RepoFile, Path]]:
    """(file, the cache it goes into) in download order; reads the shard index from the hub when there is one."""
    index = index_file(listing.files)
    index_text = None
    if index is not None:
        index_text = hub.download(repo, index, listing.commit, dirs.weights).read_text(errors="replace")
    selected = select_files(listing.files, index_text)
    steps: list[tuple[RepoFile, Path]] = [(f, dirs.weights) for f in selected if is_weight(f.name)]
    others = sorted((f for f in selected if not is_weight(f.name)), key=lambda f: f.name == COMPLETION_FILE)
    for f in others:
        steps += [(f, cache) for cache in dirs.all()]
    return steps


def missing_bytes(steps: list[tuple[RepoFile, Path]], repo: str) -> int:
    """What the pull still has to download (files already in their snapshot count nothing)."""
    needed = 0
    for f, cache in steps:
        folder = snapshot(cache, repo)
        if folder is None or not (folder / f.name).exists():
            needed += f.size
    return needed


def pull(model: str, hub: HubClient, dirs: CacheDirs, repo: str, reserve: int, counters: PullCounters) -> None:
    """Pull ``repo`` into ``dirs``; raises ``HubError``, ``DiskTooSmall`` or ``PullCancelled``."""
    listing = hub.listing(repo)
    for cache in dirs.all():
        write_ref(cache, repo, "main", listing.commit)
    steps = plan(hub, dirs, repo, listing)
    counters.steps = steps
    counters.total_bytes = sum(f.size for f, _ in steps)
    counters.files = len(steps)
    counters.phase = "checking disk"
    check_space(model, dirs.weights, missing_bytes(steps, repo), reserve)
    counters.phase = "downloading"
    for f, cache in steps:
        if hub.stop.is_set():
            raise PullCancelled(model)
        counters.current = f.name
        hub.download(repo, f.name, listing.commit, cache)
        counters.files_done += 1
    counters.phase = "done"


def done_bytes(steps: list[tuple[RepoFile, Path]], repo: str) -> int:
    """Bytes of the pull on disk: its finished files and the partial blobs being written (or resumed)."""
    done = sum(f.size for f, _ in steps) - missing_bytes(steps, repo)
    for cache in {cache for _, cache in steps}:
        blobs = cache / repo_folder(repo) / "blobs"
        if blobs.is_dir():
            done += sum(file_size(p) for p in blobs.glob("*.incomplete"))
    return done
