"""Which nodes may run a model whole (``[models.x] nodes`` as placement candidates), in this node's terms.

This node is ``local`` (or its ``cluster.name``); every other name is a ``[peers.<name>]`` table.
A model that spans its nodes (``parallel`` tensor/pipeline with ``local`` as head) has no candidates:
it runs here, with worker leases on the peers (``sparkd/cluster``).
"""

from __future__ import annotations

from ..config import Config, ModelConfig

LOCAL = "local"


def this_node(config: Config) -> str:
    """How this node names itself to its clients: ``cluster.name``, else ``local``."""
    return config.cluster.name or LOCAL


def candidates(model: ModelConfig, config: Config) -> tuple[str, ...]:
    """The nodes that may each run ``model`` (``local`` for this one), in the configured order; () for a
    model that runs here only (no ``nodes``, or it spans them)."""
    if not model.nodes or model.spans:
        return ()
    return tuple(LOCAL if node in (LOCAL, config.cluster.name) else node for node in model.nodes)


def runs_here(model: ModelConfig, config: Config) -> bool:
    """This node may run ``model`` itself."""
    placed = candidates(model, config)
    return not placed or LOCAL in placed
