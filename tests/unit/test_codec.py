"""The sans-I/O codec: strict parsing, limits, events, and re-serialization."""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshlayer.proxy.codec import (
    Body,
    EndOfMessage,
    ProtocolError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    TunnelData,
)
from meshlayer.proxy.codec.events import CHUNKED, LENGTH, NO_BODY, UNTIL_CLOSE
from meshlayer.proxy.codec.serialize import (
    build_head,
    chunk,
    end_to_end,
    framing_lines,
    last_chunk,
)

# Every test here runs with heads taken field by field and in one block (conftest).
pytestmark = pytest.mark.usefixtures("parser_mode")


def parse(data: bytes) -> list[object]:
    return RequestParser().feed(data)


def error_of(data: bytes) -> ProtocolError:
    events = parse(data)
    assert events, "expected an error event"
    err = events[-1]
    assert isinstance(err, ProtocolError), events
    return err


GOOD = b"GET /a?b=1 HTTP/1.1\r\nHost: svc\r\nX-One: 1\r\n\r\n"


def test_simple_request() -> None:
    events = parse(GOOD)
    head, end = events
    assert isinstance(head, RequestHead) and isinstance(end, EndOfMessage)
    assert (head.method, head.target, head.version, head.host) == (
        b"GET",
        b"/a?b=1",
        b"1.1",
        b"svc",
    )
    assert head.headers == [(b"Host", b"svc"), (b"X-One", b"1")]
    assert head.keep_alive and head.framing == NO_BODY


def test_byte_by_byte_gives_the_same_events() -> None:
    data = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    p = RequestParser()
    events: list[object] = []
    for i in range(len(data)):
        events += p.feed(data[i : i + 1])
    body = b"".join(e.data for e in events if isinstance(e, Body))
    assert body == b"hello"
    assert isinstance(events[0], RequestHead) and events[0].framing == CHUNKED
    assert isinstance(events[-1], EndOfMessage)
    assert events[-1].trailers == [(b"X-Trailer", b"t")]


def test_pipelined_then_error_keeps_the_good_ones_first() -> None:
    events = parse(GOOD + GOOD + b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n")
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "RequestHead",
        "EndOfMessage",
        "RequestHead",
        "EndOfMessage",
        "ProtocolError",
    ]


