"""Issue 18: two Sparks, one endpoint. Two real sparkd daemons on this machine (their own ports, state,
keys and container instances) on real Podman with the fake engine: node A forwards a request for a
model node B serves to B's sparkd over the peer channel, places a model allowed on both where it is
ready, falls back or names B when B is gone, and never lets a key reach more than it may.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness import Sparkd, engine_model, write_keys
from opskit import ctl

pytestmark = pytest.mark.podman

PEER_KEY = "sk-sparkd-fleet-peer-a-0123456789"
"""The key node B made for node A: role peer."""
B_ADMIN = "sk-sparkd-fleet-b-admin-0123456789"
B_USER = "sk-sparkd-fleet-b-user-0123456789"
A_ADMIN = "sk-sparkd-fleet-a-admin-0123456789"
ALICE = "sk-sparkd-fleet-alice-0123456789"
"""A user key on node A that may use every model."""
RESTRICTED = "sk-sparkd-fleet-restricted-0123456789"
"""A user key on node A restricted to the model "shared"."""
FORWARD_MESSAGES = "{}/api/fleet/v1/messages"
FAST_POLL = {"heartbeat_s": 0.3, "lease_timeout_s": 3, "devices": []}


def fleet(
    sparkd_factory: Any, engine_image: str, tmp_path: Path, *, a_models: dict[str, Any] | None = None, poll: dict[str, Any] | None = None,
    b_models: dict[str, Any] | None = None,
) -> tuple[Sparkd, Sparkd]:
    """Node B serving "coder" and "shared"; node A with B as a peer and "shared" allowed on both."""
    b = sparkd_factory(
        {"coder": engine_model(engine_image), "shared": engine_model(engine_image), **(b_models or {})},
        {"gpu": {"memory_budget": 0.94}, "cluster": {**(poll or FAST_POLL), "name": "spark-b"}},
        name="b",
    )
    b.settings["server"] = {"instance": b.prefix + "b", "anonymous": "off"}
    b.write_config()
    write_keys(
        b.workdir / "keys.toml",
        {"node-a": {"key": PEER_KEY, "role": "peer"}, "ops": {"key": B_ADMIN, "role": "admin"}, "bob": {"key": B_USER}},
    )
    b.admin_key = B_ADMIN
    key_file = tmp_path / "peer-b.key"
    key_file.write_text(PEER_KEY + "\n")
    key_file.chmod(0o600)
    a = sparkd_factory(
        a_models if a_models is not None else {"shared": engine_model(engine_image, nodes=["local", "b"], parallel="none")},
        {
            "gpu": {"memory_budget": 0.94},
            "cluster": {**(poll or FAST_POLL), "name": "spark-a"},
            # The test daemons listen on loopback without TLS: insecure = true says so.
            "peers": {"b": {"url": b.base_url, "key_file": str(key_file), "address": "127.0.0.1", "insecure": True}},
        },
        name="a",
    )
    a.settings["server"] = {"anonymous": "off"}
    a.write_config()
    write_keys(
        a.workdir / "keys.toml",
        {
            "alice": {"key": ALICE},
            "restricted": {"key": RESTRICTED, "models": [a.model("shared")]},
            "ops": {"key": A_ADMIN, "role": "admin"},
        },
    )
    a.admin_key = A_ADMIN
    return a, b


async def chat(node: Sparkd, session: aiohttp.ClientSession, key: str, model: str, text: str = "hello", **fields: Any) -> tuple[int, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **fields}
    async with session.post(node.base_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as response:
        return response.status, await response.json(content_type=None)


async def models_of(node: Sparkd, session: aiohttp.ClientSession, key: str = ALICE) -> dict[str, Any]:
    async with session.get(node.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status == 200
        return {entry["id"]: entry for entry in (await response.json())["data"]}


async def wait_listed(node: Sparkd, session: aiohttp.ClientSession, model: str, test: Any, timeout: float = 15) -> dict[str, Any]:
    """The ``/v1/models`` entry of ``model`` on ``node`` once ``test(entry)`` holds."""
    deadline = time.monotonic() + timeout
    entry: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        entry = (await models_of(node, session)).get(model)
        if entry is not None and test(entry):
            return entry
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{model} on {node.base_url}: {entry}")


def request_lines(node: Sparkd, model: str) -> list[str]:
    return [line for line in node.logs().splitlines() if "event=request_done" in line and f"model={model}" in line]


def usage_of(node: Sparkd, model: str) -> tuple[int, int]:
    """(requests, tokens) the node's history counted for ``model`` (read after the node stopped: its close flushes)."""
    path = Path(node.document()["server"]["state_dir"]) / "history.sqlite3"
    with sqlite3.connect(path) as db:
        row = db.execute(
            "SELECT SUM(requests), SUM(prompt_tokens + completion_tokens) FROM usage_daily WHERE model = ?", (model,)
        ).fetchone()
    return int(row[0] or 0), int(row[1] or 0)


