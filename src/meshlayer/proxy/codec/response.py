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

As in ``request``, heads come field by field (interpreted) or in one block
(compiled): then llhttp is given no ``on_header`` (nor ``on_status``,
``on_message_begin``) and the head block is split as in ``block``; ``_mark``
follows the framing, so bytes left after the final response (other than
blank lines) are refused as a second response.
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
    UNTIL_CLOSE,
    Body,
    EndOfMessage,
    Headers,
    ResponseHead,
    TunnelData,
    split_rows,
    tunnel_from,
)
from meshlayer.proxy.codec.fields import CLEN, CONN, PLAIN, TE, kind_table
from meshlayer.proxy.codec.request import MAX_HEADER_BYTES, MAX_HEADERS
from meshlayer.proxy.codec.serialize import NO_TOKENS, named_by_connection

_KINDS: Final = kind_table(False)
_KIND_OF: Final = _KINDS.kinds

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}  # by llhttp's version string


def _probe() -> None:
    """A native function when this module is compiled (see ``block.native``)."""


_NATIVE = native(_probe)  # not Final: tests switch modes on compiled modules too

# What the bytes after ``_mark`` belong to.
_HEAD: Final = 0  # the next head (or blank lines before it)
_LENGTH: Final = 1  # a Content-Length body, ``_left`` bytes of it
_CHUNKED: Final = 2  # a chunked body, followed by ``_chunks``
_TO_CLOSE: Final = 3  # a body delimited by the connection closing


