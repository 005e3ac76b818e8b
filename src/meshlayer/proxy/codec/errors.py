"""Protocol errors carry the HTTP status to answer with (as h11's do)."""


class ProtocolError(Exception):
    """The peer broke HTTP/1.1 framing or limits.

    ``status`` is what a server answers (400, 431, 501, 505, ...); a client-side
    parser of responses uses 502. After a ProtocolError the connection is not
    reusable: the framing of whatever follows cannot be trusted.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"ProtocolError({self.status}, {self.reason!r})"
