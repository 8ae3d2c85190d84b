#!/usr/bin/env python3
r"""A fake vLLM OpenAI-compatible server for sparkd's tests.

It speaks the parts of vLLM's HTTP API that sparkd uses, deterministically and
with no GPU, so the daemon can be tested against real containers. Standard
library plus aiohttp only; it runs on Debian bookworm's python3-aiohttp 3.8 in
the test image and on newer aiohttp on the host (no web.AppKey, no 3.9+ API).

Command line (vLLM-like; unknown arguments are accepted, ignored and shown in
GET /fake/state):

    fake_vllm.py [serve] [MODEL] [--host H] [--port 8000] [--served-model-name N ...]
                 [--api-key K] [--max-model-len 4096] [--enable-sleep-mode]
                 [--fake-<knob> VALUE ...]

Precedence is argument > environment > default. The API key falls back to
VLLM_API_KEY; each knob falls back to FAKE_<KNOB> (e.g. FAKE_LOAD_DELAY=3).

Knobs (``--fake-<name>`` / ``FAKE_<NAME>``):
    load_delay            seconds before the port is bound at all (vLLM refuses
                          connections while loading); vLLM-like progress lines
                          are printed meanwhile
    token_rate            tokens per second per stream (0 = as fast as possible)
    tokens                default completion length (16)
    embedding_dim         embedding vector size (8)
    crash_at_start        after the load delay, print a CUDA-like error to stderr, exit 1
    crash_during_load     this many seconds into the load delay (mid-load, progress
                          lines printed so far), print a CUDA out-of-memory error, exit 1
    crash_after_requests  exit 1 once N inference requests were answered (0 = never)
    crash_mid_stream      os._exit(1) after N SSE events of a stream (0 = never)
    hang                  accept inference requests but never answer them
    hang_health           with hang: /health never answers either
    capture               record the raw bytes of every connection made to the port
                          (a TCP front that passes them to the server): GET /fake/captured
    hold_after_chunk      a stream sends N SSE events then waits for POST /fake/release
    end_stream_after      a stream sends N SSE events, then ends cleanly without the
                          rest and without [DONE] (0 = never)
    stream_fail           a stream answers 200 text/event-stream, prints this message
                          as an ERROR log line and ends cleanly with no event at all
                          (llama-cpp-python with a prompt over its context)
    role                  single (default) | head | worker
    head_address          worker: the head's host:port to register with
    workers               head: /health is 503 until this many workers registered
    worker_id             worker: its id at the head (default hostname-pid)
    load_mb               MB really allocated (pages written) while loading, growing evenly
                          over load_delay up to this peak; once ready the engine keeps ready_mb
    ready_mb              MB really allocated while ready (weights and KV cache)
    spike_mb              MB allocated half way through the load and freed 10 ms later: a peak
                          as brief as torch.compile's, which sampling at 0.1 s misses
    freeze_after          after N SSE events (all streams together) the engine wedges as GB10 engines
                          do: streams stop mid-answer and never end, /health and /v1/models stay
                          200, vllm:generation_tokens_total stops while num_requests_running > 0
    kv_mb                 the part of ready_mb that is KV cache: freed by sleep level 1, which
                          keeps the weights (on unified memory: in the same pool); sleep level 2
                          frees all of ready_mb; a wake allocates it again

Tokenizer (deterministic, documented so tests can predict counts):
    tokens = re.findall(r"<\|\w+\|>|\w+|[^\w\s]", text): special markers such as
    <|user|>, runs of word characters, and every other non-space character alone.
    id(token) = 1000 + crc32(token) % 100000. /detokenize maps ids back through
    the tokens this process has seen (plus the filler vocabulary), joined by single
    spaces; an unknown id becomes "<|id|>". No BOS/EOS tokens are added.
    A chat prompt is, per message, the marker <|role|> followed by its content's
    tokens (text parts of a content array are joined by spaces), then <|assistant|>
    when add_generation_prompt (default true). Tools are not counted.

Generated text: the word tokens (\w+) of the last user message (chat), of the
prompt (completions) or of the input (responses), then the filler words
"lorem ipsum dolor ..." cycled, joined by spaces. Its length in tokens is
min(max_completion_tokens or max_tokens, the ``tokens`` knob); without a limit
it is the knob. finish_reason is "length" when the request's limit cut it,
otherwise "stop". A stream sends one SSE event per token.

SSE events are counted from 1 for crash_mid_stream and hold_after_chunk: in a
chat stream event 1 is the role chunk, then one per token, then the finish chunk,
then the usage chunk (stream_options.include_usage); [DONE] is not counted.

API key (--api-key or VLLM_API_KEY): required as "Authorization: Bearer <key>" on
/v1/*, /tokenize, /detokenize and the sleep endpoints (vLLM itself guards /v1 only);
/health, /ping, /metrics, /version and /fake/* stay open. x-api-key is not a key,
on /v1/messages neither (as vLLM). A refusal is vLLM's 401 {"error": "Unauthorized"}.

As vLLM 0.32 (checked against it by tests/engine/probe_engine.py):
- errors are {"error": {"message", "type", "param", "code"}}; /v1/messages errors
  are Anthropic's {"type": "error", "error": {"type", "message"}};
- a JSON endpoint refuses a body whose Content-Type is not application/json with a
  400 "Unsupported Media Type" (curl -d sends application/x-www-form-urlencoded);
- max_tokens over max_model_len is a 400 naming max_model_len; a prompt that
  fills the context is a 400; a prompt plus max_tokens over the context is not an
  error: the answer stops at the context's end (finish_reason "length");
- /metrics does not count aborted requests in request_success_total: an abort
  shows as a request that had its first token (time_to_first_token_seconds_count)
  and never finished (e2e_request_latency_seconds_count).

Test-control endpoints:
    GET  /fake/state     counters, last inference request's body/headers/path, argv, env
    POST /fake/release   let every stream held by hold_after_chunk go on
    POST /fake/register  (head role) a worker announces itself: {"worker_id": ...}
    POST /fake/hang_health  from now on /health never answers (a READY engine that hangs)
    GET  /fake/captured  with capture: {"connections": [raw bytes received, latin-1, ...]}

Requests are logged one line each on stdout, uvicorn-style.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import struct
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

VERSION = "0.10.1+fake"
FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
          "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore",
          "magna", "aliqua")
TOKEN_RE = re.compile(r"<\|\w+\|>|\w+|[^\w\s]")
WORD_RE = re.compile(r"^\w+$")

# Paths that need the API key when one is set. vLLM itself guards /v1 only; the
# admin endpoints are guarded here too so tests catch a daemon that forgets the key.
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/sleep", "/wake_up", "/is_sleeping")
INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages")
JSON_BODY_PATHS = (*INFERENCE_PATHS, "/tokenize", "/detokenize")

# name -> (type, default, help). Every knob is --fake-<name> and FAKE_<NAME>.
KNOBS: dict[str, tuple[type, Any, str]] = {
    "load_delay": (float, 0.0, "seconds before the port is bound"),
    "token_rate": (float, 0.0, "tokens/second per stream, 0 = unlimited"),
    "tokens": (int, 16, "default completion length in tokens"),
    "embedding_dim": (int, 8, "embedding vector size"),
    "crash_at_start": (bool, False, "exit 1 with a CUDA-like error after the load delay"),
    "crash_during_load": (float, 0.0, "exit 1 with a CUDA out-of-memory error this many seconds into the load"),
    "crash_after_requests": (int, 0, "exit 1 after N answered inference requests"),
    "crash_mid_stream": (int, 0, "os._exit(1) after N SSE events of a stream"),
    "hang": (bool, False, "never answer inference requests"),
    "hang_health": (bool, False, "with hang: never answer /health either"),
    "capture": (bool, False, "record the raw bytes received on every connection (GET /fake/captured)"),
    "hold_after_chunk": (int, 0, "hold each stream after N SSE events until /fake/release"),
    "end_stream_after": (int, 0, "end each stream cleanly after N SSE events, without [DONE]"),
    "stream_fail": (str, "", "answer 200 SSE, log this error and end the stream with no event"),
    "role": (str, "single", "single | head | worker"),
    "head_address": (str, "", "worker: head host:port"),
    "workers": (int, 0, "head: workers needed before /health is 200"),
    "worker_id": (str, "", "worker: id to register with (default hostname-pid)"),
    "load_mb": (int, 0, "MB allocated while loading (the load's peak)"),
    "ready_mb": (int, 0, "MB allocated while ready"),
    "spike_mb": (int, 0, "MB allocated for 10 ms half way through the load"),
    "kv_mb": (int, 0, "the part of ready_mb sleep level 1 frees (level 2 frees all of it)"),
    "freeze_after": (int, 0, "wedge every stream after N SSE events in total (0 = never)"),
}

MIB = 1024 * 1024
BALLAST_CHUNK_MB = 10


# ---------------------------------------------------------------- configuration


def _parse_bool(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _parse_model_len(value: str) -> int:
    """vLLM accepts 4096, 4k (=4000) and 4K (=4096)."""
    value = str(value).strip()
    if value[-1:] in ("k", "m"):
        return int(float(value[:-1]) * (1000 if value[-1] == "k" else 1_000_000))
    if value[-1:] in ("K", "M"):
        return int(float(value[:-1]) * (1024 if value[-1] == "K" else 1024 * 1024))
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    # Defaults are None so that "not given" can fall back to the environment.
    p = argparse.ArgumentParser(prog="fake_vllm", add_help=True, allow_abbrev=False)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-model-len", type=_parse_model_len, default=None)
    p.add_argument("--enable-sleep-mode", action="store_true", default=None)
    for name, (typ, _default, help_) in KNOBS.items():
        flag = "--fake-" + name.replace("_", "-")
        if typ is bool:
            # "--fake-hang" alone means true; "--fake-hang 0" means false.
            p.add_argument(flag, dest="fake_" + name, nargs="?", const="1", default=None, help=help_)
        else:
            p.add_argument(flag, dest="fake_" + name, default=None, help=help_)
    return p


class Config:
    """The engine's settings after arguments, environment and defaults are merged."""

    def __init__(self, argv: list[str] | None = None, env: dict[str, str] | None = None):
        argv = list(sys.argv[1:] if argv is None else argv)
        env = dict(os.environ if env is None else env)
        self.argv = list(argv)
        self.env = {k: v for k, v in env.items() if k.startswith(("VLLM_", "FAKE_"))}

        rest = list(argv)
        if rest[:1] == ["serve"]:  # `vllm serve MODEL ...`
            rest = rest[1:]
        positional_model = None
        if rest and not rest[0].startswith("-"):
            positional_model = rest.pop(0)
        args, unknown = build_parser().parse_known_args(rest)
        self.unknown_args = unknown

        self.host = args.host or "0.0.0.0"
        self.port = args.port if args.port is not None else 8000
        self.model = args.model or positional_model or "fake-model"
        self.served_model_names = args.served_model_name or [self.model]
        self.api_key = args.api_key if args.api_key is not None else env.get("VLLM_API_KEY") or None
        self.max_model_len = args.max_model_len if args.max_model_len is not None else 4096
        self.enable_sleep_mode = bool(args.enable_sleep_mode)
        for name, (typ, default, _help) in KNOBS.items():
            raw = getattr(args, "fake_" + name)
            if raw is None:
                raw = env.get("FAKE_" + name.upper())
            if raw is None:
                value = default
            elif typ is bool:
                value = _parse_bool(raw)
            else:
                value = typ(raw)
            setattr(self, name, value)
        if self.role not in ("single", "head", "worker"):
            raise SystemExit(f"fake_vllm: --fake-role must be single, head or worker, not {self.role!r}")
        if self.role == "worker" and not self.head_address:
            raise SystemExit("fake_vllm: --fake-role worker needs --fake-head-address host:port")
        if not self.worker_id:
            self.worker_id = f"{socket.gethostname()}-{os.getpid()}"

    def public(self) -> dict[str, Any]:
        """Settings for /fake/state; the key itself is not echoed, only whether it is set."""
        out = {k: v for k, v in vars(self).items()
               if k not in ("api_key", "argv", "env", "unknown_args")}
        out["api_key_set"] = self.api_key is not None
        return out


