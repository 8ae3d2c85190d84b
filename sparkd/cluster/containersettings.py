"""What a container needs to take part in a multi-node model on a Spark.

Ray and NCCL talk over the cluster network (the ConnectX-7 link), so head and
worker containers use host networking, see the RDMA devices, may lock memory
(IPC_LOCK, unlimited memlock), and are told which interface and address to use.
"""

from __future__ import annotations

from typing import Any

from ..config import Config, ModelConfig

UNLIMITED = 2**64 - 1
LOCAL = "local"


def cluster_env(config: Config) -> dict[str, str]:
    cluster = config.cluster
    env = {"VLLM_HOST_IP": cluster.address} if cluster.address else {}
    if cluster.interface:
        env.update(NCCL_SOCKET_IFNAME=cluster.interface, GLOO_SOCKET_IFNAME=cluster.interface, UCX_NET_DEVICES=cluster.interface)
    if cluster.ib_hca:
        env["NCCL_IB_HCA"] = cluster.ib_hca
    return env


def placeholders(config: Config, model: ModelConfig) -> dict[str, str]:
    """Values for ``{name}`` fields in a multi-node model's entrypoint, command and worker command."""
    return {
        "head_address": config.cluster.address,
        "node_address": config.cluster.address,
        "ray_port": str(config.cluster.ray_port),
        "port": str(model.port or ""),
        "head_port": str(model.port or ""),
        "nodes": str(len(model.nodes)),
        "workers": str(len(model.nodes) - 1),
    }


def fill(tokens: tuple[str, ...], values: dict[str, str]) -> tuple[str, ...]:
    """Replace known ``{name}`` fields; anything else (a JSON argument's braces) stays as written."""
    filled = []
    for token in tokens:
        for name, value in values.items():
            token = token.replace("{" + name + "}", value)
        filled.append(token)
    return tuple(filled)


def parallel_args(model: ModelConfig, command: tuple[str, ...]) -> tuple[str, ...]:
    """vLLM's split across the nodes, unless the command already sets it."""
    flag = "--tensor-parallel-size" if model.parallel == "tensor" else "--pipeline-parallel-size"
    extra: tuple[str, ...] = ()
    if flag not in command:
        extra += (flag, str(len(model.nodes)))
    if "--distributed-executor-backend" not in command:
        extra += ("--distributed-executor-backend", "ray")
    return extra


def for_cluster(fields: dict[str, Any], config: Config, model: ModelConfig, role: str) -> dict[str, Any]:
    """Adapt rendered container fields for a multi-node head or a Ray worker."""
    values = placeholders(config, model)
    fields = dict(fields)
    fields["network"] = "host"
    fields["cap_add"] = ("IPC_LOCK",)
    fields["ulimits"] = {"memlock": UNLIMITED, **fields["ulimits"]}  # an explicit memlock limit wins
    fields["devices"] = tuple(dict.fromkeys(fields["devices"] + tuple(config.cluster.devices)))
    fields["env"] = dict(sorted({**fields["env"], **cluster_env(config)}.items()))
    if role == "worker":
        # The worker's own [workers.<model>] command, the head's values filled in already (workers.py).
        fields["entrypoint"] = fill(fields["command"], values)
        fields["command"] = ()
        fields["host_port"] = None
        return fields
    command = fill(fields["command"], values)
    fields["command"] = command + parallel_args(model, command)
    fields["entrypoint"] = fill(fields["entrypoint"], values)
    return fields
