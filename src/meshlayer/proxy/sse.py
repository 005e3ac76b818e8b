"""Server-sent events, sans-I/O: body bytes in, events out.

Theory of operation (the WHATWG ``text/event-stream`` rules, trimmed to what
the control plane sends): the stream is UTF-8 lines ending in LF, CRLF or CR.
``field: value`` lines accumulate into the current event; a blank line
dispatches it; lines starting with ``:`` are comments (keep-alives). ``data``
lines are joined with LF. An event with no data is dropped, as browsers do.
A line longer than ``max_line`` bytes is a protocol error: the peer is not
speaking SSE, and buffering it forever would be a memory leak.
"""

from __future__ import annotations

from dataclasses import dataclass


class SSEError(Exception):
    """The stream is not a valid event stream."""


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event."""

    event: str
    """The ``event:`` field (``message`` when absent)."""
    data: str
    """The ``data:`` lines, joined with LF."""
    id: str | None = None
    """The ``id:`` field, if any."""


class SSEDecoder:
    """Feeds bytes, returns complete events."""

    def __init__(self, max_line: int = 16 * 1024 * 1024) -> None:
        self.max_line = max_line
        self._buf = b""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self.comments = 0
        """Comment lines seen (keep-alives)."""

    def feed(self, data: bytes) -> list[Event]:
        """Decode ``data``; return the events it completes. Raises SSEError."""
        self._buf += data
        events: list[Event] = []
        while True:
            lf, cr = self._buf.find(b"\n"), self._buf.find(b"\r")
            cut = lf if cr < 0 else cr if lf < 0 else min(lf, cr)
            if cut < 0:
                if len(self._buf) > self.max_line:
                    raise SSEError(f"event-stream line longer than {self.max_line} bytes")
                return events
            if self._buf[cut] == 13:
                if cut + 1 == len(self._buf):
                    return events  # wait: CR may be the first half of CRLF
                skip = 2 if self._buf[cut + 1] == 10 else 1
            else:
                skip = 1
            line, self._buf = self._buf[:cut], self._buf[cut + skip :]
            ev = self._line(line)
            if ev is not None:
                events.append(ev)

    def _line(self, raw: bytes) -> Event | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SSEError(f"event-stream line is not UTF-8: {exc}") from None
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None  # "retry" and unknown fields are ignored

    def _dispatch(self) -> Event | None:
        event, data, ident = self._event, self._data, self._id
        self._event, self._data = "", []
        if not data:
            return None
        return Event(event or "message", "\n".join(data), ident)