def keys_of(node: Sparkd, model: str) -> dict[str, int]:
    """Requests per key name the node's usage per key counted for ``model`` (read after the node stopped)."""
    path = Path(node.document()["server"]["state_dir"]) / "history.sqlite3"
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT key, SUM(requests) FROM usage_keys_daily WHERE model = ? GROUP BY key", (model,))
        return {key: int(count) for key, count in rows}


async def test_a_model_only_on_b_is_answered_through_a_streaming_too(sparkd_factory, engine_image, podman, tmp_path):
    a, b = fleet(sparkd_factory, engine_image, tmp_path)
    await b.start()
    await a.start()
    coder = a.model("coder")
    async with aiohttp.ClientSession() as session:
        listed = await wait_listed(a, session, coder, lambda entry: entry["node"] == "b")
        assert listed["object"] == "model" and listed["owned_by"] == "sparkd" and listed["state"] == "stopped"
        status, body = await chat(a, session, ALICE, coder, "hello fleet")
        assert status == 200, body
        assert body["choices"][0]["message"]["content"].startswith("hello fleet")
        # Streaming, through the same relay: the events as the engine sent them, to the end.
        payload = {"model": coder, "stream": True, "stream_options": {"include_usage": True},
                   "messages": [{"role": "user", "content": "stream me"}]}
        async with session.post(a.base_url + "/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {ALICE}"}) as response:
            assert response.status == 200 and response.content_type == "text/event-stream"
            text = (await response.read()).decode()
        events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        content = "".join(
            choice["delta"].get("content") or "" for event in events[:-1] for choice in json.loads(event)["choices"]
        )
        assert content.startswith("stream me")
        # The Messages API too (an Anthropic client sends its key as x-api-key).
        anthropic = {"model": coder, "max_tokens": 16, "messages": [{"role": "user", "content": "anthropic hi"}]}
        async with session.post(a.base_url + "/v1/messages", json=anthropic, headers={"x-api-key": ALICE}) as response:
            reply = await response.json()
            assert response.status == 200 and reply["type"] == "message", reply
        # B's status shows the model it runs; A's shows B and what B runs.
        b_status = await b.model_status("coder")
        assert b_status["state"] == "ready"
        listed = await wait_listed(a, session, coder, lambda entry: entry["state"] == "ready")
        assert listed["node"] == "b" and listed["nodes"] == [{"node": "b", "state": "ready"}]
        a_status = await a.status()
        (peer,) = a_status["fleet"]["peers"]
        assert peer["name"] == "b" and peer["reachable"] is True and peer["node"] == "spark-b" and peer["version"]
        assert {"name": coder, "state": "ready"} in peer["models"]
        placement = a_status["fleet"]["placements"][coder]
        assert placement["node"] == "b" and placement["reason"] in ("ready on b", "loading on b", "fits on b without evicting another model")
        # sparkctl status on A: the peer, reachable, its version and what it runs.
        code, out, _ = await ctl(a, "status")
        assert code == 0, out
        assert re.search(rf"peer b \(http://127\.0\.0\.1:\d+\): reachable, sparkd \S+, checked .* ago; runs: .*{coder} ready", out), out
        assert f"{coder} placed on b: " in out
    # A never made a container for it: the model ran on B only.
    assert a.container("coder") not in {c.name for c in podman.containers.list(all=True)}
    # The peer logged the request under the client's key name, forwarded by A's peer key.
    b_lines = request_lines(b, coder)
    assert len(b_lines) == 3 and all("key=alice" in line and "via=node-a" in line and "status=200" in line for line in b_lines), b_lines
    # The entry node's request path counted it: its request_done line and its usage history.
    a_lines = request_lines(a, coder)
    assert len(a_lines) == 3 and all("key=alice" in line and "status=200" in line for line in a_lines), a_lines
    assert re.search(r"completion_tokens=\d+", a_lines[-1]) and "completion_tokens=None" not in a_lines[-1]
    # A's usage per key (issue 17) counts them under the client's key name.
    code, out, err = await ctl(a, "usage", "--key", "alice", "--json")
    assert code == 0, err
    [alice_on_a] = [row for row in json.loads(out)["rows"] if row["model"] == coder]
    assert alice_on_a["key"] == "alice" and alice_on_a["requests"] == 3 and alice_on_a["completion_tokens"] > 0, alice_on_a
    await a.stop()
    requests, tokens = usage_of(a, coder)
    assert requests == 3 and tokens > 0
    # The peer accounts them to the client's key name too, not to the peer key that forwarded them.
    await b.stop()
    assert keys_of(b, coder) == {"alice": 3}


