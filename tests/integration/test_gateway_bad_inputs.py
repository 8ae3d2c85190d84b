"""Bad input against the running daemon (acceptance c of issue 4).

Every case must get a precise 4xx answer in OpenAI's error shape, the daemon must
stay healthy, and nothing may reach the engine. Requests that are not valid HTTP
at all (a NUL in a header, a header over the size limit) are answered by aiohttp's
parser before sparkd sees them: a plain-text 400 and a closed connection; they are
checked separately, for the same health and the same silence at the engine.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from harness import engine_model, write_keys

pytestmark = pytest.mark.podman

LIMIT = 1024 * 1024


@dataclass
class Case:
    name: str
    status: int
    code: str | None = None
    method: str = "POST"
    path: str = "/v1/chat/completions"
    body: Any = None
    """bytes as sent, or a JSON value; None = no body."""
    headers: dict[str, str] = field(default_factory=dict)
    key: bool = True
    chunked: bool = False
    message: str | None = None
    """Text the error message must hold."""


def cases(model: str) -> list[Case]:
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return [
        # malformed bodies
        Case("truncated JSON", 400, "invalid_json", body=b'{"model": "x", "messages": [', message="not valid JSON"),
        Case("not JSON", 400, "invalid_json", body=b"hello"),
        Case("JSON array", 400, "invalid_json", body=[chat], message="JSON object"),
        Case("JSON string", 400, "invalid_json", body="chat"),
        Case("JSON number", 400, "invalid_json", body=42),
        Case("JSON null", 400, "invalid_json", body=None, headers={"Content-Type": "application/json"}),
        Case("empty body", 400, "empty_body", body=b""),
        Case("whitespace body", 400, "empty_body", body=b" \n\t "),
        Case("invalid UTF-8", 400, "invalid_json", body=b'{"model": "\xff\xfe"}'),
        Case("NaN literal", 400, "invalid_json", body=b'{"model": "%s", "temperature": NaN}' % model.encode(), message="NaN"),
        Case("deep nesting", 400, "invalid_json", body=b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", message="nested too deeply"),
        # wrong types
        Case("model is a number", 400, "invalid_model", body={**chat, "model": 5}, message="'model' must be a string"),
        Case("model is null", 400, "missing_model", body={**chat, "model": None}),
        Case("model missing", 400, "missing_model", body={"messages": chat["messages"]}),
        Case("model empty", 400, "invalid_model", body={**chat, "model": ""}),
        Case("model is a list", 400, "invalid_model", body={**chat, "model": [model]}),
        Case("model is an object", 400, "invalid_model", body={**chat, "model": {"id": model}}),
        Case("messages is a string", 400, "invalid_type", body={**chat, "messages": "hi"}, message="'messages' must be an array"),
        Case("messages is an object", 400, "invalid_type", body={**chat, "messages": {"role": "user"}}),
        Case("messages missing", 400, "invalid_type", body={"model": model}),
        Case("messages empty", 400, "invalid_value", body={**chat, "messages": []}),
        Case("message is a string", 400, "invalid_type", body={**chat, "messages": ["hi"]}, message="messages[0]"),
        Case("message without role", 400, "invalid_type", body={**chat, "messages": [{"content": "hi"}]}, message="messages[0].role"),
        Case("role is a number", 400, "invalid_type", body={**chat, "messages": [{"role": 1, "content": "hi"}]}),
        Case("content is a number", 400, "invalid_type", body={**chat, "messages": [{"role": "user", "content": 7}]}, message="messages[0].content"),
        Case("content part is a string", 400, "invalid_type", body={**chat, "messages": [{"role": "user", "content": ["hi"]}]}),
        Case("stream is a string", 400, "invalid_type", body={**chat, "stream": "yes"}, message="'stream' must be true or false"),
        Case("stream is a number", 400, "invalid_type", body={**chat, "stream": 1}),
        Case("temperature is a string", 400, "invalid_type", body={**chat, "temperature": "hot"}),
        Case("n is a float", 400, "invalid_type", body={**chat, "n": 1.5}),
        Case("tools is an object", 400, "invalid_type", body={**chat, "tools": {"type": "function"}}),
        Case("stop is a number", 400, "invalid_type", body={**chat, "stop": 3}),
        Case("completions prompt missing", 400, "invalid_type", path="/v1/completions", body={"model": model}),
        Case("embeddings input is a number", 400, "invalid_type", path="/v1/embeddings", body={"model": model, "input": 3}),
        # unknown models, odd names, header injection through names
        Case("unknown model", 404, "model_not_found", body={**chat, "model": "nope"}, message="GET /v1/models"),
        Case("unicode model name", 404, "model_not_found", body={**chat, "model": "모델-\u202e"}),
        Case("NUL in model name", 404, "model_not_found", body={**chat, "model": model + "\u0000"}),
        Case("CRLF in model name", 404, "model_not_found", body={**chat, "model": "a\r\nX-Injected: 1"}),
        Case("10 000 character model name", 404, "model_not_found", body={**chat, "model": "m" * 10_000}),
        Case("path form: unknown model", 404, "model_not_found", path="/v1/nope/chat/completions", body=chat),
        Case("path form: encoded traversal", 404, "unknown_endpoint", path="/v1/%2e%2e/chat/completions", body=chat),
        Case("path form: encoded slashes", 404, None, path="/v1/%2e%2e%2fapi%2fstatus/chat/completions", body=chat),
        Case("path form: traversal to /etc", 404, None, path="/v1/..%2f..%2fetc%2fpasswd/chat/completions", body=chat),
        Case("path form: double-encoded", 404, "unknown_endpoint", path="/v1/%252e%252e/chat/completions", body=chat),
        Case("path form: NUL", 404, "unknown_endpoint", path=f"/v1/{model}%00/chat/completions", body=chat),
        Case("path form: CRLF", 404, "unknown_endpoint", path=f"/v1/{model}%0d%0aX-Injected:%201/chat/completions", body=chat),
        Case("path form: unicode", 404, "unknown_endpoint", path=f"/v1/%E2%80%AE{model}/chat/completions", body=chat),
        Case("path form: semicolon", 404, "unknown_endpoint", path="/v1/a;b/chat/completions", body=chat),
        Case("path form: unknown endpoint", 404, "unknown_endpoint", path=f"/v1/{model}/nope", body=chat),
        Case("unknown endpoint for a valid model", 404, "unknown_endpoint", path="/v1/frobnicate", body=chat),
        Case("POST /v1/models", 404, "unknown_endpoint", path="/v1/models", body=chat),
        Case("CRLF-looking key header", 401, "invalid_api_key", key=False, headers={"x-api-key": "abc%0d%0aX-Injected:%201"}, body=chat),
        Case("Authorization not Bearer", 401, "invalid_authorization_header", key=False, headers={"Authorization": "Token abc"}, body=chat),
        Case("no key", 401, "missing_api_key", key=False, body=chat),
        Case("origin with CRLF-looking text", 403, "origin_not_allowed", headers={"Origin": "http://x%0d%0aX-Injected:%201"}, body=chat),
        # sizes
        Case("body over the limit (Content-Length)", 413, "request_too_large", body=b'{"model": "' + b"x" * (2 * LIMIT) + b'"}'),
        Case("body over the limit (chunked)", 413, "request_too_large", body=b'{"model": "' + b"x" * (2 * LIMIT) + b'"}', chunked=True),
        # methods and endpoints
        Case("PUT chat", 405, "method_not_allowed", method="PUT", body=chat),
        Case("GET chat", 405, "method_not_allowed", method="GET"),
        Case("DELETE models", 405, "method_not_allowed", method="DELETE", path="/v1/models"),
        Case("PATCH admin", 405, "method_not_allowed", method="PATCH", path="/api/status"),
        Case("unknown top-level endpoint", 404, "unknown_endpoint", method="GET", path="/v2/chat/completions"),
        Case("unknown admin endpoint", 404, "unknown_endpoint", method="GET", path="/api/secrets"),
        Case("TRACE", 405, "method_not_allowed", method="TRACE", path="/v1/chat/completions"),
    ]


async def send(session: aiohttp.ClientSession, base: str, key: str, case: Case) -> tuple[int, dict[str, str], bytes]:
    headers = dict(case.headers)
    if case.key:
        headers.setdefault("Authorization", f"Bearer {key}")
    data: Any = None
    if isinstance(case.body, bytes):
        data = case.body
    elif case.body is not None or "Content-Type" in headers:
        data = json.dumps(case.body, ensure_ascii=False).encode()
        headers.setdefault("Content-Type", "application/json")
    if case.chunked and data is not None:
        payload = data

        async def chunks():
            for start in range(0, len(payload), 65536):
                yield payload[start:start + 65536]

        data = chunks()
    async with session.request(case.method, base + case.path, data=data, headers=headers, skip_auto_headers=["Content-Type"]) as response:
        return response.status, dict(response.headers), await response.read()


def engine_work(state: dict[str, Any]) -> int:
    """Requests the engine served, apart from health probes and the test's own state reads."""
    return sum(n for route, n in state["requests"].items() if not route.startswith(("/health", "/fake/", "/ping", "/metrics", "/version")))