# ---------------------------------------------------------------- tokenizer


class Tokenizer:
    """Whitespace/punctuation tokenizer with stable ids (see the module docstring)."""

    def __init__(self) -> None:
        self._by_id: dict[int, str] = {}
        for word in FILLER:
            self.token_id(word)

    def token_id(self, token: str) -> int:
        tid = 1000 + zlib.crc32(token.encode()) % 100000
        self._by_id[tid] = token
        return tid

    @staticmethod
    def split(text: str) -> list[str]:
        return TOKEN_RE.findall(text or "")

    def encode(self, text: str) -> list[int]:
        return [self.token_id(t) for t in self.split(text)]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self._by_id.get(int(i), f"<|{int(i)}|>") for i in ids)


def content_text(content: Any) -> str:
    """Text of a chat message content: a string, a list of parts, or None."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return str(content)


def chat_prompt_tokens(messages: list[dict], add_generation_prompt: bool = True) -> list[str]:
    tokens: list[str] = []
    for msg in messages:
        tokens.append(f"<|{msg.get('role', 'user')}|>")
        tokens.extend(Tokenizer.split(content_text(msg.get("content"))))
    if add_generation_prompt:
        tokens.append("<|assistant|>")
    return tokens


def generated_words(source_text: str, n: int) -> list[str]:
    """The first n words of the echo-then-filler sequence for source_text."""
    words = [t for t in Tokenizer.split(source_text) if WORD_RE.match(t)]
    out = words[:n]
    i = 0
    while len(out) < n:
        out.append(FILLER[i % len(FILLER)])
        i += 1
    return out


# ---------------------------------------------------------------- errors


class EngineError(Exception):
    """An error answered in vLLM's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self, anthropic: bool = False) -> web.Response:
        if anthropic:  # vLLM's /v1/messages answers errors in Anthropic's shape
            return web.json_response({"type": "error", "error": {"type": self.type, "message": self.message}},
                                     status=self.status)
        return web.json_response(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}},
            status=self.status)


