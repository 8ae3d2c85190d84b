"""Multi-node container specs for a Spark-like two-node config, and their validation: peers, worker tables,
and what a head may ask of a worker."""

from __future__ import annotations

import os
import textwrap

import pytest
from structlog.testing import capture_logs

from sparkd.cluster.head import HeadCoordinator
from sparkd.cluster.peers import PeerError, load_peers, warn_insecure
from sparkd.cluster.workers import WorkerRequest, worker_model
from sparkd.config import ConfigError, load_config
from sparkd.errors import BadRequest
from sparkd.runtime.spec import UNLIMITED, render

SPARK = textwrap.dedent(
    """
    [cluster]
    address = "192.168.100.10"
    interface = "enp1s0f1np1"
    ib_hca = "rocep1s0f1"

    [peers.spark2]
    url = "https://spark2.lan:8443"
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


PEER = textwrap.dedent(
    """
    [cluster]
    address = "192.168.100.11"
    interface = "enp1s0f1np1"

    [workers.llama-405b]
    image = "localhost/sparkd/vllm-gb10:v1"
    gpu_memory = 0.9
    volumes = ["/var/lib/sparkd/huggingface:/root/.cache/huggingface"]
    """
)


@pytest.fixture
def peer_config(tmp_path):
    path = tmp_path / "peer.toml"
    path.write_text(PEER)
    return load_config(path)


def test_worker_spec_on_the_peer(config, peer_config):
    """The head sends its address and ports; image, command, volumes and share are the peer's own."""
    body = HeadCoordinator(config, {}, None, lambda model, reason: None).worker_request(config.models["llama-405b"])  # type: ignore[arg-type]
    assert body == {
        "head": "default", "model": "llama-405b", "image": "localhost/sparkd/vllm-gb10:v1", "head_address": "192.168.100.10",
        "ray_port": 6379, "head_port": 18500, "heartbeat_timeout_s": 30.0,
    }
    request = WorkerRequest.parse(body, peer_config)
    spec = render(peer_config, worker_model(peer_config, peer_config.workers["llama-405b"], request), role="worker")
    assert spec.entrypoint == ("ray", "start", "--block", "--address=192.168.100.10:6379", "--node-ip-address=192.168.100.11")
    assert spec.network == "host" and spec.env["VLLM_HOST_IP"] == "192.168.100.11"
    assert spec.name == "sparkd-llama-405b.worker"
    assert [(m.source, m.target) for m in spec.mounts] == [("/var/lib/sparkd/huggingface", "/root/.cache/huggingface")]


@pytest.mark.parametrize(
    "extra, expected",
    [
        ('[models.bad]\nimage = "x"\nnodes = ["local", "nowhere"]\nport = 1\n', "models.bad.nodes"),
        ('[models.bad]\nimage = "x"\nnodes = ["local", "spark2"]\n', "models.bad.port: expected a host port"),
        ('[models.bad]\nimage = "x"\nnodes = ["spark2", "spark2"]\nport = 2\n', "models.bad.nodes"),
        ('[peers.local]\nurl = "https://x:1"\nkey_file = "k"\naddress = "a"\n', "peers.local"),
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
    "head": "spark1", "model": "llama-405b", "image": "localhost/sparkd/vllm-gb10:v1", "head_address": "192.168.100.10",
    "ray_port": 6379, "head_port": 18500, "heartbeat_timeout_s": 30,
}


@pytest.mark.parametrize(
    "change, message",
    [
        # what the worker's own table decides is not the head's to send
        ({"volumes": ["/:/host:rw"]}, "'volumes' not accepted"),
        ({"command": ["sh", "-c", "id"]}, "'command' not accepted"),
        ({"env": {"LD_PRELOAD": "/x.so"}}, "'env' not accepted"),
        ({"claim": 0}, "'claim' not accepted"),
        ({"devices": ["/dev/sda"]}, "'devices' not accepted"),
        ({"image": "docker.io/evil/image:latest"}, "is not this node's image for llama-405b"),
        ({"model": "other-model"}, "no [workers.other-model] table"),
        ({"model": "../../x"}, "'model' must be a name"),
        ({"head": 7}, "'head' must be a name"),
        ({"head_address": "1.2.3.4 --dashboard-host=0.0.0.0"}, "'head_address' must be the head's cluster-network IP address"),
        ({"head_address": None}, "'head_address' must be"),
        ({"ray_port": 0}, "'ray_port' must be a port within 1-65535"),
        ({"ray_port": "6379"}, "'ray_port' must be a port"),
        ({"head_port": True}, "'head_port' must be a port"),
        ({"heartbeat_timeout_s": 0}, "'heartbeat_timeout_s' must be a number within 1.0-300.0"),
        ({"heartbeat_timeout_s": 3600}, "'heartbeat_timeout_s' must be a number within 1.0-300.0"),
    ],
)
def test_worker_requests_are_checked(peer_config, change, message):
    assert WorkerRequest.parse(GOOD_REQUEST, peer_config).head_address == "192.168.100.10"
    assert WorkerRequest.parse({k: v for k, v in GOOD_REQUEST.items() if k != "image"}, peer_config).model == "llama-405b"
    with pytest.raises(BadRequest) as caught:
        WorkerRequest.parse({**GOOD_REQUEST, **change}, peer_config)
    assert message in caught.value.message and caught.value.status == 400


@pytest.mark.parametrize(
    "table, expected",
    [
        ('gpu_memory = 0', "workers.w.gpu_memory: expected this node's share for the worker: more than 0"),
        ('gpu_memory = 2', "workers.w.gpu_memory"),
        ('gpu_memory = 0.5\nvolumes = ["relative"]', "workers.w.volumes"),
        ('gpu_memory = 0.5\ncommand = []', "workers.w.command"),
        ('gpu_memory = 0.5\nclaim = 0.5', "workers.w.claim"),
    ],
)
def test_worker_table_mistakes_are_reported(tmp_path, table, expected):
    path = tmp_path / "sparkd.toml"
    path.write_text(f'[cluster]\naddress = "10.0.0.2"\n[workers.w]\nimage = "x"\n{table}\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert any(expected in str(p) for p in caught.value.problems), caught.value.problems


def test_a_worker_table_needs_a_cluster_table_and_the_lease_timeout_is_capped(tmp_path):
    path = tmp_path / "sparkd.toml"
    path.write_text('[workers.w]\nimage = "x"\ngpu_memory = 0.5\n')
    with pytest.raises(ConfigError, match="a \\[cluster\\] table too"):
        load_config(path)
    path.write_text('[cluster]\nlease_timeout_s = 3600\n')
    with pytest.raises(ConfigError, match="at most 300 seconds"):
        load_config(path)
    path.write_text('[cluster]\nmax_leases_per_head = 0\n')
    with pytest.raises(ConfigError, match="max_leases_per_head"):
        load_config(path)
    path.write_text('[cluster]\n')
    assert load_config(path).cluster_configured and not load_config(path).workers
    path.write_text('[server]\ninstance = "x"\n')
    assert not load_config(path).cluster_configured


# --- peers: TLS and the key file ---

PEER_TABLE = '[peers.p]\nurl = "{url}"\nkey_file = "{key_file}"\naddress = "10.0.0.2"\n{extra}'


def peer_file(tmp_path, url, extra="", key_mode=0o600):
    key_file = tmp_path / "p.key"
    key_file.write_text("sk-peer-key-0123456789abcdef\n")
    key_file.chmod(key_mode)
    path = tmp_path / "sparkd.toml"
    path.write_text('[cluster]\naddress = "10.0.0.1"\n' + PEER_TABLE.format(url=url, key_file=key_file, extra=extra))
    return path


def test_a_clear_text_peer_url_is_refused_unless_insecure(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(peer_file(tmp_path, "http://spark2.lan:8009"))
    (problem,) = [str(p) for p in caught.value.problems]
    assert "peers.p.url" in problem and "https://" in problem and "insecure = true" in problem
    assert load_config(peer_file(tmp_path, "https://spark2.lan:8443")).peers["p"].url.startswith("https://")
    config = load_config(peer_file(tmp_path, "http://spark2.lan:8009", "insecure = true\n"))
    assert config.peers["p"].insecure


def test_an_insecure_peer_is_a_warning_at_start_up(tmp_path):
    insecure = load_config(peer_file(tmp_path, "http://spark2.lan:8009", "insecure = true\n"))
    with capture_logs() as logs:
        warn_insecure(insecure.peers)
        warn_insecure(load_config(peer_file(tmp_path, "https://spark2.lan:8443", "insecure = true\n")).peers)
    assert [(e["event"], e["log_level"], e["peer"]) for e in logs] == [("peer_insecure", "warning", "p")]


def test_a_peer_key_file_is_checked_like_the_keys_file(tmp_path):
    config = load_config(peer_file(tmp_path, "https://spark2.lan:8443"))
    assert load_peers(config.peers)["p"].key == "sk-peer-key-0123456789abcdef"
    for mode in (0o640, 0o604, 0o660):
        config = load_config(peer_file(tmp_path, "https://spark2.lan:8443", key_mode=mode))
        with pytest.raises(PeerError) as refused:
            load_peers(config.peers)
        assert f"mode {mode:04o}" in str(refused.value) and "chmod 600" in str(refused.value)
        assert "sk-peer-key" not in str(refused.value)
    if os.geteuid() == 0:
        config = load_config(peer_file(tmp_path, "https://spark2.lan:8443"))
        os.chown(config.peers["p"].key_file, 65534, 65534)
        with pytest.raises(PeerError, match="owned by uid 65534"):
            load_peers(config.peers)
    (tmp_path / "p.key").unlink()
    with pytest.raises(PeerError, match="does not exist"):
        load_peers(config.peers)
