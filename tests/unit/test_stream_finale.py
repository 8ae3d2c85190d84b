"""The end of a relayed stream: which final events count, and the error events sparkd adds (sparkd/engine/finale.py)."""

from __future__ import annotations

import json

import pytest

from sparkd.engine.finale import StreamEnding, engine_message, error_event, has_final_event
from sparkd.engine.usage import StreamTail


@pytest.mark.parametrize("tail", [b"data: [DONE]\n\n", b'{"finish_reason": "length"}', b"event: message_stop\ndata: {}",
                                  b'{"type": "response.incomplete"}'])
def test_final_events(tail):
    assert has_final_event(tail)


@pytest.mark.parametrize("tail", [b"", b'{"finish_reason": null}', b'data: {"error": {"message": "x"}}\n\n',
                                  b'{"content": "[DONE]"}'])
def test_not_final(tail):
    assert not has_final_event(tail)


def test_done_split_over_small_reads_is_seen_at_the_end():
    tail = StreamTail()
    tail.feed(b'data: {"choices": []}\n\n' * 10)
    for byte in b"data: [DONE]\n\n\r\n0\r\n\r\n":
        tail.feed(bytes([byte]))
    assert has_final_event(tail.ending)


def test_anthropic_streams_get_anthropics_error_event():
    event = error_event("/v1/messages", "model m: broke")
    name, data = event.split(b"\n", 1)
    assert name == b"event: error"
    assert json.loads(data.removeprefix(b"data: ")) == {"type": "error", "error": {"type": "api_error", "message": "model m: broke"}}


def test_engine_message_is_unescaped():
    assert engine_message(b'data: {"error": {"message": "bad \\"x\\" \\u00e9"}}') == 'bad "x" \u00e9'
    assert engine_message(b'data: {"message": "not an error"}') is None


async def test_the_reason_comes_from_the_last_log_lines_when_the_body_has_none():
    async def last_words() -> list[str]:
        return ["INFO loading", "ERROR: Requested tokens (18750) exceed context window of 8192", "INFO Finished server process"]

    event = await StreamEnding("smol", "/v1/chat/completions", last_words).unfinished(b"")
    assert event is not None
    message = json.loads(event.removeprefix(b"data: "))["error"]["message"]
    assert "model smol" in message and "exceed context window" in message and "Finished server process" not in message
    assert await StreamEnding("smol", "/v1/chat/completions", last_words).unfinished(b"data: [DONE]\n\n") is None
