"""How a relayed stream must end: with its final event, or with an error event sparkd adds.

A client whose stream simply stops (the engine closed it cleanly but never sent
``[DONE]`` or a ``finish_reason``, or it broke off) sees an empty or truncated
answer and cannot tell why; OpenCode retried such a stream hundreds of times.
So the last reads of every stream are checked once, at its end (``StreamTail``),
and a stream without its final event gets an error event naming the model and
the engine's reason: from the body when it sent one, else from its last log lines.
Anthropic-shaped streams (``/v1/messages``) get Anthropic's ``event: error``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from .lastwords import telling_lines
from .usage import RequestRecord

log = structlog.get_logger("sparkd.proxy")

LastWords = Callable[[], Awaitable[list[str]]]
"""The engine's last log lines (Podman's logs of its container)."""

LAST_WORDS_TIMEOUT_S = 3.0
LAST_WORDS_LINES = 3

_FINAL = re.compile(
    rb'data:\s*\[DONE\]'
    rb'|"finish_reason"\s*:\s*"'
    rb'|"type"\s*:\s*"message_stop"'
    rb'|event:\s*message_stop'
    rb'|"type"\s*:\s*"response\.(?:completed|incomplete|failed)"'
)
_ENGINE_MESSAGE = re.compile(rb'"(?:message|detail)"\s*:\s*"((?:[^"\\]|\\.){1,2000})"')


def is_anthropic(path: str) -> bool:
    return path.rstrip("/").endswith("/messages")


def has_final_event(tail: bytes) -> bool:
    """``tail`` (a stream's last reads) holds the event that ends an answer."""
    return _FINAL.search(tail) is not None


def engine_message(tail: bytes) -> str | None:
    """The message of an error the engine put in its stream, if any."""
    found = None
    for match in _ENGINE_MESSAGE.finditer(tail):
        found = match  # the last one: the error the engine ended with
    if found is None or (b'"error"' not in tail and b'"detail"' not in tail):
        return None
    try:
        return str(json.loads(b'"' + found.group(1) + b'"'))
    except ValueError:
        return found.group(1).decode("utf-8", "replace")


def error_event(path: str, message: str, *, code: str = "engine_error", kind: str = "server_error",
                anthropic_kind: str = "api_error") -> bytes:
    """One SSE error event in the shape the route's SDK raises (OpenAI's, or Anthropic's).

    ``kind``: OpenAI's error ``type``; ``anthropic_kind``: Anthropic's (``overloaded_error``, ...).
    """
    if is_anthropic(path):
        error: dict[str, str] = {"type": anthropic_kind, "message": message}
        if code != "engine_error":
            error["code"] = code
        return b"event: error\ndata: " + json.dumps({"type": "error", "error": error}).encode() + b"\n\n"
    event = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


@dataclass(frozen=True)
class StreamEnding:
    """What the relays need to end one request's stream well."""

    model: str
    path: str
    last_words: LastWords | None = None
    record: RequestRecord | None = None
    """Told the code of an error event sparkd adds (the request's log line names it)."""

    async def _reason(self, tail: bytes) -> str:
        said = engine_message(tail)
        if said:
            return f"the engine said: {said}"
        lines: list[str] = []
        if self.last_words is not None:
            try:
                lines = await asyncio.wait_for(self.last_words(), LAST_WORDS_TIMEOUT_S)
            except (asyncio.TimeoutError, OSError):
                lines = []
        picked = telling_lines(lines, LAST_WORDS_LINES)
        if picked:
            return "its last log lines: " + " | ".join(picked)
        return "it gave no reason"

    async def broken(self, how: str, tail: bytes) -> bytes:
        """The event for a stream the engine broke off (``how``: what happened)."""
        if self.record is not None:
            self.record.stream_error = "engine_stream_broken"
        reason = await self._reason(tail)
        return error_event(
            self.path,
            f"model {self.model}: the engine stopped in the middle of the answer ({how}; {reason}); "
            f"retry the request, or see `sparkctl logs {self.model}`",
        )

    def refused(self, status: int, body: bytes) -> bytes:
        """The event for an engine that refused the request after sparkd's 200 went out (a stream
        that waited for its model got its headers early): the engine's status and message."""
        if self.record is not None:
            self.record.stream_error = "engine_refused"
        said = engine_message(body) or body[:300].decode("utf-8", "replace").strip() or "no reason given"
        log.warning("engine_refused_stream", model=self.model, path=self.path, status=status)
        return error_event(
            self.path,
            f"model {self.model}: the engine answered with status {status} instead of a stream: {said}",
            code="engine_refused",
            kind="invalid_request_error" if 400 <= status < 500 else "server_error",
            anthropic_kind="invalid_request_error" if 400 <= status < 500 else "api_error",
        )

    async def unfinished(self, tail: bytes) -> bytes | None:
        """The event for a stream that ended cleanly without its final event; None when it had one."""
        if has_final_event(tail):
            return None
        if self.record is not None:
            self.record.stream_error = "engine_stream_unfinished"
        reason = await self._reason(tail)
        log.warning("engine_stream_unfinished", model=self.model, path=self.path)
        return error_event(
            self.path,
            f"model {self.model}: the engine ended its answer without a final event ({reason}); "
            f"see `sparkctl logs {self.model}`",
        )
