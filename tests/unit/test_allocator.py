"""Issue 20: sparkd gives the free pages of glibc's heap back to the system now and then.

Measured by the soak benchmark: sparkd's heap grew by about 20 kB per 1000 requests, all
of it free space glibc kept (asyncio's 256 KiB read buffers, carved from the heap and
shrunk in place once glibc's dynamic mmap threshold had risen).
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sparkd import allocator

REPO = Path(__file__).resolve().parents[2]

# Fills the heap with 64 KiB blocks between small ones that stay (both from malloc, not
# pymalloc), frees the large ones (holes the heap cannot give back from its top), and
# prints the RSS given back by one trim, in kB.
FRAGMENT = """
import sys
from sparkd.allocator import heap_trimmer

def rss_kb():
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0])

large, small = [], []
for _ in range(512):
    large.append(bytearray(64 * 1024))
    small.append(bytes(600))
del large
before = rss_kb()
if sys.argv[1] == "trim":
    heap_trimmer()()
print(before - rss_kb())
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")


def given_back_kb(mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True, env=env, check=True)
    return int(done.stdout.strip())


@glibc_only
def test_free_holes_in_the_heap_stay_resident_without_a_trim() -> None:
    """The control: freed blocks between live ones are kept by glibc."""
    assert given_back_kb("none") < 4 * 1024


@glibc_only
def test_a_trim_gives_the_holes_back() -> None:
    assert given_back_kb("trim") > 24 * 1024, "512 freed blocks of 64 KiB: most of 32 MiB goes back"


async def test_the_heap_is_trimmed_every_period(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(allocator, "heap_trimmer", lambda: lambda: trims.append(1) or 1)
    task = asyncio.create_task(allocator.trim_heap_forever(every_s=0.05))
    await asyncio.sleep(0.4)
    task.cancel()
    assert 3 <= len(trims) <= 9


async def test_without_glibc_nothing_is_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert allocator.heap_trimmer() is None
    await asyncio.wait_for(allocator.trim_heap_forever(every_s=0.01), 1)  # returns at once
