"""Strict HTTP/1.1 request parsing on top of llhttp (httptools).

Theory of operation: llhttp, in its strict default mode (we never turn on a
leniency), already refuses most smuggling vectors: Content-Length with
Transfer-Encoding, duplicate or malformed Content-Length, a Transfer-Encoding
whose last coding is not ``chunked``, obs-fold, bare CR or LF, invalid token
characters, bad chunk sizes. This module adds what llhttp leaves to its
caller: limits on the header section (431), the HTTP version (505), a single
Host, CONNECT (we are not a forward tunnel), and it turns callbacks into a
list of events per ``feed``. A ProtocolError is returned as the last event of
the feed that found it, after the events that preceded it, so a pipelined
good request is still answered before the bad one is refused; after it the
parser accepts nothing more.

Two ways to receive a head, one contract (``blocks``, chosen by how the
module runs; the tests run both against llhttp's own field-by-field view):

* field by field (interpreted, the default there): llhttp calls
  ``on_header`` per field and the parser classifies each as it comes. In
  CPython httptools' C splitting plus one call per field is the cheapest;
* in one block (compiled by mypyc, the default there): llhttp is given no
  ``on_header`` (nor ``on_url``, ``on_message_begin``), calls Python once per
  head, and the parser splits the head block itself (see ``block``): a call
  from C into compiled code costs more than the splitting. Every byte still
  goes through llhttp, all of a feed in one call; the parser keeps ``_mark``,
  where in the current feed the next head starts, from what it knows of each
  message's framing (``chunked`` follows chunked bodies and finds their
  trailers), and keeps the first bytes of a head that is not complete yet.
"""

from __future__ import annotations

from typing import Final

import httptools

from meshlayer.proxy.codec.block import (
    Callbacks,
    cut_row,
    native,
    take_fields,
    version_at,
)
from meshlayer.proxy.codec.chunked import TOO_LARGE, ChunkedEnd
from meshlayer.proxy.codec.errors import ProtocolError
from meshlayer.proxy.codec.events import (
    CHUNKED,
    END,
    LENGTH,
    NO_BODY,
    Body,
    EndOfMessage,
    Headers,
    RequestHead,
    TunnelData,
    split_rows,
    tunnel_from,
)
from meshlayer.proxy.codec.fields import (
    CLEN,
    CONN,
    EXPECT,
    HOST,
    PLAIN,
    TE,
    UPGRADE,
    WATCHED,
    kind_table,
)
from meshlayer.proxy.codec.serialize import NO_TOKENS, named_by_connection

MAX_HEADER_BYTES: Final = 60 * 1024
MAX_HEADERS: Final = 100
MAX_TARGET: Final = 8 * 1024

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}  # by llhttp's version string


def _probe() -> None:
    """A native function when this module is compiled (see ``block.native``)."""


_NATIVE = native(_probe)  # not Final: tests switch modes on compiled modules too

# What the bytes after ``_mark`` belong to.
_HEAD: Final = 0  # the next head (or blank lines before it)
_LENGTH: Final = 1  # a Content-Length body, ``_left`` bytes of it
_CHUNKED: Final = 2  # a chunked body, followed by ``_chunks``


