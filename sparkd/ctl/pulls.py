"""``sparkctl pull``: start the pulls of a model's weights on the daemon and follow them to the end.

On a terminal, one redrawn progress bar per model (and per peer of a multi-node
model); otherwise a plain line per model every few seconds, for logs and scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .adminclient import Client, CtlError, model_path
from .render import human_bytes

POLL_S = 0.5
PLAIN_EVERY_S = 2.0
BAR_WIDTH = 30


def size(n: float | None) -> str:
    return human_bytes(int(n or 0))


def pull_line(pull: dict[str, Any]) -> str:
    """One pull as text: bytes, rate, ETA, or how it ended."""
    who = pull["model"] + ("" if pull.get("node", "local") == "local" else f"@{pull['node']}")
    if pull["state"] == "failed":
        return f"{who}: FAILED: {pull.get('error')}"
    done, total = pull.get("done_bytes") or 0, pull.get("total_bytes") or 0
    if pull["state"] == "done":
        return f"{who}: done, {size(total)} ({pull.get('repo')})"
    if not total:
        return f"{who}: {pull.get('phase', 'starting')} ({pull.get('repo')})"
    fraction = min(1.0, done / total)
    rate = f", {size(pull['rate_bps'])}/s" if pull.get("rate_bps") else ""
    eta = f", about {pull['eta_s']:.0f} s left" if pull.get("eta_s") is not None else ""
    return f"{who}: {fraction * 100:5.1f}% {size(done)} of {size(total)}{rate}{eta}"


def bar(pull: dict[str, Any]) -> str:
    total = pull.get("total_bytes") or 0
    fraction = 1.0 if pull["state"] == "done" else (min(1.0, (pull.get("done_bytes") or 0) / total) if total else 0.0)
    filled = int(fraction * BAR_WIDTH)
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "] " + pull_line(pull)


def all_lines(pulls: list[dict[str, Any]], draw: Any) -> list[str]:
    lines = []
    for pull in pulls:
        lines.append(draw(pull))
        lines += ["  " + draw(peer) for peer in pull.get("peers") or []]
    return lines


def finished(pull: dict[str, Any]) -> bool:
    return pull["state"] != "pulling" and all(p["state"] != "pulling" for p in pull.get("peers") or [])


def targets(client: Client, args: argparse.Namespace) -> list[str]:
    if args.all_enabled:
        catalog = client.get_json("/api/models")
        return [m["name"] for m in catalog["models"] if m["enabled"] and m.get("hf_model")]
    if not args.models:
        raise CtlError("name the models to pull, or --all-enabled", exit_code=2)
    return list(args.models)


def cmd_pull(client: Client, args: argparse.Namespace) -> int:
    names = [client.post_json(f"{model_path(name)}/pull")["model"] for name in targets(client, args)]
    tty = sys.stderr.isatty() and not args.json
    drawn, last_plain = 0, 0.0
    while True:
        pulls = [p for p in client.get_json("/api/pulls")["pulls"] if p["model"] in names]
        done = len(pulls) == len(names) and all(finished(p) for p in pulls)
        if tty:
            lines = all_lines(pulls, bar)
            sys.stderr.write("\x1b[F" * drawn + "".join("\r\x1b[K" + line[:200] + "\n" for line in lines))
            sys.stderr.flush()
            drawn = len(lines)
        elif not args.json and (done or time.monotonic() - last_plain >= PLAIN_EVERY_S):
            last_plain = time.monotonic()
            if not done:
                print("\n".join(all_lines(pulls, pull_line)), flush=True)
        if done:
            break
        time.sleep(POLL_S)
    if args.json:
        print(json.dumps({"pulls": pulls}, indent=2))
    elif not tty:
        print("\n".join(all_lines(pulls, pull_line)))
    failed = [p for p in pulls if p["state"] == "failed" or any(q["state"] == "failed" for q in p.get("peers") or [])]
    return 1 if failed else 0


def status_lines(client: Client) -> list[str]:
    """The pulls running now, for ``sparkctl status``."""
    pulls = [p for p in client.get_json("/api/pulls")["pulls"] if not finished(p)]
    return all_lines(pulls, pull_line)