async def raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


def answer_problem(case: Case, status: int, headers: dict[str, str], raw: bytes, key: str) -> str | None:
    """What is wrong with sparkd's answer to a bad input (the last check that fails), or None."""
    problem = None
    try:
        body = json.loads(raw)
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"] and "type" in error and "code" in error
    except (ValueError, KeyError, TypeError, AssertionError):
        problem = f"not an OpenAI error body: {raw[:200]!r}"
    else:
        if status != case.status:
            problem = f"status {status}, expected {case.status}: {error['message']}"
        elif case.code and error["code"] != case.code:
            problem = f"code {error['code']!r}, expected {case.code!r}: {error['message']}"
        elif case.message and case.message not in error["message"]:
            problem = f"message lacks {case.message!r}: {error['message']}"
        elif any(c in error["message"] for c in "\r\n\x00"):
            problem = f"control characters echoed: {error['message']!r}"
        elif len(error["message"]) > 600:
            problem = f"message of {len(error['message'])} characters"
    if "X-Injected" in headers or key in raw.decode(errors="replace"):
        problem = "header injected or key echoed"
    if headers.get("Content-Type", "").split(";")[0] != "application/json":
        problem = f"content type {headers.get('Content-Type')}"
    return problem


async def test_bad_inputs_get_precise_errors_and_never_reach_the_engine(sparkd_factory, engine_image, tmp_path):
    keys_path = tmp_path / "keys.toml"
    key = f"sk-test-{secrets.token_hex(16)}"
    write_keys(keys_path, {"admin": {"key": key, "role": "admin"}})
    sparkd = sparkd_factory(
        {"a": engine_model(engine_image)},
        {"server": {"keys_file": str(keys_path), "anonymous": "off", "max_body_bytes": LIMIT}},
    )
    sparkd.admin_key = key
    await sparkd.start()
    model = sparkd.model("a")
    tried = crashes = 0
    failures: list[str] = []
    async with aiohttp.ClientSession() as session:
        # the model runs, so an input that slipped through would show at the engine
        ok = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(f"{sparkd.base_url}/v1/chat/completions", json=ok, headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 200
        port = (await sparkd.model_status("a"))["port"]

        async def engine_count() -> int:
            async with session.get(f"http://127.0.0.1:{port}/fake/state") as response:
                return engine_work(await response.json())

        before = await engine_count()
        for case in cases(model):
            tried += 1
            try:
                status, headers, raw = await send(session, sparkd.base_url, key, case)
            except aiohttp.ClientError as error:
                crashes += 1
                failures.append(f"{case.name}: {type(error).__name__}: {error}")
                continue
            problem = answer_problem(case, status, headers, raw, key)
            if problem:
                failures.append(f"{case.name}: {problem}")
            async with session.get(f"{sparkd.base_url}/healthz") as response:
                if response.status != 200:
                    crashes += 1
                    failures.append(f"{case.name}: daemon unhealthy afterwards ({response.status})")

        # not HTTP at all: aiohttp's parser answers 400 and closes; sparkd stays up
        raw_cases = {
            "NUL in a header value": b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
            "header over 16 KiB": b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
            "garbage request line": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
            "bare LF header injection": b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: b\nX-Injected: 1\r\n\r\n",
        }
        for name, data in raw_cases.items():
            tried += 1
            answer = await raw_request(sparkd.port, data)
            if not (answer.startswith(b"HTTP/1.") and answer[9:10] == b"4"):
                failures.append(f"raw {name}: {answer[:80]!r}")
            async with session.get(f"{sparkd.base_url}/healthz") as response:
                if response.status != 200:
                    crashes += 1
                    failures.append(f"raw {name}: daemon unhealthy afterwards")

        after = await engine_count()
        assert sparkd.process.poll() is None, "the daemon exited"
    print(f"RESULT bad_inputs_tried {tried} cases")
    print(f"RESULT bad_inputs_crashes {crashes} cases")
    print(f"RESULT bad_inputs_reaching_engine {after - before} requests")
    assert not failures, "\n".join(failures)
    assert after == before, f"{after - before} bad requests reached the engine"
    assert "event=request_failed" not in sparkd.logs()
