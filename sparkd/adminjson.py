"""The JSON documents of the admin API, as TypedDicts: what sparkd builds and sparkctl reads.

* ``StatusDoc``: ``GET /api/status`` (``sparkctl status``);
* ``LiveStatus``: each ``status`` event of ``GET /api/events`` (the status page,
  ``sparkctl top``): the status snapshot, the server, recent moves and failures;
* ``HistoryDoc``: ``GET /api/history`` (``sparkctl history``);
* ``CatalogDoc``: ``GET /api/models`` (``sparkctl models``);
* ``PrepareDoc``: ``POST /api/prepare`` (``sparkctl prepare``).

Fields that are absent rather than null are in ``total=False`` parts. Standard library
only: sparkctl imports it, and starts fast.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

# -- status ------------------------------------------------------------------------------


class ProgressJson(TypedDict):
    phase: str
    fraction: float | None
    line: str
    """The engine's log line the progress was read from."""


class FailureJson(TypedDict):
    message: str
    log_lines: list[str]
    age_s: float


class FootprintDoc(TypedDict):
    """What a model was measured to use, in bytes (on unified memory; None: not measured yet)."""

    peak_bytes: int | None
    ready_bytes: int | None
    asleep_bytes: int | None
    sleep_level: int | None
    """The sleep level ``asleep_bytes`` was measured at."""
    total_bytes: int
    """The memory the figures are of (MemTotal on unified memory)."""


class _ModelStatusFields(TypedDict):
    name: str
    state: str
    reason: str
    state_since: float
    lifecycle: str
    claim: float
    configured_claim: float
    load_claim: float
    """What a start must find free: the larger of the claim and the measured load peak."""
    footprint: FootprintDoc | None
    claim_warnings: list[str]
    sleep_level: int | None
    sleep_claim: float | None
    holds: float
    """The lease share the model holds now (0 when it holds none)."""
    in_flight: int
    queued: int
    uptime_s: float | None
    idle_s: float | None
    progress: ProgressJson | None
    eta_s: float | None
    loading_for_s: float | None
    failure: FailureJson | None
    stale_spec: bool
    container: str
    port: int | None


class _Node(TypedDict):
    node: str
    role: str
    """"head" (this node) or "worker"."""
    address: str | None


class NodeView(_Node, total=False):
    """One node's part in a model spanning several Sparks."""

    lease: str | None
    heartbeat_age_s: float | None


class ModelStatus(_ModelStatusFields, total=False):
    nodes: list[NodeView]
    """Only for a model spanning several nodes, on ``/api/status``."""
    quantum_s: float | None
    """The swap quantum it gets when it is swapped in (None: policy fifo)."""
    quantum_left_s: float | None
    """How long its current quantum still protects it (None: none runs)."""


class LeaseJson(TypedDict):
    budget: float
    claimed: float
    free: float
    holders: dict[str, float]


class QueueJson(TypedDict):
    depth: int
    limit: int
    models: list[str]
    """The models requests wait for, in the order they are served."""


class SwapJson(TypedDict):
    """How swaps are decided: ``lifecycle.swap_policy`` and ``lifecycle.swap_cost_factor``."""

    policy: str
    cost_factor: float
    min_uptime_s: float


class _SwapStatus(TypedDict, total=False):
    swap: SwapJson


class StatusSnapshot(_SwapStatus):
    models: list[ModelStatus]
    lease: LeaseJson
    queue: QueueJson


class WorkerLeaseView(TypedDict):
    """A lease granted to a head, as /api/worker-leases and /api/status show it."""

    id: str
    head: str
    peer_key: str
    model: str
    worker: str
    state: str
    claim: float
    granted_at: float
    heartbeat_age_s: float
    releasing: bool


class PeerModelView(TypedDict):
    name: str
    state: str


class PeerView(TypedDict):
    """A peer sparkd as this node last saw it (``sparkd/fleet/peerwatch.py``)."""

    name: str
    url: str
    reachable: bool | None
    """None until its first answer."""
    version: str | None
    node: str | None
    error: str | None
    age_s: float | None
    models: list[PeerModelView]
    """What it runs itself, with the state there."""


class PlacementView(TypedDict):
    node: str
    reason: str
    at: float


