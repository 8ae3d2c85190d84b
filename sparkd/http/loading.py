"""A stream that waits for its model hears why, from the moment it is queued.

Loading a large model takes minutes; a streaming client that gets no byte in
that time cannot tell loading from hanging, and clients and proxies with read
timeouts give up.  So a streaming request (chat, completions, Anthropic
Messages, Responses) that has to wait gets its 200 and ``text/event-stream``
headers once it is accepted into the wait, then an SSE comment every few seconds
with the model's stage and an ETA from its past loads::

    : sparkd: loading gpt-oss-120b, loading weights 45%, about 80 s left

Headers go out only after the request has waited ``ACCEPT_GRACE_S`` and, for a
cold start, once the model's container runs (at most ``HEADERS_BY_S``): a
refusal the scheduler decides at once (queue full, the key's queue limit, the
reject policy's 429, a failed model in back-off, an impossible claim) and a
start that fails before its container runs (a missing image, missing encodings,
no GPU device) keep their HTTP status.  Any failure after the headers (the engine dies while loading, the
start or queue times out, the engine refuses the request) ends the stream with
the SSE error event of ``engine/finale.py``, which the SDKs raise.

``loading_feedback`` (per model, or per key in keys.toml) = ``"content"`` or
``"reasoning"`` also sends the same text as answer or reasoning deltas, which
chat UIs display: ``delta.content`` / ``delta.reasoning_content`` chunks on
chat completions, ``text`` on completions ("reasoning" has no channel there:
comments only).  An Anthropic stream is one message, so sparkd opens it
(``message_start``) and puts the text in a block of its own at index 0, a
``thinking`` block (what Claude Code and the SDKs show as thinking) or a ``text``
block; the engine's answer then follows with its own ``message_start`` left out
and its block indexes moved up by one (``AnthropicAfterLoading``; such a stream
takes the read-by-read relay, not the raw one).  Responses streams get comments
only: their output items belong to a response the engine has not created yet.

The model's state is read through ``wait_view`` only, never changed.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from multidict import CIMultiDict

from ..config.schema import LoadingFeedback
from ..engine.finale import error_event, is_anthropic
from ..engine.progress import DOWNLOAD_PHASE, LoadProgress
from ..engine.usage import RequestRecord
from ..errors import ApiError
from ..scheduler.state import ModelState
from .anthropic import error_type

if TYPE_CHECKING:
    from ..scheduler.runner import ModelRunner
    from ..scheduler.scheduler import Scheduler

log = structlog.get_logger("sparkd.requests")
S = ModelState

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
STREAM_PATHS = frozenset({CHAT_PATH, COMPLETIONS_PATH, "/v1/messages", "/v1/responses"})
"""The streams that hear about the wait (their SDKs skip SSE comments)."""
ACCEPT_GRACE_S = 0.25
"""How long a request waits before its headers go out: refusals decided at once keep their status."""
HEADERS_BY_S = 0.8
"""The latest the headers (and the first comment) go out, so a client hears within 1 s of queueing."""
CONTAINER_CHECK_S = 0.05
TICK_S = 4.0
"""Seconds between two progress lines (at most 5, so read timeouts of 5 s and more never fire)."""
MINUTES_FROM_S = 120.0


@dataclass(frozen=True)
class HolderView:
    """A model that holds the GPU share the waiting model needs."""

    name: str
    state: ModelState
    in_flight: int
    quantum_left_s: float | None = None
    """How long its swap quantum still keeps it, while it has work (None: none does)."""


@dataclass(frozen=True)
class WaitView:
    """What a waiting request's model is doing, as far as its client should know."""

    model: str
    state: ModelState
    progress: LoadProgress | None = None
    busy_for_s: float | None = None
    """Seconds it has been loading (STARTING), waking (WAKING) or pulling its weights (PULLING)."""
    usual_load_s: float | None = None
    """Its measured load time (the median of its past loads), None when it never loaded."""
    holders: tuple[HolderView, ...] = ()
    """The other models holding the GPU."""
    container_running: bool = True
    """False while a start has not got its container running yet (it may still fail for the operator)."""


