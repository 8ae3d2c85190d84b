"""Usage history in an embedded SQLite database in the state directory.

What the seed's ``gpu-monitor`` tried to collect in a CSV, kept across restarts:

* ``loads``: every start (and wake) of a model: when, how long it took, whether
  it became ready or failed (with the message);
* ``sessions``: every time a model's container ran: start, stop, why it stopped,
  the requests it served, and the peak memory seen while it ran (host memory in
  use, which on a DGX Spark's unified memory includes the GPU's; the container's
  own memory from Podman; GPU memory where nvidia-smi reports it);
* ``usage_daily``: requests, errors and tokens per model per day;
* ``usage_keys_daily``: requests, errors, tokens and queue wait per key name, model and day
  (the key's name from the keys file, never the key).

sqlite3 blocks, so the database lives in one dedicated thread (a single-worker
executor): the event loop only queues work for it (writes are fire-and-forget,
reads are awaited), and that thread alone ever touches the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from ..adminjson import DailyRow, HistoryDoc, KeyUsageRow, LoadRow, ModelHistory, SessionRow
from ..scheduler.events import Adopted, Event, FootprintMeasured, LoadFinished, Transitioned
from ..scheduler.footprint import Footprint
from ..scheduler.state import ModelState

log = structlog.get_logger("sparkd.history")
T = TypeVar("T")

S = ModelState
SCHEMA_VERSION = 1
KEEP_DAYS = 400
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS loads (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,              -- start | wake
    started_at REAL NOT NULL,        -- epoch seconds
    duration_s REAL NOT NULL,
    outcome TEXT NOT NULL,           -- ready | failed
    message TEXT                     -- why it started ("requested", ...) or the failure
);
CREATE INDEX IF NOT EXISTS loads_model_time ON loads (model, started_at);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,                   -- NULL while it runs
    end_state TEXT,                  -- stopped | failed
    end_reason TEXT,                 -- "idle for 1200s", "swapped out for b", the failure, ...
    last_seen_at REAL NOT NULL,      -- last time a running sparkd saw it (closes sessions after a crash)
    requests INTEGER NOT NULL DEFAULT 0,
    peak_host_used_bytes INTEGER,
    peak_container_bytes INTEGER,
    peak_gpu_used_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS sessions_model_time ON sessions (model, started_at);
CREATE TABLE IF NOT EXISTS footprints (
    model TEXT PRIMARY KEY,          -- what its container was last measured to use, in bytes
    peak_bytes INTEGER,              -- the most during its last measured load
    ready_bytes INTEGER,             -- resident once ready
    asleep_bytes INTEGER,            -- resident asleep, at sleep_level
    sleep_level INTEGER,
    total_bytes INTEGER NOT NULL,    -- the memory the lease shares (MemTotal)
    measured_at REAL NOT NULL,
    spec_hash TEXT                   -- the container spec it was measured on (NULL: before sparkd kept it)
);
CREATE TABLE IF NOT EXISTS usage_daily (
    day TEXT NOT NULL,               -- local date, YYYY-MM-DD
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, model)
);
CREATE TABLE IF NOT EXISTS usage_keys_daily (
    day TEXT NOT NULL,               -- local date, YYYY-MM-DD
    key TEXT NOT NULL,               -- the key's name in the keys file (never the key), or anonymous
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    queue_wait_s REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key, model)
);
"""


ADDED_COLUMNS = (("footprints", "spec_hash", "TEXT"),)
"""Columns newer than their table: a database an older sparkd made gets them on opening
(added columns are nullable, so the older sparkd still reads and writes it)."""


def _add_missing_columns(db: sqlite3.Connection) -> None:
    for table, column, kind in ADDED_COLUMNS:  # names from the constant above, never from input
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


class HistoryUnavailable(Exception):
    pass


UsageSource = Callable[[str], list[int] | None]
"""A model's [requests, errors, prompt, completion] not yet written, taken (``Metrics.take_usage``)."""


