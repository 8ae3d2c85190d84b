"""Fast unit tests of the fake vLLM engine: in-process handlers plus a few subprocess runs.

The engine file is loaded by path so these tests don't depend on how tests/ is packaged.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ENGINE_PATH = Path(__file__).resolve().parent / "fake_vllm.py"
_spec = importlib.util.spec_from_file_location("fake_vllm", ENGINE_PATH)
fake_vllm = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("fake_vllm", fake_vllm)
_spec.loader.exec_module(fake_vllm)


def make_client(aiohttp_client, *argv: str, env: dict | None = None):
    cfg = fake_vllm.Config(["--served-model-name", "m", *argv], env=env or {})
    engine = fake_vllm.FakeEngine(cfg)
    return engine, aiohttp_client(fake_vllm.make_app(cfg, engine))


def chat_body(text: str = "Hello there, world!", **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


async def read_sse(resp) -> list:
    """Parse an SSE body into a list of JSON events, with the literal "[DONE]" kept as a string."""
    text = (await resp.read()).decode()
    assert text.endswith("data: [DONE]\n\n")
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---------------------------------------------------------------- configuration


def test_config_accepts_and_records_unknown_vllm_args():
    cfg = fake_vllm.Config(["serve", "openai/gpt-oss-20b", "--gpu-memory-utilization", "0.8",
                            "--quantization", "mxfp4", "--port", "9000", "--max-model-len", "32K",
                            "--enable-sleep-mode", "--fake-hang"], env={})
    assert cfg.model == "openai/gpt-oss-20b"
    assert cfg.served_model_names == ["openai/gpt-oss-20b"]
    assert cfg.port == 9000 and cfg.max_model_len == 32768 and cfg.enable_sleep_mode
    assert cfg.unknown_args == ["--gpu-memory-utilization", "0.8", "--quantization", "mxfp4"]
    assert cfg.hang is True


def test_config_env_is_used_only_where_no_arg_was_given():
    env = {"VLLM_API_KEY": "from-env", "FAKE_TOKENS": "5", "FAKE_LOAD_DELAY": "2.5", "HOME": "/x"}
    cfg = fake_vllm.Config(["--fake-tokens", "7"], env=env)
    assert cfg.tokens == 7 and cfg.load_delay == 2.5 and cfg.api_key == "from-env"
    assert cfg.env == {"VLLM_API_KEY": "from-env", "FAKE_TOKENS": "5", "FAKE_LOAD_DELAY": "2.5"}
    assert fake_vllm.Config(["--api-key", "arg"], env=env).api_key == "arg"
    assert fake_vllm.Config(["--fake-hang", "0"], env={"FAKE_HANG": "1"}).hang is False


def test_tokenizer_is_documented_split_and_stable():
    assert fake_vllm.Tokenizer.split("Hello, world! <|user|> it's") == [
        "Hello", ",", "world", "!", "<|user|>", "it", "'", "s"]
    tok = fake_vllm.Tokenizer()
    ids = tok.encode("alpha beta")
    assert ids == fake_vllm.Tokenizer().encode("alpha beta")  # same ids in every process
    assert tok.decode(ids) == "alpha beta"
    assert tok.decode([7]) == "<|7|>"


# ---------------------------------------------------------------- health, models, metrics


async def test_health_models_ping_version(aiohttp_client):
    _, client = make_client(aiohttp_client, "--max-model-len", "2048")
    client = await client
    resp = await client.get("/health")
    assert resp.status == 200 and await resp.read() == b""
    assert (await client.get("/ping")).status == 200
    models = await (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [(m["id"], m["max_model_len"], m["owned_by"]) for m in models["data"]] == [("m", 2048, "vllm")]
    assert "version" in await (await client.get("/version")).json()


async def test_metrics_are_prometheus_text_with_request_counters(aiohttp_client):
    _, client = make_client(aiohttp_client)
    client = await client
    await client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
    text = await (await client.get("/metrics")).text()
    assert '# TYPE vllm:request_success_total counter' in text
    assert 'vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 1.0' in text
    assert 'vllm:generation_tokens_total{engine="0",model_name="m"} 3.0' in text
    assert 'vllm:num_requests_running{engine="0",model_name="m"} 0.0' in text
    assert 'vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 1.0' in text


# ---------------------------------------------------------------- chat


async def test_chat_non_stream_echoes_then_fills_and_counts_usage(aiohttp_client):
    _engine, client = make_client(aiohttp_client)
    client = await client
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5),
                             headers={"X-Test": "1"})
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "m"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello there world lorem ipsum",
                                 "reasoning_content": None, "tool_calls": []}
    assert choice["finish_reason"] == "length"
    # <|user|> Hello there , world ! <|assistant|>  -> 7 prompt tokens
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                             "prompt_tokens_details": None}
    state = await (await client.get("/fake/state")).json()
    assert state["last_request_body"] == chat_body(max_tokens=5)
    assert state["last_request_headers"]["X-Test"] == "1"
    assert state["requests"]["/v1/chat/completions"] == 1 and state["answered_requests"] == 1


async def test_chat_default_length_is_the_tokens_knob_and_stops(aiohttp_client):
    _, client = make_client(aiohttp_client, "--fake-tokens", "4")
    client = await client
    body = await (await client.post("/v1/chat/completions", json=chat_body(max_tokens=100))).json()
    assert body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["finish_reason"] == "stop"
    body = await (await client.post("/v1/chat/completions", json=chat_body())).json()
    assert body["usage"]["completion_tokens"] == 4


async def test_max_completion_tokens_wins_over_max_tokens(aiohttp_client):
    _, client = make_client(aiohttp_client)
    client = await client
    body = await (await client.post("/v1/chat/completions",
                                    json=chat_body(max_tokens=9, max_completion_tokens=2))).json()
    assert body["usage"]["completion_tokens"] == 2


async def test_chat_stream_is_vllm_shaped_sse_with_usage(aiohttp_client):
    engine, client = make_client(aiohttp_client)
    client = await client
    resp = await client.post("/v1/chat/completions", json=chat_body(
        max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    first, *content, final, usage, _done = events
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == "Hello there world"
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert len({e["id"] for e in events[:-1]}) == 1
    assert engine.completed_streams == 1 and engine.aborted_streams == 0


async def test_chat_stream_without_usage_has_no_usage_chunk(aiohttp_client):
    _, client = make_client(aiohttp_client)
    client = await client
    events = await read_sse(await client.post("/v1/chat/completions",
                                              json=chat_body(max_tokens=2, stream=True)))
    assert all("usage" not in e for e in events[:-1])
    assert len(events) == 1 + 2 + 1 + 1  # role, 2 tokens, finish, [DONE]


async def test_context_length_error_is_vllm_shaped(aiohttp_client):
    _, client = make_client(aiohttp_client, "--max-model-len", "100")
    client = await client
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=95))
    # As vLLM 0.32: prompt + max_tokens over the context is no error, the answer stops at its end...
    assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 16
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=101))
    assert resp.status == 400
    body = await resp.json()
    assert body == {"error": {
        "type": "BadRequestError", "param": "max_tokens", "code": 400,
        "message": "max_tokens=101 cannot be greater than max_model_len=100. Please request fewer "
                   "output tokens. (parameter=max_tokens, value=101)"}}
    # ... a prompt that fills the context is
    resp = await client.post("/v1/chat/completions", json=chat_body(" ".join(["w"] * 200)))
    assert resp.status == 400
    assert "input tokens" in (await resp.json())["error"]["message"]


async def test_unknown_model_is_404_and_bad_max_tokens_400(aiohttp_client):
    _, client = make_client(aiohttp_client)
    client = await client
    resp = await client.post("/v1/chat/completions", json={**chat_body(), "model": "nope"})
    assert resp.status == 404
    assert (await resp.json())["error"]["message"] == "The model `nope` does not exist."
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=0))
    assert resp.status == 400
    resp = await client.post("/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == 400
    # vLLM refuses a body that is not declared JSON (curl -d sends a form type)
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        resp = await client.post("/v1/chat/completions", data=json.dumps(chat_body()).encode(),
                                 headers={"Content-Type": content_type})
        assert resp.status == 400 and "Unsupported Media Type" in (await resp.json())["error"]["message"]


async def test_content_parts_are_flattened(aiohttp_client):
    _, client = make_client(aiohttp_client)
    client = await client
    body = {"model": "m", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "alpha"}, {"type": "text", "text": "beta"}]}]}
    out = await (await client.post("/v1/chat/completions", json=body)).json()
    assert out["choices"][0]["message"]["content"] == "alpha beta"


# ---------------------------------------------------------------- other endpoints


async def test_completions_stream_and_non_stream(aiohttp_client):
    _, client = make_client(aiohttp_client)
    client = await client
    body = await (await client.post("/v1/completions",
                                    json={"model": "m", "prompt": "once upon", "max_tokens": 4})).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "once upon lorem ipsum"
    assert body["usage"]["prompt_tokens"] == 2
    events = await read_sse(await client.post("/v1/completions", json={
        "model": "m", "prompt": "once upon", "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}}))
    assert "".join(e["choices"][0]["text"] for e in events[:-3]) == "once upon lorem ipsum"
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 4


async def test_embeddings_are_deterministic_and_sized(aiohttp_client):
    _, client = make_client(aiohttp_client, "--fake-embedding-dim", "4")
    client = await client
    one = await (await client.post("/v1/embeddings", json={"model": "m", "input": "hi"})).json()
    two = await (await client.post("/v1/embeddings", json={"model": "m", "input": ["hi", "ho"]})).json()
    assert len(one["data"]) == 1 and len(two["data"]) == 2
    assert one["data"][0]["embedding"] == two["data"][0]["embedding"]
    assert two["data"][0]["embedding"] != two["data"][1]["embedding"]
    assert len(one["data"][0]["embedding"]) == 4
    assert abs(sum(v * v for v in one["data"][0]["embedding"]) - 1.0) < 1e-4
    b64 = await (await client.post("/v1/embeddings", json={
        "input": "hi", "encoding_format": "base64"})).json()
    floats = struct.unpack("<4f", base64.b64decode(b64["data"][0]["embedding"]))
    assert [round(f, 4) for f in floats] == [round(f, 4) for f in one["data"][0]["embedding"]]


async def test_responses_minimal_object(aiohttp_client):
    _, client = make_client(aiohttp_client)
    client = await client
    body = await (await client.post("/v1/responses", json={
        "model": "m", "input": "tell me", "max_output_tokens": 3})).json()
    assert body["object"] == "response" and body["status"] == "incomplete"
    assert body["output"][0]["content"][0]["text"] == "tell me lorem"
    assert body["usage"]["output_tokens"] == 3


async def test_tokenize_prompt_and_messages_then_detokenize(aiohttp_client):
    _, client = make_client(aiohttp_client, "--max-model-len", "1000")
    client = await client
    body = await (await client.post("/tokenize", json={"model": "m", "prompt": "Hello, world"})).json()
    assert body["count"] == 3 and body["max_model_len"] == 1000 and len(body["tokens"]) == 3
    back = await (await client.post("/detokenize", json={"tokens": body["tokens"]})).json()
    assert back == {"prompt": "Hello , world"}
    msgs = await (await client.post("/tokenize", json={
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]})).json()
    assert msgs["count"] == 1 + 2 + 1 + 1 + 1  # <|system|> be brief <|user|> hi <|assistant|>
    # The count matches the usage a chat request reports.
    chat = await (await client.post("/v1/chat/completions", json={"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]})).json()
    assert chat["usage"]["prompt_tokens"] == msgs["count"]


# ---------------------------------------------------------------- api key


async def test_api_key_guards_v1_and_admin_but_not_health_metrics(aiohttp_client):
    _, client = make_client(aiohttp_client, "--enable-sleep-mode", env={"VLLM_API_KEY": "sekret"})
    client = await client
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("POST", "/tokenize"), ("POST", "/sleep"), ("GET", "/is_sleeping")]:
        resp = await client.request(method, path, json=chat_body())
        assert resp.status == 401, path
        assert await resp.json() == {"error": "Unauthorized"}  # vLLM's own body
        resp = await client.request(method, path, json=chat_body(),
                                    headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401, path
    assert (await client.get("/health")).status == 200
    assert (await client.get("/metrics")).status == 200
    state = await (await client.get("/fake/state")).json()
    assert state["last_request_headers"]["Authorization"] == "Bearer wrong"  # refused, but seen
    ok = await client.post("/v1/chat/completions", json=chat_body(),
                           headers={"Authorization": "Bearer sekret"})
    assert ok.status == 200
    state = await (await client.get("/fake/state")).json()
    assert state["last_request_headers"]["Authorization"] == "Bearer sekret"
    assert state["config"]["api_key_set"] is True and "sekret" not in json.dumps(state["config"])


# ---------------------------------------------------------------- sleep mode


async def test_sleep_mode_endpoints_and_counters(aiohttp_client):
    _, client = make_client(aiohttp_client, "--enable-sleep-mode")
    client = await client
    assert await (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
    assert (await client.post("/sleep?level=1")).status == 200
    assert (await client.post("/sleep?level=1")).status == 200  # already asleep: no new sleep
    assert await (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 503 and "sleeping" in (await resp.json())["error"]["message"]
    assert (await client.get("/health")).status == 200  # vLLM stays healthy while asleep
    assert (await client.post("/wake_up")).status == 200
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200
    state = await (await client.get("/fake/state")).json()
    assert (state["sleeps"], state["wakes"], state["is_sleeping"]) == (1, 1, False)


def resident_mb() -> float:
    """This process's resident memory (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_memory_knobs_really_allocate_and_sleep_levels_free_what_they_say(aiohttp_client):
    cfg = fake_vllm.Config(["--served-model-name", "m", "--enable-sleep-mode", "--fake-load-mb", "300",
                            "--fake-ready-mb", "200", "--fake-kv-mb", "50", "--fake-load-delay", "0.6"], env={})
    ballast = fake_vllm.Ballast()
    before = resident_mb()
    peak = 0.0
    loading = asyncio.ensure_future(fake_vllm.load(cfg, asyncio.Event(), ballast))
    while not loading.done():
        peak = max(peak, resident_mb() - before)
        await asyncio.sleep(0.02)
    assert loading.result() is True
    assert peak >= 250, peak  # the pages are written: the kernel counts them
    ballast.resize(cfg.ready_mb)
    assert 170 <= resident_mb() - before <= 230
    client = await aiohttp_client(fake_vllm.make_app(cfg, fake_vllm.FakeEngine(cfg, ballast)))
    assert (await client.post("/sleep?level=1")).status == 200
    assert (await (await client.get("/fake/state")).json())["resident_mb"] == 150  # level 1 keeps the weights
    assert 120 <= resident_mb() - before <= 180
    assert (await client.post("/sleep?level=2")).status == 200
    assert (await (await client.get("/fake/state")).json())["resident_mb"] == 0  # level 2 discards them
    assert resident_mb() - before <= 30
    assert (await client.post("/wake_up")).status == 200
    assert (await (await client.get("/fake/state")).json())["resident_mb"] == 200


