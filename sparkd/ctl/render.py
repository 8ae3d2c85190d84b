"""Human output for sparkctl: tables, durations, sizes and load-progress bars."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..adminjson import (
    CatalogDoc,
    FootprintDoc,
    HistoryDoc,
    LiveStatus,
    ModelStatus,
    PrepareDoc,
    StatusDoc,
    StatusSnapshot,
    UsageDoc,
)

BAR_WIDTH = 20


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def size(count: float | None) -> str:
    if not count:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def stamp(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; ``right`` are the indexes of numeric columns."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def bar(fraction: float | None, width: int = BAR_WIDTH) -> str:
    fraction = 0.0 if fraction is None else max(0.0, min(1.0, fraction))
    filled = round(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {round(fraction * 100):3d}%"


def progress(model: ModelStatus) -> str:
    """Load progress of a starting, waking or pulling model: a bar over its ETA, the phase, the ETA left."""
    state = model.get("state")
    failure = model.get("failure")
    if state == "failed" and failure:
        return "failed: " + str(failure["message"])[:100]
    if state not in ("starting", "waking", "pulling"):
        return ""
    loading = model.get("loading_for_s")
    eta = model.get("eta_s")
    info = model.get("progress")
    phase = (info["phase"] if info else "") or state
    phase_fraction = info["fraction"] if info else None
    text = phase + (f" {round(phase_fraction * 100)}%" if phase_fraction is not None else "")
    if eta and loading is not None:
        overall = min(0.99, loading / eta) if eta > 0 else None
        left = max(0.0, eta - loading)
        return f"{bar(overall)} {text}, ETA {duration(left)}" + (" (overdue)" if loading > eta else "")
    if phase_fraction is not None:
        return f"{bar(min(0.99, phase_fraction))} {text}" + (f", {duration(loading)} so far" if loading is not None else "")
    return f"{text}, {duration(loading)} so far (no ETA: first load)"


def status(data: StatusSnapshot) -> str:
    rows = []
    for model in data["models"]:
        rows.append(
            [
                model["name"],
                model["state"],
                f"{model['claim']:.2f}",
                model["in_flight"],
                model["queued"],
                duration(model.get("uptime_s")),
                duration(model.get("idle_s")),
                progress(model),
            ]
        )
    out = [table(["MODEL", "STATE", "CLAIM", "IN-FLIGHT", "QUEUED", "UPTIME", "IDLE", "PROGRESS"], rows, right=(2, 3, 4, 5, 6))]
    lease = data["lease"]
    holders = ", ".join(f"{name} {share:.2f}" for name, share in lease["holders"].items()) or "nobody"
    out.append(f"\nlease: {lease['claimed']:.2f} of {lease['budget']:.2f} claimed ({holders}); free {lease['free']:.2f}")
    queue = data["queue"]
    counts = {m["name"]: m["queued"] for m in data["models"]}
    waiting = ", ".join(f"{name} {counts.get(name, '?')}" for name in queue.get("models") or [])
    out.append(f"queue: {queue['depth']} waiting (limit {queue['limit']})" + (f": {waiting}" if waiting else ""))
    swap_line = swaps(data)
    if swap_line:
        out.append(swap_line)
    for model in data["models"]:
        measured = model.get("footprint")
        if measured:
            out.append(f"{model['name']} measured: {footprint(measured)}")
        out.extend(f"{model['name']} warning: {warning}" for warning in model.get("claim_warnings") or [])
    for model in data["models"]:
        failure = model.get("failure")
        if not failure:
            continue
        out.append(f"\n{model['name']} failed {duration(failure.get('age_s'))} ago: {failure['message']}")
        out.extend(f"  | {line}" for line in failure.get("log_lines", [])[-8:])
    return "\n".join(out)


def status_with_fleet(data: StatusDoc) -> str:
    """``sparkctl status``: the status, then the peers (reachable, version, what they run) and where
    this node placed each model of several nodes."""
    fleet_view = data.get("fleet")
    if not fleet_view:
        return status(data)
    out = [status(data), f"\nfleet: this node is {fleet_view['node']}"]
    for peer in fleet_view["peers"]:
        if peer["reachable"] is None:
            out.append(f"peer {peer['name']} ({peer['url']}): not asked yet")
            continue
        if not peer["reachable"]:
            out.append(f"peer {peer['name']} ({peer['url']}): unreachable: {peer['error']}")
            continue
        runs = ", ".join(f"{m['name']} {m['state']}" for m in peer["models"]) or "no models"
        out.append(f"peer {peer['name']} ({peer['url']}): reachable, sparkd {peer['version']}, "
                   f"checked {duration(peer['age_s'])} ago; runs: {runs}")
    for model, placed in fleet_view["placements"].items():
        out.append(f"{model} placed on {placed['node']}: {placed['reason']}")
    return "\n".join(out)


def footprint(measured: FootprintDoc) -> str:
    """A model's measured memory: load peak, resident ready, resident asleep (with its sleep level)."""
    level = measured["sleep_level"]
    figures = (
        ("load peak", measured["peak_bytes"], ""),
        ("ready", measured["ready_bytes"], ""),
        ("asleep", measured["asleep_bytes"], f" (level {level})" if level else ""),
    )
    parts = [f"{label} {value / 2**20:.0f} MiB{suffix}" for label, value, suffix in figures if value is not None]
    return ", ".join(parts) + f" of {measured['total_bytes'] / 2**30:.1f} GiB"