def wait_view(scheduler: Scheduler, name: str, now_wall: float) -> WaitView:
    """The model's state, progress and ETA, and who holds the GPU; reads the scheduler, changes nothing."""
    runner = scheduler.runners.get(name)
    if runner is None:
        return WaitView(model=name, state=S.STOPPED)
    busy_for: float | None = None
    if runner.state is S.STARTING:
        busy_for = max(0.0, now_wall - runner.start_requested_at)
    elif runner.state in (S.WAKING, S.PULLING):
        busy_for = max(0.0, now_wall - runner.state_since)
    now = time.monotonic()
    holders = tuple(
        HolderView(
            other.name, other.state, other.in_flight,
            other.quantum.until - now if other.quantum is not None and other.quantum.until > now else None,
        )
        for other in (scheduler.runners.get(held) for held in scheduler.lease.holders if held != name)
        if other is not None
    )
    return WaitView(
        model=name, state=runner.state, progress=runner.progress, busy_for_s=busy_for,
        usual_load_s=scheduler.lifecycle.load_times.eta(name), holders=holders,
        container_running=runner.state is not S.STARTING or runner.started_at is not None or _pulling(runner.progress),
    )


def _pulling(progress: LoadProgress | None) -> bool:
    """A start pulling its weights: its headers need not wait for a container (the pull may take an hour)."""
    return progress is not None and progress.phase == DOWNLOAD_PHASE


def _duration(seconds: float) -> str:
    if seconds >= MINUTES_FROM_S:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def _time_left(view: WaitView) -> str:
    if view.progress is not None and view.progress.eta_s is not None:
        return f"about {_duration(view.progress.eta_s)} left"  # a download's own ETA, from its rate
    elapsed = view.busy_for_s or 0.0
    if view.usual_load_s is None:
        return f"{_duration(elapsed)} so far"  # never loaded here: no ETA rather than an invented one
    left = view.usual_load_s - elapsed
    if left >= 1:
        return f"about {_duration(left)} left"
    return f"taking longer than its usual {_duration(view.usual_load_s)}"


def _pull_left(view: WaitView) -> str:
    if view.progress is not None and view.progress.eta_s is not None:
        return f"about {_duration(view.progress.eta_s)} left"
    return f"{_duration(view.busy_for_s or 0.0)} so far"


def _holder_text(holder: HolderView) -> str:
    if holder.state is S.DRAINING and holder.in_flight:
        plural = "s" if holder.in_flight != 1 else ""
        return f"{holder.name} to finish {holder.in_flight} request{plural} in flight"
    if holder.state is S.STOPPING:
        return f"{holder.name} to stop"
    if holder.state in (S.STARTING, S.WAKING):
        return f"{holder.name} to finish loading"
    if holder.state is S.READY and holder.quantum_left_s is not None:
        return f"{holder.name}, whose swap quantum keeps the GPU up to {_duration(holder.quantum_left_s)} more while it has work"
    return f"{holder.name} to free the GPU"


def describe_wait(view: WaitView) -> str:
    """One line saying what the request waits for: the stage and ETA of a load, or who holds the GPU."""
    model = view.model
    if view.state is S.STARTING:
        stage = view.progress.describe() if view.progress is not None else "starting its container"
        return f"sparkd: loading {model}, {stage}, {_time_left(view)}"
    if view.state is S.PULLING:
        stage = view.progress.describe() if view.progress is not None else "looking up its repository"
        return f"sparkd: pulling the weights of {model} before it loads, {stage}, {_pull_left(view)}"
    if view.state is S.WAKING:
        return f"sparkd: waking {model} from sleep, {_duration(view.busy_for_s or 0.0)} so far"
    if view.state is S.READY:
        return f"sparkd: {model} is ready"
    if view.state is S.DRAINING:
        return f"sparkd: {model} is handing the GPU to another model; this request waits for its next turn"
    if view.state is S.STOPPING:
        return f"sparkd: waiting for {model} to stop before it starts again"
    if view.holders:
        return f"sparkd: {model} is queued, waiting for " + ", ".join(_holder_text(h) for h in view.holders)
    return f"sparkd: {model} is queued, starting soon"


def comment_line(text: str) -> bytes:
    return b": " + text.encode() + b"\n\n"