async def test_sleep_endpoints_absent_without_flag(aiohttp_client):
    _, client = make_client(aiohttp_client)
    client = await client
    assert (await client.post("/sleep")).status == 404


# ---------------------------------------------------------------- streams: hold, abort, rate


async def wait_for(predicate, timeout: float = 3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_hold_and_release(aiohttp_client):
    engine, client = make_client(aiohttp_client, "--fake-hold-after-chunk", "2")
    client = await client
    task = asyncio.ensure_future(client.post("/v1/chat/completions",
                                             json=chat_body(max_tokens=3, stream=True)))
    await wait_for(lambda: engine._held == 1)
    released = await (await client.post("/fake/release")).json()
    assert released == {"released": 1}
    events = await read_sse(await task)
    assert events[-1] == "[DONE]" and engine.completed_streams == 1


async def test_client_going_away_mid_stream_counts_as_aborted(aiohttp_client):
    engine, client = make_client(aiohttp_client, "--fake-hold-after-chunk", "2")
    client = await client
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    first = await resp.content.readline()
    assert first.startswith(b"data: ")
    await wait_for(lambda: engine._held == 1)
    resp.close()  # drop the connection while the engine holds the stream
    await wait_for(lambda: engine.aborted_streams == 1)
    assert engine.completed_streams == 0 and engine.active_streams == 0
    assert engine.answered_requests == 0


async def test_token_rate_paces_the_stream(aiohttp_client):
    _, client = make_client(aiohttp_client, "--fake-token-rate", "50")
    client = await client
    start = time.monotonic()
    await read_sse(await client.post("/v1/chat/completions", json=chat_body(max_tokens=10, stream=True)))
    # role + 10 tokens + finish = 12 events, 11 gaps of 20 ms
    assert time.monotonic() - start >= 0.2


async def test_hang_never_answers_but_health_does(aiohttp_client):
    engine, client = make_client(aiohttp_client, "--fake-hang")
    client = await client
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.post("/v1/chat/completions", json=chat_body()), 0.3)
    assert (await client.get("/health")).status == 200
    assert engine.inference_requests == 1 and engine.answered_requests == 0


