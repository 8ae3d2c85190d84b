"""How long each model took to load, kept in the state directory for ETAs.

The recent median is the ETA shown in status and used for ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
from pathlib import Path

import structlog

log = structlog.get_logger("sparkd.scheduler")

KEEP = 20
"""Load times kept per model (in memory and in the state file): the ETA is their median."""


class LoadTimes:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._times: dict[str, list[float]] = {}

    def load(self) -> None:
        """Read the stored history (once, at start-up)."""
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            log.warning("load_times_unreadable", path=str(self._path), error=str(error))
            return
        if isinstance(data, dict):
            self._times = {
                str(name): [float(t) for t in times if isinstance(t, (int, float))][-KEEP:]
                for name, times in data.items()
                if isinstance(times, list)
            }

    def eta(self, model: str) -> float | None:
        times = self._times.get(model)
        return statistics.median(times) if times else None

    async def record(self, model: str, seconds: float) -> None:
        self._times.setdefault(model, []).append(round(seconds, 3))
        del self._times[model][:-KEEP]
        snapshot = json.dumps(self._times, sort_keys=True)
        await asyncio.to_thread(self._write, snapshot)

    def _write(self, text: str) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._path.with_suffix(".tmp")
            temporary.write_text(text)
            os.replace(temporary, self._path)
        except OSError as error:
            log.warning("load_times_not_saved", path=str(self._path), error=str(error))