def bad_request(message: str, param: str | None = None) -> EngineError:
    return EngineError(400, message, "BadRequestError", param)


def unsupported_media_type() -> EngineError:
    return EngineError(400, "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
                       "Bad Request")


# ---------------------------------------------------------------- the engine


class Ballast:
    """Memory the engine really holds: chunks whose pages are written, so the kernel counts them
    (MemAvailable drops, the container's cgroup grows); freed chunks go back to the system."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    @property
    def mb(self) -> int:
        return len(self._chunks) * BALLAST_CHUNK_MB

    def resize(self, mb: int) -> None:
        wanted = max(0, mb) // BALLAST_CHUNK_MB
        if wanted == len(self._chunks):
            return
        while len(self._chunks) < wanted:
            self._chunks.append(b"\x01" * (BALLAST_CHUNK_MB * MIB))
        del self._chunks[wanted:]
        _log(f"fake memory: holding {self.mb} MB")


class ClientGone(Exception):
    """The client closed its connection while we were streaming to it."""


class FakeEngine:
    def __init__(self, config: Config, ballast: Ballast | None = None):
        self.cfg = config
        self.ballast = ballast or Ballast()
        self.tok = Tokenizer()
        self.started = time.time()
        self.requests: dict[str, int] = {}
        self.inference_requests = 0
        self.answered_requests = 0
        self.aborted_streams = 0
        self.completed_streams = 0
        self.active_streams = 0
        self.events_sent = 0
        self.sleeps = 0
        self.wakes = 0
        self.sleep_level = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished: dict[str, int] = {}
        self.last_request_body: Any = None
        self.last_request_headers: dict[str, str] | None = None
        self.last_request_path: str | None = None
        self.workers: dict[str, dict] = {}
        self.registered_with_head = False
        self._release: asyncio.Event | None = None
        self._held = 0
        self.health_hangs = False
        self.captured: list[bytearray] = []

    # ------------------------------------------------------------ state

    @property
    def is_sleeping(self) -> bool:
        return self.sleep_level > 0

    def ready(self) -> bool:
        if self.cfg.role == "head":
            return len(self.workers) >= self.cfg.workers
        if self.cfg.role == "worker":
            return self.registered_with_head
        return True

    def state(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": VERSION,
            "uptime_s": round(time.time() - self.started, 3),
            "requests": dict(self.requests),
            "inference_requests": self.inference_requests,
            "answered_requests": self.answered_requests,
            "aborted_streams": self.aborted_streams,
            "completed_streams": self.completed_streams,
            "active_streams": self.active_streams,
            "held_streams": self._held,
            "sleeps": self.sleeps,
            "wakes": self.wakes,
            "is_sleeping": self.is_sleeping,
            "sleep_level": self.sleep_level,
            "resident_mb": self.ballast.mb,
            "last_request_path": self.last_request_path,
            "last_request_body": self.last_request_body,
            "last_request_headers": self.last_request_headers,
            "argv": self.cfg.argv,
            "unknown_args": self.cfg.unknown_args,
            "env": self.cfg.env,
            "config": self.cfg.public(),
            "role": self.cfg.role,
            "ready": self.ready(),
            "workers": sorted(self.workers),
            "registered_with_head": self.registered_with_head,
        }

    def _release_event(self) -> asyncio.Event:
        # Created lazily: an asyncio.Event must belong to the serving loop (3.8 binds it at creation).
        if self._release is None:
            self._release = asyncio.Event()
        return self._release

    # ------------------------------------------------------------ request plumbing

    async def record(self, request: web.Request) -> None:
        """Remember what reached the engine, before any check: a request refused for its
        key or its body still shows which key and which body the daemon sent."""
        raw = await request.read()  # aiohttp caches it; the handler reads it again
        try:
            self.last_request_body = json.loads(raw or b"{}")
        except ValueError:
            self.last_request_body = raw.decode(errors="replace")
        self.last_request_path = request.path
        self.last_request_headers = dict(request.headers)

    async def read_inference_body(self, request: web.Request) -> dict:
        """Parse the body; refuse while sleeping or not ready; honour hang."""
        self.inference_requests += 1
        if request.content_type != "application/json":
            raise unsupported_media_type()
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError as exc:
            raise bad_request(f"Invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        if self.cfg.hang:
            await wait_until_client_gone(request)
            raise ClientGone()
        if self.is_sleeping:
            raise EngineError(503, f"The engine is sleeping (level {self.sleep_level}); "
                                   "POST /wake_up before sending requests.",
                              "ServiceUnavailableError")
        if not self.ready():
            raise EngineError(503, "The engine is not ready: waiting for workers.",
                              "ServiceUnavailableError")
        return body

    def check_model(self, body: dict) -> str:
        model = body.get("model")
        if model is None:  # vLLM serves its first name when no model is given
            return self.cfg.served_model_names[0]
        if model not in self.cfg.served_model_names:
            raise EngineError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return model

    def completion_budget(self, body: dict, prompt_len: int, noun: str) -> tuple[int, bool]:
        """(tokens to generate, whether the request's own limit is what cut it)."""
        field_name = "max_completion_tokens"
        limit = body.get("max_completion_tokens")
        if limit is None:
            field_name, limit = "max_tokens", body.get("max_tokens")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise bad_request(f"max_tokens must be at least 1, got {limit}.", field_name)
        max_len = self.cfg.max_model_len
        if limit is not None and limit > max_len:
            raise bad_request(
                f"{field_name}={limit} cannot be greater than max_model_len={max_len}. Please request "
                f"fewer output tokens. (parameter={field_name}, value={limit})", field_name)
        if prompt_len >= max_len:
            raise bad_request(
                f"This model's maximum context length is {max_len} tokens. However, your "
                f"request has {prompt_len} input tokens. Please reduce the length of the "
                f"input {noun}.", "input_tokens")
        room = max_len - prompt_len  # vLLM stops at the end of the context, it does not refuse
        limit_eff = room if limit is None else min(limit, room)
        n = min(limit_eff, self.cfg.tokens)
        return n, (limit is not None and n == limit_eff)

    def answered(self, prompt_tokens: int, completion_tokens: int, reason: str) -> None:
        """Count one answered inference request; maybe crash (crash_after_requests)."""
        self.answered_requests += 1
        self.prompt_tokens_total += prompt_tokens
        self.generation_tokens_total += completion_tokens
        self.finished[reason] = self.finished.get(reason, 0) + 1
        n = self.cfg.crash_after_requests
        if n and self.answered_requests >= n:
            # Exit after the response has gone out, like an engine dying between requests.
            asyncio.get_event_loop().call_later(0.2, _crash, f"fake crash after {n} requests")

    async def finish_json(self, request: web.Request, payload: dict) -> web.StreamResponse:
        resp = web.json_response(payload)
        await resp.prepare(request)
        await resp.write_eof()
        return resp

    # ------------------------------------------------------------ streaming

    async def stream(self, request: web.Request, events: list[Any],
                     on_complete: Callable[[], None], done: bool = True) -> web.StreamResponse:
        """Send events as SSE, then [DONE]; count completion or the client going away.

        An event is a dict (a ``data:`` line only, OpenAI's framing) or a pair
        (name, dict) (``event:`` + ``data:``, Anthropic's, which ends without [DONE]:
        ``done=False``). on_complete runs only when the stream ended: an aborted
        stream is not "answered".
        """
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.active_streams += 1
        delay = 1.0 / self.cfg.token_rate if self.cfg.token_rate > 0 else 0.0
        if self.cfg.stream_fail:
            _log(f"ERROR: {self.cfg.stream_fail}")
            events, done = [], False
        elif self.cfg.end_stream_after:
            _log(f"ERROR: fake stream ended after {self.cfg.end_stream_after} events without [DONE]")
            events, done = events[: self.cfg.end_stream_after], False
        try:
            for i, event in enumerate(events, start=1):
                if isinstance(event, tuple):
                    frame = b"event: " + event[0].encode() + b"\ndata: " + _dumps(event[1]) + b"\n\n"
                else:
                    frame = b"data: " + _dumps(event) + b"\n\n"
                if self.cfg.freeze_after and self.events_sent >= self.cfg.freeze_after:
                    await self.wedged(request)
                await write_or_gone(request, resp, frame)
                self.events_sent += 1
                if self.cfg.crash_mid_stream and i >= self.cfg.crash_mid_stream:
                    await asyncio.sleep(0.05)  # let the sent bytes leave before dying
                    _crash(f"fake crash mid-stream after {i} events")
                if self.cfg.hold_after_chunk and i == self.cfg.hold_after_chunk:
                    await self.hold(request)
                if delay and i < len(events):
                    await sleep_or_gone(request, delay)
            if done:
                await write_or_gone(request, resp, b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ClientGone, ConnectionError):
            self.aborted_streams += 1
            _log(f"stream aborted by client: {request.path}")
            return resp
        except asyncio.CancelledError:
            # aiohttp 3.8 cancels the handler when the peer disconnects.
            self.aborted_streams += 1
            _log(f"stream cancelled (client gone): {request.path}")
            raise
        finally:
            self.active_streams -= 1
        self.completed_streams += 1
        on_complete()
        return resp

    async def wedged(self, request: web.Request) -> None:
        """The freeze_after knob: this stream never goes on (the client may leave)."""
        _log("fake engine wedged: no more tokens")
        while not client_gone(request):
            await asyncio.sleep(0.05)
        raise ClientGone()

    async def hold(self, request: web.Request) -> None:
        event = self._release_event()
        self._held += 1
        try:
            while not event.is_set():
                if client_gone(request):
                    raise ClientGone()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(event.wait()), 0.05)
        finally:
            self._held -= 1

    def release(self) -> int:
        """Let every currently held stream go on; later streams hold again."""
        held = self._held
        event = self._release_event()
        event.set()
        self._release = asyncio.Event()
        return held


