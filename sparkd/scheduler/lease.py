"""The GPU lease: which models hold the GPU, and how much of its memory each claims.

``Lease`` is the ledger; ``plan`` decides, without side effects, what admitting
one more model takes: nothing (it fits), which holders must go first (and
whether a sleep is enough for each), or why it can never fit.

Rules (from the seed, made explicit):

* the holders' claims never sum above the budget;
* ``exclusive`` models need the GPU alone: every other holder goes, utility too;
* ``utility`` models are kept beside normal ones and only go for an exclusive
  model or as the very last resort;
* ``pinned`` models are never evicted for a normal model;
* among the rest, idle models go before busy ones, least recently used first;
  a busy one is drained (its requests finish), never cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

EPSILON = 1e-9


@dataclass
class Lease:
    budget: float
    holders: dict[str, float] = field(default_factory=dict)

    @property
    def claimed(self) -> float:
        return sum(self.holders.values())

    @property
    def free(self) -> float:
        return max(0.0, self.budget - self.claimed)

    def fits(self, claim: float) -> bool:
        return self.claimed + claim <= self.budget + EPSILON

    def grant(self, model: str, claim: float) -> None:
        """Give ``model`` a share of ``claim`` (replacing any share it held).

        Growing past the budget is refused; shrinking never is, even when a reload lowered
        the budget below what is held (the share only comes closer to it).
        """
        held = self.holders.get(model, 0.0)
        if claim > held and self.claimed - held + claim > self.budget + EPSILON:
            raise ValueError(f"lease over budget: {model} wants {claim}, free {self.budget - self.claimed + held:.2f}")
        self.holders[model] = claim

    def hold_measured(self, model: str, claim: float) -> None:
        """Set ``model``'s share to what it was measured to hold: the memory is in use whatever the
        budget says, so this is never refused; past the budget nothing fits until enough leaves."""
        self.holders[model] = claim

    def release(self, model: str) -> None:
        self.holders.pop(model, None)


@dataclass(frozen=True)
class Holder:
    """What ``plan`` needs to know about a model that holds a share."""

    name: str
    claim: float
    lifecycle: str
    in_flight: int
    last_used: float
    leaving: bool = False
    """Already draining or stopping: its share will come back without a new decision."""
    sleep_claim: float | None = None
    """The share it keeps when put to sleep; None when it cannot sleep (or already sleeps)."""


@dataclass(frozen=True)
class Eviction:
    name: str
    action: Literal["stop", "sleep"]


@dataclass(frozen=True)
class Plan:
    verdict: Literal["admit", "wait", "evict", "impossible"]
    evictions: tuple[Eviction, ...] = ()
    reason: str = ""


def plan(name: str, claim: float, lifecycle: str, held: float, holders: list[Holder], budget: float) -> Plan:
    """What admitting ``name`` (wanting ``claim``, already holding ``held``) takes.

    ``admit``: it fits now.  ``wait``: shares already on their way back will make
    it fit.  ``evict``: these holders must drain and go (or sleep).  ``impossible``:
    it cannot fit even with every evictable holder gone.
    """
    others = [h for h in holders if h.name != name]
    if claim > budget + EPSILON:
        return Plan("impossible", reason=f"it claims {claim:.2f} of the GPU but the budget is {budget:.2f}")
    if lifecycle == "exclusive":
        staying = [h for h in others if not h.leaving]
        if not others:
            return Plan("admit")
        if not staying:
            return Plan("wait", reason="waiting for the GPU to be free")
        return Plan("evict", tuple(Eviction(h.name, "stop") for h in staying), "it needs the GPU alone")

    claimed = held + sum(h.claim for h in others)
    extra = claim - held
    if claimed + extra <= budget + EPSILON:
        return Plan("admit")
    coming_back = sum(h.claim for h in others if h.leaving)
    need = claimed + extra - budget - coming_back
    if need <= EPSILON:
        return Plan("wait", reason="waiting for a stopping model to release its memory")

    candidates = [h for h in others if not h.leaving and h.lifecycle != "pinned"]
    exclusive = [h for h in candidates if h.lifecycle == "exclusive"]
    normal = [h for h in candidates if h.lifecycle == "normal"]
    utility = [h for h in candidates if h.lifecycle == "utility"]
    # Idle before busy, least recently used first; utility models only at the very end.
    ordered = sorted(exclusive + normal, key=lambda h: (h.in_flight > 0, h.last_used)) + sorted(
        utility, key=lambda h: (h.in_flight > 0, h.last_used)
    )
    chosen: list[Eviction] = []
    freed = 0.0
    for holder in ordered:
        if freed >= need - EPSILON:
            break
        if holder.sleep_claim is not None:
            chosen.append(Eviction(holder.name, "sleep"))
            freed += holder.claim - holder.sleep_claim
        else:
            chosen.append(Eviction(holder.name, "stop"))
            freed += holder.claim
    if freed < need - EPSILON:
        # Sleeping frees too little: stop instead, in the same order.
        chosen = [Eviction(e.name, "stop") for e in chosen]
        freed = sum(h.claim for h in ordered if h.name in {e.name for e in chosen})
    if freed < need - EPSILON:
        pinned = [h.name for h in others if h.lifecycle == "pinned"]
        return Plan(
            "impossible",
            reason=(
                f"it claims {claim:.2f} of the GPU and only {budget - (claimed - freed):.2f} can be freed"
                + (f" (pinned models hold the rest: {', '.join(pinned)})" if pinned else "")
            ),
        )
    return Plan("evict", tuple(chosen), f"it needs {need:.2f} more of the GPU")
