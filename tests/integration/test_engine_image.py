"""The fake vLLM engine image, run for real through Podman's REST socket with podman-py.

Needs a rootful Podman service on unix:///run/podman/podman.sock (tests/setup/host.sh)
and the test images (tests/images/build.py; built here on demand, cached by hash).
Without a socket the tests skip, unless SPARKD_REQUIRE_PODMAN=1 makes that a failure.
SPARKD_TEST_NO_BUILD=1 uses the already-built tag without invoking the build.
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

podman = pytest.importorskip("podman")
from podman import PodmanClient  # noqa: E402
from podman.errors import APIError, NotFound  # noqa: E402

pytestmark = pytest.mark.podman

SOCKET_URL = os.environ.get("SPARKD_TEST_PODMAN_URL", "unix:///run/podman/podman.sock")
REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "images" / "build.py"


def _load_build_module():
    spec = importlib.util.spec_from_file_location("sparkd_test_images_build", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def podman_client():
    client = PodmanClient(base_url=SOCKET_URL, timeout=60)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 - no service: skip (or fail when CI says Podman is required)
        client.close()
        message = f"no Podman service at {SOCKET_URL} ({exc}); run tests/setup/host.sh as root"
        if os.environ.get("SPARKD_REQUIRE_PODMAN") == "1":
            pytest.fail(message)
        pytest.skip(message)
    yield client
    client.close()


@pytest.fixture(scope="session")
def engine_image(podman_client) -> str:
    build = _load_build_module()
    tag = build.engine_tag()
    if os.environ.get("SPARKD_TEST_NO_BUILD") != "1":
        try:
            build.build_engine()
        except build.BuildError as exc:
            pytest.fail(f"building the engine image failed: {exc}")
    if not podman_client.images.exists(tag):
        pytest.fail(f"image {tag} is missing; run: python3 tests/images/build.py engine")
    return tag


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Engine:
    """One running fake-engine container and how to reach it from the host."""

    def __init__(self, container, port: int):
        self.container = container
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    # -- HTTP helpers (stdlib, so every failure is visible as a status code)

    def request(self, method: str, path: str, body: dict | None = None,
                headers: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def json(self, method: str, path: str, body: dict | None = None, **kw) -> tuple[int, dict]:
        status, raw = self.request(method, path, body, **kw)
        return status, json.loads(raw) if raw else {}

    def state(self) -> dict:
        return self.json("GET", "/fake/state")[1]

    def logs(self) -> str:
        out = self.container.logs(stdout=True, stderr=True)
        return (out if isinstance(out, bytes) else b"".join(out)).decode(errors="replace")

    def status(self) -> str:
        self.container.reload()
        return self.container.status

    def wait_healthy(self, timeout: float = 30.0) -> float:
        """Poll /health every 100 ms; fail fast (with logs) if the container exits."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError):
                pass
            if self.status() == "exited":
                raise AssertionError(f"engine exited before becoming healthy:\n{self.logs()}")
            time.sleep(0.1)
        raise AssertionError(f"engine not healthy after {timeout}s:\n{self.logs()}")


@pytest.fixture
def run_engine(podman_client, engine_image):
    """Factory: run_engine(*args, env=..., host_network=...) -> Engine; all removed at teardown."""
    created = []

    def start(*args: str, env: dict | None = None, host_network: bool = False,
              port: int | None = None, **create_kwargs) -> Engine:
        name = f"sparkd-test-engine-{uuid.uuid4().hex[:10]}"
        port = port or free_port()
        kwargs = dict(name=name, environment=env or {},
                      labels={"io.sparkd.test": "engine-image"}, **create_kwargs)
        if host_network:
            kwargs["network_mode"] = "host"
            command = ["--port", str(port), *args]
        else:
            kwargs["ports"] = {"8000/tcp": ("127.0.0.1", port)}
            command = ["--port", "8000", *args]
        if "entrypoint" in create_kwargs:  # caller supplies the whole command line
            command = list(args)
        container = podman_client.containers.create(engine_image, command=command, **kwargs)
        created.append(container)
        container.start()
        return Engine(container, port)

    yield start
    for container in created:
        with contextlib.suppress(NotFound, APIError):
            container.remove(force=True)


