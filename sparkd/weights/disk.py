"""The disk check before a pull: what it still needs against the free space, less a reserve."""

from __future__ import annotations

import shutil
from pathlib import Path


class DiskTooSmall(Exception):
    """A pull that would leave less than the reserve free; the message names sizes, place and what to do."""


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) ``path``."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def check_space(model: str, path: Path, needed: int, reserve: int) -> None:
    free = free_bytes(path)
    if free - needed < reserve:
        raise DiskTooSmall(
            f"cannot pull model {model}: it needs {human(needed)} more in {path}, which has {human(free)} free, "
            f"and {human(reserve)} must stay free (weights.reserve_bytes); free some space there or lower the reserve"
        )
