"""Issue 11 acceptance (security): what a LAN client or a local user can do, through a real daemon and Podman.

Each part below is one area of the issue; helpers a part needs live in its block
(or in tests/capture_engine.py).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from capture_engine import (
    captured,
    http_request,
    raw_exchange,
    request_lines,
    stalled_client,
)
from harness import container_events, engine_model, unique_prefix, write_keys

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
            # An instance of its own: daemons of one instance adopt (and stop) each other's containers.
            {"server": {"keys_file": str(keys_path), "anonymous": mode, "instance": f"{unique_prefix()}{mode}"}},
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
        for status, body in zip(statuses, bodies, strict=True):
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


# --- engine path: smuggling, HTTP/1.0, Content-Type, timeouts, readiness watch (issue 11 points 1, 2, 5; issue 12 point 4) ---

SMUGGLING_QUERY = (
    b"x=1%20HTTP/1.1%0D%0AX-Injected:%20yes%0D%0AContent-Length:%200%0D%0A%0D%0AGET%20/smuggled%20HTTP/1.1%0D%0AX:%20y"
)
BUDGET = {"gpu": {"memory_budget": 0.94}}
"""With two models claiming 0.8 each, one must stop before the other starts (a swap)."""


def user_key_daemon(sparkd_factory: Any, tmp_path: Path, models: dict[str, dict[str, Any]],
                    settings: dict[str, Any] | None = None) -> tuple[Any, str]:
    """A daemon that takes keys only (anonymous off); returns it and a user key."""
    keys_path = tmp_path / "keys.toml"
    merged = {section: dict(values) for section, values in (settings or {}).items()}
    merged.setdefault("server", {}).update({"keys_file": str(keys_path), "anonymous": "off"})
    sparkd = sparkd_factory(models, merged)
    admin, user = f"sk-test-admin-{secrets.token_hex(16)}", f"sk-test-user-{secrets.token_hex(16)}"
    write_keys(keys_path, {"admin": {"key": admin, "role": "admin"}, "user": {"key": user}})
    sparkd.admin_key = admin
    return sparkd, user


def chat_body(sparkd: Any, key: str, **fields: Any) -> bytes:
    return json.dumps({"model": sparkd.model(key), "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


async def engine_port(sparkd: Any, key: str) -> int:
    return int((await sparkd.model_status(key))["port"])


async def fake_state(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/fake/state") as response:
        return await response.json()


def sse_events(body: bytes) -> list[bytes]:
    return [event for event in body.split(b"\n\n") if event]


async def post_whole(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float]:
    """POST and read the whole answer: (status, body, time.monotonic() at its end)."""
    async with session.post(url, data=body, headers=headers) as response:
        return response.status, await response.read(), time.monotonic()


@pytest.mark.parametrize("stream", [False, True], ids=["pooled", "stream"])
async def test_the_smuggling_url_reaches_the_engine_as_one_request_with_the_raw_query(sparkd_factory, engine_image, tmp_path, stream):
    sparkd, user = user_key_daemon(sparkd_factory, tmp_path, {"a": engine_model(engine_image, env={"FAKE_CAPTURE": "1"})})
    await sparkd.start()
    target = b"/v1/chat/completions?" + SMUGGLING_QUERY
    request = http_request("POST", target, sparkd.port, chat_body(sparkd, "a", stream=stream, max_tokens=3),
                           {"Authorization": f"Bearer {user}", "Content-Type": "application/json"})
    answer = await raw_exchange(sparkd.port, request)
    assert answer.status == 200, answer.body
    if stream:
        assert sse_events(answer.body)[-1] == b"data: [DONE]"
    port = await engine_port(sparkd, "a")
    connections = await captured(port)
    everything = b"".join(connections)
    assert request_lines(connections, skip=("/health", "/fake/", "/tokenize")) == [b"POST /v1/chat/completions?" + SMUGGLING_QUERY + b" HTTP/1.1"]
    assert b"\nX-Injected:" not in everything  # the query stays percent-encoded: no header line of it
    assert b"\nGET /smuggled" not in everything


@pytest.mark.parametrize("stream", [False, True], ids=["pooled", "stream"])
async def test_what_would_break_a_request_toward_the_engine_is_a_400_and_reaches_nothing(sparkd_factory, engine_image, tmp_path, stream):
    sparkd, user = user_key_daemon(sparkd_factory, tmp_path, {"a": engine_model(engine_image, env={"FAKE_CAPTURE": "1"})})
    await sparkd.start()
    body = chat_body(sparkd, "a", stream=stream, max_tokens=3)
    auth = {"Authorization": f"Bearer {user}", "Content-Type": "application/json"}
    ok = await raw_exchange(sparkd.port, http_request("POST", b"/v1/chat/completions", sparkd.port, body, auth))
    assert ok.status == 200  # the model is up: what follows is refused by sparkd, not by a cold engine
    port = await engine_port(sparkd, "a")
    before = request_lines(await captured(port))
    hostile = [
        (b"/v1/chat/completions?x=" + b"a" * 5000, {}, "invalid_query"),  # within aiohttp's line limit, past sparkd's
        (b"/v1/chat/completions", {"X-Note": "caf\u00e9"}, "invalid_header"),  # obs-text aiohttp lets through
        (b"/v1/chat/completions", {"X-Note": "a\udcffb"}, "invalid_header"),  # a raw 0xff byte
    ]
    for target, headers, code in hostile:
        answer = await raw_exchange(sparkd.port, http_request("POST", target, sparkd.port, body, {**auth, **headers}))
        assert answer.status == 400, (target[:60], answer.body)
        error = answer.json()["error"]
        assert error["code"] == code and error["type"] == "invalid_request_error", error
    assert request_lines(await captured(port)) == before


async def test_a_curl_style_body_reaches_the_engine_as_application_json(sparkd_factory, engine_image, tmp_path):
    sparkd, user = user_key_daemon(sparkd_factory, tmp_path, {"a": engine_model(engine_image, env={"FAKE_CAPTURE": "1"})})
    await sparkd.start()
    body = chat_body(sparkd, "a", max_tokens=3)
    auth = {"Authorization": f"Bearer {user}"}
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}):  # curl -d without -H, and what it says
        answer = await raw_exchange(sparkd.port, http_request("POST", b"/v1/chat/completions", sparkd.port, body, {**auth, **headers}))
        assert answer.status == 200, answer.body
        port = await engine_port(sparkd, "a")
        seen = (await fake_state(port))["last_request_headers"]
        assert seen["Content-Type"] == "application/json", seen
    raw = b"".join(await captured(port))
    assert b"x-www-form-urlencoded" not in raw
    assert raw.count(b"\r\nContent-Type: application/json\r\n") == 2


async def test_an_http10_client_gets_the_stream_without_chunk_framing(sparkd_factory, engine_image, tmp_path):
    sparkd, user = user_key_daemon(sparkd_factory, tmp_path, {"a": engine_model(engine_image, env={"FAKE_TOKENS": "8", "FAKE_LOAD_DELAY": "1"})})
    await sparkd.start()
    request = http_request("POST", b"/v1/chat/completions", sparkd.port, chat_body(sparkd, "a", stream=True),
                           {"Authorization": f"Bearer {user}", "Content-Type": "application/json"}, version=b"HTTP/1.0")
    answer = await raw_exchange(sparkd.port, request)  # returns only once sparkd closed the connection
    assert answer.status_line.startswith(b"HTTP/1.") and answer.status == 200, answer.status_line
    assert "transfer-encoding" not in answer.headers and "content-length" not in answer.headers, answer.headers
    assert answer.headers["content-type"].startswith("text/event-stream")
    everything = sse_events(answer.body)
    waited = list(itertools.takewhile(lambda event: event.startswith(b": sparkd: "), everything))
    assert waited, "it waited for a's start: sparkd's comments come first"
    events = everything[len(waited):]
    assert answer.body.endswith(b"data: [DONE]\n\n"), answer.body[-80:]
    assert all(event.startswith(b"data: ") for event in events), events[:3]
    assert len(events) == 1 + 8 + 1 + 1  # the role chunk, 8 tokens, the finish chunk, [DONE]
    # And HTTP/1.1 still gets chunked framing (decoded by the client to the same events).
    async with aiohttp.ClientSession() as session, session.post(
        sparkd.base_url + "/v1/chat/completions", data=chat_body(sparkd, "a", stream=True), headers={"Authorization": f"Bearer {user}"}
    ) as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert len(sse_events(await response.read())) == len(events)


def timed_out_events(sparkd: Any) -> list[str]:
    return [line for line in sparkd.logs().splitlines() if "engine_request_timed_out" in line]


async def swap_waits_then_proceeds(sparkd: Any, session: aiohttp.ClientSession, user: str) -> asyncio.Task[Any]:
    """A request for b, sent while a holds the GPU with a request in flight: it waits (a swap is pending)."""

    async def call_b() -> tuple[int, Any]:
        async with session.post(sparkd.base_url + "/v1/chat/completions", data=chat_body(sparkd, "b", max_tokens=2),
                                headers={"Authorization": f"Bearer {user}"}) as response:
            return response.status, await response.json()

    waiting = asyncio.create_task(call_b())
    deadline = time.monotonic() + 10
    while (await sparkd.model_status("b"))["queued"] != 1:
        assert time.monotonic() < deadline, "the request for b never queued"
        await asyncio.sleep(0.05)
    assert not waiting.done()
    return waiting


@pytest.mark.parametrize(
    ("knobs", "stream", "setting", "reason"),
    [
        ({"FAKE_HANG": "1"}, False, "response_head_timeout_s", "response_head"),
        ({"FAKE_HANG": "1"}, True, "response_head_timeout_s", "response_head"),
        ({"FAKE_HOLD_AFTER_CHUNK": "2"}, True, "idle_read_timeout_s", "idle_read"),
    ],
    ids=["hung-pooled", "hung-stream", "silent-stream"],
)
async def test_a_hung_engine_ends_the_request_within_its_timeout_and_the_swap_proceeds(
        sparkd_factory, engine_image, tmp_path, knobs, stream, setting, reason):
    limit = 2.0
    sparkd, user = user_key_daemon(
        sparkd_factory, tmp_path,
        {"a": engine_model(engine_image, claim=0.8, env=knobs), "b": engine_model(engine_image, claim=0.8)},
        {**BUDGET, "engine": {setting: limit}},
    )
    await sparkd.start()
    headers = {"Authorization": f"Bearer {user}"}
    async with aiohttp.ClientSession() as session:
        hung = asyncio.create_task(post_whole(session, sparkd.base_url + "/v1/chat/completions", chat_body(sparkd, "a", stream=stream), headers))
        await sparkd.wait_state("a", "ready", timeout=20)
        began = time.monotonic()  # the engine has the request from about now
        waiting = await swap_waits_then_proceeds(sparkd, session, user)
        status, body, end = await asyncio.wait_for(hung, limit * 4)
        ended = end - began
        if reason == "idle_read":
            assert status == 200
            last = sse_events(body)[-1]
            assert b"engine.idle_read_timeout_s" in last and b'"engine_error"' in last, body[-300:]
        elif stream:  # it waited for a's start, so its 200 went out: the timeout is its error event
            assert status == 200, body
            error = json.loads(sse_events(body)[-1][len(b"data: "):])["error"]
            assert error["code"] == "engine_timeout" and f"engine.{setting}" in error["message"], error
        else:
            assert status == 504, body
            error = json.loads(body)["error"]
            assert error["code"] == "engine_timeout" and f"engine.{setting}" in error["message"], error
        assert ended < limit * 2, ended
        status, answer = await asyncio.wait_for(waiting, 30)
    assert status == 200, answer
    assert (await sparkd.model_status("a"))["in_flight"] == 0
    events = timed_out_events(sparkd)
    assert len(events) == 1 and f"reason={reason}" in events[0] and f"setting=engine.{setting}" in events[0], events


async def test_a_client_that_stops_reading_is_cut_off_and_the_swap_proceeds(sparkd_factory, engine_image, tmp_path):
    limit = 2.0
    sparkd, user = user_key_daemon(
        sparkd_factory, tmp_path,
        # A stream far larger than the socket buffers between sparkd and the client (about 150 MB).
        {"a": engine_model(engine_image, claim=0.8, args=["--max-model-len", "2000000"], env={"FAKE_TOKENS": "1000000"}),
         "b": engine_model(engine_image, claim=0.8)},
        {**BUDGET, "engine": {"write_stall_timeout_s": limit}},
    )
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        await sparkd.chat(session, "a", max_tokens=1)  # a holds the GPU and is ready
        request = http_request("POST", b"/v1/chat/completions", sparkd.port, chat_body(sparkd, "a", stream=True, max_tokens=1000000),
                               {"Authorization": f"Bearer {user}", "Content-Type": "application/json"})
        client = await asyncio.to_thread(stalled_client, sparkd.port, request)
        try:
            deadline = time.monotonic() + 10
            while (await sparkd.model_status("a"))["in_flight"] != 1:
                assert time.monotonic() < deadline, "the stalled stream never started"
                await asyncio.sleep(0.05)
            waiting = await swap_waits_then_proceeds(sparkd, session, user)
            began = time.monotonic()
            status, answer = await asyncio.wait_for(waiting, 30)
            waited = time.monotonic() - began
        finally:
            client.close()
    assert status == 200, answer
    # The stall begins only once the socket buffers between sparkd and the client are full (megabytes on
    # loopback, filled at the fake engine's pace); then the limit runs, then the swap. The limit itself is
    # timed in tests/unit/test_deadlines.py and test_stream_conformance.py.
    assert waited < 60, waited
    assert (await sparkd.model_status("a"))["in_flight"] == 0
    events = timed_out_events(sparkd)
    assert len(events) == 1 and "reason=write_stall" in events[0] and "setting=engine.write_stall_timeout_s" in events[0], events


async def test_a_ready_engine_that_stops_answering_its_readiness_path_is_failed(sparkd_factory, engine_image, tmp_path, podman):
    sparkd, user = user_key_daemon(
        sparkd_factory, tmp_path,
        {"a": engine_model(engine_image, claim=0.8, env={"FAKE_HANG": "1"}), "b": engine_model(engine_image, claim=0.8)},
        {**BUDGET, "engine": {"readiness_check_s": 0.5, "unresponsive_fail_s": 2}, "lifecycle": {"failure_backoff_s": 30}},
    )
    await sparkd.start()
    headers = {"Authorization": f"Bearer {user}"}
    async with aiohttp.ClientSession() as session:
        hung = asyncio.create_task(post_whole(session, sparkd.base_url + "/v1/chat/completions", chat_body(sparkd, "a"), headers))
        await sparkd.wait_state("a", "ready", timeout=20)
        await asyncio.sleep(3)  # several good probes of a READY engine: it is not failed for hanging on inference
        assert (await sparkd.model_status("a"))["state"] == "ready"
        waiting = await swap_waits_then_proceeds(sparkd, session, user)
        port = await engine_port(sparkd, "a")
        async with session.post(f"http://127.0.0.1:{port}/fake/hang_health") as toggle:
            assert toggle.status == 200
        began = time.monotonic()
        hung_status, hung_body, end = await asyncio.wait_for(hung, 20)
        assert hung_status == 502, hung_body  # its engine was stopped under it
        failed_after = end - began
        status, answer = await asyncio.wait_for(waiting, 30)
        assert status == 200, answer  # a's lease share was freed: b started
        a = await sparkd.model_status("a")
        assert a["state"] == "failed" and a["in_flight"] == 0, a
        # A request for a during its back-off gets the failure, naming the cause.
        async with session.post(sparkd.base_url + "/v1/chat/completions", data=chat_body(sparkd, "a"), headers=headers) as refused:
            error = (await refused.json())["error"]
        assert refused.status == 503 and error["code"] == "model_failed", error
        assert "engine.unresponsive_fail_s" in error["message"], error
    assert failed_after < 2 + 0.5 + 5 + 5, failed_after  # the limit, a probe period, a probe timeout, the stop
    assert podman.containers.get(sparkd.container("a")).status != "running"
    assert any("engine_unresponsive" in line for line in sparkd.logs().splitlines())


# --- bounds: waiting bodies, keep-alive, slow headers, connections ---

KIB = 1024
MIB = 1024 * KIB


def sized_chat_body(model: str, content_bytes: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "x" * content_bytes}], "max_tokens": 4}


async def post_chat(session: aiohttp.ClientSession, base: str, key: str, body: dict) -> tuple[int, dict, dict]:
    async with session.post(base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


async def wait_queued(sparkd, key: str, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (await sparkd.model_status(key))["queued"] != count:
        assert time.monotonic() < deadline, f"the queue never held {count} requests: {await sparkd.model_status(key)}"
        await asyncio.sleep(0.05)


async def test_waiting_bodies_past_the_byte_limit_get_503_and_one_key_cannot_fill_the_queue(sparkd_factory, engine_image, tmp_path):
    keys_path = tmp_path / "keys.toml"
    sparkd = sparkd_factory(
        {"a": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "8"})},
        {
            "server": {"keys_file": str(keys_path), "anonymous": "off", "max_body_bytes": MIB},
            "lifecycle": {"queue_body_bytes": 2 * MIB, "queue_per_key": 2},
        },
    )
    root, alice, bob = (f"sk-test-{name}-{secrets.token_hex(16)}" for name in ("root", "alice", "bob"))
    write_keys(keys_path, {"root": {"key": root, "role": "admin"}, "alice": {"key": alice}, "bob": {"key": bob}})
    sparkd.admin_key = root
    await sparkd.start()
    base, model = sparkd.base_url, sparkd.model("a")
    async with aiohttp.ClientSession() as session:
        # The model loads for 8 s: everything below waits in the queue meanwhile.
        waiting = [asyncio.create_task(post_chat(session, base, alice, sized_chat_body(model, 900 * KIB))) for _ in range(2)]
        await wait_queued(sparkd, "a", 2)
        # alice has queue_per_key (2) requests waiting: her third is hers to hold back (429), however small.
        status, headers, body = await post_chat(session, base, alice, sized_chat_body(model, 10))
        assert status == 429 and body["error"]["code"] == "key_queue_limit", body
        assert "alice" in body["error"]["message"] and int(headers["Retry-After"]) >= 1
        # 1.8 MiB of bodies wait: 0.9 MiB more would pass queue_body_bytes (2 MiB) - the server's limit, 503.
        status, headers, body = await post_chat(session, base, bob, sized_chat_body(model, 900 * KIB))
        assert status == 503 and body["error"]["code"] == "queue_body_bytes", body
        assert "lifecycle.queue_body_bytes" in body["error"]["message"] and int(headers["Retry-After"]) >= 1
        # A small body still fits, and another key is not held back by alice's.
        waiting.append(asyncio.create_task(post_chat(session, base, bob, sized_chat_body(model, 10))))
        await wait_queued(sparkd, "a", 3)
        held = 2 * len(json.dumps(sized_chat_body(model, 900 * KIB))) + len(json.dumps(sized_chat_body(model, 10)))
        async with session.get(base + "/metrics", headers={"Authorization": f"Bearer {root}"}) as response:
            gauge = re.search(r"^sparkd_queue_body_bytes (\S+)$", await response.text(), re.MULTILINE)
        assert gauge is not None and float(gauge[1]) == held
        # Refusals lost nothing: every request that waited is served once the model is up.
        for status, _, body in await asyncio.gather(*waiting):
            assert status == 200, body
    assert (await sparkd.model_status("a"))["queued"] == 0
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics", headers={"Authorization": f"Bearer {root}"}) as response:
            assert re.search(r"^sparkd_queue_body_bytes 0\.0$", await response.text(), re.MULTILINE)
    logs = sparkd.logs()
    assert "reason=key_queue_limit" in logs and "reason=queue_body_bytes" in logs


async def test_a_request_that_waited_as_bytes_keeps_its_fixups_and_its_context_fit(sparkd_factory, engine_image):
    # While it waits only the bytes are held; after the wait the body is parsed again to fit the context.
    sparkd = sparkd_factory({"m": engine_model(engine_image, args=["--max-model-len", "4096"], max_model_len=4096, env={"FAKE_LOAD_DELAY": "2"})})
    await sparkd.start()
    body = {"model": sparkd.model("m"), "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 8000, "max_completion_tokens": -1}
    async with aiohttp.ClientSession() as session:
        async with session.post(sparkd.base_url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
            assert response.headers["X-Sparkd-Fixups"] == "normalize_max_tokens"
            assert response.headers["X-Sparkd-Max-Tokens-Capped"].startswith("requested=8000 sent=4060 ")
        port = (await sparkd.model_status("m"))["port"]
        async with session.get(f"http://127.0.0.1:{port}/fake/state") as response:
            received = (await response.json())["last_request_body"]
    assert received["max_tokens"] == 4060 and "max_completion_tokens" not in received
    assert received["messages"] == body["messages"] and received["model"] == sparkd.model("m")
    assert "request_queued" in sparkd.logs()  # it did wait


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/healthz") -> int:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    assert length is not None, head
    await asyncio.wait_for(reader.readexactly(int(length[1])), 5)
    return int(head.split()[1])


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """True when the server closes (or resets) the connection within ``within`` seconds."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except asyncio.TimeoutError:
        return False


