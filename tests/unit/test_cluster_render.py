"""Multi-node container specs for a Spark-like two-node config, and their validation."""

from __future__ import annotations

import textwrap

import pytest

from sparkd.cluster.render import worker_command
from sparkd.cluster.workers import WorkerRequest, worker_model
from sparkd.config import ConfigError, load_config
from sparkd.runtime.spec import UNLIMITED, render

SPARK = textwrap.dedent(
    """
    [cluster]
    address = "192.168.100.10"
    interface = "enp1s0f1np1"
    ib_hca = "rocep1s0f1"

    [peers.spark2]
    url = "http://spark2.lan:8009"
    key_file = "/etc/sparkd/peers/spark2.key"
    address = "192.168.100.11"

    [models.llama-405b]
    image = "localhost/sparkd/vllm-gb10:v1"
    entrypoint = ["/bin/bash", "-c", "ray start --head --port={ray_port} --node-ip-address={node_address} && exec vllm \\"$@\\"", "--"]
    command = ["serve"]
    args = ["meta/llama-405b", "--host", "127.0.0.1", "--port", "{port}", "--gpu-memory-utilization", "0.9"]
    gpu_memory = 0.9
    port = 18500
    nodes = ["local", "spark2"]
    """
)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "sparkd.toml"
    path.write_text(SPARK)
    return load_config(path)


def test_head_spec_has_what_multi_node_vllm_needs(config):
    spec = render(config, config.models["llama-405b"])
    assert spec.network == "host" and spec.cap_add == ("IPC_LOCK",)
    assert "/dev/infiniband" in spec.devices and "nvidia.com/gpu=all" in spec.devices
    assert dict(spec.ulimits)["memlock"] == UNLIMITED
    assert spec.env["VLLM_HOST_IP"] == "192.168.100.10"
    for name in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "UCX_NET_DEVICES"):
        assert spec.env[name] == "enp1s0f1np1"
    assert spec.env["NCCL_IB_HCA"] == "rocep1s0f1"
    command = spec.command
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    assert command[command.index("--distributed-executor-backend") + 1] == "ray"
    assert command[command.index("--port") + 1] == "18500"
    assert "--port=6379" in spec.entrypoint[2] and "--node-ip-address=192.168.100.10" in spec.entrypoint[2]
    kwargs = spec.create_kwargs(host_port=spec.host_port, engine_key="k")
    assert kwargs["network_mode"] == "host" and "ports" not in kwargs
    assert kwargs["cap_add"] == ["IPC_LOCK"]


def test_pipeline_parallel(tmp_path):
    path = tmp_path / "sparkd.toml"
    path.write_text(SPARK + 'parallel = "pipeline"\n')
    config = load_config(path)
    command = render(config, config.models["llama-405b"]).command
    assert "--pipeline-parallel-size" in command and "--tensor-parallel-size" not in command


def test_worker_spec_on_the_peer(config, tmp_path):
    model = config.models["llama-405b"]
    command = worker_command(config, model)
    assert command == ("ray", "start", "--block", "--address=192.168.100.10:6379", "--node-ip-address={node_address}")
    # The peer renders the worker with its own cluster settings.
    peer_path = tmp_path / "peer.toml"
    peer_path.write_text('[cluster]\naddress = "192.168.100.11"\ninterface = "enp1s0f1np1"\n')
    peer_config = load_config(peer_path)
    request = WorkerRequest(
        head="default", model="llama-405b", claim=0.9, image=model.image, command=command, env={},
        volumes=(), gpu=True, heartbeat_timeout_s=30,
    )
    spec = render(peer_config, worker_model(peer_config, request), role="worker")
    assert spec.entrypoint[-1] == "--node-ip-address=192.168.100.11"
    assert spec.network == "host" and spec.env["VLLM_HOST_IP"] == "192.168.100.11"
    assert spec.name == "sparkd-llama-405b.worker"


@pytest.mark.parametrize(
    "extra, expected",
    [
        ('[models.bad]\nimage = "x"\nnodes = ["local", "nowhere"]\nport = 1\n', "models.bad.nodes"),
        ('[models.bad]\nimage = "x"\nnodes = ["local", "spark2"]\n', "models.bad.port: expected a host port"),
        ('[models.bad]\nimage = "x"\nnodes = ["spark2"]\nport = 2\n', "models.bad.nodes"),
        ('[peers.local]\nurl = "http://x:1"\nkey_file = "k"\naddress = "a"\n', "peers.local"),
        ('[peers.p3]\nurl = "ftp://x"\nkey_file = "k"\naddress = "a"\n', "peers.p3.url"),
    ],
)
def test_cluster_mistakes_are_reported(tmp_path, extra, expected):
    path = tmp_path / "sparkd.toml"
    path.write_text(SPARK + extra)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert any(expected in str(p) for p in caught.value.problems), caught.value.problems


GOOD_REQUEST = {
    "head": "spark1", "model": "llama-405b", "claim": 0.9, "image": "localhost/sparkd/vllm-gb10:v1",
    "command": ["ray", "start"], "env": {}, "volumes": ["/var/lib/sparkd/huggingface:/root/.cache/huggingface"],
    "gpu": True, "heartbeat_timeout_s": 30,
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"claim": -0.5}, "'claim' must be a number within 0.0-0.94"),
        ({"claim": 2}, "'claim' must be a number within 0.0-0.94"),
        ({"model": "../../x"}, "'model' must be a name"),
        ({"head": 7}, "'head' must be a name"),
        ({"volumes": ["relative"]}, "volume 'relative' is invalid"),
        ({"volumes": "/a:/b"}, "'volumes' must be a list of strings"),
        ({"heartbeat_timeout_s": 0}, "'heartbeat_timeout_s' must be a number within 1.0-3600.0"),
        ({"command": []}, "'command' must be a non-empty list"),
        ({"env": {"A": 1}}, "'env' must be a table of strings"),
        ({"gpu": "yes"}, "'gpu' must be true or false"),
    ],
)
def test_worker_requests_are_checked(config, change, message):
    from sparkd.errors import BadRequest

    assert WorkerRequest.parse(GOOD_REQUEST, config).claim == 0.9
    with pytest.raises(BadRequest) as caught:
        WorkerRequest.parse({**GOOD_REQUEST, **change}, config)
    assert message in caught.value.message