class ResponseParser:
    """Bytes in, response events out, for one exchange at a time."""

    __slots__ = (
        "_blocks",
        "_buf",
        "_carry",
        "_chunks",
        "_clen",
        "_conn_tokens",
        "_data",
        "_events",
        "_expecting",
        "_feed",
        "_head_bytes",
        "_head_request",
        "_headers",
        "_in_body",
        "_in_trailers",
        "_keep_alive",
        "_keep_alive_of",
        "_left",
        "_lines",
        "_mark",
        "_parser",
        "_raised",
        "_reason",
        "_state",
        "_status",
        "_te",
        "_trailers",
        "done",
        "error",
        "tunnel",
    )

    def __init__(self, blocks: bool | None = None) -> None:
        """``blocks``: take each head in one block rather than field by field
        (default: when compiled)."""
        self._blocks = _NATIVE if blocks is None else blocks
        self._use(self._new_parser())
        self._events: list[object] = []
        self._raised: ProtocolError | None = None
        self._expecting = False
        self._head_request = False
        self._buf = b""
        self.error: ProtocolError | None = None
        self.tunnel = False
        self.done = False
        self._data = b""
        self._mark = 0
        self._carry = bytearray()
        self._state = _HEAD
        self._left = 0
        self._chunks: ChunkedEnd | None = None
        self._head_bytes = 0
        self._status = 0
        self._keep_alive = False
        self._in_body = False
        self._reset_message()

    def _new_parser(self) -> httptools.HttpResponseParser:
        cb = Callbacks()
        cb.on_body = self.on_body
        if self._blocks:  # llhttp calls back once per head
            cb.on_headers_complete = self._block_head
            cb.on_message_complete = self._block_end
        else:
            cb.on_message_begin = self._field_begin
            cb.on_status = self._field_status
            cb.on_header = self._field
            cb.on_headers_complete = self._field_head
            cb.on_message_complete = self._field_end
        return httptools.HttpResponseParser(cb)

    def _reset_message(self) -> None:
        self._headers: Headers = []
        self._lines: list[bytes] = []
        self._conn_tokens: frozenset[bytes] = NO_TOKENS
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
        if self._blocks:
            return self._state == _TO_CLOSE
        return self._in_body and self._clen < 0 and not self._te

    def _use(self, parser: httptools.HttpResponseParser) -> None:
        """Parse with ``parser`` (its ``feed_data`` and ``should_keep_alive`` looked up
        once, here)."""
        self._parser = parser
        self._feed = parser.feed_data
        self._keep_alive_of = parser.should_keep_alive

    def close(self) -> None:
        """The connection is gone: ``RequestParser.close``, for responses (the same
        reference cycle through httptools' parser, broken the same way)."""
        self._use(httptools.HttpResponseParser(Callbacks()))

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
        if not self._blocks:
            try:
                self._feed(data)
            except httptools.HttpParserUpgrade as exc:
                self.tunnel = True
                tunnel_from(data, exc.args[0], events)
            except httptools.HttpParserError as exc:
                return self._refused(exc)
            return events
        self._data = data
        self._mark = 0
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            self.tunnel = True
            tunnel_from(data, exc.args[0], events)
            return events
        except httptools.HttpParserError as exc:
            return self._refused(exc)
        finally:
            self._data = b""  # a read buffer is not kept past its feed
        mark = self._mark
        if mark < len(data):
            state = self._state
            if state == _HEAD:
                self._keep_head(data, mark)
            elif state == _LENGTH:
                self._left -= len(data) - mark
            elif state == _CHUNKED:
                self._follow_chunks(data, mark)
        return events

    def _keep_head(self, data: bytes, mark: int) -> None:
        """Keep the start of a head that is not complete yet, within the limit."""
        carry = self._carry
        if not carry:
            while mark < len(data) and data[mark] in (13, 10):
                mark += 1  # blank lines after a message: llhttp skips them
            if mark == len(data):
                return
            if not self._expecting:
                self._error(ProtocolError(502, "upstream sent a second response"))
                return
        carry += data[mark:] if mark else data
        if len(carry) > MAX_HEADER_BYTES:
            self._error(ProtocolError(502, "upstream header section too large"))

    def _follow_chunks(self, data: bytes, mark: int) -> None:
        chunks = self._chunks
        assert chunks is not None
        end = chunks.advance(data, mark, MAX_HEADER_BYTES - self._head_bytes)
        if end == TOO_LARGE:
            self._error(ProtocolError(502, "upstream header section too large"))
        elif end != -1:
            self._error(ProtocolError(502, "upstream chunked framing not understood"))

    def _feed_head_only(self) -> list[object]:
        events = self._events
        while self._expecting:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEADER_BYTES:
                    return self._error(ProtocolError(502, "upstream header section too large"))
                return events
            head, self._buf = self._buf[: end + 4], self._buf[end + 4 :]
            self._data = head
            self._mark = 0
            try:
                self._feed(head)
            except httptools.HttpParserError as exc:
                return self._refused(exc)
            finally:
                self._data = b""
        if self._buf:
            return self._error(ProtocolError(502, "upstream sent a body in a response to HEAD"))
        return events

    def feed_eof(self) -> list[object]:
        """The upstream closed its side: ends a close-delimited body, else is an error."""
        if self.error is not None or self.tunnel:
            return []
        self._events = []
        if self.until_close:
            self._state = _HEAD
            self._in_body = False
            self._finish(False, self._trailers)
            return self._events
        if self._expecting:
            return self._error(ProtocolError(502, "upstream closed before the response ended"))
        return []

    def _error(self, err: ProtocolError) -> list[object]:
        self.error = err
        self._events.append(err)
        return self._events

    def _refused(self, exc: Exception) -> list[object]:
        """llhttp refused the bytes (or a callback did, with ``_raised``)."""
        return self._error(self._raised or ProtocolError(502, f"bad upstream response: {exc}"))

    def _fail(self, reason: str) -> ProtocolError:
        self._raised = ProtocolError(502, reason)
        return self._raised

    def _finish(self, keep_alive: bool, trailers: list[tuple[bytes, bytes]] | None) -> None:
        self._events.append(END if not trailers else EndOfMessage(trailers))
        self._expecting = False
        self.done = True
        if not keep_alive:
            self.error = ProtocolError(502, "connection not reusable")

    # -- llhttp callbacks, field by field ---------------------------------

    def _field_begin(self) -> None:
        if not self._expecting:
            raise self._fail("upstream sent a second response")
        self._reset_message()

    def _field_status(self, reason: bytes) -> None:
        self._reason += reason

    def _field(self, name: bytes, value: bytes) -> None:
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

    def _field_head(self) -> None:
        p = self._parser
        status = p.get_status_code()
        version = _VERSIONS.get(p.get_http_version())
        if version is None:
            raise self._fail(f"upstream HTTP version {p.get_http_version()} not supported")
        if self._te and not self._te.lower().rstrip(b" \t").endswith(b"chunked"):
            raise self._fail("upstream Transfer-Encoding does not end in chunked")
        keep_alive = self._keep_alive_of()
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
            self._finish(keep_alive, None)
            self._use(self._new_parser())

    def _final(self, status: int) -> bool:
        """Whether the response that just ended, with ``status``, is the final one: an
        interim 1xx is not (the final one follows); nor is a 101, after which the
        connection is a tunnel (done, nothing more to parse)."""
        if 100 <= status < 200:
            if status == 101:
                self._expecting = False
                self.done = True
            return False
        return True

    def _field_end(self) -> None:
        if not self._expecting:
            return  # a response to HEAD, already ended in _field_head
        if not self._final(self._parser.get_status_code()):
            return
        trailers = self._trailers
        self._trailers = None
        self._in_trailers = False
        self._finish(self._keep_alive_of(), trailers)

    # -- llhttp callbacks, in blocks ----------------------------------------

    def _block_head(self) -> None:
        if not self._expecting:
            raise self._fail("upstream sent a second response")
        lines: list[bytes] = []
        wanted: list[bytes] = []
        wanted_kinds: list[int] = []
        line, block, fields_at, self._mark, count = take_fields(
            self._carry, self._data, self._mark, _KINDS, lines, wanted, wanted_kinds
        )
        size = self._head_bytes = len(block) - fields_at - 2
        if size > MAX_HEADER_BYTES:
            raise self._fail("upstream header section too large")
        if count > MAX_HEADERS:
            raise self._fail(f"upstream sent more than {MAX_HEADERS} header fields")
        p = self._parser
        # "HTTP/1.1 200 reason": the version, then three digits (llhttp checked them)
        sp = 0
        while line[sp] != 32:
            sp += 1
        status = (line[sp + 1] - 48) * 100 + (line[sp + 2] - 48) * 10 + line[sp + 3] - 48
        self._status = status
        version = version_at(line, sp)
        if version is None:
            raise self._fail(f"upstream HTTP version {p.get_http_version()} not supported")
        conn_tokens: frozenset[bytes] = NO_TOKENS
        clen = -1
        te = b""
        for j, row in enumerate(wanted):  # the fields whose values count (framing, Connection)
            kind = wanted_kinds[j]
            i, canon = cut_row(row)
            value = row[i + 2 :] if canon else row[i + 1 :].lstrip(b" \t")
            if kind == CLEN:
                clen = int(value)
            elif kind == TE:
                te = value
            elif kind == CONN:
                named = named_by_connection(value)
                if named:
                    conn_tokens |= named
        if te and not te.lower().rstrip(b" \t").endswith(b"chunked"):
            raise self._fail("upstream Transfer-Encoding does not end in chunked")
        keep_alive = self._keep_alive = self._keep_alive_of()
        head_request = self._head_request
        if 100 <= status < 200 or status in (204, 304) or head_request:
            framing, length = NO_BODY, clen
        elif te:
            framing, length = CHUNKED, 0
            self._state = _CHUNKED
            self._chunks = ChunkedEnd()
        elif clen >= 0:
            framing, length = LENGTH, clen
            self._state = _LENGTH
            self._left = clen
        else:
            framing, length = UNTIL_CLOSE, 0
            keep_alive = False
            self._state = _TO_CLOSE
        head = ResponseHead(
            status,
            line[sp + 5 :],
            version,
            None,
            keep_alive,
            framing,
            length,
            te,
        )
        head.block = block
        head.fields_at = fields_at
        head.lines = lines
        head.conn_tokens = conn_tokens
        self._events.append(head)
        if head_request and not (100 <= status < 200):
            # llhttp would wait for a body: end the message here and start afresh.
            self._finish(keep_alive, None)
            self._use(self._new_parser())

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def _block_end(self) -> None:
        if not self._expecting:
            return  # a response to HEAD, already ended in _block_head
        state = self._state
        self._state = _HEAD
        trailers: list[tuple[bytes, bytes]] | None = None
        if state == _LENGTH:
            self._mark += self._left
            self._left = 0
        elif state == _CHUNKED:
            trailers = self._end_chunks()
        if not self._final(self._status):
            return
        self._finish(self._keep_alive, trailers)

    def _end_chunks(self) -> list[tuple[bytes, bytes]] | None:
        chunks = self._chunks
        assert chunks is not None
        self._chunks = None
        end = chunks.advance(self._data, self._mark, MAX_HEADER_BYTES - self._head_bytes)
        if end == TOO_LARGE:
            raise self._fail("upstream header section too large")
        if end < 0:
            raise self._fail("upstream chunked framing not understood")
        self._mark = end
        if not chunks.trailers:
            return None
        return split_rows(chunks.trailers.split(b"\r\n")[:-1])