async def wait_for_log(sparkd, pattern: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, sparkd.logs()):
        assert time.monotonic() < deadline, f"no log line matching {pattern!r}:\n{sparkd.logs()[-2000:]}"
        await asyncio.sleep(0.1)
    return sparkd.logs()


async def test_idle_keepalive_connections_are_closed_after_the_timeout(sparkd_factory):
    sparkd = sparkd_factory({}, {"server": {"keepalive_timeout_s": 3, "header_timeout_s": 1}})
    await sparkd.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", sparkd.port)
    try:
        assert await http_get(reader, writer) == 200
        # Idle longer than the header deadline: that timer runs from a request's first byte, not while idle.
        await asyncio.sleep(1.5)
        assert await http_get(reader, writer) == 200
        idle_from = time.monotonic()
        assert await closed_by_server(reader, 10), "an idle keep-alive connection stayed open"
        assert time.monotonic() - idle_from >= 2, "closed before keepalive_timeout_s"
    finally:
        writer.close()


async def test_a_client_sending_its_headers_slowly_is_cut_off(sparkd_factory):
    sparkd = sparkd_factory({}, {"server": {"header_timeout_s": 1, "body_timeout_s": 20}})
    await sparkd.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", sparkd.port)
    began = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    cut = False
    try:
        for index in range(30):  # one header line every 0.2 s: 6 s of headers if nobody stops it
            await asyncio.sleep(0.2)
            writer.write(f"X-Slow-{index}: y\r\n".encode())
            await writer.drain()
            if reader.at_eof():
                cut = True
                break
    except (ConnectionResetError, BrokenPipeError):
        cut = True
    cut = cut or await closed_by_server(reader, 2)
    assert cut and time.monotonic() - began < 5, "a slow-header client kept its connection"
    writer.close()
    # A connection that sends nothing at all is cut too.
    reader, writer = await asyncio.open_connection("127.0.0.1", sparkd.port)
    assert await closed_by_server(reader, 5)
    writer.close()
    # The deadline ends with the headers: a slow BODY is body_timeout_s's business (20 s here), not cut.
    reader, writer = await asyncio.open_connection("127.0.0.1", sparkd.port)
    body = b'{"model": "nope", "messages": []}'
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    for byte in range(len(body)):
        writer.write(body[byte:byte + 1])
        await writer.drain()
        await asyncio.sleep(2.5 / len(body))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.split()[1] == b"404", head  # answered (no such model), not cut off
    writer.close()
    logs = await wait_for_log(sparkd, r"event=connections_refusing reason=header_timeout")
    assert len(re.findall(r"event=connections_refusing reason=header_timeout", logs)) == 1, "logged per connection, not per burst"


