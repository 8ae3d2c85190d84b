"""A model's state machine: the states and the transitions allowed between them.

::

    stopped ─► starting ─► ready ─► draining ─► stopping ─► stopped
                  │          │  ▲        │            ▲
                  ▼          │  └────────┘ (swap      │
                failed ◄─────┘  called off)           │
                                ready/draining ─► sleeping ─► waking ─► ready
    stopped/failed ─► pulling ─► stopped (weights in the cache: admission follows)
                         └─────► failed

``pulling``: a request wants the model and its weights are absent: they are
downloaded before it takes any lease share or load slot (a download needs the
disk and the network, not the GPU), so the models that serve keep serving.
``draining``: the model still serves its in-flight requests but takes no new ones,
because a swap is waiting for it to finish.  ``failed`` keeps the last error
and log lines; the next request retries after the failure back-off.
"""

from __future__ import annotations

import enum


class ModelState(str, enum.Enum):
    STOPPED = "stopped"
    PULLING = "pulling"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    SLEEPING = "sleeping"
    WAKING = "waking"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


S = ModelState

ALLOWED: dict[ModelState, frozenset[ModelState]] = {
    S.STOPPED: frozenset({S.STARTING, S.READY, S.PULLING}),  # READY: adopted at start-up
    S.PULLING: frozenset({S.STOPPED, S.FAILED}),
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.DRAINING, S.STOPPING, S.SLEEPING, S.FAILED}),
    S.DRAINING: frozenset({S.READY, S.STOPPING, S.SLEEPING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.SLEEPING: frozenset({S.WAKING, S.STOPPING, S.FAILED}),
    S.WAKING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.FAILED: frozenset({S.STARTING, S.STOPPED, S.STOPPING, S.PULLING}),
}
