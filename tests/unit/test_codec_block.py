"""The parsers take the header block in one piece: same events as llhttp's own per-field view.

The oracle is httptools itself with the per-field callbacks (``on_url``,
``on_status``, ``on_header``) that the parsers no longer install: for any
bytes, split anywhere, pipelined or not, the parsers must report the same
heads, fields, bodies and trailers, and refuse exactly what llhttp refuses.
"""

from __future__ import annotations

import gc
import itertools

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlayer.proxy.codec import (
    Body,
    EndOfMessage,
    ProtocolError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
)
from meshlayer.proxy.codec.block import native, take_head
from meshlayer.proxy.codec.chunked import TOO_LARGE, ChunkedEnd
from meshlayer.proxy.codec.events import split_rows
from meshlayer.proxy.codec.serialize import without

# Every test here runs with heads taken field by field and in one block (conftest).
pytestmark = pytest.mark.usefixtures("parser_mode")


Seen = list[tuple[object, ...]]


class _Oracle:
    """Events as llhttp reports them through every callback httptools offers."""

    def __init__(self, response: bool) -> None:
        self.seen: Seen = []
        self.response = response
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser
        if response:
            self.parser = httptools.HttpResponseParser(self)
        else:
            self.parser = httptools.HttpRequestParser(self)
        self._start = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []
        self._in_trailers = False
        self.failed = False

    def feed(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.failed = True
            self.seen.append(("error",))

    def on_message_begin(self) -> None:
        self._start = b""
        self._headers = []
        self._trailers = []
        self._in_trailers = False

    def on_url(self, url: bytes) -> None:
        self._start += url

    def on_status(self, reason: bytes) -> None:
        self._start += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        (self._trailers if self._in_trailers else self._headers).append((name, value))

    def on_headers_complete(self) -> None:
        self._in_trailers = True
        p = self.parser
        if isinstance(p, httptools.HttpResponseParser):
            self.seen.append(("head", p.get_status_code(), self._start, self._headers))
        else:
            self.seen.append(
                ("head", p.get_method(), self._start, self._headers, p.should_keep_alive())
            )

    def on_body(self, body: bytes) -> None:
        self.seen.append(("body", body))

    def on_message_complete(self) -> None:
        p = self.parser
        if isinstance(p, httptools.HttpResponseParser) and 100 <= p.get_status_code() < 200:
            return  # interim: the parser reports no end for it
        self.seen.append(("end", self._trailers or None))


def _ours(events: list[object]) -> Seen:
    out: Seen = []
    for ev in events:
        if isinstance(ev, RequestHead):
            out.append(("head", ev.method, ev.target, ev.headers, ev.keep_alive))
        elif isinstance(ev, ResponseHead):
            out.append(("head", ev.status, ev.reason, ev.headers))
        elif isinstance(ev, Body):
            out.append(("body", ev.data))
        elif isinstance(ev, EndOfMessage):
            out.append(("end", ev.trailers))
        elif isinstance(ev, ProtocolError):
            out.append(("error",))
        else:
            raise AssertionError(ev)
    return out


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- generated messages ------------------------------------------------------

TOKEN = st.text(
    alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    min_size=1,
    max_size=10,
).map(str.encode)
NAME = st.one_of(
    TOKEN,
    st.sampled_from(
        [
            *(b"Host", b"Connection", b"Keep-Alive", b"TE", b"Trailer", b"Proxy-Foo"),
            *(b"Expect", b"X-Forwarded-For", b"x-request-id", b"Content-Type", b"Accept"),
        ]
    ),
)
VALUE = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16).map(
        str.encode
    ),
    st.sampled_from([b"close", b"keep-alive", b"x-a, close", b"100-continue", b"\x80\xff"]),
    # now and then a byte llhttp refuses, so refusals are compared too
    st.sampled_from([b"a\x00b", b"a\x7fb", b"a\rb"]).filter(lambda _: True),
)
OWS_BEFORE = st.sampled_from([b"", b" ", b"  ", b"\t", b" \t"])
OWS_AFTER = st.sampled_from([b"", b"", b" ", b"\t "])


