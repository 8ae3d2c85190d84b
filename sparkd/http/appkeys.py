"""What the routes are given: each service under its own ``web.AppKey``, so a route takes only what it uses."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..cluster.workers import WorkerLeases
from ..engine.client import EngineClient
from ..fixups.context import TokenizeFailures
from ..fleet.coordinator import Fleet
from ..observe.operations import Operations
from ..runtime.podman import PodmanRuntime
from ..scheduler.scheduler import Scheduler
from ..weights.service import WeightService
from .snapshot import SnapshotHolder

SNAPSHOT = web.AppKey("snapshot", SnapshotHolder)
SCHEDULER = web.AppKey("scheduler", Scheduler)
ENGINE = web.AppKey("engine", EngineClient)
RUNTIME = web.AppKey("runtime", PodmanRuntime)
OPERATIONS = web.AppKey("operations", Operations)
WORKERS = web.AppKey("workers", WorkerLeases)
TOKENIZE_FAILURES = web.AppKey("tokenize_failures", TokenizeFailures)
RECONCILED = web.AppKey("reconciled", asyncio.Event)
"""Set once the containers an earlier sparkd left running are adopted: ``/readyz`` says ready from then on."""
FLEET = web.AppKey("fleet", Fleet)
"""The other nodes of the fleet: where a model runs, and forwarding requests there (``sparkd/fleet``)."""
WEIGHTS = web.AppKey("weights", WeightService)
"""The weight pulls (``sparkctl pull``) and the presence of each model's weights."""
