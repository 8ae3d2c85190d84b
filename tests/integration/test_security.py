"""Issue 11 acceptance: the holes a LAN client or a local user could use, each closed on a real daemon."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from harness import engine_model, write_keys

pytestmark = pytest.mark.podman


# --- bounds: waiting bodies, keep-alive, slow headers, connections ---

KIB = 1024
MIB = 1024 * KIB


def chat_body(model: str, content_bytes: int) -> dict:
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
        waiting = [asyncio.create_task(post_chat(session, base, alice, chat_body(model, 900 * KIB))) for _ in range(2)]
        await wait_queued(sparkd, "a", 2)
        # alice has queue_per_key (2) requests waiting: her third is hers to hold back (429), however small.
        status, headers, body = await post_chat(session, base, alice, chat_body(model, 10))
        assert status == 429 and body["error"]["code"] == "key_queue_limit", body
        assert "alice" in body["error"]["message"] and int(headers["Retry-After"]) >= 1
        # 1.8 MiB of bodies wait: 0.9 MiB more would pass queue_body_bytes (2 MiB) - the server's limit, 503.
        status, headers, body = await post_chat(session, base, bob, chat_body(model, 900 * KIB))
        assert status == 503 and body["error"]["code"] == "queue_body_bytes", body
        assert "lifecycle.queue_body_bytes" in body["error"]["message"] and int(headers["Retry-After"]) >= 1
        # A small body still fits, and another key is not held back by alice's.
        waiting.append(asyncio.create_task(post_chat(session, base, bob, chat_body(model, 10))))
        await wait_queued(sparkd, "a", 3)
        held = 2 * len(json.dumps(chat_body(model, 900 * KIB))) + len(json.dumps(chat_body(model, 10)))
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