def test_nothing_is_parsed_after_an_error() -> None:
    p = RequestParser()
    assert isinstance(p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n a\r\n\r\n")[-1], ProtocolError)
    assert p.feed(GOOD) == []


SMUGGLING = {
    "cl-and-te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-and-cl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 3\r\n\r\n0\r\n\r\n",
    "two-cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "cl-plus": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    "cl-list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    "cl-hex": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\nabc",
    "te-gzip": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te-chunked-gzip": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "te-twice": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-space": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare-cr": b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
    "space-in-name": b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
    "empty-name": b"GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "ctl-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
    "bad-chunk-size": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffff\r\nx\r\n0\r\n\r\n",
    "chunk-size-space": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5 \r\nhello\r\n0\r\n\r\n",
    "chunk-missing-crlf": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhelloX0\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_ambiguous_framing_is_refused_with_400(name: str) -> None:
    err = error_of(SMUGGLING[name])
    assert err.status == 400, err


def test_no_event_before_the_error_for_a_refused_head() -> None:
    # The head must never be handed out when its own framing is bad.
    events = parse(SMUGGLING["cl-and-te"])
    assert not any(isinstance(e, RequestHead) for e in events)


def test_limits() -> None:
    many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 100 + b"\r\n"
    assert error_of(many).status == 431
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * (61 * 1024) + b"\r\n\r\n"
    assert error_of(big).status == 431
    ok = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * (50 * 1024) + b"\r\n\r\n"
    assert isinstance(parse(ok)[0], RequestHead)


def test_a_huge_header_line_fed_in_pieces_is_cut_off() -> None:
    p = RequestParser()
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    seen: list[object] = []
    for _ in range(20):
        seen += p.feed(b"a" * 8192)
    assert any(isinstance(e, ProtocolError) and e.status == 431 for e in seen)


def test_version_and_method_errors() -> None:
    assert error_of(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n").status == 505
    assert error_of(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n").status == 405


def test_http10_and_keep_alive() -> None:
    (head, _) = parse(b"GET / HTTP/1.0\r\n\r\n")
    assert isinstance(head, RequestHead) and head.version == b"1.0" and not head.keep_alive
    (head, _) = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert isinstance(head, RequestHead) and head.keep_alive
    (head, _) = parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert isinstance(head, RequestHead) and not head.keep_alive


def test_upgrade_hands_over_the_rest_as_tunnel_data() -> None:
    p = RequestParser()
    events = p.feed(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nRAW"
    )
    head = events[0]
    assert isinstance(head, RequestHead) and head.upgrade == b"websocket"
    assert isinstance(events[-1], TunnelData) and events[-1].data == b"RAW"
    assert isinstance(p.feed(b"more")[0], TunnelData)


def test_expect_continue_flag() -> None:
    (head, *_) = parse(
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"
    )
    assert isinstance(head, RequestHead) and head.expect_continue and head.framing == LENGTH


# -- responses ---------------------------------------------------------------


def response_events(method: bytes, data: bytes, eof: bool = False) -> list[object]:
    p = ResponseParser()
    p.expect(method)
    events = p.feed(data)
    if eof:
        events += p.feed_eof()
    return events


def test_response_length_chunked_and_until_close() -> None:
    ev = response_events(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert isinstance(ev[0], ResponseHead) and ev[0].framing == LENGTH
    ev = response_events(
        b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nT: 1\r\n\r\n"
    )
    assert isinstance(ev[-1], EndOfMessage) and ev[-1].trailers == [(b"T", b"1")]
    ev = response_events(b"GET", b"HTTP/1.1 200 OK\r\n\r\nstream", eof=True)
    assert isinstance(ev[0], ResponseHead) and ev[0].framing == UNTIL_CLOSE
    assert isinstance(ev[-1], EndOfMessage)


def test_head_response_has_no_body_and_the_connection_stays_usable() -> None:
    p = ResponseParser()
    p.expect(b"HEAD")
    ev = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert isinstance(ev[0], ResponseHead) and ev[0].content_length == 1000
    assert isinstance(ev[-1], EndOfMessage) and p.done and p.error is None
    p.expect(b"GET")
    ev = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert [type(e) for e in ev] == [ResponseHead, Body, EndOfMessage]


def test_interim_responses_precede_the_final_one() -> None:
    ev = response_events(
        b"POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )
    statuses = [e.status for e in ev if isinstance(e, ResponseHead)]
    assert statuses == [100, 201]


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nabHTTP/1.1",
        b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx",
    ],
)
def test_bad_upstream_framing_is_a_502(data: bytes) -> None:
    ev = response_events(b"GET", data)
    assert isinstance(ev[-1], ProtocolError) and ev[-1].status == 502


def test_unsolicited_bytes_are_an_error() -> None:
    p = ResponseParser()
    ev = p.feed(b"HTTP/1.1 200 OK\r\n\r\n")
    assert isinstance(ev[-1], ProtocolError)


def test_close_before_the_end_is_an_error() -> None:
    ev = response_events(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", eof=True)
    assert isinstance(ev[-1], ProtocolError)


# -- property: what we accept, h11 accepts with the same meaning ---------------

TOKEN = st.text(
    alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    min_size=1,
    max_size=12,
)
# Header values: visible ASCII, spaces and tabs inside, plus a few odd bytes
# (control characters, obs-text) that the parser must refuse or keep intact.
VALUE = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20).map(
        str.encode
    ),
    st.binary(max_size=20).map(lambda b: bytes(c for c in b if c not in b"\r\n")),
)
NAME = st.one_of(TOKEN.map(str.encode), TOKEN.map(str.encode), st.binary(min_size=1, max_size=8))


def _header_block(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    headers = draw(st.lists(st.tuples(NAME, VALUE), max_size=6))
    return [(n, v) for n, v in headers if b"\r" not in n and b"\n" not in n and b":" not in n]


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS"]))
    target = b"/" + draw(st.text(alphabet="abc/?=&%._-~", max_size=12)).encode()
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    headers = [(b"Host", draw(st.sampled_from([b"svc", b"svc:80", b"a.b"])))]
    headers += _header_block(draw)
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["none", "length", "chunked", "both", "bad-length", "te-gzip"]))
    tail = b""
    if framing == "length" or framing == "both":
        headers.append((b"Content-Length", str(len(body)).encode()))
        tail = body
    if framing == "bad-length":
        headers.append((b"Content-Length", draw(st.sampled_from([b"-1", b"1 2", b"x", b"+1"]))))
    if framing in ("chunked", "both", "te-gzip"):
        te = b"chunked" if framing != "te-gzip" else b"gzip"
        headers.append((b"Transfer-Encoding", te))
        pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
        tail = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    draw(st.randoms()).shuffle(headers)
    lines = [method + b" " + target + b" " + version] + [n + b": " + v for n, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + tail


def _reserialize(events: list[object]) -> bytes:
    head = events[0]
    assert isinstance(head, RequestHead)
    lines = end_to_end(head.headers)
    lines += framing_lines(head.framing, head.content_length, head.transfer_encoding)
    out = build_head(head.method + b" " + head.target + b" HTTP/1.1", lines)
    for ev in events[1:]:
        if isinstance(ev, Body):
            out += chunk(ev.data) if head.framing == CHUNKED else ev.data
        elif isinstance(ev, EndOfMessage) and head.framing == CHUNKED:
            out += last_chunk(ev.trailers)
    return out


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(raw_requests())
def test_accepted_requests_reserialize_to_what_h11_accepts(data: bytes) -> None:
    events = RequestParser().feed(data)
    if not events or any(isinstance(e, ProtocolError) for e in events):
        event("refused")
        return  # refused: nothing to forward
    event("accepted")
    end = next(i for i, e in enumerate(events) if isinstance(e, EndOfMessage))
    ours = events[: end + 1]
    head = ours[0]
    assert isinstance(head, RequestHead)
    body = b"".join(e.data for e in ours if isinstance(e, Body))

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(_reserialize(ours))
    req = conn.next_event()
    assert isinstance(req, h11.Request), req
    assert req.method == head.method
    assert req.target == head.target
    theirs = [(bytes(n), bytes(v)) for n, v in req.headers]
    expected = [
        (line.split(b": ", 1)[0].lower(), line.split(b": ", 1)[1].strip(b" \t"))
        for line in end_to_end(head.headers)
    ]
    assert [(n, v) for n, v in theirs if n not in (b"content-length", b"transfer-encoding")] == (
        expected
    )
    got = b""
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.Data):
            got += bytes(ev.data)
        elif isinstance(ev, h11.EndOfMessage):
            break
        else:
            raise AssertionError(f"h11 saw {ev!r}")
    assert got == body
