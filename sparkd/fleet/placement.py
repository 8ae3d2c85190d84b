"""Where a model allowed on several nodes should be served: a pure ranking of the candidates.

The order (issue 18): where it is ready; else where it is loading; else where it fits without
evicting anything; else by this node's own policy (it queues or swaps here when this node may run
it, else on the first reachable peer in the configured order). Unreachable peers are left out;
the rest of the ranking is the fallback when the chosen node refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .nodes import LOCAL

LOADING = frozenset({"starting", "waking", "pulling"})
"""Loading there already; pulling its weights counts too: another node would download them again."""


@dataclass(frozen=True)
class Candidate:
    node: str
    """``local`` or a peer's name."""
    state: str | None
    """The model's state on that node (``ready``, ``starting``, ``stopped``, ...); None: not known."""
    fits: bool
    """It would be admitted there without evicting another model."""
    reachable: bool = True
    error: str = ""
    """Why the node is not reachable (its last answer or connection error)."""


@dataclass(frozen=True)
class Choice:
    node: str
    reason: str
    """Why this node: shown in the status."""


def rank(candidates: list[Candidate]) -> list[Choice]:
    """The reachable candidates, best first, each with the reason it is where it is."""
    usable = [c for c in candidates if c.reachable]
    ranked: list[Choice] = []
    taken: set[str] = set()

    def take(test: Callable[[Candidate], bool], reason: Callable[[Candidate], str]) -> None:
        for candidate in usable:
            if candidate.node not in taken and test(candidate):
                taken.add(candidate.node)
                ranked.append(Choice(candidate.node, reason(candidate)))

    take(lambda c: c.state == "ready", lambda c: f"ready on {c.node}")
    take(lambda c: c.state in LOADING, lambda c: f"loading on {c.node}")
    take(lambda c: c.fits, lambda c: f"fits on {c.node} without evicting another model")
    take(lambda c: c.node == LOCAL, lambda _c: "this node's policy: it queues or swaps here")
    take(lambda _c: True, lambda c: f"the first reachable node allowed ({c.node}): it queues or swaps there")
    return ranked