def models(data: CatalogDoc) -> str:
    rows = []
    notes = []
    for model in data["models"]:
        kind = "enabled" if model["enabled"] else "experimental (off)" if model["experimental"] else "disabled"
        rows.append(
            [
                model["name"],
                kind,
                model["lifecycle"],
                f"{model['claim']:.2f}",
                model.get("max_model_len") or "-",
                model["state"],
                model["image"],
            ]
        )
        if model.get("reason"):
            notes.append(f"  {model['name']}: off: {model['reason']}")
        measured = model["footprint"]
        if measured:
            notes.append(f"  {model['name']}: measured: {footprint(measured)}")
        for warning in model.get("claim_warnings") or []:
            notes.append(f"  {model['name']}: warning: {warning}")
        for note in model.get("notes") or []:
            notes.append(f"  {model['name']}: {note}")
        if model.get("aliases"):
            notes.append(f"  {model['name']}: aliases: {', '.join(model['aliases'])}")
        weights = model.get("weights")
        if weights:
            notes.append(f"  {model['name']}: weights: {weights['weights']}, {human_bytes(weights['weights_bytes'])} ({weights['weights_repo']})")
    out = table(["MODEL", "AVAILABILITY", "LIFECYCLE", "CLAIM", "CONTEXT", "STATE", "IMAGE"], rows, right=(3, 4))
    return out + ("\n\nnotes:\n" + "\n".join(notes) if notes else "")


PREPARE_WORDS = {
    "created": "created (not started)",
    "recreated": "re-created with the current spec (not started)",
    "exists": "ready: the container exists with the current spec",
    "running": "left alone",
    "busy": "busy",
    "image_missing": "IMAGE MISSING",
    "error": "FAILED",
}


def prepare(data: PrepareDoc) -> str:
    lines = []
    width = max([len(r["model"]) for r in data["results"]] + [5])
    for result in data["results"]:
        word = PREPARE_WORDS.get(result["result"], result["result"])
        line = f"{result['model'].ljust(width)}  {word}: {result['container']} ({result['image']})"
        if result.get("message"):
            line += f"\n{' ' * width}  {result['message']}"
        lines.append(line)
    if not data["results"]:
        lines.append("no enabled models to prepare")
    return "\n".join(lines)


def swaps(data: StatusSnapshot) -> str | None:
    """``swaps: policy quantum, swap_cost_factor 4; a keeps the GPU 8s more (quantum 12s)``; None without the data."""
    swap = data.get("swap")
    if swap is None:
        return None
    held = [
        f"{m['name']} keeps the GPU {duration(m.get('quantum_left_s'))} more (quantum {duration(m.get('quantum_s'))})"
        for m in data["models"] if m.get("quantum_left_s") is not None
    ]
    return f"swaps: policy {swap['policy']}, swap_cost_factor {swap['cost_factor']:g}" + ("; " + ", ".join(held) if held else "")


