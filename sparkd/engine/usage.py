"""What the proxy notes about one answer for metrics and history: first byte, token usage.

Kept tiny and dependency-free: the proxy fills a ``RequestRecord`` as it relays
(one per request; a stream only keeps references to its last reads, ``StreamTail``), and the
usage is parsed once, at the end, from the whole answer or the stream's tail.
"""

from __future__ import annotations

import re

NO_MODEL = "(none)"
"""The model of a request refused before a configured model was found (bad JSON, unknown model)."""
NO_PATH = "(none)"
"""The engine path of a request refused before its path was checked."""

_USAGE = re.compile(rb'"usage"\s*:\s*\{([^{}]*)\}')
_PROMPT = re.compile(rb'"(?:prompt_tokens|input_tokens)"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"(?:completion_tokens|output_tokens)"\s*:\s*(\d+)')


END_WINDOW = 64


class StreamTail:
    """The last two reads of a stream that carry JSON: where its usage chunk is.

    The usage chunk is followed by ``data: [DONE]`` and the end of the body, which
    often arrive in reads of their own; reads without a brace cannot hold any part of
    a usage object, so they are not kept and cannot push the usage out.  The stream's
    last bytes are kept too (``END_WINDOW``): ``[DONE]`` (which has no brace) ends a
    complete stream, and may arrive split, or followed by the chunked body's last chunk.
    A read that long is only referenced; shorter ones are joined to the window.
    """

    __slots__ = ("_before", "_end", "_last")

    def __init__(self) -> None:
        self._before = self._last = self._end = b""

    def feed(self, data: bytes) -> None:
        self._end = data if len(data) >= END_WINDOW else (self._end + data)[-END_WINDOW:]
        if b"}" in data or b"{" in data:
            self._before, self._last = self._last, data

    @property
    def text(self) -> bytes:
        return self._before + self._last

    @property
    def ending(self) -> bytes:
        """The last JSON-carrying reads and the last reads: where a final event (or an error) is."""
        return self._before + self._last + b"\n" + self._end


class RequestRecord:
    __slots__ = ("first_byte", "model", "path", "queued_s", "stream_error", "usage")

    def __init__(self) -> None:
        self.model = NO_MODEL
        self.path = NO_PATH
        """The checked engine path (``routing.target``): never the client's raw path."""
        self.queued_s = 0.0
        """Seconds the request waited for its model (queue, start, swap)."""
        self.first_byte: float | None = None
        """time.monotonic() when the first byte of the answer's body went to the client."""
        self.usage: tuple[int, int] | None = None
        """(prompt, completion) tokens the engine reported."""
        self.stream_error: str | None = None
        """The code of the error event sparkd ended a stream with (its status was 200 already)."""

    def note_body(self, first_byte: float | None, text: bytes) -> None:
        """The answer (or a stream's tail) is known: when it began, and the usage it reports."""
        self.first_byte = first_byte
        if b'"usage"' in text:
            self.usage = parse_usage(text)


def parse_usage(text: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last ``"usage": {...}`` object in ``text``.

    Works on a whole JSON answer and on the tail of an SSE stream (where only the
    final chunk carries numbers; earlier chunks may say ``"usage": null``).
    Chat/completions say prompt/completion_tokens, the Responses API input/output_tokens.
    In JSON a key's quotes are never escaped, so ``"usage"`` inside generated text
    (``\\"usage\\"``) does not match.
    """
    found = None
    for match in _USAGE.finditer(text):
        found = match  # the last one: the final usage report
    if found is None:
        return None
    body = found.group(1)
    prompt = _PROMPT.search(body)
    completion = _COMPLETION.search(body)
    if prompt is None and completion is None:
        return None
    return (int(prompt.group(1)) if prompt else 0, int(completion.group(1)) if completion else 0)
