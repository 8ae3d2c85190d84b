#!/usr/bin/env python3
"""What checking a client key costs: ``python tests/bench/key_check_bench.py``.

One SHA-256 of the presented key and one dict lookup, whatever the number of
keys: the figure with 10 000 keys should match the one with 1. In-process, no
daemon or Podman needed.
"""

from __future__ import annotations

import secrets
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparkd.config.keys import ClientKey
from sparkd.http.auth import KeyRing, authenticate

ROUNDS = 20_000


def cost_us(count: int) -> float:
    """Microseconds per ``authenticate`` of the last of ``count`` keys."""
    secrets_by_name = {f"k{i}": f"sk-{secrets.token_hex(24)}" for i in range(count)}
    keys = KeyRing(ClientKey.of(name, secret) for name, secret in secrets_by_name.items())
    sock = SimpleNamespace(family=socket.AF_INET)
    request = SimpleNamespace(
        headers={"Authorization": f"Bearer {secrets_by_name[f'k{count - 1}']}"},
        remote="192.168.1.20",
        transport=SimpleNamespace(get_extra_info=lambda name: sock if name == "socket" else None),
    )
    started = time.perf_counter()
    for _ in range(ROUNDS):
        authenticate(keys, "off", request)
    return (time.perf_counter() - started) / ROUNDS * 1e6


def main() -> None:
    one, many = cost_us(1), cost_us(10_000)
    print(f"key check: {one:.2f} us with 1 key, {many:.2f} us with 10000 keys ({ROUNDS} rounds each)")
    print(f"RESULT key_check_cost {many:.2f} us")


if __name__ == "__main__":
    main()