@st.composite
def field_lines(draw: st.DrawFn, host: bool) -> bytes:
    fields_ = draw(st.lists(st.tuples(NAME, OWS_BEFORE, VALUE, OWS_AFTER), max_size=6))
    out = [
        n + b":" + a + v + z
        for n, a, v, z in fields_
        if n.lower() not in (b"host", b"content-length", b"transfer-encoding")
    ]
    if host:
        out.insert(draw(st.integers(0, len(out))), b"Host: svc")
    return b"".join(line + b"\r\n" for line in out)


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    body = draw(st.binary(max_size=40))
    sizes = draw(st.lists(st.integers(1, 9), max_size=6))
    out, at = b"", 0
    for n in sizes:
        piece = body[at : at + n]
        at += n
        if not piece:
            break
        size = draw(st.sampled_from([b"%x", b"%X", b"0%x", b"000%x"])) % len(piece)
        ext = draw(st.sampled_from([b"", b";a=b", b';q="x;y"', b";e"]))
        out += size + ext + b"\r\n" + piece + b"\r\n"
    last = draw(st.sampled_from([b"0", b"000", b"0;z=1"]))
    trailers = draw(st.sampled_from([b"", b"X-Sum: 1\r\n", b"T:  a b \r\nU:\tv\r\n"]))
    return out + last + b"\r\n" + trailers + b"\r\n"


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS"]))
    target = b"/" + draw(st.text(alphabet="abc/?=&%._-~", max_size=12)).encode()
    gap = draw(st.sampled_from([b" ", b" ", b"  "]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    head = method + gap + target + b" " + version + b"\r\n" + draw(field_lines(host=True))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "length":
        body = draw(st.binary(max_size=30))
        head += b"Content-Length: %d\r\n" % len(body)
    elif framing == "chunked":
        body = draw(chunked_body())
        head += b"Transfer-Encoding: chunked\r\n"
    else:
        body = b""
    if version == b"HTTP/1.0":
        head += b"Connection: keep-alive\r\n"
    blank = draw(st.sampled_from([b"", b"", b"\r\n"]))
    return blank + head + b"\r\n" + body


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(requests(), min_size=1, max_size=3), st.lists(st.integers(0, 10_000), max_size=6))
def test_requests_give_what_llhttp_reports_field_by_field(
    messages: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(messages)
    oracle = _Oracle(response=False)
    parser = RequestParser()
    ours: list[object] = []
    for piece in _pieces(data, cuts):
        oracle.feed(piece)
        ours += parser.feed(piece)
    assert _ours(ours) == oracle.seen


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    out = b""
    if draw(st.booleans()):
        out += b"HTTP/1.1 100 Continue\r\n" + draw(field_lines(host=False)) + b"\r\n"
    status = draw(st.sampled_from([b"200", b"201", b"204", b"304", b"404", b"503"]))
    reason = draw(st.sampled_from([b" OK", b" ", b"", b"  Odd  reason ", b" \x80"]))
    out += b"HTTP/1.1 " + status + reason + b"\r\n" + draw(field_lines(host=False))
    framing = draw(st.sampled_from(["length", "chunked"]))
    if status in (b"204", b"304"):
        return out + b"\r\n"
    if framing == "length":
        body = draw(st.binary(max_size=30))
        return out + b"Content-Length: %d\r\n\r\n" % len(body) + body
    return out + b"Transfer-Encoding: chunked\r\n\r\n" + draw(chunked_body())


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(responses(), min_size=1, max_size=3), st.lists(st.integers(0, 10_000), max_size=6))
def test_responses_give_what_llhttp_reports_field_by_field(
    exchanges: list[bytes], cuts: list[int]
) -> None:
    parser = ResponseParser()  # one connection, one exchange after the other
    for data in exchanges:
        oracle = _Oracle(response=True)
        parser.expect(b"GET")
        ours: list[object] = []
        for piece in _pieces(data, cuts):
            oracle.feed(piece)
            ours += parser.feed(piece)
        seen = _ours(ours)
        if oracle.failed:
            assert seen == oracle.seen
            return
        assert seen == oracle.seen
        assert parser.done
        if parser.error is not None:  # Connection: close
            assert parser.error.reason == "connection not reusable"
            return


# -- the pieces ----------------------------------------------------------------


def test_rows_become_fields_as_llhttp_cuts_values() -> None:
    rows = [b"Host: a", b"X:  b  ", b"Y:\tc\t", b"Z:", b"W: x: y"]
    assert split_rows(rows) == [
        (b"Host", b"a"),
        (b"X", b"b  "),
        (b"Y", b"c\t"),
        (b"Z", b""),
        (b"W", b"x: y"),
    ]


def test_lines_are_name_colon_space_value_whatever_the_spacing_sent() -> None:
    data = b"GET / HTTP/1.1\r\nHost:a\r\nX:  b  \r\nY:\tc\r\nZ:\r\nV: \r\nU: u\r\n\r\n"
    (head, _) = RequestParser().feed(data)
    assert isinstance(head, RequestHead)
    assert _rows(head.lines) == [b"Host: a", b"X: b  ", b"Y: c", b"Z: ", b"V: ", b"U: u"]
    assert head.host == b"a"
    data = b"HTTP/1.1 200 OK\r\nA:1\r\nB:  2\r\nContent-Length:\t0\r\n\r\n"
    p = ResponseParser()
    p.expect(b"GET")
    resp = p.feed(data)[0]
    assert isinstance(resp, ResponseHead)
    assert _rows(resp.lines) == [b"A: 1", b"B: 2"] and resp.content_length == 0


def _rows(lines: list[bytes]) -> list[bytes]:
    """Header lines one per item (the block parser hands on runs of lines in one item)."""
    return [row for line in lines for row in line.split(b"\r\n")]


def test_rows_that_travel_as_received_go_as_one_slice_in_order() -> None:
    """Consecutive canonical rows are one item; a rewritten row, a dropped one or a
    framing one ends the run, and the order of the lines is kept."""
    data = (
        b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nKeep-Alive: 5\r\nC: 3\r\n"
        b"D:  4\r\nE: 5\r\nContent-Length: 0\r\nF: 6\r\nExpect: x\r\n\r\n"
    )
    (head, _) = RequestParser(blocks=True).feed(data)
    assert isinstance(head, RequestHead)
    assert head.lines == [
        b"Host: a\r\nA: 1\r\nB: 2",
        b"C: 3",
        b"D: 4",
        b"E: 5",
        b"F: 6\r\nExpect: x",
    ]
    assert head.host == b"a" and head.content_length == 0 and not head.expect_continue
    assert head.headers[3] == (b"Keep-Alive", b"5") and len(head.headers) == 10
    p = ResponseParser(blocks=True)
    p.expect(b"GET")
    data = b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nConnection: B\r\nContent-Length: 0\r\n\r\n"
    (resp, _) = p.feed(data)
    assert isinstance(resp, ResponseHead)
    assert resp.lines == [b"A: 1\r\nB: 2"] and resp.conn_tokens == frozenset({b"b"})
    assert without(resp.lines, resp.conn_tokens) == [b"A: 1"]


def test_interpreted_modules_say_so() -> None:
    def probe() -> None:
        pass

    assert not native(probe)


def test_take_head_across_feeds_and_after_blank_lines() -> None:
    carry = bytearray(b"GET / HTTP/1.1\r\nHost: a\r\n\r")
    assert take_head(carry, b"\nrest", 0) == (bytes(carry) + b"\n", 1)
    assert take_head(bytearray(), b"xx\r\n\r\nGET / HTTP/1.1\r\n\r\nbody", 2) == (
        b"GET / HTTP/1.1\r\n\r\n",
        24,
    )


def test_chunked_end_byte_by_byte() -> None:
    body = b"5;ext=1\r\nhello\r\n00000000000000000000a\r\n0123456789\r\n0\r\nT: 1\r\n\r\nNEXT"
    scan = ChunkedEnd()
    for i in range(len(body)):
        end = scan.advance(body[i : i + 1], 0, 1000)
        if end >= 0:
            assert body[: i + end] == body[: body.index(b"NEXT")]
            break
    else:
        raise AssertionError("no end found")
    assert scan.trailers == b"T: 1\r\n"


def test_chunked_end_bounds_the_trailer_section() -> None:
    assert ChunkedEnd().advance(b"0\r\nX: " + b"a" * 100, 0, 50) == TOO_LARGE


# -- behaviour around the block ----------------------------------------------------


def test_a_stray_blank_line_after_a_request_does_not_start_a_head() -> None:
    p = RequestParser()
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok\r\n")
    assert not p.in_head
    p.feed(b"GET / HT")
    assert p.in_head
    events = p.feed(b"TP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(events[0], RequestHead) and not p.in_head


def test_pipelined_requests_split_anywhere_give_the_same_events() -> None:
    data = (
        b"POST /1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
        b"PUT /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nwxyz"
        b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    whole = _ours(RequestParser().feed(data))
    assert [e[0] for e in whole].count("end") == 3
    for cut in range(1, len(data)):
        p = RequestParser()
        got = _ours(p.feed(data[:cut]) + p.feed(data[cut:]))
        merged: Seen = []
        for ev in got:  # a body cut in two comes out in two pieces
            if ev[0] == "body" and merged and merged[-1][0] == "body":
                merged[-1] = ("body", merged[-1][1] + ev[1])  # type: ignore[operator]
            else:
                merged.append(ev)
        assert merged == whole, cut


def test_a_long_target_in_pieces_is_414() -> None:
    p = RequestParser()
    p.feed(b"GET /")
    events: list[object] = []
    for _ in range(3):
        events += p.feed(b"a" * 4096)
    assert isinstance(events[-1], ProtocolError) and events[-1].status == 414


@pytest.mark.parametrize("head", [b"Content-Length: 0\r\n", b""])
def test_a_head_response_without_body_ends_once_and_keeps_the_connection(head: bytes) -> None:
    p = ResponseParser()
    p.expect(b"HEAD")
    status = b"200 OK" if head else b"204 No Content"
    events = p.feed(b"HTTP/1.1 " + status + b"\r\n" + head + b"\r\n")
    assert [type(e) for e in events] == [ResponseHead, EndOfMessage]
    assert p.error is None
    p.expect(b"GET")
    events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert [type(e) for e in events] == [ResponseHead, Body, EndOfMessage]


def test_bytes_after_the_final_response_are_a_second_response() -> None:
    p = ResponseParser()
    p.expect(b"GET")
    events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1 2")
    assert isinstance(events[-1], ProtocolError) and events[-1].status == 502
    p = ResponseParser()
    p.expect(b"GET")
    events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi\r\n")
    assert isinstance(events[-1], EndOfMessage) and p.error is None


def test_the_mode_under_test_is_the_one_in_use(parser_mode: str) -> None:
    blocks = parser_mode == "blocks"
    assert RequestParser()._blocks is blocks and ResponseParser()._blocks is blocks


@pytest.mark.parametrize("blocks", [True, False])
def test_a_closed_parser_is_freed_without_the_cycle_collector(blocks: bool) -> None:
    """httptools' parser holds the codec parser's bound callbacks: a cycle. ``close``
    (on connection loss) breaks it, so closed connections leave nothing for the cyclic
    collector, whose full collections otherwise grow with every closed connection."""
    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            req = RequestParser(blocks=blocks)
            assert req.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            req.close()
            resp = ResponseParser(blocks=blocks)
            resp.expect(b"GET")
            assert resp.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            resp.close()
        del req, resp
        assert gc.collect() == 0
    finally:
        gc.enable()