def feedback_event(path: str, feedback: LoadingFeedback, model: str, text: str, chunk_id: str) -> bytes | None:
    """``text`` as the route's SDKs show it to users, when ``feedback`` asks for it; None = comments only."""
    if feedback == "off":
        return None
    created = int(time.time())
    if path == CHAT_PATH:
        channel = "content" if feedback == "content" else "reasoning_content"
        chunk: dict[str, Any] = {
            "id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", channel: text}, "logprobs": None, "finish_reason": None}],
        }
    elif path == COMPLETIONS_PATH and feedback == "content":
        chunk = {
            "id": chunk_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}],
        }
    elif is_anthropic(path):
        delta = {"type": "thinking_delta", "thinking": text} if feedback == "reasoning" else {"type": "text_delta", "text": text}
        return anthropic_event({"type": "content_block_delta", "index": 0, "delta": delta})
    else:
        return None
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def anthropic_event(data: dict[str, Any]) -> bytes:
    return b"event: " + str(data["type"]).encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def anthropic_opening(feedback: LoadingFeedback, model: str, message_id: str) -> bytes:
    """sparkd's start of an Anthropic message whose block 0 carries the loading text."""
    message: dict[str, Any] = {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    block = {"type": "thinking", "thinking": "", "signature": ""} if feedback == "reasoning" else {"type": "text", "text": ""}
    return (anthropic_event({"type": "message_start", "message": message})
            + anthropic_event({"type": "content_block_start", "index": 0, "content_block": block}))


ANTHROPIC_CLOSING = anthropic_event({"type": "content_block_stop", "index": 0})

_BLOCK_EVENT = re.compile(rb"^event:\s*content_block_(?:start|delta|stop)\b", re.MULTILINE)
_MESSAGE_START = re.compile(rb"^event:\s*message_start\b", re.MULTILINE)
_INDEX = re.compile(rb'"index"\s*:\s*(\d+)')
_MESSAGE_DELTA = re.compile(rb"^event:\s*message_delta\b", re.MULTILINE)
_DATA = re.compile(rb"^data:\s?(.*)$", re.MULTILINE)


class AnthropicAfterLoading:
    """The engine's Anthropic stream behind sparkd's opening: its ``message_start`` left out
    (a second one is an error to Anthropic's TypeScript SDK), its block indexes moved up by one,
    and the usage its ``message_start`` reported carried over to its ``message_delta``."""

    def __init__(self) -> None:
        self._held = b""
        self._usage: dict[str, Any] = {}

    def feed(self, data: bytes) -> bytes:
        """The rewritten complete events of ``data``; an incomplete event waits for its end."""
        events = (self._held + data).split(b"\n\n")
        self._held = events.pop()
        return b"".join(self._rewrite(event) for event in events if event.strip())

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return self._rewrite(held) if held.strip() else b""

    def _rewrite(self, event: bytes) -> bytes:
        if _MESSAGE_START.search(event):
            usage = _event_data(event).get("message", {}).get("usage")
            self._usage = usage if isinstance(usage, dict) else {}
            return b""
        if _BLOCK_EVENT.search(event):
            event = _INDEX.sub(lambda found: b'"index": %d' % (int(found.group(1)) + 1), event, count=1)
        elif self._usage and _MESSAGE_DELTA.search(event):
            data = _event_data(event)
            if isinstance(data.get("usage"), dict):
                data["usage"] = {**self._usage, **{k: v for k, v in data["usage"].items() if v is not None}}
                return anthropic_event(data)
        return event + b"\n\n"


def _event_data(event: bytes) -> dict[str, Any]:
    """The JSON of an SSE event's data line; empty when it has none that parses."""
    found = _DATA.search(event)
    try:
        data = json.loads(found.group(1)) if found else None
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def failure_event(path: str, error: ApiError) -> bytes:
    """``error`` (raised after the headers went out) as the route's SSE error event."""
    return error_event(path, error.message, code=error.code, kind=error.type, anthropic_kind=error_type(error.status))


class LoadingFeed:
    """One streaming request's wait for its model, told to its client while it lasts."""

    def __init__(
        self, request: web.Request, scheduler: Scheduler, model: str, path: str,
        feedback: LoadingFeedback, headers: Mapping[str, str],
    ) -> None:
        self._request = request
        self._scheduler = scheduler
        self._model = model
        self._path = path
        self._feedback = feedback
        self._headers = headers
        self._chunk_id = f"chatcmpl-sparkd-{uuid.uuid4().hex[:16]}" if path == CHAT_PATH else f"cmpl-sparkd-{uuid.uuid4().hex[:16]}"
        self.response: web.StreamResponse | None = None
        """The client's stream once its headers went out; None while the request may still be refused with a status."""
        self._opened_message = is_anthropic(path) and feedback != "off"
        """An Anthropic message sparkd opened (its loading block at index 0)."""

    def engine_rewrite(self) -> AnthropicAfterLoading | None:
        """How the engine's stream must be rewritten to follow what this feed sent, if at all."""
        return AnthropicAfterLoading() if self.response is not None and self._opened_message else None

    async def acquire(self, *, key: str | None, body_bytes: int, priority: int = 0) -> ModelRunner | None:
        """``scheduler.acquire``, telling the client about the wait; None when the client left meanwhile.

        Raises the scheduler's ``ApiError``: before the headers went out (``response`` is None)
        it becomes a status as usual, after them the caller ends the stream with ``fail``.
        """
        waiting = asyncio.ensure_future(self._scheduler.acquire(self._model, key=key, body_bytes=body_bytes, priority=priority))
        began = time.monotonic()
        try:
            done, _ = await asyncio.wait((waiting,), timeout=ACCEPT_GRACE_S)
            while not done and not self._container_running() and time.monotonic() - began < HEADERS_BY_S:
                done, _ = await asyncio.wait((waiting,), timeout=CONTAINER_CHECK_S)
            if done:
                return waiting.result()
            await self._open()
            while not done:
                await self._say(describe_wait(wait_view(self._scheduler, self._model, time.time())))
                done, _ = await asyncio.wait((waiting,), timeout=TICK_S)
            runner = waiting.result()
            await self._say(f"sparkd: {self._model} is ready after {_duration(time.monotonic() - began)}", last=True)
            return runner
        except asyncio.CancelledError:
            await self._abandon(waiting)
            raise
        except ConnectionError:
            # A write found the client gone (the handler's cancellation may not have come yet).
            await self._abandon(waiting)
            log.debug("stream_wait_abandoned", model=self._model, path=self._path)
            if self.response is None:
                raise  # it left before its headers went out: nothing to return
            return None

    def _container_running(self) -> bool:
        return wait_view(self._scheduler, self._model, time.time()).container_running

    async def _open(self) -> None:
        headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        headers.update(self._headers)
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(self._request)
        self.response = response
        if self._opened_message:
            await response.write(anthropic_opening(self._feedback, self._model, f"msg_sparkd_{uuid.uuid4().hex[:24]}"))
        log.info("stream_waiting_for_model", model=self._model, path=self._path, feedback=self._feedback)

    async def _say(self, text: str, last: bool = False) -> None:
        assert self.response is not None
        shown = feedback_event(self._path, self._feedback, self._model, text + ("\n\n" if last else "\n"), self._chunk_id)
        closing = ANTHROPIC_CLOSING if last and self._opened_message else b""
        await self.response.write(comment_line(text) + (shown or b"") + closing)

    async def tell_headers(self, headers: Mapping[str, str]) -> None:
        """Headers decided after the stream's own went out (``X-Sparkd-Max-Tokens-Capped``), as comments."""
        if self.response is not None:
            await self.response.write(b"".join(comment_line(f"sparkd: {name}: {value}") for name, value in headers.items()))

    async def _abandon(self, waiting: asyncio.Future[ModelRunner]) -> None:
        """The client left: give up the queue slot, or hand back a grant that came meanwhile."""
        waiting.cancel()
        await asyncio.wait((waiting,))
        if not waiting.cancelled() and waiting.exception() is None:
            self._scheduler.release(waiting.result())

    async def end_with_error(self, error: ApiError, record: RequestRecord) -> web.StreamResponse:
        """End the stream whose headers went out with ``error`` as its SSE error event."""
        response = self.response
        assert response is not None
        record.stream_error = error.code
        log.info("stream_failed_after_headers", model=self._model, path=self._path, code=error.code)
        try:
            await response.write(failure_event(self._path, error))
            await response.write_eof()
        except ConnectionError:
            pass  # the client left: nobody to tell
        return response
