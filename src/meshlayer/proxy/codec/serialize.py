"""Events in, bytes out: message heads for the next hop, and chunk framing.

A proxy re-frames every message it forwards: hop-by-hop fields (Connection
and the fields it names, Keep-Alive, TE, Trailer, Upgrade, Proxy-*,
Transfer-Encoding, Content-Length) are dropped from the incoming head and the
framing fields are written anew from the parsed framing, so what the next hop
sees never depends on how this hop read an ambiguous message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from meshlayer.proxy.codec.events import CHUNKED, LENGTH, Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"transfer-encoding",
        b"content-length",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# How the parsers treat a header field by lower-cased name (anything else is end-to-end).
OTHER: Final = 0
DROP: Final = 1
CONNECTION: Final = 2
CLASSIFY: dict[bytes, int] = dict.fromkeys(HOP_BY_HOP, DROP)
CLASSIFY[b"connection"] = CONNECTION
STANDARD_TOKENS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})
NO_TOKENS: Final[frozenset[bytes]] = frozenset()  # a head whose Connection names no fields


_NAMED: dict[bytes, frozenset[bytes]] = {}  # Connection value -> names; most repeat


def named_by_connection(value: bytes) -> frozenset[bytes]:
    """Field names a Connection value lists, other than the standard tokens."""
    named = _NAMED.get(value)
    if named is None:
        tokens = {t.strip().lower() for t in value.split(b",")}
        tokens.discard(b"")
        named = frozenset(tokens - STANDARD_TOKENS)
        if len(_NAMED) < 256:  # values come from peers: remember a bounded few
            _NAMED[value] = named
    return named


def without(lines: list[bytes], names: frozenset[bytes]) -> list[bytes]:
    """``lines`` minus the fields in ``names`` (lower-cased); an item of several
    lines joined by CRLF comes out as single lines."""
    return [
        row
        for line in lines
        for row in line.split(b"\r\n")
        if row.split(b":", 1)[0].lower() not in names
    ]


CRLF: Final = b"\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Lower-cased field names listed in Connection headers (RFC 9110 7.6.1)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def end_to_end(headers: Headers, drop: frozenset[bytes] = frozenset()) -> list[bytes]:
    """The header lines of ``headers`` that survive a hop, as ``name: value`` bytes.

    ``drop`` adds lower-cased names to remove (the mesh's own, or fields the
    caller rewrites).
    """
    named = connection_tokens(headers)
    out = []
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in named or lname in drop or lname.startswith(b"proxy-"):
            continue
        out.append(name + b": " + value)
    return out


def framing_lines(framing: int, length: int, transfer_encoding: bytes) -> list[bytes]:
    """The framing header lines for a body of the given framing."""
    if framing == LENGTH:
        return [b"content-length: " + str(length).encode()]
    if framing == CHUNKED:
        return [b"transfer-encoding: " + (transfer_encoding or b"chunked")]
    return []


def build_head(start_line: bytes, lines: Iterable[bytes]) -> bytes:
    """Join a start line and header lines into a head ending in a blank line."""
    return CRLF.join([start_line, *lines]) + b"\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: Headers | None) -> bytes:
    """The last chunk, with trailer fields that may travel end to end."""
    if not trailers:
        return LAST_CHUNK
    lines = end_to_end(trailers)
    if not lines:
        return LAST_CHUNK
    return b"0\r\n" + CRLF.join(lines) + b"\r\n\r\n"