class RequestParser:
    """Bytes in, request events out.

    ``feed(data)`` returns a list of RequestHead, Body, EndOfMessage and
    TunnelData events, possibly ending with a ProtocolError (which is also
    remembered in ``error``).
    """

    __slots__ = (
        "_blocks",
        "_carry",
        "_chunked",
        "_chunks",
        "_clen",
        "_conn_tokens",
        "_data",
        "_events",
        "_expect",
        "_feed",
        "_head_bytes",
        "_head_raw",
        "_headers",
        "_host",
        "_hosts",
        "_in_head",
        "_in_trailers",
        "_keep_alive_of",
        "_kind_of",
        "_kinds",
        "_left",
        "_lines",
        "_mark",
        "_max_header_bytes",
        "_max_headers",
        "_parser",
        "_picked",
        "_raised",
        "_state",
        "_te",
        "_trailers",
        "_upgrade",
        "_url",
        "_watch",
        "error",
        "tunnel",
    )

    def __init__(
        self,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_headers: int = MAX_HEADERS,
        watch: frozenset[bytes] = frozenset(),
        blocks: bool | None = None,
    ) -> None:
        """``watch``: lower-cased field names to hand out in ``RequestHead.picked``
        instead of ``lines`` (fields the caller rewrites). ``blocks``: take each
        head in one block rather than field by field (default: when compiled)."""
        self._watch = watch
        self._kinds = kind_table(True, watch)
        self._kind_of = self._kinds.kinds
        self._blocks = _NATIVE if blocks is None else blocks
        cb = Callbacks()
        cb.on_body = self.on_body
        if self._blocks:  # llhttp calls back once per head
            cb.on_headers_complete = self._block_head
            cb.on_message_complete = self._block_end
        else:
            cb.on_message_begin = self._field_begin
            cb.on_url = self._field_url
            cb.on_header = self._field
            cb.on_headers_complete = self._field_head
            cb.on_message_complete = self._field_end
        self._use(httptools.HttpRequestParser(cb))
        self._max_header_bytes = max_header_bytes
        self._max_headers = max_headers
        self._events: list[object] = []
        self._raised: ProtocolError | None = None
        self.error: ProtocolError | None = None
        self.tunnel = False
        self._data = b""
        self._mark = 0
        self._carry = bytearray()
        self._state = _HEAD
        self._left = 0
        self._chunks: ChunkedEnd | None = None
        self._head_bytes = 0
        self._in_head = False
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: Headers = []
        self._lines: list[bytes] = []
        self._picked: dict[bytes, bytes] = {}
        self._conn_tokens: frozenset[bytes] = NO_TOKENS
        self._head_bytes = 0
        self._head_raw = 0
        self._clen = -1
        self._te = b""
        self._chunked = False
        self._host: bytes | None = None
        self._hosts = 0
        self._upgrade: bytes | None = None
        self._expect = False
        self._in_trailers = False
        self._trailers: Headers | None = None

    @property
    def in_head(self) -> bool:
        """A request head has started but is not complete (header-read timer runs)."""
        return len(self._carry) > 0 if self._blocks else self._in_head

    def _use(self, parser: httptools.HttpRequestParser) -> None:
        """Parse with ``parser`` (its ``feed_data`` and ``should_keep_alive`` looked up
        once, here)."""
        self._parser = parser
        self._feed = parser.feed_data
        self._keep_alive_of = parser.should_keep_alive

    def close(self) -> None:
        """The connection is gone. httptools' parser holds this one's bound callbacks
        and this one holds it: a reference cycle, left to the cyclic collector, whose
        full collections then grow with every closed connection (2,000 connections
        closed at once: one 14 ms pause, 18,542 objects, measured). A parser without
        callbacks takes its place, and both are freed as soon as they are dropped."""
        self._use(httptools.HttpRequestParser(Callbacks()))

    def feed(self, data: bytes) -> list[object]:
        """Parse ``data``; return the events it completes."""
        if self.tunnel:
            return [TunnelData(data)] if data else []
        if self.error is not None:
            return []
        events = self._events = []
        if self._blocks:
            return self._feed_blocks(data, events)
        was_in_head = self._in_head
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            self.tunnel = True
            tunnel_from(data, exc.args[0], events)
        except httptools.HttpParserError as exc:
            self._error(self._raised or ProtocolError(400, _reason(exc)))
            return events
        if self._in_head and was_in_head:
            self._head_raw += len(data)
        if self._in_head and self._head_raw > self._max_header_bytes:
            # A single enormous header line never reaches on_header: bound it here.
            self.error = ProtocolError(431, "request header section too large")
            events.append(self.error)
        return events

    def _feed_blocks(self, data: bytes, events: list[object]) -> list[object]:
        self._data = data
        self._mark = 0
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            self.tunnel = True
            tunnel_from(data, exc.args[0], events)
            return events
        except httptools.HttpParserError as exc:
            self._error(self._raised or ProtocolError(400, _reason(exc)))
            return events
        finally:
            self._data = b""  # a read buffer is not kept past its feed
        mark = self._mark
        if mark < len(data):
            state = self._state
            if state == _HEAD:
                self._keep_head(data, mark)
            elif state == _LENGTH:
                self._left -= len(data) - mark
            else:
                self._follow_chunks(data, mark)
        return events

    def _keep_head(self, data: bytes, mark: int) -> None:
        """Keep the start of a head that is not complete yet, within the limits."""
        carry = self._carry
        if carry:
            carry += data[mark:] if mark else data
        else:
            while mark < len(data) and data[mark] in (13, 10):
                mark += 1  # blank lines between messages: llhttp skips them
            carry += data[mark:] if mark else data
        if len(carry) > MAX_TARGET and _target_length(carry) > MAX_TARGET:
            self._error(ProtocolError(414, "request target too long"))
        elif len(carry) > self._max_header_bytes:
            # A single enormous header line never completes: bound it here.
            self._error(ProtocolError(431, "request header section too large"))

    def _follow_chunks(self, data: bytes, mark: int) -> None:
        chunks = self._chunks
        assert chunks is not None
        end = chunks.advance(data, mark, self._max_header_bytes - self._head_bytes)
        if end == TOO_LARGE:
            self._error(ProtocolError(431, "trailer section too large"))
        elif end != -1:
            self._error(ProtocolError(400, "chunked body framing not understood"))

    def _error(self, err: ProtocolError) -> None:
        self.error = err
        self._events.append(err)

    def _fail(self, status: int, reason: str) -> ProtocolError:
        self._raised = ProtocolError(status, reason)
        return self._raised

    # -- llhttp callbacks, field by field ---------------------------------

    def _field_begin(self) -> None:
        self._reset_message()
        self._in_head = True

    def _field_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_TARGET:
            raise self._fail(414, "request target too long")

    def _field(self, name: bytes, value: bytes) -> None:
        if self._in_trailers:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
            self._head_bytes += len(name) + len(value) + 4
            if self._head_bytes > self._max_header_bytes:
                raise self._fail(431, "trailer section too large")
            return
        headers = self._headers
        headers.append((name, value))
        size = self._head_bytes = self._head_bytes + len(name) + len(value) + 4
        if size > self._max_header_bytes or len(headers) > self._max_headers:
            if len(headers) > self._max_headers:
                raise self._fail(431, f"more than {self._max_headers} header fields")
            raise self._fail(431, "request header section too large")
        kind = self._kind_of.get(name)
        if kind is None:
            kind = self._kinds.classify(name)
        if kind == PLAIN:
            self._lines.append(name + b": " + value)
        elif kind == HOST:
            self._lines.append(name + b": " + value)
            self._hosts += 1
            self._host = value
        elif kind == WATCHED:
            lname = name.lower()
            old = self._picked.get(lname)
            self._picked[lname] = value if old is None else old + b", " + value
        elif kind == CLEN:
            self._clen = int(value)  # llhttp has checked it is digits only, and single
        elif kind == TE:
            self._te = value
        elif kind == UPGRADE:
            self._upgrade = value
        elif kind == CONN:
            named = named_by_connection(value)
            if named:
                self._conn_tokens |= named
        elif kind == EXPECT:
            self._lines.append(name + b": " + value)
            if value.lower() == b"100-continue":
                self._expect = True

    def _field_head(self) -> None:
        p = self._parser
        self._in_head = False
        version = _VERSIONS.get(p.get_http_version())
        if version is None:
            raise self._fail(505, f"HTTP version {p.get_http_version()} not supported")
        method = p.get_method()
        if method == b"CONNECT":
            raise self._fail(405, "CONNECT is not supported")
        if self._hosts > 1:
            raise self._fail(400, "more than one Host header")
        if self._hosts == 0 and version == b"1.1":
            raise self._fail(400, "HTTP/1.1 request without Host")
        if self._te:
            framing, length = CHUNKED, 0  # llhttp ensured the last coding is chunked
        elif self._clen > 0:
            framing, length = LENGTH, self._clen
        else:
            framing, length = NO_BODY, 0
        upgrade = self._upgrade if p.should_upgrade() else None
        self._in_trailers = framing == CHUNKED
        head = RequestHead(
            method,
            self._url,
            version,
            self._headers,
            self._keep_alive_of(),
            framing,
            length,
            self._te,
            self._host,
            upgrade,
            self._expect,
        )
        head.lines = self._lines
        head.picked = self._picked
        head.conn_tokens = self._conn_tokens
        self._events.append(head)

    def _field_end(self) -> None:
        trailers = self._trailers
        self._events.append(END if trailers is None else EndOfMessage(trailers))
        self._trailers = None
        self._in_trailers = False

    # -- llhttp callbacks, in blocks ----------------------------------------

    def _block_head(self) -> None:
        lines: list[bytes] = []
        wanted: list[bytes] = []
        wanted_kinds: list[int] = []
        line, block, fields_at, self._mark, count = take_fields(
            self._carry, self._data, self._mark, self._kinds, lines, wanted, wanted_kinds
        )
        sp = 0
        while line[sp] != 32:
            sp += 1
        method = line[:sp]
        n = len(line)  # llhttp accepted "METHOD SP target SP HTTP/x.y": n >= 12
        target = line[sp + 1 : n - 9 if line[n - 9] == 32 else line.rfind(b" ")]
        if target[:1] == b" ":
            target = target.lstrip(b" ")  # llhttp allows more spaces after the method
        if len(target) > MAX_TARGET:
            raise self._fail(414, "request target too long")
        if count > self._max_headers:
            raise self._fail(431, f"more than {self._max_headers} header fields")
        size = self._head_bytes = len(block) - fields_at - 2
        if size > self._max_header_bytes:
            raise self._fail(431, "request header section too large")
        version = version_at(line, n)
        if version is None:
            raise self._fail(505, f"HTTP version {self._parser.get_http_version()} not supported")
        if method == b"CONNECT":
            raise self._fail(405, "CONNECT is not supported")
        picked: dict[bytes, bytes] = {}
        conn_tokens: frozenset[bytes] = NO_TOKENS
        hosts = 0
        host: bytes | None = None
        clen = -1
        te = b""
        upgrade: bytes | None = None
        expect = False
        for j, row in enumerate(wanted):  # the fields whose values count (Host, framing, ...)
            kind = wanted_kinds[j]
            i, canon = cut_row(row)
            value = row[i + 2 :] if canon else row[i + 1 :].lstrip(b" \t")
            if kind == HOST:
                hosts += 1
                host = value
            elif kind == WATCHED:
                lname = row[:i].lower()
                old = picked.get(lname)
                picked[lname] = value if old is None else old + b", " + value
            elif kind == CLEN:
                clen = int(value)  # llhttp has checked it is digits only, and single
            elif kind == TE:
                te = value
            elif kind == UPGRADE:
                upgrade = value
            elif kind == CONN:
                named = named_by_connection(value)
                if named:
                    conn_tokens |= named
            elif kind == EXPECT and value.lower() == b"100-continue":
                expect = True
        if hosts > 1:
            raise self._fail(400, "more than one Host header")
        if hosts == 0 and version == b"1.1":
            raise self._fail(400, "HTTP/1.1 request without Host")
        if te:
            framing, length = CHUNKED, 0  # llhttp ensured the last coding is chunked
            self._state = _CHUNKED
            self._chunks = ChunkedEnd()
        elif clen > 0:
            framing, length = LENGTH, clen
            self._state = _LENGTH
            self._left = clen
        else:
            framing, length = NO_BODY, 0
        p = self._parser
        head = RequestHead(
            method,
            target,
            version,
            None,
            self._keep_alive_of(),
            framing,
            length,
            te,
            host,
            upgrade if upgrade is not None and p.should_upgrade() else None,
            expect,
        )
        head.block = block
        head.fields_at = fields_at
        head.lines = lines
        head.picked = picked
        head.conn_tokens = conn_tokens
        self._events.append(head)

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def _block_end(self) -> None:
        state = self._state
        self._state = _HEAD
        if state == _HEAD:
            self._events.append(END)
        elif state == _LENGTH:
            self._mark += self._left
            self._left = 0
            self._events.append(END)
        else:
            self._end_chunks()

    def _end_chunks(self) -> None:
        chunks = self._chunks
        assert chunks is not None
        self._chunks = None
        end = chunks.advance(self._data, self._mark, self._max_header_bytes - self._head_bytes)
        if end == TOO_LARGE:
            raise self._fail(431, "trailer section too large")
        if end < 0:
            raise self._fail(400, "chunked body framing not understood")
        self._mark = end
        if chunks.trailers:
            self._events.append(EndOfMessage(split_rows(chunks.trailers.split(b"\r\n")[:-1])))
        else:
            self._events.append(END)


def _target_length(head: bytearray) -> int:
    """The length of the request target so far in an incomplete head."""
    eol = head.find(b"\r\n")
    line = head if eol < 0 else head[:eol]
    sp = line.find(b" ")
    if sp < 0:
        return 0
    while sp < len(line) and line[sp] == 32:
        sp += 1
    end = line.find(b" ", sp)
    return (len(line) if end < 0 else end) - sp


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.replace("`", "")