def history(data: HistoryDoc) -> str:
    out = []
    rows = []
    for name, entry in sorted(data["models"].items()):
        times = entry.get("load_s")
        rows.append(
            [
                name,
                entry.get("loads", 0),
                entry.get("failed_loads", 0),
                duration(times["median"]) if times else "-",
                duration(times["last"]) if times else "-",
                entry.get("sessions", 0),
                duration(entry.get("running_s")),
                entry.get("requests") or 0,
                entry.get("tokens") or 0,
                size(entry.get("peak_host_used_bytes")),
                size(entry.get("peak_container_bytes")),
            ]
        )
    out.append(
        table(
            ["MODEL", "LOADS", "FAILED", "MEDIAN LOAD", "LAST LOAD", "SESSIONS", "RAN FOR", "REQUESTS", "TOKENS",
             "PEAK HOST MEM", "PEAK CONTAINER MEM"],
            rows, right=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
        )
        if rows else "no history yet"
    )
    if data["sessions"]:
        out.append("\nsessions (most recent first):")
        for session in data["sessions"]:
            end = "running" if session["running"] else f"{session['end_state']}: {session['end_reason']}"
            peak = size(session.get("peak_host_used_bytes"))
            out.append(
                f"  {stamp(session['started_at'])}  {session['model']}  {duration(session['duration_s'])}  "
                f"{session['requests']} requests  peak host mem {peak}  {end}"
            )
    if data["loads"]:
        out.append("\nloads (most recent first):")
        for load in data["loads"]:
            message = f"  ({load['message']})" if load.get("message") else ""
            out.append(f"  {stamp(load['started_at'])}  {load['model']}  {load['kind']}  {duration(load['duration_s'])}  {load['outcome']}{message}")
    if data["daily"]:
        out.append(f"\nper day (last {data['days']} days):")
        out.append(
            "\n".join(
                "  " + line
                for line in table(
                    ["DAY", "MODEL", "REQUESTS", "ERRORS", "PROMPT TOKENS", "COMPLETION TOKENS"],
                    [[d["day"], d["model"], d["requests"], d["errors"], d["prompt_tokens"], d["completion_tokens"]] for d in data["daily"]],
                    right=(2, 3, 4, 5),
                ).splitlines()
            )
        )
    return "\n".join(out)


def usage(data: UsageDoc) -> str:
    """``sparkctl usage``: one row per day, key and model, and a total per key."""
    rows = data["rows"]
    if not rows:
        return f"no usage in the last {data['days']} days"
    body = [
        [r["day"], r["key"], r["model"], r["requests"], r["errors"], r["prompt_tokens"], r["completion_tokens"],
         duration(r["queue_wait_s"])]
        for r in rows
    ]
    totals: dict[str, list[int]] = {}
    for r in rows:
        total = totals.setdefault(r["key"], [0, 0, 0, 0])
        for index, value in enumerate((r["requests"], r["errors"], r["prompt_tokens"], r["completion_tokens"])):
            total[index] += value
    lines = [table(
        ["DAY", "KEY", "MODEL", "REQUESTS", "ERRORS", "PROMPT TOKENS", "COMPLETION TOKENS", "QUEUE WAIT"],
        body, right=(3, 4, 5, 6, 7),
    )]
    lines.append(f"\ntotal per key (last {data['days']} days):")
    lines.extend(
        f"  {key}: {t[0]} requests, {t[1]} errors, {t[2] + t[3]} tokens ({t[2]} prompt, {t[3]} completion)"
        for key, t in sorted(totals.items())
    )
    return "\n".join(lines)


def recent(data: LiveStatus, count: int = 8) -> str:
    lines = []
    for event in (data.get("recent") or [])[-count:]:
        when = time.strftime("%H:%M:%S", time.localtime(event["at"]))
        reason = f" ({event['reason']})" if event.get("reason") else ""
        lines.append(f"  {when}  {event['model']}: {event['from']} -> {event['to']}{reason}")
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"
