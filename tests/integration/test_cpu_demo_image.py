"""The CPU demo model image (SmolLM2-135M on llama-cpp-python), run for real.

Started through Podman's REST socket with podman-py, exactly as sparkd would
start a model container: published on 127.0.0.1 only, with an engine API key.
Asserts real generations from the model, plain and streamed.

Needs a rootful Podman service on unix:///run/podman/podman.sock and the image
``localhost/sparkd/smollm2-cpu`` (tests/images/cpu_demo.py; built here on demand,
cached by content hash: the first build compiles llama.cpp, several minutes).
Without a socket the tests skip, unless SPARKD_REQUIRE_PODMAN=1 makes that a
failure. SPARKD_TEST_NO_BUILD=1 uses the already-built tag without building.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("podman")
from podman import PodmanClient

pytestmark = pytest.mark.podman

SOCKET_URL = os.environ.get("SPARKD_TEST_PODMAN_URL", "unix:///run/podman/podman.sock")
REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "images" / "cpu_demo.py"
MODEL_NAME = "smollm2-135m-cpu"
TEST_LABEL = "io.sparkd.test"
TEST_LABEL_VALUE = "cpu-demo"
READY_TIMEOUT_S = 180.0


def _load_build_module():
    spec = importlib.util.spec_from_file_location("sparkd_cpu_demo_build", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def podman_client():
    client = PodmanClient(base_url=SOCKET_URL, timeout=120)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 - no service: skip (or fail when CI says Podman is required)
        client.close()
        message = f"no Podman service at {SOCKET_URL} ({exc}); run tests/setup/host.sh as root"
        if os.environ.get("SPARKD_REQUIRE_PODMAN") == "1":
            pytest.fail(message)
        pytest.skip(message)
    _remove_test_containers(client)  # leftovers of an interrupted run
    yield client
    _remove_test_containers(client)
    client.close()


def _remove_test_containers(client) -> None:
    for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={TEST_LABEL_VALUE}"}):
        with contextlib.suppress(Exception):
            c.remove(force=True)


@pytest.fixture(scope="module")
def cpu_demo_image(podman_client) -> str:
    build = _load_build_module()
    if os.environ.get("SPARKD_TEST_NO_BUILD") != "1":
        try:
            return build.ensure_image()
        except Exception as exc:  # noqa: BLE001 - subprocess.CalledProcessError, OSError, ...
            pytest.fail(f"building the CPU demo image failed: {exc}")
    tag = build.IMAGE_LATEST
    if not podman_client.images.exists(tag):
        pytest.fail(f"image {tag} is missing; run: python3 tests/images/cpu_demo.py")
    return tag


class Engine:
    """One running demo container and how to talk to it."""

    def __init__(self, container, port: int, key: str | None):
        self.container = container
        self.port = port
        self.key = key
        self.base = f"http://127.0.0.1:{port}"

    def headers(self, key: str | None = "default") -> dict:
        key = self.key if key == "default" else key
        h = {"Content-Type": "application/json"}
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def request(self, method: str, path: str, body=None, key: str | None = "default", timeout=120):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=self.headers(key))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:
                return err.code, raw.decode(errors="replace")

    def logs(self) -> str:
        try:
            out = self.container.logs(stdout=True, stderr=True)
            if not isinstance(out, (bytes, str)):
                out = b"".join(out)
            return out.decode(errors="replace") if isinstance(out, bytes) else out
        except Exception as exc:  # noqa: BLE001 - the logs only explain a failure, they must not replace it
            return f"<no logs: {exc}>"


def start_engine(client, image: str, *, command: list[str], environment: dict | None = None,
                 key: str | None = None) -> Engine:
    port = free_port()
    container = client.containers.create(
        image,
        command=command,
        name=f"sparkd-test-cpu-demo-{uuid.uuid4().hex[:8]}",
        labels={TEST_LABEL: TEST_LABEL_VALUE},
        environment=environment or {},
        ports={"8000/tcp": ("127.0.0.1", port)},
    )
    engine = Engine(container, port, key)
    t0 = time.monotonic()
    container.start()
    deadline = t0 + READY_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(engine.base + "/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        container.reload()
        if container.status not in ("created", "running"):
            logs = engine.logs()
            container.remove(force=True)
            pytest.fail(f"demo engine exited ({container.status}) before it was ready:\n{logs[-3000:]}")
        if time.monotonic() > deadline:
            logs = engine.logs()
            container.remove(force=True)
            pytest.fail(f"demo engine not ready after {READY_TIMEOUT_S:.0f}s:\n{logs[-3000:]}")
        time.sleep(0.1)
    print(f"\n[cpu-demo] ready {time.monotonic() - t0:.2f}s after start (port {port})")
    return engine


@pytest.fixture(scope="module")
def engine(podman_client, cpu_demo_image):
    key = "sk-engine-" + uuid.uuid4().hex
    eng = start_engine(
        podman_client, cpu_demo_image, command=["--port", "8000", "--api_key", key], key=key
    )
    yield eng
    eng.container.remove(force=True)


# ---------------------------------------------------------------- tests


def test_health_is_open_and_models_need_the_key(engine):
    with urllib.request.urlopen(engine.base + "/health", timeout=5) as resp:
        assert resp.status == 200
    status, _ = engine.request("GET", "/v1/models", key=None)
    assert status == 401
    status, _ = engine.request("GET", "/v1/models", key="sk-wrong")
    assert status == 401
    status, body = engine.request("GET", "/v1/models")
    assert status == 200, body
    assert [m["id"] for m in body["data"]] == [MODEL_NAME]


def test_chat_completion_returns_text(engine):
    status, body = engine.request(
        "POST",
        "/v1/chat/completions",
        {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24,
            "temperature": 0,
        },
    )
    assert status == 200, body
    text = body["choices"][0]["message"]["content"]
    assert isinstance(text, str) and text.strip(), body
    assert body["usage"]["completion_tokens"] > 0
    print(f"\n[cpu-demo] completion: {text!r}")


def test_chat_completion_without_key_is_refused(engine):
    status, _ = engine.request(
        "POST",
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        key=None,
    )
    assert status == 401


def test_streaming_yields_content_chunks(engine):
    body = json.dumps({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Count from one to five."}],
        "max_tokens": 32,
        "temperature": 0,
        "stream": True,
    })
    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=120)
    t0 = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body=body, headers=engine.headers())
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("Content-Type", "").startswith("text/event-stream")
    pieces: list[str] = []
    first_token_s = None
    done = False
    try:
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[len(b"data:"):].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            delta = chunk["choices"][0].get("delta") or {}
            content = delta.get("content")
            if content:
                if first_token_s is None:
                    first_token_s = time.monotonic() - t0
                pieces.append(content)
    finally:
        conn.close()
    assert done, "stream ended without data: [DONE]"
    assert len(pieces) >= 2, pieces
    assert "".join(pieces).strip()
    print(f"\n[cpu-demo] first token after {first_token_s:.3f}s, {len(pieces)} content chunks: {''.join(pieces)!r}")


def test_key_from_vllm_api_key_environment(podman_client, cpu_demo_image):
    """The key can come from VLLM_API_KEY, like the vLLM images."""
    key = "sk-env-" + uuid.uuid4().hex
    eng = start_engine(
        podman_client, cpu_demo_image, command=["--port", "8000"],
        environment={"VLLM_API_KEY": key}, key=key,
    )
    try:
        assert eng.request("GET", "/v1/models", key=None)[0] == 401
        status, body = eng.request("GET", "/v1/models")
        assert status == 200, body
    finally:
        eng.container.remove(force=True)