class History:
    def __init__(self, path: Path, pending_usage: UsageSource | None = None) -> None:
        """``pending_usage``: where a session that ends takes its model's last request counts from."""
        self.path = path
        self._pending_usage = pending_usage
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparkd-history")
        self._db: sqlite3.Connection | None = None  # touched only by the executor's thread
        self._open: dict[str, int] = {}  # model -> open session row id; executor's thread only
        self.problem: str | None = None

    # -- plumbing -----------------------------------------------------------------

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    def _submit(self, func: Callable[..., Any], *args: Any) -> None:
        """Queue a write; never blocks the event loop."""
        if self.problem is not None:
            return
        with contextlib.suppress(RuntimeError):  # shut down already
            self._executor.submit(self._guarded, func, *args)

    def _guarded(self, func: Callable[..., Any], *args: Any) -> None:
        try:
            func(*args)
        except sqlite3.Error as error:
            log.warning("history_write_failed", path=str(self.path), error=str(error))

    # -- lifespan -------------------------------------------------------------------

    async def open(self) -> None:
        """Raises ``HistoryUnavailable`` (sparkd does not start) when the database cannot be used."""
        try:
            await self._run(self._open_sync)
        except (sqlite3.Error, OSError) as error:
            self.problem = (
                f"the usage history {self.path} cannot be used: {error}. Move the file aside (sparkd starts a new "
                "one) or let the sparkd user read and write it and its directory (server.state_dir)"
            )
            raise HistoryUnavailable(self.problem) from error

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, timeout=5)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            _add_missing_columns(db)
            found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if found is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(found[0]) > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"it was written by a newer sparkd (schema {found[0]} > {SCHEMA_VERSION})")
            horizon = time.time() - KEEP_DAYS * 86400
            db.execute("DELETE FROM loads WHERE started_at < ?", (horizon,))
            db.execute("DELETE FROM sessions WHERE ended_at IS NOT NULL AND ended_at < ?", (horizon,))
            db.execute("DELETE FROM usage_daily WHERE day < ?", (time.strftime("%Y-%m-%d", time.localtime(horizon)),))
            db.execute("DELETE FROM usage_keys_daily WHERE day < ?", (time.strftime("%Y-%m-%d", time.localtime(horizon)),))
        except BaseException:
            db.close()
            raise
        self._db = db
        self._open = {model: row_id for row_id, model in db.execute("SELECT id, model FROM sessions WHERE ended_at IS NULL")}

    async def close_stale(self, running: set[str]) -> None:
        """After adoption: end the sessions left open by an earlier sparkd whose container is gone."""
        if self.problem is None:
            await self._run(self._guarded, self._close_stale_sync, running)

    def _close_stale_sync(self, running: set[str]) -> None:
        assert self._db is not None
        for model, row_id in list(self._open.items()):
            if model in running:
                continue
            self._db.execute(
                "UPDATE sessions SET ended_at = last_seen_at, end_state = 'stopped', "
                "end_reason = 'gone when sparkd restarted (sparkd stopped while it ran)' WHERE id = ?",
                (row_id,),
            )
            del self._open[model]

    async def close(self, usage: dict[str, list[int]] | None = None) -> None:
        """Write what is pending and close the database (sessions still running stay open)."""
        if self.problem is None:
            if usage:
                await self._run(self._guarded, self._flush_sync, usage, time.time())
            await self._run(self._guarded, self._touch_sync, time.time())
            await self._run(self._close_sync)
        self._executor.shutdown(wait=True)

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- recording --------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Scheduler listener: sessions and loads (runs on the loop, queues the writes)."""
        if isinstance(event, LoadFinished):
            self._submit(self._load_sync, event.model, event.kind, event.began, event.took, event.outcome, event.message)
        elif isinstance(event, FootprintMeasured) and event.total is not None:
            self._submit(self._footprint_sync, event)
        elif isinstance(event, Transitioned):
            self._record_move(event)

    def _record_move(self, event: Transitioned) -> None:
        name, old, new = event.model, event.old, event.new
        if new in (S.STARTING, S.READY) and old in (S.STOPPED, S.FAILED):
            # A start, or a container adopted at start-up: an open session continues.
            started = event.cause.started_at if isinstance(event.cause, Adopted) else event.at
            self._submit(self._begin_sync, name, started, event.at)
        if new in (S.STOPPED, S.FAILED):
            usage = self._pending_usage(name) if self._pending_usage is not None else None
            if usage:
                self._submit(self._flush_sync, {name: usage}, event.at)  # the session's last requests count in it
            self._submit(self._end_sync, name, event.at, new.value, event.reason)

    def _begin_sync(self, model: str, started_at: float, now: float) -> None:
        assert self._db is not None
        if model in self._open:
            return
        cursor = self._db.execute(
            "INSERT INTO sessions (model, started_at, last_seen_at) VALUES (?, ?, ?)", (model, started_at, now)
        )
        self._open[model] = int(cursor.lastrowid or 0)

    def _end_sync(self, model: str, now: float, end_state: str, reason: str) -> None:
        assert self._db is not None
        row_id = self._open.pop(model, None)
        if row_id is None:
            return
        self._db.execute(
            "UPDATE sessions SET ended_at = ?, last_seen_at = ?, end_state = ?, end_reason = ? WHERE id = ?",
            (now, now, end_state, reason, row_id),
        )

    def _load_sync(self, model: str, kind: str, started_at: float, duration: float, outcome: str, message: str) -> None:
        assert self._db is not None
        self._db.execute(
            "INSERT INTO loads (model, kind, started_at, duration_s, outcome, message) VALUES (?, ?, ?, ?, ?, ?)",
            (model, kind, started_at, round(duration, 3), outcome, message),
        )

    def _footprint_sync(self, event: FootprintMeasured) -> None:
        assert self._db is not None
        self._db.execute(
            "INSERT INTO footprints (model, peak_bytes, ready_bytes, asleep_bytes, sleep_level, total_bytes, measured_at, "
            "spec_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model) DO UPDATE SET peak_bytes = excluded.peak_bytes, "
            "ready_bytes = excluded.ready_bytes, asleep_bytes = excluded.asleep_bytes, sleep_level = excluded.sleep_level, "
            "total_bytes = excluded.total_bytes, measured_at = excluded.measured_at, spec_hash = excluded.spec_hash",
            (event.model, event.peak, event.ready, event.asleep, event.sleep_level, event.total, event.at, event.spec_hash),
        )

    async def footprints(self) -> dict[str, Footprint]:
        """Every model's last measured footprint (for admission after a restart)."""
        if self.problem is not None:
            return {}
        return await self._run(self._footprints_sync)

    def _footprints_sync(self) -> dict[str, Footprint]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT model, peak_bytes, ready_bytes, asleep_bytes, sleep_level, total_bytes, spec_hash FROM footprints"
        )
        return {
            model: Footprint(peak=peak, ready=ready, asleep=asleep, sleep_level=level, total=total, spec_hash=spec)
            for model, peak, ready, asleep, level, total, spec in rows
        }

    def record_memory(self, model: str, host_used: int | None, container: int | None, gpu_used: int | None) -> None:
        """Raise the running session's peaks to what was just measured."""
        self._submit(self._memory_sync, model, host_used, container, gpu_used)

    def _memory_sync(self, model: str, host_used: int | None, container: int | None, gpu_used: int | None) -> None:
        assert self._db is not None
        row_id = self._open.get(model)
        if row_id is None:
            return
        self._db.execute(
            "UPDATE sessions SET "
            "peak_host_used_bytes = MAX(COALESCE(peak_host_used_bytes, 0), COALESCE(?, 0)), "
            "peak_container_bytes = MAX(COALESCE(peak_container_bytes, 0), COALESCE(?, 0)), "
            "peak_gpu_used_bytes = CASE WHEN ? IS NULL THEN peak_gpu_used_bytes "
            "ELSE MAX(COALESCE(peak_gpu_used_bytes, 0), ?) END WHERE id = ?",
            (host_used, container, gpu_used, gpu_used, row_id),
        )

    async def flush(self, usage: dict[str, list[int]]) -> None:
        """Add per-model [requests, errors, prompt, completion] to today's row; mark open sessions seen."""
        if self.problem is None:
            await self._run(self._guarded, self._flush_sync, usage, time.time())

    def _flush_sync(self, usage: dict[str, list[int]], now: float) -> None:
        assert self._db is not None
        day = time.strftime("%Y-%m-%d", time.localtime(now))
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            for model, (requests, errors, prompt, completion) in usage.items():
                self._db.execute(
                    "INSERT INTO usage_daily (day, model, requests, errors, prompt_tokens, completion_tokens) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (day, model) DO UPDATE SET "
                    "requests = requests + excluded.requests, errors = errors + excluded.errors, "
                    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                    "completion_tokens = completion_tokens + excluded.completion_tokens",
                    (day, model, requests, errors, prompt, completion),
                )
                row_id = self._open.get(model)
                if row_id is not None:
                    self._db.execute("UPDATE sessions SET requests = requests + ? WHERE id = ?", (requests, row_id))
            self._touch_sync(now)

    def _touch_sync(self, now: float) -> None:
        assert self._db is not None
        for row_id in self._open.values():
            self._db.execute("UPDATE sessions SET last_seen_at = ? WHERE id = ?", (now, row_id))

    async def flush_key_usage(self, rows: list[KeyUsageRow]) -> None:
        """Add per key, model and day counts (``KeyUsage.drain``) to the days' rows."""
        if self.problem is None and rows:
            await self._run(self._guarded, self._flush_keys_sync, rows)

    def _flush_keys_sync(self, rows: list[KeyUsageRow]) -> None:
        assert self._db is not None
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO usage_keys_daily (day, key, model, requests, errors, prompt_tokens, completion_tokens, "
                "queue_wait_s) VALUES (:day, :key, :model, :requests, :errors, :prompt_tokens, :completion_tokens, "
                ":queue_wait_s) ON CONFLICT (day, key, model) DO UPDATE SET requests = requests + excluded.requests, "
                "errors = errors + excluded.errors, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens, "
                "queue_wait_s = queue_wait_s + excluded.queue_wait_s",
                rows,
            )

    async def key_usage(self, key: str | None = None, model: str | None = None, days: int = 30) -> list[KeyUsageRow]:
        """Per key, model and day for the last ``days`` days (today included), newest first."""
        if self.problem is not None:
            return []
        return await self._run(self._key_usage_sync, key, model, days, time.time())

    def _key_usage_sync(self, key: str | None, model: str | None, days: int, now: float) -> list[KeyUsageRow]:
        assert self._db is not None
        # Constant query with bound values only; a NULL :key or :model matches every one.
        params = {"key": key, "model": model,
                  "since_day": time.strftime("%Y-%m-%d", time.localtime(now - (days - 1) * 86400))}
        return [
            {"day": d, "key": k, "model": m, "requests": q, "errors": e, "prompt_tokens": p, "completion_tokens": c,
             "queue_wait_s": round(w, 3)}
            for d, k, m, q, e, p, c, w in self._db.execute(
                "SELECT day, key, model, requests, errors, prompt_tokens, completion_tokens, queue_wait_s "
                "FROM usage_keys_daily WHERE (:key IS NULL OR key = :key) AND (:model IS NULL OR model = :model) "
                "AND day >= :since_day ORDER BY day DESC, key, model",
                params,
            )
        ]

    # -- reading ----------------------------------------------------------------------

    async def query(self, model: str | None = None, days: int = 30, limit: int = 20) -> HistoryDoc:
        return await self._run(self._query_sync, model, days, limit, time.time())

    def _query_sync(self, model: str | None, days: int, limit: int, now: float) -> HistoryDoc:
        assert self._db is not None
        db = self._db
        # Constant queries with bound values only; a NULL :model matches every model.
        params = {"model": model or None, "now": now, "limit": limit,
                  "since_day": time.strftime("%Y-%m-%d", time.localtime(now - days * 86400))}
        summary: dict[str, ModelHistory] = {}
        ready: dict[str, list[float]] = {}
        for name, duration, outcome in db.execute(
            "SELECT model, duration_s, outcome FROM loads WHERE (:model IS NULL OR model = :model) AND kind = 'start' "
            "ORDER BY started_at", params
        ):
            entry = summary.setdefault(name, {"loads": 0, "failed_loads": 0, "load_s": None})
            entry["loads"] += 1
            if outcome == "ready":
                ready.setdefault(name, []).append(duration)
            else:
                entry["failed_loads"] += 1
        for name, ok in ready.items():
            summary[name]["load_s"] = {
                "median": round(statistics.median(ok), 1), "min": round(min(ok), 1), "max": round(max(ok), 1),
                "last": round(ok[-1], 1),
            }
        for name, count, seconds, peak_host, peak_container, peak_gpu in db.execute(
            "SELECT model, COUNT(*), SUM(COALESCE(ended_at, :now) - started_at), MAX(peak_host_used_bytes), "
            "MAX(peak_container_bytes), MAX(peak_gpu_used_bytes) FROM sessions WHERE (:model IS NULL OR model = :model) "
            "GROUP BY model",
            params,
        ):
            entry = summary.setdefault(name, {"loads": 0, "failed_loads": 0, "load_s": None})
            entry.update({
                "sessions": count, "running_s": round(seconds or 0.0, 1), "peak_host_used_bytes": peak_host,
                "peak_container_bytes": peak_container, "peak_gpu_used_bytes": peak_gpu,
            })
        for name, requests, tokens in db.execute(
            "SELECT model, SUM(requests), SUM(prompt_tokens + completion_tokens) FROM usage_daily "
            "WHERE (:model IS NULL OR model = :model) GROUP BY model", params
        ):
            entry = summary.setdefault(name, {"loads": 0, "failed_loads": 0, "load_s": None})
            entry.update({"requests": requests, "tokens": tokens})
        loads: list[LoadRow] = [
            {"model": m, "kind": k, "started_at": s, "duration_s": d, "outcome": o, "message": msg}
            for m, k, s, d, o, msg in db.execute(
                "SELECT model, kind, started_at, duration_s, outcome, message FROM loads "
                "WHERE (:model IS NULL OR model = :model) ORDER BY started_at DESC LIMIT :limit", params
            )
        ]
        sessions: list[SessionRow] = [
            {
                "model": m, "started_at": s, "ended_at": e, "duration_s": round((e or now) - s, 1), "running": e is None,
                "end_state": st, "end_reason": r, "requests": q, "peak_host_used_bytes": ph,
                "peak_container_bytes": pc, "peak_gpu_used_bytes": pg,
            }
            for m, s, e, st, r, q, ph, pc, pg in db.execute(
                "SELECT model, started_at, ended_at, end_state, end_reason, requests, peak_host_used_bytes, "
                "peak_container_bytes, peak_gpu_used_bytes FROM sessions WHERE (:model IS NULL OR model = :model) "
                "ORDER BY started_at DESC LIMIT :limit",
                params,
            )
        ]
        daily: list[DailyRow] = [
            {"day": d, "model": m, "requests": q, "errors": e, "prompt_tokens": p, "completion_tokens": c}
            for d, m, q, e, p, c in db.execute(
                "SELECT day, model, requests, errors, prompt_tokens, completion_tokens FROM usage_daily "
                "WHERE (:model IS NULL OR model = :model) AND day >= :since_day ORDER BY day DESC, model",
                params,
            )
        ]
        return {"path": str(self.path), "days": days, "models": summary, "loads": loads, "sessions": sessions, "daily": daily}