async def test_the_openai_sdk_lists_and_uses_the_fleets_models(sparkd_factory, engine_image, tmp_path):
    openai = pytest.importorskip("openai")
    a, b = fleet(sparkd_factory, engine_image, tmp_path)
    await b.start()
    await a.start()
    coder = a.model("coder")
    async with aiohttp.ClientSession() as session:
        await wait_listed(a, session, coder, lambda entry: entry["node"] == "b")
    client = openai.AsyncOpenAI(base_url=a.base_url + "/v1", api_key=ALICE, max_retries=0)
    listed = {model.id: model for model in (await client.models.list()).data}
    assert {a.model("shared"), coder} <= set(listed)
    assert listed[coder].model_extra["node"] == "b" and listed[a.model("shared")].model_extra["node"] in ("spark-a", "b")
    assert (await client.models.retrieve(coder)).model_extra["node"] == "b"
    reply = await client.chat.completions.create(model=coder, messages=[{"role": "user", "content": "sdk hello"}])
    assert reply.choices[0].message.content.startswith("sdk hello")
    await client.close()


async def test_a_model_ready_on_b_is_served_by_b_without_a_load_on_a(sparkd_factory, engine_image, podman, tmp_path):
    a, b = fleet(sparkd_factory, engine_image, tmp_path)
    await b.start()
    await a.start()
    shared = a.model("shared")
    assert (await b.admin("POST", f"/api/models/{shared}/start"))[0] == 200
    async with aiohttp.ClientSession() as session:
        await wait_listed(a, session, shared, lambda entry: {"node": "b", "state": "ready"} in entry["nodes"])
        for text in ("first", "second"):
            status, body = await chat(a, session, ALICE, shared, text)
            assert status == 200, body
            assert body["choices"][0]["message"]["content"].startswith(text)
    assert (await a.model_status("shared"))["state"] == "stopped"
    assert a.container("shared") not in {c.name for c in podman.containers.list(all=True)}  # A loaded nothing
    placement = (await a.status())["fleet"]["placements"][shared]
    assert placement == {"node": "b", "reason": "ready on b", "at": placement["at"]}
    assert len([line for line in request_lines(b, shared) if "key=alice" in line]) == 2


async def test_b_stopped_a_names_b_or_serves_what_it_may_itself(sparkd_factory, engine_image, tmp_path):
    a, b = fleet(sparkd_factory, engine_image, tmp_path)
    await b.start()
    await a.start()
    coder, shared = a.model("coder"), a.model("shared")
    async with aiohttp.ClientSession() as session:
        await wait_listed(a, session, coder, lambda entry: entry["node"] == "b")
        await b.stop()
        # A model only B serves: a 503 naming B and why, streamed or not, at once.
        for fields in ({}, {"stream": True}):
            started = time.monotonic()
            status, body = await chat(a, session, ALICE, coder, **fields)
            assert status == 503, body
            assert body["error"]["code"] == "peer_unavailable"
            message = body["error"]["message"]
            assert f"model {coder}" in message and "peer b" in message and "unreachable" in message, message
            assert time.monotonic() - started < 10
        # A model allowed on A too: A serves it itself.
        status, body = await chat(a, session, ALICE, shared, "from a")
        assert status == 200, body
        assert body["choices"][0]["message"]["content"].startswith("from a")
        assert (await a.model_status("shared"))["state"] == "ready"
        a_status = await a.status()
        (peer,) = a_status["fleet"]["peers"]
        assert peer["reachable"] is False and peer["error"]
        assert a_status["fleet"]["placements"][shared]["node"] == "local"
        listed = await models_of(a, session)
        assert listed[coder]["state"] == "unreachable" and listed[shared]["node"] == "spark-a"
        code, out, _ = await ctl(a, "status")
        assert code == 0 and re.search(r"peer b \(http://127\.0\.0\.1:\d+\): unreachable: ", out), out


