"""Chunked-frame tracking of the raw SSE relay: bytes pass untouched, the engine's last chunk is held back."""

from __future__ import annotations

import random

import pytest

from sparkd.engine.stream import ChunkFrames, decode_chunked
from sparkd.errors import BadGateway


def frame(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(50)] + [b"data: [DONE]\n\n"]
BODY = b"".join(frame(e) for e in EVENTS)
WIRE = BODY + b"0\r\n\r\n"


def relay(pieces: list[bytes]) -> tuple[bytes, bool]:
    frames = ChunkFrames()
    out = b""
    for piece in pieces:
        out += frames.feed(piece)
        if frames.finished:
            break
    return out, frames.finished


def test_whole_body_passes_and_the_last_chunk_is_held_back():
    out, finished = relay([WIRE])
    assert out == BODY and finished


@pytest.mark.parametrize("seed", range(20))
def test_any_split_of_the_wire_gives_the_same_bytes(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(WIRE)), 25))
    pieces = [WIRE[a:b] for a, b in zip([0, *cuts], [*cuts, len(WIRE)], strict=True)]
    out, finished = relay(pieces)
    assert out == BODY and finished


def test_a_split_last_chunk_marker_is_never_forwarded():
    out, finished = relay([BODY + b"0", b"\r", b"\n\r\n"])
    assert out == BODY and finished


def test_data_that_looks_like_a_last_chunk_is_data():
    tricky = frame(b"0\r\n\r\n") + frame(b"x")
    out, finished = relay([tricky, b"0\r\n\r\n"])
    assert out == tricky and finished


def test_boundary_tracking_for_broken_streams():
    frames = ChunkFrames()
    frames.feed(frame(b"abc"))
    assert frames.at_boundary
    frames.feed(frame(b"abcdef")[:5])
    assert not frames.at_boundary


def test_chunk_extensions_and_bad_sizes():
    assert relay([b"3;ext=1\r\nabc\r\n0\r\n\r\n"]) == (b"3;ext=1\r\nabc\r\n", True)
    with pytest.raises(BadGateway):
        ChunkFrames().feed(b"zz\r\nabc\r\n")


def test_decode_chunked():
    assert decode_chunked(WIRE) == b"".join(EVENTS)
    assert decode_chunked(b"0\r\n\r\n") == b""
