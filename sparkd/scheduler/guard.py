"""The memory guard: a model that takes free memory under ``gpu.min_free`` is stopped at once.

On unified memory (a DGX Spark) the CPU, the page cache and the GPU share one pool:
an engine that allocates past it does not get a CUDA out-of-memory error, the host
swaps, the OOM killer picks some process, or the driver wedges.  So while a model
loads, and while models run, sparkd reads MemAvailable and the container's own
memory; under the floor the offending container is killed before any of that.
The guard never moves a model's state: a load it stops ends in a failed outcome
(``lifecycle``), a running model it stops is handed to ``Scheduler.model_lost``
(``running_guard``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from ..hardware.memory import MemoryGauge

log = structlog.get_logger("sparkd.scheduler")

MIB = 1024 * 1024


@dataclass(frozen=True)
class Tripped:
    """Free memory fell under the floor."""

    available: int
    floor: int
    peak: int | None
    """The container's largest measured memory (bytes), None when it could not be read."""


class LoadWatch:
    """Samples one loading container: the machine's free memory against the floor (on unified
    memory) and the container's own share, whose largest value is its measured peak (on a discrete
    GPU from nvidia-smi, at most once a second: each reading is a process to run)."""

    def __init__(self, gauge: MemoryGauge, floor: int, pid: int | None) -> None:
        self._gauge = gauge
        self._floor = floor if gauge.unified else 0
        self.pid = pid
        self.peak: int | None = None
        self._next_gpu_sample = 0.0

    async def sample(self) -> Tripped | None:
        if self.pid is not None and self._may_sample_container():
            used = await self._gauge.container_bytes(self.pid)
            if used is not None:
                self.peak = max(self.peak or 0, used)
        if not self._floor:
            return None
        reading = await self._gauge.read()
        if reading is None or reading.available_bytes >= self._floor:
            return None
        return Tripped(available=reading.available_bytes, floor=self._floor, peak=self.peak)

    def _may_sample_container(self) -> bool:
        if self._gauge.unified:
            return True
        now = time.monotonic()
        if now < self._next_gpu_sample:
            return False
        self._next_gpu_sample = now + GPU_SAMPLE_S
        return True


GPU_SAMPLE_S = 1.0


def guard_message(model: str, tripped: Tripped, doing: str) -> str:
    """What a client and the history are told about a model the guard stopped."""
    peak = f"{tripped.peak / MIB:.0f} MiB" if tripped.peak is not None else "not measurable"
    return (
        f"model {model} was stopped by the memory guard while it was {doing}: free memory fell to "
        f"{tripped.available / MIB:.0f} MiB, under gpu.min_free = {tripped.floor} bytes "
        f"({tripped.floor / MIB:.0f} MiB); its measured peak was {peak}. Stop other models first, give it "
        "a smaller footprint (kv_cache_bytes, --gpu-memory-utilization), or lower gpu.min_free"
    )
