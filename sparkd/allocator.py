"""glibc's allocator, set up for a process that runs for months.

glibc serves a request above its mmap threshold (128 KiB) with a mapping of its own,
and each time such a block is freed it raises the threshold to that block's size (up
to 32 MiB).  Importing sparkd's libraries already does that (measured: after ``import
sparkd.daemon`` a 260 KiB block comes from the heap).  From then on the 256 KiB buffer
asyncio allocates for every socket read (``recv(256 KiB)``, then shrunk to what
arrived) comes from the main heap and is shrunk in place, and the heap grows with free
holes it does not return.  Measured by ``tests/bench/run.py soak``: about 45 kB of RSS per
1000 requests, nearly all of it free space in glibc's heap (``mallinfo2().fordblks``),
with Python's own objects flat.  Setting the threshold explicitly turns that
adjustment off (mallopt(3)), and the heap stays flat.

An operator's own ``MALLOC_MMAP_THRESHOLD_`` (or ``GLIBC_TUNABLES`` with
``glibc.malloc.mmap_threshold``) wins: then nothing is changed.  Other C libraries
(musl) have no such adjustment and are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3
"""mallopt(3)'s parameter number for the mmap threshold (glibc's malloc.h)."""
MMAP_THRESHOLD_BYTES = 128 * 1024
"""glibc's default threshold, made fixed: blocks from 128 KiB up are mapped and unmapped on their own."""


def operator_chose_threshold(environ: dict[str, str] | os._Environ[str]) -> bool:
    return "MALLOC_MMAP_THRESHOLD_" in environ or "glibc.malloc.mmap_threshold" in environ.get("GLIBC_TUNABLES", "")


def fix_mmap_threshold() -> bool:
    """Turn glibc's dynamic mmap threshold off; True when this process's allocator was changed."""
    if platform.libc_ver()[0] != "glibc" or operator_chose_threshold(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
