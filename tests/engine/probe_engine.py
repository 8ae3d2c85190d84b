#!/usr/bin/env python3
"""Probe an engine for everything sparkd relies on, as comparable observations.

The same probe runs against the fake engine (tests/engine/fake_vllm.py) and the
real vLLM (tests/images/real_vllm), and tests/integration/test_real_vllm.py
fails when they differ where it matters. Each case sends one request with
exact headers (http.client: no library adds a Content-Type behind our back)
and records only what sparkd depends on: the status code, the JSON shape
(keys and value types, not generated text), the SSE framing and the usage
chunk, the error body's shape, the /tokenize fields, who is refused a key.

Usage: probe_engine.py HOST:PORT KEY MODEL    (prints the observations as JSON)
Stdlib only.
"""

from __future__ import annotations

import http.client
import json
import re
import sys
from typing import Any

Observation = dict[str, Any]
MAX_TOKENS_THAT_FIT_ALONE = 4090
"""With a max_model_len of 4096 (the probe's engines run with it): fits alone, not with the prompt."""


def shape(value: Any, depth: int = 3) -> Any:
    """A value's structure: dict keys with their shapes, list of the first item's shape, type names."""
    if isinstance(value, dict):
        if depth == 0:
            return "object"
        return {key: shape(item, depth - 1) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0], depth - 1)] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "null"


