"""Issue 20: glibc's dynamic mmap threshold is off in a serving sparkd.

Measured by the soak benchmark: with the threshold left dynamic, sparkd's heap grew by
about 45 kB per 1000 requests, all of it free space glibc kept (asyncio's 256 KiB read
buffers, carved from the heap and shrunk in place once the threshold had risen).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sparkd import allocator, cli

REPO = Path(__file__).resolve().parents[2]

# Frees a mapped 4 MiB block (a dynamic threshold rises to 4 MiB), then allocates 1 MiB and
# prints whether it got a mapping of its own (1) or came from the heap (0).
PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "fixed":
    from sparkd.allocator import fix_mmap_threshold
    assert fix_mmap_threshold(), "the threshold was not set"
big = bytearray(4 << 20)
del big
before = mallinfo2().hblks
kept = bytearray(1 << 20)
print(mallinfo2().hblks - before)
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")


def mapped_after_a_large_free(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return int(done.stdout.strip())


@glibc_only
def test_dynamic_threshold_puts_large_blocks_on_the_heap() -> None:
    """The control: without the fix, a freed large block moves the next large ones onto the heap."""
    assert mapped_after_a_large_free("default") == 0


@glibc_only
def test_fixed_threshold_keeps_large_blocks_off_the_heap() -> None:
    assert mapped_after_a_large_free("fixed") == 1


@pytest.mark.parametrize("environ", [{"MALLOC_MMAP_THRESHOLD_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}])
def test_an_operators_own_threshold_is_left_alone(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]) -> None:
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert allocator.fix_mmap_threshold() is False


def test_serve_fixes_the_threshold_before_the_daemon_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    monkeypatch.setattr(allocator, "fix_mmap_threshold", lambda: calls.append("allocator") or True)
    import sparkd.daemon

    monkeypatch.setattr(sparkd.daemon, "serve", lambda path: calls.append("serve") or 0)
    assert cli.main(["serve", "--config", str(tmp_path / "sparkd.toml")]) == 0
    assert calls == ["allocator", "serve"]
