"""The server-sent events decoder: any split of the bytes gives the same events."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlayer.proxy.sse import Event, SSEDecoder, SSEError

STREAM = (
    b": keep-alive\n\n"
    b'event: snapshot\r\nid: 41\r\ndata: {"version": 41}\r\n\r\n'
    b"data: line one\rdata:line two\r\r"
    b"event: empty\n\n"
    b": keep-alive\n"
    b'event: snapshot\nid: 42\nretry: 100\nunknown: x\ndata: {"version": 42, "s": "\xc3\xa9"}\n\n'
    b"data: incomplete"
)
EVENTS = [
    Event("snapshot", '{"version": 41}', "41"),
    Event("message", "line one\nline two", "41"),
    Event("snapshot", '{"version": 42, "s": "\u00e9"}', "42"),
]


def test_decodes_events_comments_and_line_endings() -> None:
    d = SSEDecoder()
    assert d.feed(STREAM) == EVENTS
    assert d.comments == 2


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    d = SSEDecoder()
    out: list[Event] = []
    bounds = [0, *sorted(cuts), len(STREAM)]
    for a, b in itertools.pairwise(bounds):
        out += d.feed(STREAM[a:b])
    assert out == EVENTS


def test_limits_and_encoding() -> None:
    with pytest.raises(SSEError):
        SSEDecoder(max_line=16).feed(b"data: " + b"x" * 32)
    with pytest.raises(SSEError):
        SSEDecoder().feed(b"data: \xff\n\n")