async def test_a_peer_that_goes_away_unnoticed_falls_back_to_the_next_allowed_node(sparkd_factory, engine_image, tmp_path):
    """A still believes B has the model ready (its next poll is far off): the forward fails, A serves it itself."""
    a, b = fleet(sparkd_factory, engine_image, tmp_path, poll={"heartbeat_s": 60, "lease_timeout_s": 120, "devices": []})
    await b.start()
    shared = a.model("shared")
    assert (await b.admin("POST", f"/api/models/{shared}/start"))[0] == 200
    await a.start()
    async with aiohttp.ClientSession() as session:
        entry = await wait_listed(a, session, shared, lambda entry: {"node": "b", "state": "ready"} in entry["nodes"])
        assert entry["node"] == "b"
        await b.stop()
        status, body = await chat(a, session, ALICE, shared, "fallback")
        assert status == 200, body
        assert body["choices"][0]["message"]["content"].startswith("fallback")
    placement = (await a.status())["fleet"]["placements"][shared]
    assert placement["node"] == "local" and "b unreachable at" in placement["reason"], placement
    assert "event=peer_forward_failed peer=b" in a.logs()

async def test_a_peer_that_refuses_is_a_503_naming_it(sparkd_factory, engine_image, tmp_path):
    a, b = fleet(sparkd_factory, engine_image, tmp_path, a_models={
        "coder": engine_model(engine_image, nodes=["b"]), "ghost": engine_model(engine_image, nodes=["b"]),
    })
    await b.start()
    await a.start()
    coder = a.model("coder")
    async with aiohttp.ClientSession() as session:
        await wait_listed(a, session, coder, lambda entry: entry["nodes"] == [{"node": "b", "state": "stopped"}])
        # A configures it to run on B only: A's scheduler has no such model and will not start it here.
        assert coder not in {m["name"] for m in (await a.status())["models"]}
        status, body = await a.admin("POST", f"/api/models/{coder}/start")
        assert status == 409 and body["error"]["code"] == "not_served_here", body
        status, body = await chat(a, session, ALICE, coder, "configured on a, run by b")
        assert status == 200 and body["choices"][0]["message"]["content"].startswith("configured on a"), body
        # A model A sends to B that B does not serve: a 503 saying so, without a try.
        status, body = await chat(a, session, ALICE, a.model("ghost"))
        assert status == 503 and f"peer b does not serve model {a.model('ghost')}" in body["error"]["message"], body
        # B revokes A's peer key: B refuses, A says so and names B.
        write_keys(b.workdir / "keys.toml", {"ops": {"key": B_ADMIN, "role": "admin"}})
        b.reload()
        deadline = time.monotonic() + 15
        while True:
            status, body = await chat(a, session, ALICE, coder)
            if status == 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert status == 503, body
        message = body["error"]["message"]
        assert "peer b" in message and ("401" in message or "refused" in message), message