def chat(text: str = "hello from the host", **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


# ---------------------------------------------------------------- tests


def test_health_appears_after_load_delay_with_progress_in_logs(run_engine):
    engine = run_engine("--served-model-name", "m", "--fake-load-delay", "2",
                        "--gpu-memory-utilization", "0.8", "--quantization", "mxfp4")
    took = engine.wait_healthy()
    assert took >= 1.5, f"healthy after {took:.2f}s, before the 2 s load delay"
    logs = engine.logs()
    assert "Loading safetensors checkpoint shards: 100% Completed | 4/4" in logs
    assert "Capturing CUDA graphs" in logs
    assert "Application startup complete." in logs
    state = engine.state()
    assert state["argv"][-4:] == ["--gpu-memory-utilization", "0.8", "--quantization", "mxfp4"]
    assert state["unknown_args"] == ["--gpu-memory-utilization", "0.8", "--quantization", "mxfp4"]


def test_chat_non_stream_and_stream(run_engine):
    engine = run_engine("--served-model-name", "m", "--fake-tokens", "6")
    engine.wait_healthy()
    status, body = engine.json("POST", "/v1/chat/completions", chat(max_tokens=4))
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "hello from the host"
    assert body["usage"]["completion_tokens"] == 4

    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=10)
    conn.request("POST", "/v1/chat/completions",
                 json.dumps(chat(stream=True, stream_options={"include_usage": True})),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    raw = resp.read().decode()
    conn.close()
    events = [b[len("data: "):] for b in raw.split("\n\n") if b]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "hello from the host lorem ipsum"
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert engine.state()["completed_streams"] == 1
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in engine.logs()


def test_vllm_serve_command_line_through_shim(run_engine):
    # The way the real vllm/vllm-openai image is driven: `vllm serve MODEL --flags`.
    engine = run_engine("serve", "org/tiny-model", "--port", "8000", "--max-model-len", "1K",
                        entrypoint=["vllm"])
    engine.wait_healthy()
    status, models = engine.json("GET", "/v1/models")
    assert status == 200
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [("org/tiny-model", 1024)]


def test_embeddings_and_tokenize(run_engine):
    engine = run_engine("--served-model-name", "m", "--fake-embedding-dim", "5")
    engine.wait_healthy()
    status, body = engine.json("POST", "/v1/embeddings", {"model": "m", "input": ["a", "b c"]})
    assert status == 200
    assert [len(d["embedding"]) for d in body["data"]] == [5, 5]
    assert body["usage"]["prompt_tokens"] == 3
    status, tok = engine.json("POST", "/tokenize", {"model": "m", "prompt": "one, two"})
    assert status == 200 and tok["count"] == 3 and tok["max_model_len"] == 4096
    status, tok = engine.json("POST", "/tokenize", {"model": "m", "messages": [
        {"role": "user", "content": "one two"}]})
    assert tok["count"] == 4


def test_api_key_enforced(run_engine):
    engine = run_engine("--served-model-name", "m", env={"VLLM_API_KEY": "engine-key"})
    engine.wait_healthy()  # /health needs no key
    status, body = engine.json("POST", "/v1/chat/completions", chat())
    assert status == 401 and body == {"error": "Unauthorized"}  # vLLM's own 401 body
    status, _ = engine.json("GET", "/v1/models", headers={"Authorization": "Bearer client-key"})
    assert status == 401
    status, _ = engine.json("POST", "/v1/chat/completions", chat(),
                            headers={"Authorization": "Bearer engine-key"})
    assert status == 200
    state = engine.state()
    assert state["last_request_headers"]["Authorization"] == "Bearer engine-key"
    assert state["env"]["VLLM_API_KEY"] == "engine-key"
    assert engine.request("GET", "/metrics")[0] == 200


def test_client_dropping_mid_stream_counts_as_aborted(run_engine):
    engine = run_engine("--served-model-name", "m", "--fake-token-rate", "10", "--fake-tokens", "100")
    engine.wait_healthy()
    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat(stream=True)),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.fp.readline()  # the chunk size line: the stream has begun
    time.sleep(0.3)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = engine.state()
        if state["aborted_streams"] == 1:
            break
        time.sleep(0.1)
    assert state["aborted_streams"] == 1, state
    assert state["completed_streams"] == 0 and state["active_streams"] == 0


def test_crash_at_start_exits_with_error_in_logs(run_engine):
    engine = run_engine("--served-model-name", "m", "--fake-load-delay", "0.5",
                        "--fake-crash-at-start")
    exit_code = engine.container.wait(condition="exited", timeout=30)
    assert exit_code == 1
    assert engine.status() == "exited"
    logs = engine.logs()
    assert "RuntimeError: CUDA error: fake crash at start" in logs
    assert "Loading safetensors checkpoint shards" in logs
    assert "Application startup complete." not in logs


def test_stop_is_prompt_and_clean(run_engine):
    # Python is PID 1 in the container: without its own SIGTERM handler `podman stop`
    # would wait the whole timeout and then SIGKILL.
    engine = run_engine("--served-model-name", "m")
    engine.wait_healthy()
    start = time.monotonic()
    engine.container.stop(timeout=10)
    assert time.monotonic() - start < 5
    engine.container.reload()
    assert engine.container.attrs["State"]["ExitCode"] == 0


def test_sleep_and_wake_counters(run_engine):
    engine = run_engine("--served-model-name", "m", "--enable-sleep-mode")
    engine.wait_healthy()
    assert engine.request("POST", "/sleep?level=1")[0] == 200
    assert engine.json("GET", "/is_sleeping")[1] == {"is_sleeping": True}
    status, body = engine.json("POST", "/v1/chat/completions", chat())
    assert status == 503 and "sleeping" in body["error"]["message"]
    assert engine.request("POST", "/wake_up")[0] == 200
    assert engine.json("POST", "/v1/chat/completions", chat())[0] == 200
    assert engine.request("POST", "/sleep?level=2")[0] == 200
    assert engine.request("POST", "/wake_up")[0] == 200
    state = engine.state()
    assert (state["sleeps"], state["wakes"], state["is_sleeping"]) == (2, 2, False)


def test_head_waits_for_worker_registration(run_engine):
    head_port = free_port()
    head = run_engine("--served-model-name", "m", "--fake-role", "head", "--fake-workers", "1",
                      host_network=True, port=head_port)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the head is up but not ready: 503
        try:
            status, _ = head.request("GET", "/health", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    assert status == 503
    worker = run_engine("--fake-role", "worker", "--fake-head-address", f"127.0.0.1:{head_port}",
                        "--fake-worker-id", "worker-1", host_network=True)
    worker.wait_healthy()
    head.wait_healthy()
    assert head.state()["workers"] == ["worker-1"]
    assert worker.state()["registered_with_head"] is True
    assert "registered with head" in worker.logs()