# ---------------------------------------------------------------- client disconnect helpers


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def write_or_gone(request: web.Request, resp: web.StreamResponse, data: bytes) -> None:
    # Newer aiohttp does not cancel the handler on disconnect, and a write into a
    # closed transport may not raise at once: check before writing.
    if client_gone(request):
        raise ClientGone()
    await resp.write(data)


async def sleep_or_gone(request: web.Request, seconds: float) -> None:
    end = time.monotonic() + seconds
    while True:
        if client_gone(request):
            raise ClientGone()
        left = end - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 0.05))


async def wait_until_client_gone(request: web.Request) -> None:
    while not client_gone(request):
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------- handlers


def _now() -> int:
    return int(time.time())


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion, "prompt_tokens_details": None}


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


class Handlers:
    """aiohttp handlers bound to one FakeEngine (no app-dict keys: aiohttp 3.8 and 3.9+ alike)."""

    def __init__(self, engine: FakeEngine):
        self.e = engine

    # ---- health and info

    async def health(self, request: web.Request) -> web.Response:
        if (self.e.cfg.hang and self.e.cfg.hang_health) or self.e.health_hangs:
            await wait_until_client_gone(request)
            raise ClientGone()
        if not self.e.ready():
            return web.Response(status=503, text="waiting for workers")
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        created = _now()
        data = [{
            "id": name, "object": "model", "created": created, "owned_by": "vllm",
            "root": self.e.cfg.model, "parent": None, "max_model_len": self.e.cfg.max_model_len,
            "permission": [{"id": _id("modelperm"), "object": "model_permission",
                            "created": created, "allow_create_engine": False,
                            "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": False, "allow_view": True,
                            "allow_fine_tuning": False, "organization": "*", "group": None,
                            "is_blocking": False}],
        } for name in self.e.cfg.served_model_names]
        return web.json_response({"object": "list", "data": data})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    async def metrics(self, request: web.Request) -> web.Response:
        e, name = self.e, self.e.cfg.served_model_names[0]
        label = f'engine="0",model_name="{name}"'
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{label}}} {float(e.active_streams)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{label}}} 0.0",
            "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:gpu_cache_usage_perc gauge",
            f"vllm:gpu_cache_usage_perc{{{label}}} 0.0",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{label}}} {float(e.prompt_tokens_total)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{label}}} {float(e.generation_tokens_total)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason in ("stop", "length", "abort", "error", "repetition"):
            # vLLM counts no aborted request here (the label exists, its value stays 0).
            count = e.finished.get(reason, 0)
            lines.append(f'vllm:request_success_total{{engine="0",finished_reason="{reason}",model_name="{name}"}} {float(count)}')
        lines += [
            "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
            "# TYPE vllm:time_to_first_token_seconds histogram",
            f"vllm:time_to_first_token_seconds_count{{{label}}} {float(e.answered_requests + e.aborted_streams)}",
            "# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.",
            "# TYPE vllm:e2e_request_latency_seconds histogram",
            f"vllm:e2e_request_latency_seconds_count{{{label}}} {float(e.answered_requests)}",
        ]
        lines += [
            "# HELP fake:inference_requests_total Inference requests received by the fake engine.",
            "# TYPE fake:inference_requests_total counter",
            f"fake:inference_requests_total{{{label}}} {float(e.inference_requests)}",
        ]
        return web.Response(text="\n".join(lines) + "\n",
                            content_type="text/plain", charset="utf-8")

    # ---- inference

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        e = self.e
        body = await e.read_inference_body(request)
        model = e.check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise bad_request("messages must be a non-empty list of message objects.")
        prompt_len = len(chat_prompt_tokens(messages, body.get("add_generation_prompt", True)))
        n, cut = e.completion_budget(body, prompt_len, "messages")
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
        words = generated_words(content_text(last_user.get("content")) if last_user else "", n)
        reason = "length" if cut else "stop"
        rid, created = _id("chatcmpl"), _now()

        if not body.get("stream"):
            payload = {
                "id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words),
                                                     "reasoning_content": None, "tool_calls": []},
                             "logprobs": None, "finish_reason": reason, "stop_reason": None}],
                "usage": _usage(prompt_len, n), "prompt_logprobs": None,
            }
            e.answered(prompt_len, n, reason)
            return await e.finish_json(request, payload)

        include_usage = _include_usage(body)

        def chunk(delta: dict, finish: str | None = None) -> dict:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return c

        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
        events.append(chunk({}, reason))
        if include_usage:
            events.append({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [], "usage": _usage(prompt_len, n)})
        return await e.stream(request, events, lambda: e.answered(prompt_len, n, reason))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        e = self.e
        body = await e.read_inference_body(request)
        model = e.check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompt = e.tok.decode(prompt)  # a single token-id prompt
        elif isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad_request("prompt must be a string, a list of token ids, or a list of one string.")
        prompt_len = len(Tokenizer.split(prompt))
        n, cut = e.completion_budget(body, prompt_len, "prompt")
        words = generated_words(prompt, n)
        reason = "length" if cut else "stop"
        rid, created = _id("cmpl"), _now()

        if not body.get("stream"):
            payload = {
                "id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": " ".join(words), "logprobs": None,
                             "finish_reason": reason, "stop_reason": None, "prompt_logprobs": None}],
                "usage": _usage(prompt_len, n),
            }
            e.answered(prompt_len, n, reason)
            return await e.finish_json(request, payload)

        include_usage = _include_usage(body)

        def chunk(text: str, finish: str | None = None) -> dict:
            c = {"id": rid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"index": 0, "text": text, "logprobs": None,
                              "finish_reason": finish, "stop_reason": None}]}
            if include_usage:
                c["usage"] = None
            return c

        events = [chunk(w if i == 0 else " " + w) for i, w in enumerate(words)]
        events.append(chunk("", reason))
        if include_usage:
            events.append({"id": rid, "object": "text_completion", "created": created,
                           "model": model, "choices": [], "usage": _usage(prompt_len, n)})
        return await e.stream(request, events, lambda: e.answered(prompt_len, n, reason))

    async def embeddings(self, request: web.Request) -> web.Response:
        e = self.e
        body = await e.read_inference_body(request)
        model = e.check_model(body)
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs
                                       and all(isinstance(i, int) for i in inputs)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise bad_request("input must be a string, a list of strings, or token id lists.")
        texts = [i if isinstance(i, str) else e.tok.decode(i) for i in inputs]
        prompt_len = sum(len(Tokenizer.split(t)) for t in texts)
        dim = int(body.get("dimensions") or e.cfg.embedding_dim)
        b64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vec = embed(text, dim)
            value: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else vec
            data.append({"index": index, "object": "embedding", "embedding": value})
        e.answered(prompt_len, 0, "stop")
        return await e.finish_json(request, {
            "id": _id("embd"), "object": "list", "created": _now(), "model": model,
            "data": data, "usage": _usage(prompt_len, 0)})

    async def responses(self, request: web.Request) -> web.Response:
        e = self.e
        body = await e.read_inference_body(request)
        model = e.check_model(body)
        if body.get("stream"):
            raise bad_request("The fake engine does not stream /v1/responses.")
        raw = body.get("input")
        if isinstance(raw, str):
            messages = [{"role": "user", "content": raw}]
        elif isinstance(raw, list):
            messages = [m for m in raw if isinstance(m, dict)]
        else:
            raise bad_request("input must be a string or a list of input items.")
        if body.get("instructions"):
            messages = [{"role": "system", "content": body["instructions"]}, *messages]
        prompt_len = len(chat_prompt_tokens(messages))
        limit = body.get("max_output_tokens")
        n, cut = e.completion_budget({"max_tokens": limit}, prompt_len, "messages")
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
        text = " ".join(generated_words(content_text(last_user.get("content")) if last_user else "", n))
        e.answered(prompt_len, n, "length" if cut else "stop")
        return await e.finish_json(request, {
            "id": "resp_" + uuid.uuid4().hex, "object": "response", "created_at": _now(),
            "model": model, "status": "completed" if not cut else "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "output": [{"type": "message", "id": "msg_" + uuid.uuid4().hex, "role": "assistant",
                        "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": prompt_len, "output_tokens": n,
                      "total_tokens": prompt_len + n},
        })

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API, as vLLM serves it (a chat underneath)."""
        e = self.e
        body = await e.read_inference_body(request)
        model = e.check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise bad_request("messages must be a non-empty list of message objects.", "messages")
        if not isinstance(body.get("max_tokens"), int):
            raise bad_request("max_tokens is required and must be an integer.", "max_tokens")
        system = body.get("system")
        chat = ([{"role": "system", "content": content_text(system)}] if system else []) + messages
        prompt_len = len(chat_prompt_tokens(chat))
        # vLLM turns the request into a chat: its errors name max_completion_tokens.
        n, cut = e.completion_budget({"max_completion_tokens": body["max_tokens"]}, prompt_len, "messages")
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
        words = generated_words(content_text(last_user.get("content")) if last_user else "", n)
        stop_reason = "max_tokens" if cut else "end_turn"
        mid = _id("chatcmpl")
        if not body.get("stream"):
            e.answered(prompt_len, n, "length" if cut else "stop")
            return await e.finish_json(request, {
                "id": mid, "type": "message", "role": "assistant",
                "content": [{"type": "text", "text": " ".join(words)}], "model": model,
                "stop_reason": stop_reason, "usage": {"input_tokens": prompt_len, "output_tokens": n}})
        events: list[Any] = [
            ("message_start", {"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "content": [], "model": model,
                "stop_reason": None, "usage": {"input_tokens": prompt_len, "output_tokens": 0}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
        ]
        events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": w if i == 0 else " " + w}})
                   for i, w in enumerate(words)]
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                               "usage": {"input_tokens": prompt_len, "output_tokens": n}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        return await e.stream(request, events, lambda: e.answered(prompt_len, n, "length" if cut else "stop"),
                              done=False)

    # ---- tokenizer endpoints

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if "messages" in body:
            if not isinstance(body["messages"], list):
                raise bad_request("messages must be a list.")
            tokens = chat_prompt_tokens(body["messages"], body.get("add_generation_prompt", True))
        elif isinstance(body.get("prompt"), str):
            tokens = Tokenizer.split(body["prompt"])
        else:
            raise bad_request("Either prompt (a string) or messages must be given.")
        if body.get("model") is not None:
            self.e.check_model(body)
        ids = [self.e.tok.token_id(t) for t in tokens]
        return web.json_response({"count": len(ids), "max_model_len": self.e.cfg.max_model_len,
                                  "tokens": ids, "token_strs": tokens if body.get("return_token_strs") else None})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise bad_request("tokens must be a list of integers.")
        return web.json_response({"prompt": self.e.tok.decode(ids)})

    # ---- sleep mode (registered only with --enable-sleep-mode)

    async def sleep(self, request: web.Request) -> web.Response:
        level = int(request.query.get("level", "1"))
        if level not in (1, 2):
            raise bad_request(f"sleep level must be 1 or 2, got {level}.")
        if not self.e.is_sleeping:
            self.e.sleeps += 1
            _log(f"engine put to sleep (level {level})")
        self.e.sleep_level = max(level, self.e.sleep_level)
        cfg = self.e.cfg
        self.e.ballast.resize(0 if self.e.sleep_level == 2 else cfg.ready_mb - cfg.kv_mb)
        return web.Response(status=200)

    async def wake_up(self, request: web.Request) -> web.Response:
        if self.e.is_sleeping:
            self.e.wakes += 1
            _log("engine woken up")
        self.e.sleep_level = 0
        self.e.ballast.resize(self.e.cfg.ready_mb)
        return web.Response(status=200)

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.e.is_sleeping})

    # ---- test control

    async def fake_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.e.state())

    async def fake_hang_health(self, request: web.Request) -> web.Response:
        self.e.health_hangs = True
        return web.json_response({"health_hangs": True})

    async def fake_captured(self, request: web.Request) -> web.Response:
        return web.json_response({"connections": [bytes(c).decode("latin-1") for c in self.e.captured]})

    async def fake_release(self, request: web.Request) -> web.Response:
        return web.json_response({"released": self.e.release()})

    async def fake_register(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        worker_id = str(body.get("worker_id") or request.remote)
        self.e.workers[worker_id] = {"address": body.get("address"), "at": time.time()}
        _log(f"worker registered: {worker_id} ({len(self.e.workers)}/{self.e.cfg.workers})")
        return web.json_response({"registered": worker_id, "workers": len(self.e.workers),
                                  "ready": self.e.ready()})


async def _json_object(request: web.Request) -> dict:
    if request.path in JSON_BODY_PATHS and request.content_type != "application/json":
        raise unsupported_media_type()
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError as exc:
        raise bad_request(f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def embed(text: str, dim: int) -> list[float]:
    """A deterministic unit vector derived from the text's sha256 stream."""
    out: list[float] = []
    counter = 0
    while len(out) < dim:
        block = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        out.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    vec = out[:dim]
    norm = sum(v * v for v in vec) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in vec]


