"""What a model was measured to use, and the claims that follow from it.

On unified memory a model's claim in the configuration (``gpu_memory``) is a guess;
what its container really holds is measured: the peak while it loads, the resident
use once ready and the resident use asleep.  The lease admits a model by the larger
of the two, and a start by its load peak, which must fit beside what runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..adminjson import FootprintDoc

MIB = 1024 * 1024


@dataclass(frozen=True)
class Footprint:
    """Bytes a model's container held (None: not measured yet), out of ``total`` bytes the lease shares."""

    peak: int | None = None
    """The most it held during its last measured load."""
    ready: int | None = None
    """What it held once ready."""
    asleep: int | None = None
    """What it held after its last sleep."""
    total: int | None = None
    """The memory the fractions are of (MemTotal on unified memory, the GPU's total on a discrete GPU)."""
    sleep_level: int | None = None
    """The sleep level ``asleep`` was measured at."""
    spec_hash: str | None = None
    """The container spec it was measured on (None: not recorded, measured by an older sparkd).
    Another spec is another container: its figures say nothing of this one's."""

    def measured_on(self, spec_hash: str) -> bool:
        """Whether these figures hold for a container made from ``spec_hash``."""
        return self.spec_hash in (None, spec_hash)

    def fraction(self, value: int | None) -> float:
        """``value`` as a fraction of the shared memory (0 when not measured)."""
        if value is None or not self.total:
            return 0.0
        return value / self.total

    def view(self) -> FootprintDoc | None:
        """For the status API: bytes, None when nothing was measured."""
        if self.total is None:
            return None
        return {"peak_bytes": self.peak, "ready_bytes": self.ready, "asleep_bytes": self.asleep,
                "sleep_level": self.sleep_level, "total_bytes": self.total}

    def describe(self) -> str:
        parts = [(name, value) for name, value in (("peak", self.peak), ("ready", self.ready), ("asleep", self.asleep))]
        return ", ".join(f"{name} {value / MIB:.0f} MiB" for name, value in parts if value is not None) or "not measured"


def claim_warning(model: str, configured: float, measured: float, what: str, key: str, source: str) -> str:
    """The operator's advice when a measured footprint is above the configured claim."""
    where = f" in {source}" if source else ""
    return (
        f"model {model} measured {measured:.3f} of the memory ({what}) but claims {configured:.3f}: "
        f"set {key} = {math.floor(measured * 100) / 100 + 0.01:.2f} in [models.{model}]{where}; "
        "until then the lease uses the measured size"
    )
