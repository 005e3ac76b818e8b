"""Where a chunked body ends, and its trailer section, for bytes llhttp has accepted.

Theory of operation: the parsers feed llhttp everything they read and learn
where each message's head ends themselves (``block``). After a body they must
know where the next message starts, and a chunked body's end is not visible
through httptools (it reports de-chunked data, not positions), nor are its
trailer fields once the parsers have no ``on_header``. ``ChunkedEnd`` follows
the chunk framing alongside llhttp: a size line (hex digits, optional
extensions, CRLF), that many bytes and a CRLF, ..., a zero size line, then the
trailer section up to an empty line. It only ever scans bytes that llhttp has
already accepted, so it needs no validation of its own: llhttp refuses bad
sizes, missing CRLFs and malformed trailers before they get here. It keeps
only a size line's significant digits and a bounded trailer section.
"""

from __future__ import annotations

from typing import Final

_SIZE: Final = 0
_DATA: Final = 1
_TRAILERS: Final = 2
TOO_LARGE: Final = -2
UNREADABLE: Final = -3
_MAX_DIGITS: Final = 16  # significant hex digits: llhttp refuses sizes that overflow 64 bits


class ChunkedEnd:
    """Scans one chunked body, fed in pieces, for its end."""

    __slots__ = ("_digits", "_ext", "_left", "_state", "trailers")

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0
        self._digits = b""
        self._ext = False
        self.trailers = b""
        """The trailer section's field lines (each ending in CRLF), once the end is found."""

    def advance(self, data: bytes, pos: int, limit: int) -> int:
        """Scan ``data[pos:]``: the index just past the body's last byte if it
        ends there, -1 if it goes on, ``TOO_LARGE`` if the trailer section
        exceeds ``limit`` bytes, ``UNREADABLE`` if a size line cannot be read
        (llhttp would have refused it: a disagreement)."""
        n = len(data)
        while pos < n:
            state = self._state
            if state == _DATA:
                take = n - pos
                if take >= self._left:
                    pos += self._left
                    self._left = 0
                    self._state = _SIZE
                else:
                    self._left -= take
                    return -1
            elif state == _SIZE:
                nl = data.find(b"\n", pos)
                if not self._ext:
                    piece = data[pos:nl] if nl >= 0 else data[pos:]
                    cut = piece.find(b";")
                    if cut >= 0:
                        piece = piece[:cut]
                        self._ext = True
                    digits = (self._digits + piece.rstrip(b"\r")).lstrip(b"0")
                    if len(digits) > _MAX_DIGITS:
                        return UNREADABLE
                    self._digits = digits
                if nl < 0:
                    return -1
                pos = nl + 1
                try:
                    size = int(self._digits, 16) if self._digits else 0
                except ValueError:
                    return UNREADABLE
                self._digits = b""
                self._ext = False
                if size:
                    self._state = _DATA
                    self._left = size + 2  # the data, then its CRLF
                else:
                    self._state = _TRAILERS
            else:
                seen = self.trailers + data[pos:] if self.trailers else data[pos:]
                if len(seen) < 2:
                    self.trailers = seen
                    return -1
                if seen[0] == 13 and seen[1] == 10:  # an empty line: no trailers
                    self.trailers = b""
                    return pos + 2 - (len(seen) - (n - pos))
                end = seen.find(b"\r\n\r\n")
                if end < 0:
                    if len(seen) > limit:
                        return TOO_LARGE
                    self.trailers = seen
                    return -1
                if end + 2 > limit:
                    return TOO_LARGE
                self.trailers = seen[: end + 2]
                return n - (len(seen) - end - 4)
        return -1