async def test_a_restricted_key_cannot_reach_another_model_through_the_peer_path(sparkd_factory, engine_image, tmp_path):
    # B also configures a model it lets node "a" run only: a request forwarded to B for it is not forwarded again.
    a, b = fleet(sparkd_factory, engine_image, tmp_path, b_models={"elsewhere": engine_model(engine_image, nodes=["spark-a"])})
    a_key = tmp_path / "peer-a.key"
    a_key.write_text("sk-sparkd-not-a-key-of-a-0123456789\n")
    a_key.chmod(0o600)
    b.settings["peers"] = {"spark-a": {"url": a.base_url, "key_file": str(a_key), "address": "127.0.0.1", "insecure": True}}
    b.write_config()
    await b.start()
    await a.start()
    coder, shared = a.model("coder"), a.model("shared")
    async with aiohttp.ClientSession() as session:
        await wait_listed(a, session, coder, lambda entry: entry["node"] == "b")
        # Through A: the key's model list is enforced at the entry node, before anything reaches B.
        assert coder not in await models_of(a, session, RESTRICTED)
        async with session.get(f"{a.base_url}/v1/models/{coder}", headers={"Authorization": f"Bearer {RESTRICTED}"}) as response:
            assert response.status == 403
        status, body = await chat(a, session, RESTRICTED, coder)
        assert status == 403 and body["error"]["code"] == "model_not_allowed", body
        for path_form in (f"/v1/{coder}/chat/completions",):
            async with session.post(a.base_url + path_form, json={"messages": [{"role": "user", "content": "x"}]},
                                    headers={"Authorization": f"Bearer {RESTRICTED}"}) as response:
                assert response.status == 403
        assert request_lines(b, coder) == []
        # The key's own model still works (served wherever placement says).
        status, body = await chat(a, session, RESTRICTED, shared)
        assert status == 200, body
        # A client of A cannot put another name on its request either: its header never reaches B.
        async with session.post(a.base_url + "/v1/chat/completions", json={"model": coder, "messages": [{"role": "user", "content": "x"}]},
                                headers={"Authorization": f"Bearer {ALICE}", "X-Sparkd-Key-Name": "victim"}) as response:
            assert response.status == 200
        (line,) = request_lines(b, coder)
        assert "key=alice" in line and "victim" not in b.logs()
        # Straight to B's peer route: a user key is refused, no key is refused, and a claimed key name
        # from a user key is ignored (usage stays its own).
        forward_path = b.base_url + "/api/fleet/v1/chat/completions"
        request = {"model": coder, "messages": [{"role": "user", "content": "x"}]}
        for headers, expected in (({"Authorization": f"Bearer {B_USER}", "X-Sparkd-Key-Name": "alice"}, 403), ({}, 401)):
            async with session.post(forward_path, json=request, headers=headers) as response:
                assert response.status == expected
        async with session.post(b.base_url + "/v1/chat/completions", json=request,
                                headers={"Authorization": f"Bearer {B_USER}", "X-Sparkd-Key-Name": "alice"}) as response:
            assert response.status == 200
        assert [line for line in request_lines(b, coder) if "key=bob" in line]
        assert len([line for line in request_lines(b, coder) if "key=alice" in line]) == 1  # the one through A
        # Even the peer key reaches only what B configures.
        async with session.post(forward_path, json={**request, "model": "not-a-model"},
                                headers={"Authorization": f"Bearer {PEER_KEY}", "X-Sparkd-Key-Name": "alice"}) as response:
            assert response.status == 404
        # A forwarded Messages API request gets its errors in Anthropic's shape, as its client expects.
        async with session.post(FORWARD_MESSAGES.format(b.base_url), json={"model": "not-a-model", "max_tokens": 5, "messages": []},
                                headers={"Authorization": f"Bearer {PEER_KEY}", "X-Sparkd-Key-Name": "alice"}) as response:
            assert response.status == 404 and (await response.json())["type"] == "error"
        # A forwarded request is never forwarded again: B does not run "elsewhere" itself.
        async with session.post(forward_path, json={**request, "model": b.model("elsewhere")},
                                headers={"Authorization": f"Bearer {PEER_KEY}", "X-Sparkd-Key-Name": "alice"}) as response:
            assert response.status == 503 and (await response.json())["error"]["code"] == "not_served_here"
        # A name that is no key name is refused, not logged.
        async with session.post(forward_path, json=request,
                                headers={"Authorization": f"Bearer {PEER_KEY}", "X-Sparkd-Key-Name": "al ice"}) as response:
            assert response.status == 400


@contextlib.asynccontextmanager
async def tls_front(tmp_path: Path, port: int) -> AsyncIterator[tuple[str, Path]]:
    """A TLS terminator on loopback in front of 127.0.0.1:``port`` (as nginx or caddy in front of a peer's
    sparkd), with a certificate of its own CA: (its https URL, the CA file)."""
    cert, key = tmp_path / "front.pem", tmp_path / "front.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}", cert
    finally:
        server.close()


async def test_a_peer_behind_tls_is_polled_and_streams_through_a(sparkd_factory, engine_image, tmp_path):
    """The production shape: the peer's sparkd behind TLS with a private CA (tls_ca): no raw relay, the
    aiohttp client relays the stream read by read."""
    a, b = fleet(sparkd_factory, engine_image, tmp_path)
    await b.start()
    async with tls_front(tmp_path, b.port) as (url, ca):
        peer = {**a.settings["peers"]["b"], "url": url, "tls_ca": str(ca)}
        peer.pop("insecure")
        a.settings["peers"] = {"b": peer}
        a.write_config()
        await a.start()
        assert "event=peer_insecure" not in a.logs()
        coder = a.model("coder")
        async with aiohttp.ClientSession() as session:
            await wait_listed(a, session, coder, lambda entry: entry["node"] == "b")
            payload = {"model": coder, "stream": True, "messages": [{"role": "user", "content": "over tls"}]}
            async with session.post(a.base_url + "/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {ALICE}"}) as response:
                assert response.status == 200 and response.content_type == "text/event-stream"
                text = (await response.read()).decode()
            assert text.rstrip().endswith("data: [DONE]") and '"content":"over' in text.replace(" ", ""), text[-500:]
            status, body = await chat(a, session, ALICE, coder, "tls again")
            assert status == 200 and body["choices"][0]["message"]["content"].startswith("tls again"), body
    assert len([line for line in request_lines(b, coder) if "key=alice" in line and "via=node-a" in line]) == 2