# ---------------------------------------------------------------- app


def _log(msg: str) -> None:
    print(f"INFO {time.strftime('%m-%d %H:%M:%S')} [fake_vllm.py] {msg}", flush=True)


def _crash(msg: str) -> None:
    print(f"ERROR {time.strftime('%m-%d %H:%M:%S')} [fake_vllm.py] RuntimeError: {msg}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # abrupt on purpose: connections drop, nothing is cleaned up


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return f"{request.remote}:0"


def make_middleware(engine: FakeEngine):
    api_key = engine.cfg.api_key

    @web.middleware
    async def middleware(request: web.Request, handler):
        route = request.match_info.route.resource
        key = route.canonical if route is not None else request.path
        engine.requests[key] = engine.requests.get(key, 0) + 1
        status = 500
        try:
            if request.path in INFERENCE_PATHS:
                await engine.record(request)
            if api_key is not None and request.path.startswith(PROTECTED_PREFIXES):
                given = request.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    status = 401
                    return web.json_response({"error": "Unauthorized"}, status=401)
            try:
                resp = await handler(request)
            except EngineError as err:
                resp = err.response(anthropic=request.path == "/v1/messages")
            except ClientGone:
                status = 499  # nginx's "client closed request", for the log line only
                return web.Response(status=499)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            print(f'INFO:     {_peer(request)} - "{request.method} {request.path_qs} '
                  f'HTTP/{request.version.major}.{request.version.minor}" {status}', flush=True)

    return middleware


def make_app(config: Config, engine: FakeEngine | None = None) -> web.Application:
    engine = engine or FakeEngine(config)
    h = Handlers(engine)
    app = web.Application(middlewares=[make_middleware(engine)], client_max_size=64 * 1024 * 1024)
    r = app.router
    r.add_get("/health", h.health)
    r.add_get("/fake/state", h.fake_state)
    r.add_get("/fake/captured", h.fake_captured)
    r.add_post("/fake/hang_health", h.fake_hang_health)
    if config.role == "head":
        r.add_post("/fake/register", h.fake_register)
    if config.role != "worker":  # a worker serves /health (and its state) only
        r.add_get("/ping", h.health)
        r.add_post("/ping", h.health)
        r.add_get("/v1/models", h.models)
        r.add_get("/version", h.version)
        r.add_get("/metrics", h.metrics)
        r.add_post("/v1/chat/completions", h.chat_completions)
        r.add_post("/v1/completions", h.completions)
        r.add_post("/v1/embeddings", h.embeddings)
        r.add_post("/v1/responses", h.responses)
        r.add_post("/v1/messages", h.messages)
        r.add_post("/tokenize", h.tokenize)
        r.add_post("/detokenize", h.detokenize)
        r.add_post("/fake/release", h.fake_release)
        if config.enable_sleep_mode:
            r.add_post("/sleep", h.sleep)
            r.add_post("/wake_up", h.wake_up)
            r.add_get("/is_sleeping", h.is_sleeping)
    return app


# ---------------------------------------------------------------- process


def _ts() -> str:
    return time.strftime("%m-%d %H:%M:%S")


class LoadCrashed(Exception):
    """The crash_during_load knob: the load dies part way."""


async def allocate_while_loading(cfg: Config, ballast: Ballast, began: float) -> None:
    """The load_mb knob: grow the ballast evenly over the load (a load's peak is transient)."""
    while True:
        share = 1.0 if cfg.load_delay <= 0 else min(1.0, (time.monotonic() - began) / cfg.load_delay)
        ballast.resize(int(cfg.load_mb * share))
        if share >= 1.0:
            return
        await asyncio.sleep(0.05)


async def spike_while_loading(cfg: Config) -> None:
    """The spike_mb knob: a brief peak in the middle of the load."""
    await asyncio.sleep(cfg.load_delay / 2)
    held = [b"\x01" * (BALLAST_CHUNK_MB * MIB) for _ in range(cfg.spike_mb // BALLAST_CHUNK_MB)]
    _log(f"fake memory: spike of {len(held) * BALLAST_CHUNK_MB} MB")
    await asyncio.sleep(0.01)
    del held


async def load(cfg: Config, stop: asyncio.Event, ballast: Ballast) -> bool:
    """Pretend to load weights for load_delay seconds, printing vLLM-like progress.

    Returns False if a stop signal arrived meanwhile; raises LoadCrashed at crash_during_load.
    """
    began = time.monotonic()
    allocating = asyncio.ensure_future(allocate_while_loading(cfg, ballast, began)) if cfg.load_mb > 0 else None
    spiking = asyncio.ensure_future(spike_while_loading(cfg)) if cfg.spike_mb > 0 else None
    try:
        return await _load_steps(cfg, stop, began)
    finally:
        for task in (allocating, spiking):
            if task is not None:
                task.cancel()


async def _load_steps(cfg: Config, stop: asyncio.Event, began: float) -> bool:
    print(f"INFO {_ts()} [api_server.py] vLLM API server version {VERSION}", flush=True)
    print(f"INFO {_ts()} [api_server.py] args: {cfg.argv}", flush=True)
    print(f"INFO {_ts()} [model_runner.py] Starting to load model {cfg.model}...", flush=True)
    shards = 4
    steps = [(0.7 / shards, (f"Loading safetensors checkpoint shards: {int(100 * i / shards):3d}% "
                            f"Completed | {i}/{shards} [00:0{i}<00:0{shards - i}, 1.00s/it]"))
             for i in range(shards + 1)]
    steps += [(0.25, (f"INFO {_ts()} [gpu_model_runner.py] Model loading took 1.00 GiB and "
                     f"{cfg.load_delay * 0.7:.2f} seconds")),
              (0.05, "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 67/67")]
    total = sum(w for w, _ in steps)
    for weight, line in steps:
        print(line, flush=True)
        if cfg.load_delay > 0:
            wait = cfg.load_delay * weight / total
            crash_in = cfg.crash_during_load - (time.monotonic() - began) if cfg.crash_during_load > 0 else None
            try:
                await asyncio.wait_for(stop.wait(), wait if crash_in is None else max(0.0, min(wait, crash_in)))
                return False
            except asyncio.TimeoutError:
                pass
            if crash_in is not None and crash_in <= wait:
                raise LoadCrashed()
    print(f"INFO {_ts()} [gpu_model_runner.py] Graph capturing finished in 1 secs", flush=True)
    return not stop.is_set()


class CaptureFront:
    """The capture knob: records what each connection sends, byte for byte, before any HTTP parsing
    (a smuggled second request shows as such), and passes everything through to the real server."""

    LIMIT = 1024 * 1024
    """Bytes kept per connection."""

    def __init__(self, captured: list, inner_port: int):
        self.captured = captured
        self.inner_port = inner_port

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = bytearray()
        self.captured.append(record)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.inner_port)
        except OSError:
            writer.close()
            return

        async def pump(source: asyncio.StreamReader, target: asyncio.StreamWriter, keep: bytearray | None) -> None:
            try:
                while True:
                    data = await source.read(65536)
                    if not data:
                        break
                    if keep is not None and len(keep) < self.LIMIT:
                        keep += data[: self.LIMIT - len(keep)]
                    target.write(data)
                    await target.drain()
                if target.can_write_eof():
                    target.write_eof()
            except (OSError, RuntimeError):
                pass
            if keep is None:  # the server's side ended: so does the client's
                target.close()

        await asyncio.gather(pump(reader, up_writer, record), pump(up_reader, writer, None))
        up_writer.close()


async def register_with_head(engine: FakeEngine, port: int) -> None:
    """Worker role: POST to the head's /fake/register until it answers 200."""
    cfg = engine.cfg
    url = f"http://{cfg.head_address}/fake/register"
    payload = {"worker_id": cfg.worker_id, "address": f"{socket.gethostname()}:{port}"}
    attempt = 0
    async with ClientSession(timeout=ClientTimeout(total=5)) as session:
        while True:
            attempt += 1
            try:
                async with session.post(url, json=payload) as resp:
                    if resp.status == 200:
                        engine.registered_with_head = True
                        _log(f"registered with head {cfg.head_address} as {cfg.worker_id}")
                        return
                    reason = f"HTTP {resp.status}"
            except Exception as exc:  # noqa: BLE001 - the head may not be up yet: keep trying
                reason = f"{type(exc).__name__}: {exc}"
            if attempt == 1 or attempt % 25 == 0:
                _log(f"waiting for head {cfg.head_address} ({reason}); retrying")
            await asyncio.sleep(0.2)


async def serve(cfg: Config) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # As PID 1 in a container, default signal actions do nothing: handle them.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    ballast = Ballast()
    try:
        loaded = await load(cfg, stop, ballast)
    except LoadCrashed:
        print("Traceback (most recent call last):\n"
              '  File "/opt/fake_vllm.py", line 1, in load_weights\n'
              "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (fake crash during load)",
              file=sys.stderr, flush=True)
        return 1
    if not loaded:
        return 0
    if cfg.crash_at_start:
        print("Traceback (most recent call last):\n"
              '  File "/opt/fake_vllm.py", line 1, in <module>\n'
              "RuntimeError: CUDA error: fake crash at start", file=sys.stderr, flush=True)
        return 1

    ballast.resize(cfg.ready_mb)
    engine = FakeEngine(cfg, ballast)
    runner = web.AppRunner(make_app(cfg, engine), access_log=None, handle_signals=False)
    await runner.setup()
    front = None
    if cfg.capture:
        inner = socket.socket()
        inner.bind(("127.0.0.1", 0))
        site: web.BaseSite = web.SockSite(runner, inner)
        capture = CaptureFront(engine.captured, inner.getsockname()[1])
        front = await asyncio.start_server(capture.handle, cfg.host, cfg.port)
    else:
        site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    print(f"INFO {_ts()} [api_server.py] Starting vLLM API server on http://{cfg.host}:{cfg.port}", flush=True)
    print(f"INFO:     Started server process [{os.getpid()}]", flush=True)
    print("INFO:     Waiting for application startup.", flush=True)
    print("INFO:     Application startup complete.", flush=True)
    tasks = []
    if cfg.role == "worker":
        tasks.append(loop.create_task(register_with_head(engine, cfg.port)))
    await stop.wait()
    print("INFO:     Shutting down", flush=True)
    for task in tasks:
        task.cancel()
    if front is not None:
        front.close()
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = Config(argv)
    return asyncio.run(serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
