#!/usr/bin/env python3
"""Summarize a py-spy ``--format raw`` profile (collapsed stacks): where the samples go.

    python tests/bench/profile_top.py PROFILE.txt [--top 25] [--thread MainThread]

Prints, for the samples of the chosen thread (default: the thread with the most
samples; sparkd's event loop): self time by function, inclusive time by
function, and self time by package (sparkd, aiohttp, asyncio, json, ...).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def package(path: str) -> str:
    for marker in ("site-packages/", "lib/python3", "/sparkd/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            if marker == "/sparkd/":
                return "sparkd/" + tail.split("/", 1)[0]
            if marker == "lib/python3":
                tail = tail.split("/", 1)[1] if "/" in tail else tail
                return "stdlib:" + tail.split("/", 1)[0].removesuffix(".py")
            return tail.split("/", 1)[0]
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--thread", help="thread name prefix (default: the busiest thread)")
    args = parser.parse_args()

    stacks: dict[str, Counter[tuple[str, ...]]] = {}
    for line in Path(args.profile).read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        body = tuple(f for f in frames if not f.startswith(("thread", "process")))
        stacks.setdefault(thread, Counter())[body] += int(count)
    totals = {thread: sum(c.values()) for thread, c in stacks.items()}
    for thread, total in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{total:8d} samples  {thread}")
    chosen = next(t for t in stacks if args.thread in t) if args.thread else max(totals, key=totals.get)
    samples = stacks[chosen]
    total = totals[chosen]
    idle = sum(n for body, n in samples.items() if body and ("select (selectors.py" in body[-1] or "epoll" in body[-1]))
    print(f"\nthread {chosen}: {total} samples, {idle} ({idle / total:.0%}) waiting in select/epoll\n")

    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    for body, n in samples.items():
        if not body or "select (selectors.py" in body[-1] or "epoll" in body[-1]:
            continue
        self_time[body[-1]] += n
        match = FRAME.match(body[-1])
        by_package[package(match.group("file")) if match else "?"] += n
        for frame in set(body):
            inclusive[frame] += n
    busy = sum(self_time.values()) or 1
    print("self time (share of non-idle samples):")
    for frame, n in self_time.most_common(args.top):
        print(f"  {n / busy:6.1%}  {frame}")
    print("\nself time by package:")
    for name, n in by_package.most_common(args.top):
        print(f"  {n / busy:6.1%}  {name}")
    print("\ninclusive time (share of non-idle samples):")
    for frame, n in inclusive.most_common(args.top * 2):
        print(f"  {n / busy:6.1%}  {frame}")


if __name__ == "__main__":
    main()
