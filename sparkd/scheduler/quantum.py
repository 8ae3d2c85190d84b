"""The swap quantum: how long a model swapped in for waiters keeps the GPU before another swap.

Without it two clients alternating two models that cannot share the GPU make every
request a cold load: the first-come-first-served queue evicts a model as soon as its
requests are done.  With it, a model swapped in for waiting requests keeps the GPU,
while it has work, for ``max(min_uptime_s, swap_cost_factor x its measured load time)``
before another swap may evict it.  A waiter of a higher priority than the one the model
was loaded for may still evict it.

The quantum is the model's whole turn on the GPU: it counts from the moment the GPU was
promised to the model (the holders began draining for it, or it was admitted), and its
load time is what that swap-in cost, measured from then until the model was ready (the
holders' last answers, their stop, the memory reclaim and the model's load; before a
first swap-in, the model's load ETA).  So at most ``1 / swap_cost_factor`` of the GPU's
time goes to swaps, and a waiter waits at most about a quantum, one answer of the holder
and its own model's swap.

"Has work" means a request in flight or waiting for it, or one that ended less than
``WORK_GRACE_S`` ago: a client sending one request after another leaves a gap of a
round trip between them, which must not count as the model being idle.

Pure functions only; the scheduler keeps each model's ``Quantum`` and asks
``protected_until`` before it evicts one.
"""

from __future__ import annotations

from dataclasses import dataclass

WORK_GRACE_S = 1.0
"""A model whose last request ended this recently still has work (its client's next request is on the way)."""


@dataclass(frozen=True)
class Quantum:
    """The protection a model got when it became ready for waiting requests."""

    length_s: float
    until: float
    """time.monotonic() when the protection ends."""
    priority: int
    """The priority of the waiters it was loaded for: only a higher one may evict it sooner."""


def quantum_length(min_uptime_s: float, swap_cost_factor: float, load_s: float | None) -> float:
    """max(min_uptime_s, swap_cost_factor x load time); without a measured load, min_uptime_s."""
    return max(min_uptime_s, swap_cost_factor * load_s) if load_s is not None else min_uptime_s


def protected_until(
    quantum: Quantum | None, *, now: float, in_flight: int, queued: int, last_used: float, challenger_priority: int
) -> float | None:
    """Until when (time.monotonic()) the quantum keeps the model against a waiter of ``challenger_priority``:
    the moment to decide again.  None: it does not protect the model now, the waiter may evict it."""
    if quantum is None or now >= quantum.until or challenger_priority > quantum.priority:
        return None
    if in_flight or queued:
        return quantum.until
    idle_until = last_used + WORK_GRACE_S
    if now >= idle_until:
        return None  # out of work: keeping it would only keep the waiter waiting
    return min(quantum.until, idle_until)
