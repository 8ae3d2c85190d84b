"""Issue 8: a model across two nodes, negotiated between two real sparkd daemons on real Podman.

Both daemons run on this machine (their own ports, state and runtime directories,
GPU locks and container instance labels). The fake engine plays vLLM's Ray roles:
the worker registers with the head, and the head answers /health only once every
worker joined.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from harness import container_events, engine_model, free_port, write_keys

pytestmark = pytest.mark.podman

PEER_KEY = "sk-sparkd-peer-head-0123456789"
"""The key node b made for the head: role peer, worker leases only."""
PEER_ADMIN_KEY = "sk-sparkd-peer-admin-0123456789"
FAST_CLUSTER = {"address": "127.0.0.1", "devices": [], "heartbeat_s": 0.5, "lease_timeout_s": 3}
# Multi-node containers raise memlock (unlimited on a Spark); this test machine's hard limits are
# 8 MiB memlock, 20000 open files and 4096 processes (once any ulimit is set, Podman drops
# containers.conf's default_ulimits and its own defaults exceed these).
TEST_ULIMITS = {"defaults": {"ulimits": {"nofile": 20000, "nproc": 4096, "memlock": 8388608}}}


def two_nodes(sparkd_factory, engine_image, tmp_path, peer_models=None, peer_lifecycle=None, head_lifecycle=None):
    """A peer daemon (node b) whose [workers] table describes the worker of "big", and a head spanning local + b."""
    peer = sparkd_factory(
        peer_models or {},
        {
            **TEST_ULIMITS,
            "gpu": {"memory_budget": 0.94},
            "cluster": FAST_CLUSTER,
            "lifecycle": dict(peer_lifecycle or {}),
        },
        name="peer",
    )
    head_port, worker_port = free_port(), free_port()
    # The worker is the peer's own configuration: the head only names the model and sends its address and ports.
    peer.settings["workers"] = {
        peer.model("big"): {
            "image": engine_image,
            "gpu": False,
            "gpu_memory": 0.5,
            "command": [
                "python3", "/opt/fake_vllm.py", "--host", "127.0.0.1", "--port", str(worker_port),
                "--fake-role", "worker", "--fake-head-address", "{head_address}:{head_port}",
            ],
        }
    }
    # Its own container labels, apart from the head's; and keys: the head must present the key b made for it.
    peer.settings["server"] = {"instance": peer.prefix + "b", "anonymous": "off"}
    peer.write_config()
    write_keys(
        peer.workdir / "keys.toml",
        {"head-spark1": {"key": PEER_KEY, "role": "peer"}, "ops": {"key": PEER_ADMIN_KEY, "role": "admin"}},
    )
    peer.admin_key = PEER_ADMIN_KEY
    key_file = tmp_path / "peer-b.key"
    key_file.write_text(PEER_KEY + "\n")
    key_file.chmod(0o600)
    big = engine_model(
        engine_image,
        claim=0.5,
        port=head_port,
        nodes=["local", "b"],
        args=["--host", "127.0.0.1", "--fake-role", "head", "--fake-workers", "{workers}"],
    )
    big["args"] = ["--port", "{port}"] + [a for a in big["args"] if a not in ("--port", "8000")]
    head = sparkd_factory(
        {"big": big},
        {
            **TEST_ULIMITS,
            "gpu": {"memory_budget": 0.94},
            "cluster": FAST_CLUSTER,
            # The test daemons listen on loopback without TLS: insecure = true says so (and start-up warns).
            "peers": {"b": {"url": peer.base_url, "key_file": str(key_file), "address": "127.0.0.1", "insecure": True}},
            "lifecycle": dict(head_lifecycle or {}),
        },
        name="head",
    )
    return head, peer


async def test_two_node_model_starts_worker_on_peer_then_head(sparkd_factory, engine_image, podman, tmp_path):
    head, peer = two_nodes(sparkd_factory, engine_image, tmp_path)
    await peer.start()
    await head.start()
    assert "event=peer_insecure" in head.logs() and "peer=b" in head.logs()
    since = time.time()
    async with aiohttp.ClientSession() as session:
        status, body = await head.chat(session, "big", "hello cluster")
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].startswith("hello cluster")
    starts = [model for _, _, model in container_events(podman, since, head.prefix, {"start"})]
    assert starts == [head.model("big") + ".worker", head.model("big")], starts  # the worker first, then the head
    head_status = await head.model_status("big")
    assert head_status["state"] == "ready" and head_status["holds"] == 0.5
    assert [n["node"] for n in head_status["nodes"]] == ["local", "b"]
    assert head_status["nodes"][1]["lease"]
    peer_status = await peer.status()
    (lease,) = peer_status["worker_leases"]
    assert lease["model"] == head.model("big") and lease["state"] == "ready" and lease["peer_key"] == "head-spark1"
    assert peer_status["lease"]["holders"] == {head.model("big") + ".worker": 0.5}


async def test_stopping_the_model_releases_both_sides(sparkd_factory, engine_image, podman, tmp_path):
    head, peer = two_nodes(sparkd_factory, engine_image, tmp_path)
    await peer.start()
    await head.start()
    async with aiohttp.ClientSession() as session:
        assert (await head.chat(session, "big"))[0] == 200
        since = time.time()
        assert (await head.admin("POST", f"/api/models/{head.model('big')}/stop"))[0] == 200
    deadline = time.monotonic() + 10
    while (await peer.status())["worker_leases"] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    peer_status = await peer.status()
    assert peer_status["worker_leases"] == [] and peer_status["lease"]["holders"] == {}
    assert (await head.status())["lease"]["holders"] == {}
    died = {model for _, _, model in container_events(podman, since, head.prefix, {"died"})}
    assert died == {head.model("big"), head.model("big") + ".worker"}


async def test_busy_peer_model_is_drained_before_the_worker_starts(sparkd_factory, engine_image, podman, tmp_path):
    peer_models = {"p": engine_model(engine_image, claim=0.8, env={"FAKE_TOKEN_RATE": "20", "FAKE_TOKENS": "30"})}
    # fifo: the drain begins at once (under the swap quantum it begins once p's quantum is over).
    head, peer = two_nodes(sparkd_factory, engine_image, tmp_path, peer_models=peer_models, peer_lifecycle={"swap_policy": "fifo"})
    await peer.start()
    await head.start()
    body = {"model": peer.model("p"), "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 30}
    async with aiohttp.ClientSession() as session:
        assert (await peer.chat(session, "p"))[0] == 200
        auth = {"Authorization": f"Bearer {PEER_ADMIN_KEY}"}
        async with session.post(peer.base_url + "/v1/chat/completions", json=body, headers=auth) as stream:
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")
            big = asyncio.create_task(head.chat(session, "big"))
            await asyncio.sleep(0.5)
            assert not big.done()  # the peer's model is busy: the worker waits, nothing is cut
            assert (await peer.model_status("p"))["state"] == "draining"
            streamed = await stream.read()
            stream_done = time.time()
        assert streamed.rstrip().endswith(b"data: [DONE]")
        status, answer = await big
    assert status == 200, answer
    worker_start = [t for t, _, m in container_events(podman, stream_done - 5, head.prefix, {"start"}) if m.endswith(".worker")]
    assert worker_start and worker_start[0] >= stream_done - 0.05


async def test_peer_refusal_reaches_the_head_with_its_reason(sparkd_factory, engine_image, tmp_path):
    peer_models = {"p": engine_model(engine_image, claim=0.8)}
    head, peer = two_nodes(sparkd_factory, engine_image, tmp_path, peer_models=peer_models, peer_lifecycle={"policy": "reject"})
    await peer.start()
    await head.start()
    async with aiohttp.ClientSession() as session:
        assert (await peer.chat(session, "p"))[0] == 200
        status, body = await head.chat(session, "big")
    assert status == 503
    message = body["error"]["message"]
    assert "peer b answered 429" in message and f"busy with model {peer.model('p')}" in message


async def test_killed_head_makes_the_peer_release_its_worker(sparkd_factory, engine_image, tmp_path):
    head, peer = two_nodes(sparkd_factory, engine_image, tmp_path)
    await peer.start()
    await head.start()
    async with aiohttp.ClientSession() as session:
        assert (await head.chat(session, "big"))[0] == 200
    assert len((await peer.status())["worker_leases"]) == 1
    head.kill()
    killed = time.monotonic()
    while (await peer.status())["worker_leases"] and time.monotonic() - killed < 10:
        await asyncio.sleep(0.1)
    released_after = time.monotonic() - killed
    assert (await peer.status())["worker_leases"] == []
    assert released_after <= FAST_CLUSTER["lease_timeout_s"] + 3, released_after
    assert (await peer.status())["lease"]["holders"] == {}
    assert "worker_lease_expired" in peer.logs()


async def test_killed_peer_fails_the_model_on_the_head(sparkd_factory, engine_image, tmp_path):
    head, peer = two_nodes(sparkd_factory, engine_image, tmp_path)
    await peer.start()
    await head.start()
    async with aiohttp.ClientSession() as session:
        assert (await head.chat(session, "big"))[0] == 200
    peer.kill()
    failed = await head.wait_state("big", "failed", timeout=FAST_CLUSTER["lease_timeout_s"] + 10)
    assert "peer b has not answered heartbeats" in failed["failure"]["message"]
    assert (await head.status())["lease"]["holders"] == {}
    async with aiohttp.ClientSession() as session:
        status, body = await head.chat(session, "big")
    assert status == 503 and "peer b" in body["error"]["message"] and "unreachable" in body["error"]["message"]


async def test_doctor_reaches_the_peer(sparkd_factory, engine_image, tmp_path):
    import subprocess
    import sys

    head, peer = two_nodes(sparkd_factory, engine_image, tmp_path)
    await peer.start()
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "sparkd", "doctor", "--config", str(head.config_path)], capture_output=True, text=True
    )
    assert "PASS  peer       peer b at" in result.stdout and "accepts its key" in result.stdout, result.stdout
    peer.kill()
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "sparkd", "doctor", "--config", str(head.config_path)], capture_output=True, text=True
    )
    assert "FAIL  peer       peer b at" in result.stdout and "unreachable" in result.stdout