async def test_connections_past_the_cap_are_refused_and_logged_once_per_burst(sparkd_factory):
    sparkd = sparkd_factory({}, {"server": {"max_connections": 3, "header_timeout_s": 10}})
    await sparkd.start()
    await asyncio.sleep(0.3)  # the harness's readiness polls have closed their connections
    held = [await asyncio.open_connection("127.0.0.1", sparkd.port) for _ in range(3)]
    extra = [await asyncio.open_connection("127.0.0.1", sparkd.port) for _ in range(4)]
    for reader, _ in extra:
        assert await closed_by_server(reader, 3), "a connection past max_connections was kept"
    # The connections within the cap serve as usual.
    for reader, writer in held:
        assert await http_get(reader, writer) == 200
    for _, writer in held + extra:
        writer.close()
    await asyncio.sleep(0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", sparkd.port)
    assert await http_get(reader, writer) == 200, "closed connections must free their slots"
    writer.close()
    logs = await wait_for_log(sparkd, r"event=connections_refused reason=max_connections count=4")
    assert len(re.findall(r"event=connections_refusing reason=max_connections", logs)) == 1
    # Counted in /metrics, read over the admin unix socket (not counted against the TCP cap).
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sparkd.workdir / "run" / "sparkd.sock"))) as admin:
        async with admin.get("http://sparkd/metrics") as response:
            text = await response.text()
    assert re.search(r'^sparkd_connections_refused_total\{reason="max_connections"\} 4\.0$', text, re.MULTILINE), text


