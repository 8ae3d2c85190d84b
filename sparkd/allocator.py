"""Hand the C heap's free pages back to the system now and then: a daemon that runs for months must not grow.

glibc serves a block above its mmap threshold (128 KiB) with a mapping of its own, and
each time such a block is freed it raises the threshold to that block's size (up to 32
MiB).  Importing sparkd's libraries already does that (measured: after ``import
sparkd.daemon`` a 260 KiB block comes from the heap).  From then on the 256 KiB buffer
asyncio allocates for every socket read (``recv(256 KiB)``, then shrunk to what arrived)
is carved from the main heap and shrunk in place, and the heap fills with free holes that
glibc keeps: measured by ``tests/bench/run.py soak``, about 20 kB of RSS per 1000
requests over the first 100 000, all of it free space (``mallinfo2().fordblks``), with
Python's own objects flat.

Fixing the threshold (mallopt) stops that but maps and unmaps a buffer for every read:
+16 us of kernel time per streamed chunk in the proxy benchmark.  Instead, every
``TRIM_EVERY_S`` ``malloc_trim(0)`` gives the pages of those holes back to the system
(madvise), in a worker thread; the holes stay usable, a reused page costs one page fault.
On other C libraries (musl) nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import platform
from collections.abc import Callable

TRIM_EVERY_S = 10.0
"""How often free heap pages go back to the system: the RSS a burst leaves behind lasts at most this long."""


def heap_trimmer() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)``, or None where there is no glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int

    def trim() -> int:
        return int(malloc_trim(0))

    return trim


async def trim_heap_forever(every_s: float = TRIM_EVERY_S) -> None:
    """Give free heap pages back every ``every_s`` seconds, until cancelled."""
    trim = heap_trimmer()
    if trim is None:
        return
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(trim)
