"""The fleet as this node sees it: which node serves a model, and sending requests there.

``Fleet`` holds the peers' last known state (``peerwatch.py``), ranks a model's candidate nodes
(``placement.py``) with this node's own state from the scheduler, and tries them best first: a peer
that is down or refuses is passed over for the next allowed node; with none left the client gets a
503 naming each peer tried and why. The last choice per model is kept for the status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import web

from ..adminjson import FleetView
from ..cluster.peers import Peer, PeerClient
from ..config import Config, ModelConfig
from ..engine.usage import RequestRecord
from ..errors import ServiceUnavailable
from ..http.auth import Principal
from ..scheduler.scheduler import Scheduler
from .nodes import LOCAL, candidates, this_node
from .onbehalf import forwarded_for
from .peerwatch import PeerWatch, RemoteModel
from .placement import Candidate, Choice, rank
from .relay import PeerFailed, send

log = structlog.get_logger("sparkd.fleet")


@dataclass(frozen=True)
class FleetModel:
    """A model of the fleet that a request named: its name, what the key check needs, where it may run."""

    name: str
    aliases: tuple[str, ...]
    endpoints: tuple[str, ...]
    nodes: list[Candidate]


@dataclass(frozen=True)
class Placed:
    node: str
    reason: str
    at: float


class Fleet:
    def __init__(self, config: Callable[[], Config], scheduler: Scheduler, peers: dict[str, Peer], client: PeerClient) -> None:
        self._config, self._scheduler, self.peers = config, scheduler, peers
        self.watch = PeerWatch(peers, client, config().cluster.heartbeat_s)
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self.placements: dict[str, Placed] = {}

    async def start(self) -> None:
        for name, peer in self.peers.items():
            self._sessions[name] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=peer.ssl, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        self.watch.start()

    async def close(self) -> None:
        await self.watch.close()
        for session in self._sessions.values():
            await session.close()

    # -- where a model is --------------------------------------------------------------------

    def local_candidate(self, model: ModelConfig) -> Candidate:
        runner = self._scheduler.runners.get(model.name)
        if runner is None:
            return Candidate(LOCAL, None, False, reachable=False, error="disabled here")
        lease = self._scheduler.lease
        fits = lease.fits(runner.load_claim) and (model.lifecycle != "exclusive" or not lease.holders)
        # A failed model in its back-off would only refuse: it is no better than any node that must queue.
        held = runner.name in lease.holders
        return Candidate(LOCAL, runner.state.value, (fits or held) and runner.state.value != "failed")

    def peer_candidate(self, node: str, model: str) -> Candidate:
        state = self.watch.states.get(node)
        if state is None:
            return Candidate(
                node, None, False, reachable=False,
                error=f"peer {node} is not one this sparkd started with (a reload cannot add peers: restart sparkd)",
            )
        remote = state.models.get(model)
        if state.reachable is False:
            return Candidate(node, None, False, reachable=False, error=state.error)
        if remote is None and state.reachable:
            return Candidate(
                node, None, False, reachable=False,
                error=f"peer {node} does not serve model {model} (not in its list of the models it runs for this node's key)",
            )
        return Candidate(node, remote.state if remote else None, remote.fits if remote else False)

    def configured(self, model: ModelConfig) -> FleetModel | None:
        """A model of this node's configuration that may run on peers; None: it runs here only."""
        nodes = candidates(model, self._config())
        if not nodes:
            return None
        found = [self.local_candidate(model) if node == LOCAL else self.peer_candidate(node, model.name) for node in nodes]
        return FleetModel(model.name, model.aliases, model.api_paths, found)

    def learned(self, name: str) -> FleetModel | None:
        """A model this node does not configure that a peer serves (by its name or an alias there)."""
        serving: list[tuple[str, RemoteModel]] = []
        for peer, state in self.watch.states.items():
            for remote in state.models.values():
                if remote.name == name or name in remote.aliases:
                    serving.append((peer, remote))
        if not serving:
            return None
        first = serving[0][1]
        nodes = [self.peer_candidate(peer, remote.name) for peer, remote in serving if remote.name == first.name]
        return FleetModel(first.name, first.aliases, first.endpoints, nodes)

    def remote_models(self) -> dict[str, tuple[RemoteModel, list[tuple[str, str]]]]:
        """Models peers serve that this node does not configure: each with (peer, state) pairs."""
        local = self._config().models
        found: dict[str, tuple[RemoteModel, list[tuple[str, str]]]] = {}
        for peer, state in self.watch.states.items():
            for remote in state.models.values():
                if remote.name in local:
                    continue
                entry = found.setdefault(remote.name, (remote, []))
                entry[1].append((peer, remote.state if state.reachable is not False else "unreachable"))
        return found

    # -- serving ------------------------------------------------------------------------------

    async def serve(
        self, request: web.Request, model: FleetModel, path: str, body: bytes, principal: Principal, record: RequestRecord,
        streaming: bool,
    ) -> web.StreamResponse | None:
        """The answer of the best node for ``model`` that takes it; None when that is this node (the
        caller serves it as any local request). ``ServiceUnavailable`` naming every peer that failed."""
        config = self._config()
        failures: list[PeerFailed] = []
        for choice in rank(model.nodes):
            if choice.node == LOCAL:
                self._placed(model.name, choice, failures)
                return None
            try:
                answer = await send(
                    request, self._sessions[choice.node], self.peers[choice.node], path, body, model.name, config.engine,
                    streaming, record, forwarded_for(principal, this_node(config)),
                )
            except PeerFailed as failure:
                log.warning("peer_forward_failed", peer=failure.peer, model=model.name, reason=failure.reason)
                if not failure.reachable:
                    self.watch.mark_unreachable(failure.peer, f"peer {failure.peer} {failure.reason}")
                failures.append(failure)
                continue
            self._placed(model.name, choice, failures)
            return answer
        raise self._unavailable(model, failures)

    def _placed(self, model: str, choice: Choice, failures: list[PeerFailed]) -> None:
        reason = choice.reason + "".join(f"; {f.peer} {f.reason}" for f in failures)
        previous = self.placements.get(model)
        if previous is None or previous.node != choice.node:
            log.info("model_placed", model=model, node=choice.node, reason=reason)
        self.placements[model] = Placed(choice.node, reason, time.time())

    def _unavailable(self, model: FleetModel, failures: list[PeerFailed]) -> ServiceUnavailable:
        reasons = [f"peer {f.peer} {f.reason}" for f in failures]
        reasons += [c.error for c in model.nodes if not c.reachable and c.node != LOCAL]  # each names its peer
        nodes = ", ".join(c.node for c in model.nodes)
        retry = min((f.retry_after for f in failures if f.retry_after is not None), default=5.0)
        return ServiceUnavailable(
            f"model {model.name} can run on {nodes}, and none of them takes it now: " + "; ".join(reasons or ["no node reachable"])
            + ". Check the peer's sparkd (sparkctl status on it), or allow another node in the model's nodes list",
            retry_after=retry,
            code="peer_unavailable",
            extra={"peers": [{"peer": f.peer, "reason": f.reason} for f in failures]},
        )

    # -- status ---------------------------------------------------------------------------------

    def view(self) -> FleetView:
        return {
            "node": this_node(self._config()),
            "peers": [state.view() for state in self.watch.states.values()],
            "placements": {name: {"node": p.node, "reason": p.reason, "at": p.at} for name, p in sorted(self.placements.items())},
        }
