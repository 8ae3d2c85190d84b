"""Multi-node models: the same pull on every peer of the model's nodes, each into its own cache.

The head asks each peer through the peer API (``/api/worker-weights/<model>``, role
``peer``) to pull the model's repository into the cache its ``[workers.<model>]`` container
mounts at the head's container paths, then follows the peer's progress into the head's
pull (``PullJob.peers``), so ``sparkctl pull`` and the status show both.  The peer alone
decides where its files go (its own worker table's volumes); the head sends only the
repository and the container paths its engine reads.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import structlog

from ..cluster.peers import Peer, PeerClient, PeerError
from ..config import Config, ModelConfig
from ..errors import BadRequest, Forbidden, NotFound
from .cache import DOWNLOAD_DIR_FLAG, container_paths
from .service import PullJob, WeightsUnavailable

log = structlog.get_logger("sparkd.weights")

WORKER_WEIGHTS_PATH = "/api/worker-weights"
FOLLOW_EVERY_S = 1.0
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
MAX_PATH = 1024


@dataclass(frozen=True)
class PeerWeightRequest:
    """A head's request to pull a model's weights on this node, checked against this node's ``[workers]``."""

    model: str
    repo: str
    hub_path: str
    weights_path: str

    @classmethod
    def parse(cls, model: str, body: Any, config: Config, peer_key: str) -> PeerWeightRequest:
        worker = config.workers.get(model)
        if worker is None:
            raise NotFound(f"this node has no [workers.{model}] table: it runs no worker of that model", code="worker_unknown")
        if worker.heads and peer_key not in worker.heads:
            raise Forbidden(f"the peer key {peer_key!r} may not pull for {model}: [workers.{model}] heads lists "
                            f"{', '.join(worker.heads)}", code="head_not_allowed")
        if not isinstance(body, dict):
            raise BadRequest("a weights request is a JSON object with repo, hub_path and weights_path")
        repo, hub_path, weights_path = body.get("repo"), body.get("hub_path"), body.get("weights_path")
        if not isinstance(repo, str) or not REPO_ID.match(repo):
            raise BadRequest("repo must be a hub repository id like org/name", code="invalid_repo")
        for key, value in (("hub_path", hub_path), ("weights_path", weights_path)):
            if not isinstance(value, str) or not _container_path(value):
                raise BadRequest(f"{key} must be an absolute container path without '..'", code="invalid_path")
        assert isinstance(hub_path, str) and isinstance(weights_path, str)
        return cls(model, repo, hub_path, weights_path)

    def model_table(self, config: Config) -> ModelConfig:
        """The worker as a model table whose cache paths are the head's: what ``cache_dirs`` maps through its volumes."""
        worker = config.workers[self.model]
        args = (DOWNLOAD_DIR_FLAG, self.weights_path) if self.weights_path != self.hub_path else ()
        return ModelConfig(
            name=self.model, image=worker.image, args=args, env={**worker.env, "HF_HUB_CACHE": self.hub_path},
            volumes=worker.volumes, hf_model=self.repo,
        )


def _container_path(value: str) -> bool:
    path = PurePosixPath(value)
    return len(value) <= MAX_PATH and path.is_absolute() and ".." not in path.parts and "\x00" not in value


@dataclass
class PeerPulls:
    """The head's side: start the pull on each peer of a model and follow it."""

    peers: dict[str, Peer]
    client: PeerClient

    async def missing(self, model: ModelConfig) -> list[str]:
        """The peers of ``model`` whose caches lack its weights, as "<state> on node <peer>".

        An unreachable peer is left out: the start's worker lease then fails with its own, precise message.
        """
        hub_path, weights_path = container_paths(model)
        body = {"repo": model.hf_model, "hub_path": hub_path, "weights_path": weights_path}
        gaps = []
        for node in (n for n in model.nodes if n != "local" and n in self.peers):
            try:
                seen = await self.client.call(self.peers[node], "POST", f"{WORKER_WEIGHTS_PATH}/{model.name}/presence", body)
            except PeerError as error:
                log.warning("weights_peer_presence_unknown", model=model.name, peer=node, error=str(error))
                continue
            state = seen.get("weights") if isinstance(seen, dict) else None
            if state != "complete":
                gaps.append(f"{state or 'unknown'} on node {node}")
        return gaps

    def follow(self, model: ModelConfig, job: PullJob) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._all(model, job))

    async def _all(self, model: ModelConfig, job: PullJob) -> None:
        nodes = [node for node in model.nodes if node != "local"]
        results = await asyncio.gather(*(self._one(model, job, node) for node in nodes), return_exceptions=True)
        failures = [str(r) for r in results if isinstance(r, BaseException)]
        if failures:
            raise WeightsUnavailable("; ".join(failures))

    async def _one(self, model: ModelConfig, job: PullJob, node: str) -> None:
        peer = self.peers.get(node)
        if peer is None:
            raise WeightsUnavailable(f"model {model.name} spans node {node}, which is not in [peers]")
        hub_path, weights_path = container_paths(model)
        path = f"{WORKER_WEIGHTS_PATH}/{model.name}"
        try:
            view = await self.client.call(peer, "POST", path, {"repo": job.repo, "hub_path": hub_path, "weights_path": weights_path})
            while True:
                job.peers[node] = {**view, "node": node, "peers": []}
                if view.get("state") != "pulling":
                    break
                await asyncio.sleep(FOLLOW_EVERY_S)
                view = await self.client.call(peer, "GET", path)
        except PeerError as error:
            job.peers[node] = {"model": model.name, "repo": job.repo, "node": node, "state": "failed", "error": str(error), "peers": []}
            raise WeightsUnavailable(f"peer {node}: {error}") from None
        if view.get("state") == "failed":
            raise WeightsUnavailable(f"peer {node}: {view.get('error')}")
        log.info("weights_peer_pull_done", model=model.name, peer=node)
