"""An upstream connection: a thin asyncio.Protocol around a ResponseParser.

It serves one exchange at a time (``attach``/``detach``) and passes the
parser's events straight to it. Flow control is the exchange's business: it
pauses this transport's reading when the client is slow, and is told when
this transport's write buffer is full.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshlayer.proxy.codec import Body, EndOfMessage, ProtocolError, ResponseHead, TunnelData
from meshlayer.proxy.codec.response import ResponseParser

if TYPE_CHECKING:
    from meshlayer.proxy.balancer import EndpointState
    from meshlayer.proxy.exchange import Exchange
    from meshlayer.proxy.pool import ServicePool


def unconnected(data: bytes) -> None:
    """What a connection's ``send`` is before ``connection_made``."""
    raise RuntimeError("write before connection_made")


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to one endpoint."""

    __slots__ = (
        "closed",
        "endpoint",
        "exchange",
        "idle_since",
        "parser",
        "pool",
        "reading_paused",
        "requests",
        "send",
        "transport",
    )

    def __init__(self, pool: ServicePool, endpoint: EndpointState) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.send: Callable[[bytes], object] = unconnected
        """``transport.write``, looked up once."""
        self.parser = ResponseParser()
        self.exchange: Exchange | None = None
        self.closed = False
        self.reading_paused = False
        self.requests = 0
        self.idle_since = 0.0

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("active" if self.exchange else "idle")
        addr = self.endpoint.endpoint.address
        return f"<UpstreamConnection {addr} {state} requests={self.requests}>"

    # -- used by the exchange ------------------------------------------------

    def attach(self, exchange: Exchange, method: bytes) -> None:
        self.exchange = exchange
        self.requests += 1
        self.parser.expect(method)

    @property
    def reusable(self) -> bool:
        """The last exchange ended cleanly and the server keeps the connection open."""
        p = self.parser
        return not self.closed and p.done and p.error is None and not p.tunnel

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.send(data)

    def write_eof(self) -> None:
        """Half-close: the peer reads an end of stream, and may still answer."""
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close now; whatever was attached is detached first and not told."""
        self.exchange = None
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        self.exchange = None
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.send = transport.write

    def data_received(self, data: bytes) -> None:
        events = self.parser.feed(data)
        ex = self.exchange
        if ex is None or len(events) < 2:
            self._dispatch(events)
            return
        down = ex.down
        down.cork()
        try:
            self._dispatch(events)
        finally:
            down.uncork()

    def _dispatch(self, events: list[object]) -> None:
        for ev in events:
            ex = self.exchange
            if ex is None:
                # Nothing attached (idle, or the exchange gave up): not reusable.
                self.close()
                return
            t = type(ev)
            if t is Body:
                ex.on_response_body(ev.data)  # type: ignore[attr-defined]
            elif t is ResponseHead:
                ex.on_response_head(ev)  # type: ignore[arg-type]
            elif t is EndOfMessage:
                ex.on_response_end(ev.trailers)  # type: ignore[attr-defined]
            elif t is TunnelData:
                ex.on_tunnel_up(ev.data)  # type: ignore[attr-defined]
            else:
                assert isinstance(ev, ProtocolError)
                if ev.reason != "connection not reusable":
                    ex.on_upstream_error(ev)

    def eof_received(self) -> bool:
        self._dispatch(self.parser.feed_eof())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.parser.close()
        self.pool.on_closed(self)
        ex = self.exchange
        self.exchange = None
        if ex is not None:
            ex.on_upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.down.pause(2)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.down.resume(2)