async def test_hang_health_hangs_health_too(aiohttp_client):
    _, client = make_client(aiohttp_client, "--fake-hang", "--fake-hang-health")
    client = await client
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.get("/health"), 0.3)


# ---------------------------------------------------------------- roles


async def test_head_waits_for_workers(aiohttp_client):
    _, client = make_client(aiohttp_client, "--fake-role", "head", "--fake-workers", "2")
    client = await client
    assert (await client.get("/health")).status == 503
    await client.post("/fake/register", json={"worker_id": "w1"})
    await client.post("/fake/register", json={"worker_id": "w1"})  # a retry is not a new worker
    assert (await client.get("/health")).status == 503
    reg = await (await client.post("/fake/register", json={"worker_id": "w2"})).json()
    assert reg["ready"] is True
    assert (await client.get("/health")).status == 200
    assert (await (await client.get("/fake/state")).json())["workers"] == ["w1", "w2"]


# ---------------------------------------------------------------- whole process (subprocess)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """fake_vllm.py as a child process on a free port."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.p = subprocess.Popen(
            [sys.executable, str(ENGINE_PATH), "--host", "127.0.0.1", "--port", str(self.port),
             "--served-model-name", "m", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})})

    def wait_healthy(self, timeout: float = 10.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            assert self.p.poll() is None, self.p.stderr.read()
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        raise AssertionError("engine never became healthy")

    def post(self, path: str, body: dict, timeout: float = 5.0):
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(req, timeout=timeout)

    def stop(self) -> tuple[str, str]:
        if self.p.poll() is None:
            self.p.terminate()
        out, err = self.p.communicate(timeout=10)
        return out, err


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(*args, **kw):
        proc = Proc(*args, **kw)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.p.poll() is None:
            proc.p.kill()
        proc.p.communicate(timeout=10)


def test_process_load_delay_refuses_connections_then_logs_progress(procs):
    proc = procs("--fake-load-delay", "0.8", env={"FAKE_TOKENS": "3"})
    took = proc.wait_healthy()
    assert took >= 0.6
    body = json.loads(proc.post("/v1/chat/completions", chat_body()).read())
    assert body["usage"]["completion_tokens"] == 3
    out, _ = proc.stop()
    assert proc.p.returncode == 0  # SIGTERM is a clean shutdown
    assert "Loading safetensors checkpoint shards:  50% Completed | 2/4" in out
    assert "Capturing CUDA graphs" in out
    assert out.index("Loading safetensors") < out.index("INFO:     Application startup complete.")
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in out


def test_process_crash_at_start(procs):
    proc = procs("--fake-crash-at-start")
    assert proc.p.wait(timeout=10) == 1
    _, err = proc.stop()
    assert "RuntimeError: CUDA error: fake crash at start" in err


def test_process_crash_during_load_dies_part_way_with_progress_printed(procs):
    proc = procs("--fake-load-delay", "4", "--fake-crash-during-load", "1")
    began = time.monotonic()
    assert proc.p.wait(timeout=10) == 1
    took = time.monotonic() - began
    out, err = proc.stop()
    assert 0.8 < took < 3.5  # part way through the 4 s load, not after it
    assert "Loading safetensors checkpoint shards:   0% Completed" in out
    assert "Application startup complete" not in out
    assert "CUDA out of memory" in err and "fake crash during load" in err


def test_process_crash_after_requests(procs):
    proc = procs("--fake-crash-after-requests", "2")
    proc.wait_healthy()
    proc.post("/v1/chat/completions", chat_body()).read()
    assert proc.p.poll() is None
    proc.post("/v1/chat/completions", chat_body()).read()  # answered in full, then exit
    assert proc.p.wait(timeout=5) == 1
    _, err = proc.stop()
    assert "fake crash after 2 requests" in err


def test_process_crash_mid_stream_drops_the_connection(procs):
    proc = procs("--fake-crash-mid-stream", "3")
    proc.wait_healthy()
    resp = proc.post("/v1/chat/completions", chat_body(stream=True))
    # The engine exits mid-body: the chunked body ends without its last chunk.
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    assert proc.p.wait(timeout=5) == 1


def test_process_worker_registers_with_head(procs):
    head = procs("--fake-role", "head", "--fake-workers", "1")
    worker = procs("--fake-role", "worker", "--fake-head-address", f"127.0.0.1:{head.port}")
    worker.wait_healthy()
    head.wait_healthy()
    state = json.loads(urllib.request.urlopen(head.base + "/fake/state").read())
    assert len(state["workers"]) == 1