class FleetView(TypedDict):
    node: str
    """This node's name (``cluster.name``, else ``local``)."""
    peers: list[PeerView]
    placements: dict[str, PlacementView]
    """The last node each model of several nodes was served on, and why."""


class StatusDoc(StatusSnapshot):
    worker_leases: list[WorkerLeaseView]
    """What this node runs for other nodes' heads."""
    fleet: FleetView | None
    """The peers and where models were placed; None on a node without peers."""


# -- live status ---------------------------------------------------------------------------


class ServerJson(TypedDict):
    version: str
    instance: str
    started_at: float
    now: float
    policy: str
    listen: list[str]


RecentMove = TypedDict("RecentMove", {"at": float, "model": str, "from": str, "to": str, "reason": str})
"""One state change (``from`` is a keyword, hence the functional form)."""


class RecentFailure(TypedDict):
    at: float
    model: str
    message: str
    log_lines: list[str]


class _LiveUsage(TypedDict, total=False):
    usage_today: list[KeyUsageRow]
    """Today's requests, tokens and queue wait per key name and model (the status page's table)."""


class LiveStatus(StatusSnapshot, _LiveUsage):
    server: ServerJson
    recent: list[RecentMove]
    failures: list[RecentFailure]


# -- history -------------------------------------------------------------------------------


class LoadTimesJson(TypedDict):
    median: float
    min: float
    max: float
    last: float


class _ModelHistoryFields(TypedDict):
    loads: int
    failed_loads: int
    load_s: LoadTimesJson | None
    """Of the starts that became ready; None when none did."""


class ModelHistory(_ModelHistoryFields, total=False):
    """The session fields are there once the model ran, the usage fields once it served."""

    sessions: int
    running_s: float
    peak_host_used_bytes: int | None
    peak_container_bytes: int | None
    peak_gpu_used_bytes: int | None
    requests: int
    tokens: int


class LoadRow(TypedDict):
    model: str
    kind: str
    started_at: float
    duration_s: float
    outcome: str
    message: str | None


class SessionRow(TypedDict):
    model: str
    started_at: float
    ended_at: float | None
    duration_s: float
    running: bool
    end_state: str | None
    end_reason: str | None
    requests: int
    peak_host_used_bytes: int | None
    peak_container_bytes: int | None
    peak_gpu_used_bytes: int | None


class DailyRow(TypedDict):
    day: str
    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int


class KeyUsageRow(TypedDict):
    """One key's use of one model on one day (the key's name only, never the key)."""

    day: str
    key: str
    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    queue_wait_s: float


class UsageDoc(TypedDict):
    """``GET /api/usage``: per key, day and model, newest day first."""

    days: int
    key: str | None
    model: str | None
    rows: list[KeyUsageRow]


class HistoryDoc(TypedDict):
    path: str
    days: int
    models: dict[str, ModelHistory]
    loads: list[LoadRow]
    sessions: list[SessionRow]
    daily: list[DailyRow]


# -- catalog and prepare -----------------------------------------------------------------------


class WeightsDoc(TypedDict):
    """A model's weights in the cache (models with ``hf_model`` only)."""

    weights: str
    """complete, partial or absent."""
    weights_bytes: int
    weights_repo: str


class CatalogEntry(TypedDict):
    name: str
    enabled: bool
    experimental: bool
    reason: str | None
    """Why the model is off; None when it is enabled."""
    state: str
    lifecycle: str
    claim: float
    configured_claim: float
    footprint: FootprintDoc | None
    claim_warnings: list[str]
    max_model_len: int | None
    image: str
    gpu: bool
    sleep_mode: bool
    aliases: list[str]
    profile: str | None
    tools: str
    hf_model: str | None
    notes: list[str]
    container: str
    weights: NotRequired[WeightsDoc]


class CatalogDoc(TypedDict):
    models: list[CatalogEntry]


class _PrepareResultField(TypedDict):
    result: str
    """created, recreated, exists, running, busy, image_missing or error."""


class PrepareOutcome(_PrepareResultField, total=False):
    message: str
    """What to do, for the results that are not a container."""
    status: str
    port: int | None


class PrepareResult(PrepareOutcome):
    model: str
    container: str
    image: str


class PrepareDoc(TypedDict):
    ok: bool
    results: list[PrepareResult]
