"""Issue 11: the holes a LAN client or a local user could use, closed; each block is one acceptance point."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from harness import container_events, engine_model, write_keys

pytestmark = pytest.mark.podman


# --- keys and admin access matrix ---
#
# Acceptance c: anonymous mode x key x route x transport, one daemon per anonymous mode. Inference uses a
# fake-engine model ("a"), so an admitted request is a real 200 from a real container; the restricted
# key may use only model "b" (never started). "wrong" is a key in no file; "peer" a key with role peer.

MATRIX_KEYS = {
    "user": "sk-test-matrix-user-0123456789abcdef",
    "admin": "sk-test-matrix-admin-0123456789abcdef",
    "restricted": "sk-test-matrix-restricted-0123456789",
    "peer": "sk-test-matrix-peer-0123456789abcdef",
    "wrong": "sk-test-matrix-wrong-0123456789abcdef",
}
ROUTES = ("models", "inference", "api")
# (anonymous, key, transport): (GET /v1/models, POST /v1/chat/completions for "a", GET /api/status)
MATRIX: dict[tuple[str, str, str], tuple[int, int, int]] = {
    ("off", "none", "tcp"): (401, 401, 401),
    ("off", "wrong", "tcp"): (401, 401, 401),
    ("off", "user", "tcp"): (200, 200, 403),
    ("off", "admin", "tcp"): (200, 200, 200),
    ("off", "restricted", "tcp"): (200, 403, 403),
    ("off", "peer", "tcp"): (403, 403, 403),
    ("off", "none", "unix"): (200, 200, 200),
    ("off", "wrong", "unix"): (401, 401, 401),
    ("off", "user", "unix"): (200, 200, 403),
    ("off", "admin", "unix"): (200, 200, 200),
    ("off", "restricted", "unix"): (200, 403, 403),
    ("off", "peer", "unix"): (403, 403, 403),
    ("loopback", "none", "tcp"): (200, 200, 401),
    ("loopback", "wrong", "tcp"): (401, 401, 401),
    ("loopback", "user", "tcp"): (200, 200, 403),
    ("loopback", "admin", "tcp"): (200, 200, 200),
    ("loopback", "restricted", "tcp"): (200, 403, 403),
    ("loopback", "peer", "tcp"): (403, 403, 403),
    ("loopback", "none", "unix"): (200, 200, 200),
    ("loopback", "wrong", "unix"): (401, 401, 401),
    ("loopback", "user", "unix"): (200, 200, 403),
    ("loopback", "admin", "unix"): (200, 200, 200),
    ("loopback", "restricted", "unix"): (200, 403, 403),
    ("loopback", "peer", "unix"): (403, 403, 403),
    ("any", "none", "tcp"): (200, 200, 401),
    ("any", "wrong", "tcp"): (401, 401, 401),
    ("any", "user", "tcp"): (200, 200, 403),
    ("any", "admin", "tcp"): (200, 200, 200),
    ("any", "restricted", "tcp"): (200, 403, 403),
    ("any", "peer", "tcp"): (403, 403, 403),
    ("any", "none", "unix"): (200, 200, 200),
    ("any", "wrong", "unix"): (401, 401, 401),
    ("any", "user", "unix"): (200, 200, 403),
    ("any", "admin", "unix"): (200, 200, 200),
    ("any", "restricted", "unix"): (200, 403, 403),
    ("any", "peer", "unix"): (403, 403, 403),
}
# The refusal's code where it says more than the status.
MATRIX_CODES = {401: {"missing_api_key", "invalid_api_key"}, 403: {"admin_role_required", "model_not_allowed", "role_not_allowed"}}


async def test_key_matrix(sparkd_factory, engine_image, tmp_path):
    daemons = {}
    for mode in ("off", "loopback", "any"):
        keys_path = tmp_path / f"keys-{mode}.toml"
        sparkd = sparkd_factory(
            {"a": engine_model(engine_image), "b": engine_model(engine_image)},
            {"server": {"keys_file": str(keys_path), "anonymous": mode}},
            name=f"matrix-{mode}",
        )
        write_keys(
            keys_path,
            {
                "user": {"key": MATRIX_KEYS["user"]},
                "admin": {"key": MATRIX_KEYS["admin"], "role": "admin"},
                "restricted": {"key": MATRIX_KEYS["restricted"], "models": [sparkd.model("b")]},
                "peer": {"key": MATRIX_KEYS["peer"], "role": "peer"},
            },
        )
        daemons[mode] = sparkd
    await asyncio.gather(*(sparkd.start() for sparkd in daemons.values()))

    async def cell(mode: str, key: str, transport: str) -> tuple[list[int], list[Any]]:
        sparkd = daemons[mode]
        headers = {} if key == "none" else {"Authorization": f"Bearer {MATRIX_KEYS[key]}"}
        if transport == "unix":
            session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sparkd.socket_path)))
            base = "http://sparkd"
        else:
            session, base = aiohttp.ClientSession(), sparkd.base_url
        chat = {"model": sparkd.model("a"), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        requests = (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat), ("GET", "/api/status", None))
        statuses, bodies = [], []
        async with session:
            for method, path, body in requests:
                async with session.request(method, base + path, json=body, headers=headers) as response:
                    statuses.append(response.status)
                    bodies.append(await response.json(content_type=None))
        return statuses, bodies

    mismatches = []
    for (mode, key, transport), expected in MATRIX.items():
        statuses, bodies = await cell(mode, key, transport)
        if tuple(statuses) != expected:
            mismatches.append(f"{mode:8} {key:10} {transport:4}: got {tuple(statuses)}, expected {expected}")
        for status, body in zip(statuses, bodies):
            if status in MATRIX_CODES:
                assert body["error"]["code"] in MATRIX_CODES[status], (mode, key, transport, body)
        if key == "restricted" and statuses[0] == 200:  # its model list is its own models only
            assert [m["id"] for m in bodies[0]["data"]] == [daemons[mode].model("b")]
    assert not mismatches, "\n" + "\n".join(mismatches)
    print(f"RESULT key_matrix_cells {len(MATRIX) * len(ROUTES)} cells")


async def test_only_user_keys_and_no_anonymous_access_keep_loopback_out_of_the_admin_api(sparkd_factory, engine_image, tmp_path):
    """Before: with no admin key in the file, a keyless loopback client was an admin even with anonymous = "off"."""
    keys_path = tmp_path / "keys.toml"
    sparkd = sparkd_factory({"a": engine_model(engine_image)}, {"server": {"keys_file": str(keys_path), "anonymous": "off"}})
    write_keys(keys_path, {"user": {"key": MATRIX_KEYS["user"]}})
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        for method, path in (("GET", "/api/status"), ("GET", "/metrics"), ("GET", "/api/events"), ("POST", f"/api/models/{sparkd.model('a')}/start")):
            async with session.request(method, sparkd.base_url + path) as response:
                assert response.status == 401, (path, await response.text())
            async with session.request(method, sparkd.base_url + path, headers={"Authorization": f"Bearer {MATRIX_KEYS['user']}"}) as response:
                assert response.status == 403, path
    assert (await sparkd.model_status("a"))["state"] == "stopped"  # over the unix socket, keyless: the operator's way in


# --- worker leases ---
#
# Acceptance d: a head asks a worker node for a lease. No [cluster] -> 404; a key without role peer -> 403;
# host volumes, a command, an image or a model the worker's own [workers.<model>] does not describe -> 400;
# and none of these makes Podman create a container.

LEASE_KEYS = {
    "peer": "sk-test-lease-peer-0123456789abcdef",
    "other-head": "sk-test-lease-other-0123456789abcd",
    "admin": "sk-test-lease-admin-0123456789abcdef",
    "user": "sk-test-lease-user-0123456789abcdef",
}


def lease_keys(path, heads=("peer", "other-head")):
    write_keys(
        path,
        {
            **{name: {"key": LEASE_KEYS[name], "role": "peer"} for name in heads},
            "admin": {"key": LEASE_KEYS["admin"], "role": "admin"},
            "user": {"key": LEASE_KEYS["user"]},
        },
    )


def lease_request(sparkd, model="w1", **change):
    body = {
        "head": "spark1", "model": sparkd.model(model), "head_address": "127.0.0.1", "ray_port": 6379,
        "head_port": 18500, "heartbeat_timeout_s": 30,
    }
    body.update(change)
    return body


async def lease_call(sparkd, method, path, key=None, body=None, unix=False):
    headers = {"Authorization": f"Bearer {LEASE_KEYS[key]}"} if key else {}
    if unix:
        session, base = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sparkd.socket_path))), "http://sparkd"
    else:
        session, base = aiohttp.ClientSession(), sparkd.base_url
    async with session, session.request(method, base + path, json=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


def our_containers(podman, prefix):
    return [c.name for c in podman.containers.list(all=True, filters={"label": "io.sparkd.managed=true"})
            if (c.labels or {}).get("io.sparkd.model", "").startswith(prefix + "-")]


async def test_worker_lease_routes_do_not_exist_without_a_cluster_table(sparkd_factory, engine_image, podman, tmp_path):
    keys_path = tmp_path / "keys.toml"
    sparkd = sparkd_factory({"a": engine_model(engine_image)}, {"server": {"keys_file": str(keys_path), "anonymous": "loopback"}})
    lease_keys(keys_path)
    since = time.time()
    await sparkd.start()
    evil = lease_request(sparkd, image=engine_image, command=["sh", "-c", "id"], volumes=["/:/host:rw"], claim=0)
    for key in ("peer", "admin", "user", None):
        for method, path, body in (
            ("POST", "/api/worker-leases", evil),
            ("GET", "/api/worker-leases", None),
            ("POST", "/api/worker-leases/x/heartbeat", None),
            ("DELETE", "/api/worker-leases/x", None),
        ):
            status, answer = await lease_call(sparkd, method, path, key, body)
            assert status == 404 and answer["error"]["code"] == "unknown_endpoint", (key, method, path, answer)
    status, answer = await lease_call(sparkd, "POST", "/api/worker-leases", body=evil, unix=True)
    assert status == 404, answer
    assert our_containers(podman, sparkd.prefix) == []
    assert container_events(podman, since, sparkd.prefix, {"create"}) == []


async def test_worker_leases_need_a_peer_key_and_the_workers_own_configuration(sparkd_factory, engine_image, podman, tmp_path):
    keys_path = tmp_path / "keys.toml"
    sparkd = sparkd_factory(
        {},
        {
            "server": {"keys_file": str(keys_path), "anonymous": "loopback"},
            "cluster": {"address": "127.0.0.1", "devices": [], "heartbeat_s": 1, "lease_timeout_s": 30, "max_leases_per_head": 1},
            "gpu": {"memory_budget": 0.94},
            # A worker gets an unlimited memlock unless set; this machine's hard limit is 8 MiB (see test_cluster.py).
            "defaults": {"ulimits": {"nofile": 20000, "nproc": 4096, "memlock": 8388608}},
        },
    )
    # A worker that only runs (a Ray worker serves no HTTP: running is ready).
    worker = {"image": engine_image, "gpu": False, "gpu_memory": 0.2, "command": ["python3", "-c", "import time; time.sleep(3600)"]}
    sparkd.settings["workers"] = {sparkd.model("w1"): worker, sparkd.model("w2"): worker}
    sparkd.write_config()
    lease_keys(keys_path)
    since = time.time()
    await sparkd.start()
    good = lease_request(sparkd)

    # not a peer key: refused before the body is read
    for key, expected in (("admin", 403), ("user", 403), (None, 401)):
        status, answer = await lease_call(sparkd, "POST", "/api/worker-leases", key, good)
        assert status == expected, (key, answer)
    status, answer = await lease_call(sparkd, "POST", "/api/worker-leases", body=good, unix=True)
    assert status == 401 and "peer" in answer["error"]["message"], answer  # the admin socket is no head
    # a peer key, but the body asks for what only the worker's configuration decides
    bad_bodies = {
        "host volumes": (lease_request(sparkd, volumes=["/:/host:rw"]), "worker_field_not_allowed"),
        "a command": (lease_request(sparkd, command=["sh", "-c", "id"]), "worker_field_not_allowed"),
        "env": (lease_request(sparkd, env={"LD_PRELOAD": "/x.so"}), "worker_field_not_allowed"),
        "claim 0": (lease_request(sparkd, claim=0), "worker_field_not_allowed"),
        "another image": (lease_request(sparkd, image="docker.io/library/alpine:latest"), "worker_image_mismatch"),
        "a model without a worker table": (lease_request(sparkd, model="nope"), "worker_not_configured"),
        "an address that is no IP": (lease_request(sparkd, head_address="1.2.3.4 --block"), "bad_request"),
        "a heartbeat timeout of an hour": (lease_request(sparkd, heartbeat_timeout_s=3600), "bad_request"),
        "not an object": ([good], "invalid_json"),
    }
    for name, (body, code) in bad_bodies.items():
        status, answer = await lease_call(sparkd, "POST", "/api/worker-leases", "peer", body)
        assert status == 400 and answer["error"]["code"] == code, (name, answer)
    assert our_containers(podman, sparkd.prefix) == []
    assert container_events(podman, since, sparkd.prefix, {"create"}) == []

    # the one good request: the worker's own image and command, the share its table gives
    status, lease = await lease_call(sparkd, "POST", "/api/worker-leases", "peer", good)
    assert status == 200 and lease["claim"] == 0.2 and lease["peer_key"] == "peer", lease
    inspected = podman.containers.get(sparkd.container("w1.worker")).attrs
    assert inspected["Config"]["Image"] == engine_image or inspected["ImageName"] == engine_image
    assert not any(m.get("Destination") == "/host" for m in inspected.get("Mounts", []))
    # bounded per head: max_leases_per_head = 1; another head has its own bound
    status, answer = await lease_call(sparkd, "POST", "/api/worker-leases", "peer", lease_request(sparkd, model="w2"))
    assert status == 503 and answer["error"]["code"] == "too_many_worker_leases", answer
    # a head sees and touches only its own leases
    assert [held["id"] for held in (await lease_call(sparkd, "GET", "/api/worker-leases", "peer"))[1]["leases"]] == [lease["id"]]
    assert (await lease_call(sparkd, "GET", "/api/worker-leases", "other-head"))[1]["leases"] == []
    for method, path in (("POST", f"/api/worker-leases/{lease['id']}/heartbeat"), ("DELETE", f"/api/worker-leases/{lease['id']}")):
        status, answer = await lease_call(sparkd, method, path, "other-head")
        assert status == 404, answer
    assert (await lease_call(sparkd, "POST", f"/api/worker-leases/{lease['id']}/heartbeat", "peer"))[0] == 200
    assert (await lease_call(sparkd, "DELETE", f"/api/worker-leases/{lease['id']}", "peer"))[0] == 200
    assert (await sparkd.status())["worker_leases"] == []
    created = {model for _, _, model in container_events(podman, since, sparkd.prefix, {"create"})}
    assert created == {sparkd.model("w1") + ".worker"}, created