async def test_readyz_tells_a_keyless_caller_only_the_verdict(sparkd_factory, tmp_path):
    keys_path = tmp_path / "keys.toml"
    root = f"sk-test-root-{secrets.token_hex(16)}"
    write_keys(keys_path, {"root": {"key": root, "role": "admin"}, "user": {"key": f"sk-test-user-{secrets.token_hex(16)}"}})
    sparkd = sparkd_factory({}, {"server": {"keys_file": str(keys_path), "anonymous": "off"}})
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(sparkd.base_url + "/readyz") as response:
            assert response.status == 200 and await response.json() == {"status": "ready"}
        async with session.get(sparkd.base_url + "/readyz", headers={"Authorization": f"Bearer {root}"}) as response:
            assert response.status == 200 and (await response.json())["config"]


def assert_one_line_startup_failure(sparkd, code: int | None, *needles: str) -> str:
    logs = sparkd.logs()
    assert code == 1, logs
    assert "Traceback" not in logs, logs
    failures = [line for line in logs.splitlines() if "event=startup_failed" in line]
    assert len(failures) == 1, logs
    for needle in needles:
        assert needle in failures[0], failures[0]
    return failures[0]


async def test_a_broken_history_database_is_a_one_line_startup_error(sparkd_factory, tmp_path):
    sparkd = sparkd_factory({}, {"log": {"level": "info"}})
    state = sparkd.workdir / "state"
    state.mkdir(parents=True)
    (state / "history.sqlite3").write_bytes(b"not a database " * 300)
    await sparkd.start(wait=False)
    code = await asyncio.to_thread(sparkd.process.wait, 30)
    assert_one_line_startup_failure(sparkd, code, str(state / "history.sqlite3"), "file is not a database", "Move the file aside")
    # Moved aside as the message says: sparkd starts and makes a new one.
    (state / "history.sqlite3").rename(state / "history.broken")
    await sparkd.start()
    assert sqlite3.connect(state / "history.sqlite3").execute("SELECT COUNT(*) FROM meta").fetchone()[0] >= 1


