"""Strict HTTP/1.1 response parsing on top of llhttp (httptools).

Theory of operation: one parser reads the responses of one upstream
connection, one exchange at a time. Before each request is sent the caller
says which method it used (``expect``), because a response to HEAD has no body
whatever its Content-Length says, and httptools offers no way to tell llhttp
so. For HEAD we therefore feed llhttp only up to the end of each header
section and end the message ourselves, starting a fresh llhttp parser for the
next exchange. Interim 1xx responses (other than 101) come out as ResponseHead
events before the final one. Bytes that arrive when no response is expected,
or framing llhttp refuses, or a Transfer-Encoding that does not end in
``chunked``, give a ProtocolError with status 502: the connection must not be
reused. A response with neither Content-Length nor chunked is delimited by
the connection closing: ``feed_eof`` ends it.
"""

from __future__ import annotations

import httptools

from meshlayer.proxy.codec.errors import ProtocolError
from meshlayer.proxy.codec.events import (
    CHUNKED,
    END,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    Body,
    EndOfMessage,
    Headers,
    ResponseHead,
    TunnelData,
)
from meshlayer.proxy.codec.fields import CLEN, CONN, PLAIN, TE, kind_table
from meshlayer.proxy.codec.request import MAX_HEADER_BYTES, MAX_HEADERS
from meshlayer.proxy.codec.serialize import named_by_connection

_KINDS = kind_table(False)
_KIND_OF = _KINDS.kinds

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}


class ResponseParser:
    """Bytes in, response events out, for one exchange at a time."""

    __slots__ = (
        "_buf",
        "_clen",
        "_conn_tokens",
        "_events",
        "_expecting",
        "_head_bytes",
        "_head_request",
        "_headers",
        "_in_body",
        "_in_trailers",
        "_lines",
        "_parser",
        "_raised",
        "_reason",
        "_te",
        "_trailers",
        "done",
        "error",
        "tunnel",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._events: list[object] = []
        self._raised: ProtocolError | None = None
        self._expecting = False
        self._head_request = False
        self._buf = b""
        self._in_body = False
        self.error: ProtocolError | None = None
        self.tunnel = False
        self.done = False
        self._reset_message()

    def _reset_message(self) -> None:
        self._headers: Headers = []
        self._lines: list[bytes] = []
        self._conn_tokens: frozenset[bytes] = frozenset()
        self._reason = b""
        self._clen = -1
        self._te = b""
        self._head_bytes = 0
        self._in_trailers = False
        self._trailers: Headers | None = None

    def expect(self, method: bytes) -> None:
        """Arm the parser for the response to a request with ``method``."""
        self._expecting = True
        self.done = False
        self._head_request = method == b"HEAD"

    @property
    def until_close(self) -> bool:
        """The current response's body ends when the connection closes."""
        return self._in_body and self._clen < 0 and not self._te

    def feed(self, data: bytes) -> list[object]:
        """Parse ``data``; return the events it completes."""
        if self.tunnel:
            return [TunnelData(data)] if data else []
        if self.error is not None:
            return []
        events = self._events = []
        if not self._expecting:
            return self._error(ProtocolError(502, "upstream sent data with no request pending"))
        if self._head_request:
            self._buf += data
            return self._feed_head_only()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.tunnel = True
            rest = data[exc.args[0] :]
            if rest:
                events.append(TunnelData(rest))
        except httptools.HttpParserError as exc:
            return self._error(self._raised or ProtocolError(502, f"bad upstream response: {exc}"))
        return events

    def _feed_head_only(self) -> list[object]:
        events = self._events
        while self._expecting:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEADER_BYTES:
                    return self._error(ProtocolError(502, "upstream header section too large"))
                return events
            head, self._buf = self._buf[: end + 4], self._buf[end + 4 :]
            try:
                self._parser.feed_data(head)
            except httptools.HttpParserError as exc:
                return self._error(
                    self._raised or ProtocolError(502, f"bad upstream response: {exc}")
                )
        if self._buf:
            return self._error(ProtocolError(502, "upstream sent a body in a response to HEAD"))
        return events

    def feed_eof(self) -> list[object]:
        """The upstream closed its side: ends a close-delimited body, else is an error."""
        if self.error is not None or self.tunnel:
            return []
        self._events = []
        if self.until_close:
            self._in_body = False
            self._finish(keep_alive=False)
            return self._events
        if self._expecting:
            return self._error(ProtocolError(502, "upstream closed before the response ended"))
        return []

    def _error(self, err: ProtocolError) -> list[object]:
        self.error = err
        self._events.append(err)
        return self._events

    def _fail(self, reason: str) -> ProtocolError:
        self._raised = ProtocolError(502, reason)
        return self._raised

    def _finish(self, keep_alive: bool) -> None:
        trailers = self._trailers
        self._events.append(END if trailers is None else EndOfMessage(trailers))
        self._expecting = False
        self.done = True
        if not keep_alive:
            self.error = ProtocolError(502, "connection not reusable")

    # -- llhttp callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        if not self._expecting:
            raise self._fail("upstream sent a second response")
        self._reset_message()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._head_bytes = self._head_bytes + len(name) + len(value) + 4
        if size > MAX_HEADER_BYTES:
            raise self._fail("upstream header section too large")
        if self._in_trailers:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
            return
        headers = self._headers
        headers.append((name, value))
        if len(headers) > MAX_HEADERS:
            raise self._fail(f"upstream sent more than {MAX_HEADERS} header fields")
        kind = _KIND_OF.get(name)
        if kind is None:
            kind = _KINDS.classify(name)
        if kind == PLAIN:
            self._lines.append(name + b": " + value)
        elif kind == CLEN:
            self._clen = int(value)
        elif kind == TE:
            self._te = value
        elif kind == CONN:
            named = named_by_connection(value)
            if named:
                self._conn_tokens |= named

    def on_headers_complete(self) -> None:
        p = self._parser
        status = p.get_status_code()
        version = _VERSIONS.get(p.get_http_version())
        if version is None:
            raise self._fail(f"upstream HTTP version {p.get_http_version()} not supported")
        if self._te and not self._te.lower().rstrip(b" \t").endswith(b"chunked"):
            raise self._fail("upstream Transfer-Encoding does not end in chunked")
        keep_alive = p.should_keep_alive()
        if 100 <= status < 200 or status in (204, 304) or self._head_request:
            framing, length = NO_BODY, self._clen
        elif self._te:
            framing, length = CHUNKED, 0
        elif self._clen >= 0:
            framing, length = LENGTH, self._clen
        else:
            framing, length = UNTIL_CLOSE, 0
            keep_alive = False
        self._in_trailers = framing == CHUNKED
        self._in_body = framing == UNTIL_CLOSE
        head = ResponseHead(
            status,
            self._reason,
            version,
            self._headers,
            keep_alive,
            framing,
            length,
            self._te,
        )
        head.lines = self._lines
        head.conn_tokens = self._conn_tokens
        self._events.append(head)
        if self._head_request and not (100 <= status < 200):
            # llhttp would wait for a body: end the message here and start afresh.
            self._finish(keep_alive)
            self._parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # an interim response: the final one follows
        if status == 101:
            self._expecting = False
            self.done = True
            return
        self._finish(self._parser.should_keep_alive())