def has_shape(value: Any, expected: Any) -> bool:
    """True when ``value`` carries at least the structure ``expected`` (extra keys allowed)."""
    if isinstance(expected, dict):
        return isinstance(value, dict) and all(k in value and has_shape(value[k], e) for k, e in expected.items())
    if isinstance(expected, list):
        return isinstance(value, list) and all(has_shape(item, expected[0]) for item in value) if expected else isinstance(value, list)
    if isinstance(expected, tuple):  # one of several shapes
        return any(has_shape(value, e) for e in expected)
    return {"string": isinstance(value, str), "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool), "null": value is None, "any": True}[expected]


# What sparkd reads from each answer (extra keys are fine; these must be there).
ERROR_SHAPE = {"error": {"message": "string", "type": "string", "code": "number"}}
ANTHROPIC_ERROR_SHAPE = {"type": "string", "error": {"type": "string", "message": "string"}}
USAGE = {"prompt_tokens": "number", "completion_tokens": "number", "total_tokens": "number"}
CHAT = {"id": "string", "object": "string", "model": "string", "usage": USAGE,
        "choices": [{"index": "number", "finish_reason": "string", "message": {"role": "string", "content": "string"}}]}
COMPLETION = {"id": "string", "object": "string", "model": "string", "usage": USAGE,
              "choices": [{"index": "number", "finish_reason": "string", "text": "string"}]}
RESPONSE = {"id": "string", "object": "string", "status": "string", "model": "string",
            "usage": {"input_tokens": "number", "output_tokens": "number", "total_tokens": "number"},
            "output": [{"type": "string"}]}
MESSAGE = {"id": "string", "type": "string", "role": "string", "model": "string", "stop_reason": "string",
           "content": [{"type": "string", "text": "string"}],
           "usage": {"input_tokens": "number", "output_tokens": "number"}}
TOKENIZE = {"count": "number", "max_model_len": "number", "tokens": ["number"]}
MODELS = {"object": "string", "data": [{"id": "string", "object": "string", "max_model_len": "number"}]}


class Probe:
    def __init__(self, address: str, key: str, model: str, timeout: float = 120.0) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port, self.key, self.model, self.timeout = host, int(port), key, model, timeout

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def bearer(self, content_type: str | None = "application/json", **extra: str) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.key}", **extra}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path, raw, self.bearer() if headers is None else headers)

    def chat_body(self, **fields: Any) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, **fields}

    # ------------------------------------------------------------ observations

    def json_case(self, status: int, headers: dict[str, str], raw: bytes, expected: Any) -> Observation:
        observed: Observation = {"status": status, "content_type": headers.get("content-type", "").split(";")[0]}
        try:
            body = json.loads(raw)
        except ValueError:
            observed["json"] = False
            return observed
        observed["json"] = True
        observed["shape_ok"] = has_shape(body, expected)
        if not observed["shape_ok"]:
            observed["shape"] = shape(body)
        return observed

    def error_case(self, status: int, headers: dict[str, str], raw: bytes, mentions: tuple[str, ...] = ()) -> Observation:
        observed = self.json_case(status, headers, raw, ERROR_SHAPE)
        text = raw.decode(errors="replace").lower()
        for word in mentions:
            observed[f"mentions {word}"] = word.lower() in text
        return observed

    def sse_case(self, status: int, headers: dict[str, str], raw: bytes, usage_key: str = "usage") -> Observation:
        """OpenAI-style SSE: data-only events, [DONE] last, usage in a final chunk with no choices."""
        text = raw.decode()
        blocks = [b for b in text.split("\n\n") if b.strip()]
        datas = [b[len("data: "):] for b in blocks if b.startswith("data: ")]
        chunks = [json.loads(d) for d in datas if d != "[DONE]"]
        usage_chunks = [c for c in chunks if c.get(usage_key)]
        return {
            "status": status,
            "content_type": headers.get("content-type", "").split(";")[0],
            "every_event_is_data": len(datas) == len(blocks),
            "ends_with_done": bool(datas) and datas[-1] == "[DONE]",
            "usage_chunks": len(usage_chunks),
            "usage_chunk_has_no_choices": all(c.get("choices") == [] for c in usage_chunks),
            "usage_shape_ok": all(has_shape(c[usage_key], USAGE) for c in usage_chunks),
            "other_chunks_usage_null": all(c.get(usage_key) is None for c in chunks if c not in usage_chunks),
            "has_finish_reason": any(ch.get("finish_reason") for c in chunks for ch in c.get("choices", [])),
        }

    def anthropic_sse_case(self, status: int, headers: dict[str, str], raw: bytes) -> Observation:
        """Anthropic SSE: `event: NAME` + `data: {"type": NAME, ...}` blocks, message_stop last."""
        blocks = [b for b in raw.decode().split("\n\n") if b.strip()]
        events = []
        consistent = True
        for block in blocks:
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            data = json.loads(fields.get("data", "{}")) if fields.get("data", "").startswith("{") else {}
            events.append(fields.get("event"))
            consistent &= fields.get("event") == data.get("type")
        delta = [json.loads(b.split("data: ", 1)[1]) for b in blocks if b.startswith("event: message_delta")]
        return {
            "status": status,
            "content_type": headers.get("content-type", "").split(";")[0],
            "first": events[0] if events else None,
            "last": events[-1] if events else None,
            "event_names_match_types": consistent,
            "has_text_delta": "content_block_delta" in events,
            "message_delta_usage": bool(delta) and has_shape(delta[-1].get("usage"), {"output_tokens": "number"}),
        }

    # ------------------------------------------------------------ the cases

    def run(self) -> dict[str, Observation]:
        cases: dict[str, Observation] = {}
        status, headers, _ = self.request("GET", "/health")
        cases["health"] = {"status": status}
        cases["models without key"] = self.error_case(*self.request("GET", "/v1/models"))
        cases["models"] = self.json_case(*self.request("GET", "/v1/models", headers=self.bearer(None)), MODELS)
        cases["chat"] = self.json_case(*self.post("/v1/chat/completions", self.chat_body()), CHAT)
        cases["chat wrong key"] = self.error_case(*self.post(
            "/v1/chat/completions", self.chat_body(), {"Authorization": "Bearer wrong", "Content-Type": "application/json"}))
        cases["chat x-api-key"] = {"status": self.post(
            "/v1/chat/completions", self.chat_body(), {"x-api-key": self.key, "Content-Type": "application/json"})[0]}
        body = json.dumps(self.chat_body()).encode()
        cases["chat without content-type"] = self.error_case(
            *self.post("/v1/chat/completions", body, self.bearer(None)), ("media type",))
        cases["chat form content-type (curl -d)"] = self.error_case(
            *self.post("/v1/chat/completions", body, self.bearer("application/x-www-form-urlencoded")), ("media type",))
        cases["chat json charset"] = {"status": self.post(
            "/v1/chat/completions", body, self.bearer("application/json; charset=utf-8"))[0]}
        cases["chat malformed json"] = self.error_case(*self.post("/v1/chat/completions", b'{"model": '))
        cases["chat unknown model"] = self.error_case(
            *self.post("/v1/chat/completions", self.chat_body(model="no-such-model")), ("no-such-model",))
        cases["chat max_tokens over context"] = self.error_case(
            *self.post("/v1/chat/completions", self.chat_body(max_tokens=10**6)), ("max_model_len", "context length"))
        long_prompt = "word " * 6000
        cases["chat prompt plus max_tokens over context"] = self.json_case(*self.post(
            "/v1/chat/completions", self.chat_body(max_tokens=MAX_TOKENS_THAT_FIT_ALONE, stop=[" "])), CHAT)
        cases["chat prompt over context"] = self.error_case(*self.post("/v1/chat/completions", self.chat_body(
            messages=[{"role": "user", "content": long_prompt}], max_tokens=None)), ("context length",))
        cases["chat stream usage"] = self.sse_case(*self.post("/v1/chat/completions", self.chat_body(
            stream=True, stream_options={"include_usage": True})))
        plain_stream = self.sse_case(*self.post("/v1/chat/completions", self.chat_body(stream=True)))
        cases["chat stream without usage"] = {k: plain_stream[k] for k in ("status", "content_type", "ends_with_done", "usage_chunks")}
        cases["completion"] = self.json_case(*self.post(
            "/v1/completions", {"model": self.model, "prompt": "The capital of France is", "max_tokens": 8}), COMPLETION)
        cases["completion stream usage"] = self.sse_case(*self.post("/v1/completions", {
            "model": self.model, "prompt": "Once upon", "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}))
        cases["responses"] = self.json_case(*self.post(
            "/v1/responses", {"model": self.model, "input": "Say hello.", "max_output_tokens": 16}), RESPONSE)
        message = {"model": self.model, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]}
        cases["messages bearer"] = self.json_case(*self.post("/v1/messages", message), MESSAGE)
        cases["messages x-api-key only"] = {"status": self.post(
            "/v1/messages", message, {"x-api-key": self.key, "anthropic-version": "2023-06-01",
                                      "Content-Type": "application/json"})[0]}
        cases["messages max_tokens over context"] = self.json_case(*self.post(
            "/v1/messages", {**message, "max_tokens": 10**6}), ANTHROPIC_ERROR_SHAPE)
        cases["messages without content-type"] = {"status": self.post(
            "/v1/messages", json.dumps(message).encode(), self.bearer(None))[0]}
        cases["messages stream"] = self.anthropic_sse_case(*self.post("/v1/messages", {**message, "stream": True}))
        tokenize = {"model": self.model, "messages": [{"role": "user", "content": "Say hello."}], "add_generation_prompt": True}
        cases["tokenize messages"] = self.json_case(*self.post("/tokenize", tokenize), TOKENIZE)
        cases["tokenize prompt"] = self.json_case(*self.post("/tokenize", {"model": self.model, "prompt": "hello world"}), TOKENIZE)
        cases["tokenize without key"] = {"status": self.post("/tokenize", tokenize, {"Content-Type": "application/json"})[0]}
        status, headers, raw = self.request("GET", "/metrics")
        samples = metric_samples(raw.decode(errors="replace"))
        cases["metrics"] = {"status": status, "content_type": headers.get("content-type", "").split(";")[0],
                            **{name: name in {n for n, _ in samples} for name in (
                                "vllm:num_requests_running", "vllm:num_requests_waiting",
                                "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                                "vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count")},
                            "finished_reasons": sorted({labels.get("finished_reason", "") for n, labels in samples
                                                        if n == "vllm:request_success_total"} & {"stop", "length", "abort"}),
                            "samples labelled by model": all("model_name" in labels for n, labels in samples
                                                             if n.startswith("vllm:num_requests"))}
        return cases


def metric_samples(text: str) -> list[tuple[str, dict[str, str]]]:
    """(name, labels) of each sample line of a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', rest.partition("}")[0])) if rest else {}
        samples.append((name.split()[0], labels))
    return samples


# Differences between the fake and vLLM that sparkd does not rely on, each with the reason.
TOLERATED = {
    ("tokenize without key", "status"):
        "vLLM guards /v1 only; the fake also guards /tokenize so a daemon forgetting its engine key fails the tests",
}


def differences(fake: dict[str, Observation], real: dict[str, Observation]) -> list[str]:
    """Every (case, field) where the fake differs from the real engine, less the tolerated ones."""
    found = []
    for case in sorted(set(fake) | set(real)):
        ours, theirs = fake.get(case, {}), real.get(case, {})
        for field_name in sorted(set(ours) | set(theirs)):
            if (case, field_name) in TOLERATED:
                continue
            if ours.get(field_name) != theirs.get(field_name):
                found.append(f"{case}: {field_name}: fake {ours.get(field_name)!r}, vLLM {theirs.get(field_name)!r}")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(Probe(argv[1], argv[2], argv[3]).run(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