async def podman_refusing_listings(path: Path, upstream: str = "/run/podman/podman.sock") -> web.AppRunner:
    """Podman's API passed through, except that listing containers fails as a broken Podman's does."""
    connector = aiohttp.UnixConnector(path=upstream)
    client = aiohttp.ClientSession(connector=connector)

    async def relay(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/containers/json"):
            return web.json_response({"cause": "database is locked", "message": "database is locked", "response": 500}, status=500)
        async with client.request(request.method, "http://d" + request.path_qs, data=await request.read(), headers={"Content-Type": request.content_type}) as upstream_response:
            response = web.StreamResponse(status=upstream_response.status, headers={"Content-Type": upstream_response.content_type})
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    app.on_cleanup.append(lambda _app: client.close())
    runner = web.AppRunner(app, shutdown_timeout=0.5)  # the relayed events stream never ends by itself
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    return runner


async def test_an_adoption_failure_is_a_one_line_startup_error(sparkd_factory, engine_image, tmp_path):
    socket = tmp_path / "podman.sock"
    relay = await podman_refusing_listings(socket)
    try:
        sparkd = sparkd_factory({"a": engine_model(engine_image)}, {"podman": {"url": f"unix://{socket}"}, "log": {"level": "info"}})
        await sparkd.start(wait=False)
        code = await asyncio.to_thread(sparkd.process.wait, 30)
    finally:
        await relay.cleanup()
    line = assert_one_line_startup_failure(sparkd, code, "adopting the containers an earlier sparkd left running failed", "database is locked")
    assert "podman ps" in line
