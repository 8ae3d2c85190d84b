"""The http side of the fleet (``sparkd/fleet``): forwarding a request to the node that serves its
model, the peer API that answers what this node serves and takes forwarded requests, and the fleet's
models in ``/v1/models``.

A forwarded request passes the same checks as a local one before it leaves this node: the body's
size, time and JSON, the path (``routing.requested``), the key's model list, the endpoint, the
body's shape; the query and headers then pass ``engine/outbound.py``. A request that came from a
peer (role ``peer``) is never forwarded again: it is served here or refused.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .. import __version__
from ..config import ModelConfig
from ..config.keys import PEER
from ..engine.usage import RequestRecord
from ..errors import NotFound, ServiceUnavailable
from ..fleet.coordinator import Fleet, FleetModel
from ..fleet.nodes import runs_here, this_node
from ..fleet.peerwatch import MODELS_PATH, RemoteModel
from ..fleet.placement import Candidate
from ..fleet.relay import FORWARD_PREFIX
from .appkeys import FLEET, SCHEDULER, SNAPSHOT
from .auth import PRINCIPAL, Principal
from .routing import requested
from .snapshot import Snapshot
from .validation import validate_body


class FleetRoutes:
    """``GET /api/fleet/models`` and ``POST /api/fleet/v1/...``: the peer API (role ``peer``)."""

    def __init__(self, inference: Handler) -> None:
        self._inference = inference

    def add_to(self, app: web.Application) -> None:
        self._snapshot, self._scheduler, self._fleet = app[SNAPSHOT], app[SCHEDULER], app[FLEET]
        app.router.add_get(MODELS_PATH, self.models)
        app.router.add_post(FORWARD_PREFIX + "/v1/{tail:.+}", self._inference)

    async def models(self, request: web.Request) -> web.Response:
        """The models this node runs itself that the calling peer's key may use, with their state here."""
        current = self._snapshot.current
        principal = request[PRINCIPAL]
        entries = []
        for model in current.config.enabled_models():
            if runs_here(model, current.config) and principal.may_use(model):
                candidate = self._fleet.local_candidate(model)
                entries.append({
                    "id": model.name, "aliases": list(model.aliases), "state": candidate.state, "fits": candidate.fits,
                    "endpoints": list(model.api_paths), "max_model_len": model.max_model_len,
                })
        return web.json_response({"sparkd": __version__, "node": this_node(current.config), "models": entries})


async def forward_elsewhere(
    fleet: Fleet, request: web.Request, current: Snapshot, raw: bytes, payload: dict[str, Any], record: RequestRecord
) -> web.StreamResponse | None:
    """The answer of the peer that serves the request's model; None when this node serves it."""
    if not fleet.peers and not current.config.peers:
        return None  # without peers every model runs here (a nodes list names peers only)
    principal = request[PRINCIPAL]
    name, path = requested(request.match_info["tail"], payload.get("model"))
    if not isinstance(name, str):
        return None  # the local path says what is wrong with it
    configured = current.directory.lookup(name)
    if principal.role == PEER:
        if configured is not None and configured.enabled and not runs_here(configured, current.config):
            raise ServiceUnavailable(
                f"model {configured.name} does not run on this node (its nodes are {', '.join(configured.nodes)}) and a "
                "forwarded request is never forwarded again; fix the nodes list on the node that sent it",
                code="not_served_here",
            )
        return None
    model = _fleet_model(fleet, configured, name)
    if model is None:
        return None
    principal.check_model_named(model.name, model.aliases)
    if model.endpoints and not any(path == p or path.startswith(p + "/") for p in model.endpoints):
        raise NotFound(
            f"model {model.name}: its engine does not serve POST {path}; it serves {', '.join(model.endpoints)}",
            code="unsupported_endpoint", extra={"endpoints": list(model.endpoints)},
        )
    validate_body(path, payload)
    record.model, record.path = model.name, path
    body = raw if payload.get("model") == model.name else json.dumps({**payload, "model": model.name}, separators=(",", ":")).encode()
    return await fleet.serve(request, model, path, body, principal, record, payload.get("stream") is True)


def _fleet_model(fleet: Fleet, configured: ModelConfig | None, name: str) -> FleetModel | None:
    if configured is None:
        return fleet.learned(name)
    if not configured.enabled:
        return None  # the local path refuses it with its reason
    return fleet.configured(configured)


def where(fleet: Fleet, current: Snapshot, model: ModelConfig) -> dict[str, Any]:
    """``/v1/models`` fields of a configured model: the node it runs on (or would), and each candidate's state."""
    fleet_model = fleet.configured(model)
    if fleet_model is None:
        return {"node": this_node(current.config)}
    placed = fleet.placements.get(model.name)
    ready = [c for c in fleet_model.nodes if c.state == "ready"]
    there = ready[0] if ready else next((c for c in fleet_model.nodes if placed and c.node == placed.node), fleet_model.nodes[0])
    here = this_node(current.config)
    return {
        "node": here if there.node == "local" else there.node,
        "state": _state(there),
        "nodes": [{"node": here if c.node == "local" else c.node, "state": _state(c)} for c in fleet_model.nodes],
    }


def _state(candidate: Candidate) -> str:
    if not candidate.reachable:
        return "unreachable"
    return candidate.state or "unknown"  # a peer not asked yet


def fleet_models(fleet: Fleet, principal: Principal, created: int) -> list[dict[str, Any]]:
    """``/v1/models`` entries for the models only peers serve, in OpenAI's shape plus ``node`` and ``state``."""
    return [
        _remote_entry(name, remote, nodes, created)
        for name, (remote, nodes) in sorted(fleet.remote_models().items())
        if principal.may_use_named(name, remote.aliases)
    ]


def fleet_model_entry(fleet: Fleet, current: Snapshot, principal: Principal, name: str, created: int) -> dict[str, Any] | None:
    """``GET /v1/models/<name>`` of a model only peers serve (403 when the key may not use it); None otherwise."""
    if current.directory.lookup(name) is not None:
        return None
    for model_name, (remote, nodes) in fleet.remote_models().items():
        if name == model_name or name in remote.aliases:
            principal.check_model_named(model_name, remote.aliases)
            return _remote_entry(model_name, remote, nodes, created)
    return None


def _remote_entry(name: str, remote: RemoteModel, nodes: list[tuple[str, str]], created: int) -> dict[str, Any]:
    ready = [peer for peer, state in nodes if state == "ready"]
    node, state = (ready[0], "ready") if ready else nodes[0]
    return {
        "id": name, "object": "model", "created": created, "owned_by": "sparkd", "state": state, "node": node,
        "nodes": [{"node": peer, "state": peer_state} for peer, peer_state in nodes],
        "max_model_len": remote.max_model_len, "aliases": list(remote.aliases), "endpoints": list(remote.endpoints),
    }
