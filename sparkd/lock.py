"""One daemon per GPU: an exclusive lock file taken at start-up."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockHeld(Exception):
    pass


class GpuLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``LockHeld`` naming the holder and what to do."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(
                f"another sparkd (pid {holder}) already manages this GPU: it holds the lock {self.path}. "
                "Stop it first (`systemctl stop sparkd`), or give this instance its own server.runtime_dir "
                "if it manages a different GPU"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
