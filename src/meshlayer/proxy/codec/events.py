"""The events the parsers produce.

Plain slotted classes rather than frozen dataclasses: they are made on the hot
path, and nothing mutates them after the parser hands them out.
"""

from __future__ import annotations

from typing import Final

Headers = list[tuple[bytes, bytes]]


def split_rows(rows: list[bytes]) -> Headers:
    """``name: value`` rows, as llhttp accepted them, into fields: the value
    without its leading spaces and tabs (trailing ones kept, as llhttp does)."""
    out: Headers = []
    for row in rows:
        name, _, value = row.partition(b":")
        out.append((name, value.lstrip(b" \t")))
    return out


def block_fields(block: bytes, at: int) -> Headers:
    """The fields of a head ``block`` (start line, rows, empty line) whose first row
    starts at ``at``."""
    end = len(block) - 4
    return split_rows(block[at:end].split(b"\r\n")) if at <= end else []


# How a message's body is delimited.
NO_BODY: Final = 0  # no body at all
LENGTH: Final = 1  # Content-Length
CHUNKED: Final = 2  # Transfer-Encoding ending in chunked
UNTIL_CLOSE: Final = 3  # responses only: read until the connection closes


class RequestHead:
    """A request line and header section, validated."""

    __slots__ = (
        "_headers",
        "block",
        "conn_tokens",
        "content_length",
        "expect_continue",
        "fields_at",
        "framing",
        "host",
        "keep_alive",
        "lines",
        "method",
        "picked",
        "target",
        "transfer_encoding",
        "upgrade",
        "version",
    )

    lines: list[bytes]
    """Header lines (``name: value``) that may travel to the next hop, in order:
    hop-by-hop fields, framing fields and the parser's watched names are left out
    (fields named in ``conn_tokens`` still need removing). An item may hold several
    consecutive lines joined by CRLF, as received (``block.scan_fields``)."""
    picked: dict[bytes, bytes]
    """Values of the parser's watched fields by lower-cased name (repeats joined by ", ")."""
    conn_tokens: frozenset[bytes]
    """Field names listed in Connection other than close, keep-alive and upgrade."""
    block: bytes
    """The head as received (block mode), from which ``headers`` is made when first
    asked for; its first field row starts at ``fields_at``."""
    fields_at: int

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Headers | None,
        keep_alive: bool,
        framing: int,
        content_length: int,
        transfer_encoding: bytes,
        host: bytes | None,
        upgrade: bytes | None,
        expect_continue: bool,
    ) -> None:
        self.method = method
        """Request method, e.g. ``b"GET"``."""
        self.target = target
        """Request target as sent: origin-form, absolute-form or ``*``."""
        self.version = version
        """``b"1.1"`` or ``b"1.0"``."""
        self._headers = headers
        self.keep_alive = keep_alive
        """The client allows the connection to be reused after this exchange."""
        self.framing = framing
        """NO_BODY, LENGTH or CHUNKED."""
        self.content_length = content_length
        """Body length when framing is LENGTH, else 0."""
        self.transfer_encoding = transfer_encoding
        """The Transfer-Encoding value (ends in chunked) when framing is CHUNKED."""
        self.host = host
        """The Host header value, if any."""
        self.upgrade = upgrade
        """The Upgrade header value when the client asks to switch protocols."""
        self.expect_continue = expect_continue
        """The client sent ``Expect: 100-continue``."""
        self.lines = []
        self.picked = {}
        self.conn_tokens = frozenset()
        self.block = b""
        self.fields_at = 0

    @property
    def headers(self) -> Headers:
        """Header fields in order, names as sent (made from ``block`` on first use:
        the proxy's own path reads ``lines`` and ``picked`` instead)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = block_fields(self.block, self.fields_at)
        return headers

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r}, {self.target!r}, framing={self.framing})"


class ResponseHead:
    """A status line and header section, validated."""

    __slots__ = (
        "_headers",
        "block",
        "conn_tokens",
        "content_length",
        "fields_at",
        "framing",
        "keep_alive",
        "lines",
        "reason",
        "status",
        "transfer_encoding",
        "version",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: bytes,
        headers: Headers | None,
        keep_alive: bool,
        framing: int,
        content_length: int,
        transfer_encoding: bytes,
    ) -> None:
        self.status = status
        """Status code."""
        self.reason = reason
        """Reason phrase as sent."""
        self.version = version
        """``b"1.1"`` or ``b"1.0"``."""
        self._headers = headers
        self.keep_alive = keep_alive
        """The server allows the connection to be reused."""
        self.framing = framing
        """NO_BODY, LENGTH, CHUNKED or UNTIL_CLOSE."""
        self.content_length = content_length
        """Body length when framing is LENGTH; with NO_BODY, the Content-Length sent
        (on HEAD or 304) or -1 when none was."""
        self.transfer_encoding = transfer_encoding
        """The Transfer-Encoding value when framing is CHUNKED."""
        self.lines: list[bytes] = []
        """End-to-end header lines, as in RequestHead."""
        self.conn_tokens: frozenset[bytes] = frozenset()
        """Extra field names listed in Connection, as in RequestHead."""
        self.block = b""
        """The head as received, as in RequestHead."""
        self.fields_at = 0

    @property
    def headers(self) -> Headers:
        """Header fields in order (made from ``block`` on first use)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = block_fields(self.block, self.fields_at)
        return headers

    def __repr__(self) -> str:
        return f"ResponseHead({self.status}, framing={self.framing})"


class Body:
    """A piece of a message body (de-chunked)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Body({len(self.data)} bytes)"


class EndOfMessage:
    """The message is complete; ``trailers`` holds a chunked body's trailer fields."""

    __slots__ = ("trailers",)

    def __init__(self, trailers: Headers | None = None) -> None:
        self.trailers = trailers

    def __repr__(self) -> str:
        return f"EndOfMessage(trailers={self.trailers!r})"


END: Final = EndOfMessage()
"""The end of a message without trailers: one shared instance, as events are never mutated."""


class TunnelData:
    """Bytes after an upgrade or CONNECT: no longer HTTP."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


Event = RequestHead | ResponseHead | Body | EndOfMessage | TunnelData


def tunnel_from(data: bytes, offset: int, events: list[object]) -> None:
    """After llhttp's HttpParserUpgrade at ``offset`` in ``data``: what follows is
    the tunnel's first bytes."""
    if offset < len(data):
        events.append(TunnelData(data[offset:]))
