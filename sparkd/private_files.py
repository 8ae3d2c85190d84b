"""Files that hold secrets (the keys file, a peer's key, sparkctl's admin key): owner-only or refused.

One check for all of them, so they cannot drift apart: the file is a regular
file, owned by the user reading it (the user sparkd, or sparkctl, runs as),
and neither group nor others may read or write it (mode 0600 or stricter).
Standard library only: sparkctl uses it too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class PrivateFileError(Exception):
    """A secret file that cannot be used; the message says why and how to fix it (never its content)."""


def read_private_file(path: str | Path, *, check_owner: bool = True) -> bytes:
    """The bytes of ``path`` once it passes the owner and mode check.

    ``check_owner=False`` skips the owner check, for a reader that only validates the file
    for the user it is for (``sparkd check-config`` run as root on the daemon's keys file).
    ``FileNotFoundError`` passes through (whether a missing file is fine is the
    caller's decision); every other problem is a ``PrivateFileError``.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            # fstat on the open file: the checked file is the one read, even if the path is swapped meanwhile.
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise PrivateFileError("it is not a regular file")
            user = os.geteuid()
            if check_owner and info.st_uid != user:
                raise PrivateFileError(
                    f"it is owned by uid {info.st_uid}, not by the user reading it (uid {user}); a secret must belong "
                    f"to the user it is for: run `chown <that user> {path}` (the user sparkd runs as, or yourself for sparkctl)"
                )
            if info.st_mode & 0o077:
                raise PrivateFileError(
                    f"it is readable or writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
                    f"it holds a secret: run `chmod 600 {path}`"
                )
            return handle.read()
    except PermissionError:
        raise PrivateFileError("permission denied: it must be readable by the user that reads it (its owner)") from None
    except IsADirectoryError:
        raise PrivateFileError("it is a directory, not a file") from None
