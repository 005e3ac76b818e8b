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
"""

from __future__ import annotations

import httptools

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
from meshlayer.proxy.codec.serialize import named_by_connection

MAX_HEADER_BYTES = 60 * 1024
MAX_HEADERS = 100
MAX_TARGET = 8 * 1024

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}


class RequestParser:
    """Bytes in, request events out.

    ``feed(data)`` returns a list of RequestHead, Body, EndOfMessage and
    TunnelData events, possibly ending with a ProtocolError (which is also
    remembered in ``error``).
    """

    __slots__ = (
        "_chunked",
        "_clen",
        "_conn_tokens",
        "_events",
        "_expect",
        "_head_bytes",
        "_head_raw",
        "_headers",
        "_host",
        "_hosts",
        "_in_head",
        "_in_trailers",
        "_kind_of",
        "_kinds",
        "_lines",
        "_max_header_bytes",
        "_max_headers",
        "_parser",
        "_picked",
        "_raised",
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
    ) -> None:
        """``watch``: lower-cased field names to hand out in ``RequestHead.picked``
        instead of ``lines`` (fields the caller rewrites)."""
        self._watch = watch
        self._kinds = kind_table(True, watch)
        self._kind_of = self._kinds.kinds
        self._parser = httptools.HttpRequestParser(self)
        self._max_header_bytes = max_header_bytes
        self._max_headers = max_headers
        self._events: list[object] = []
        self._raised: ProtocolError | None = None
        self.error: ProtocolError | None = None
        self.tunnel = False
        self._in_head = False
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: Headers = []
        self._lines: list[bytes] = []
        self._picked: dict[bytes, bytes] = {}
        self._conn_tokens: frozenset[bytes] = frozenset()
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
        return self._in_head

    def feed(self, data: bytes) -> list[object]:
        """Parse ``data``; return the events it completes."""
        if self.tunnel:
            return [TunnelData(data)] if data else []
        if self.error is not None:
            return []
        events = self._events = []
        was_in_head = self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.tunnel = True
            rest = data[exc.args[0] :]
            if rest:
                events.append(TunnelData(rest))
        except httptools.HttpParserError as exc:
            err = self._raised or ProtocolError(400, _reason(exc))
            self.error = err
            events.append(err)
            return events
        if self._in_head and was_in_head:
            self._head_raw += len(data)
        if self._in_head and self._head_raw > self._max_header_bytes:
            # A single enormous header line never reaches on_header: bound it here.
            self.error = ProtocolError(431, "request header section too large")
            events.append(self.error)
        return events

    def _fail(self, status: int, reason: str) -> ProtocolError:
        self._raised = ProtocolError(status, reason)
        return self._raised

    # -- llhttp callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_message()
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_TARGET:
            raise self._fail(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
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

    def on_headers_complete(self) -> None:
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
            p.should_keep_alive(),
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

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        trailers = self._trailers
        self._events.append(END if trailers is None else EndOfMessage(trailers))
        self._trailers = None
        self._in_trailers = False


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.replace("`", "")
