"""Upstream connection pools, one per service, with its circuit breaker.

Theory of operation (httpcore's split): ``checkout`` decides synchronously
what a request gets, doing no I/O: an idle keep-alive connection to the chosen
endpoint, leave to open a new one, a place in the pending queue, or an
overflow. The caller then does the awaiting (``open``) outside any shared
state. Idle connections are kept per endpoint, most recently used first;
when one closes, or returns to the pool, the first pending request is woken.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshlayer.config.model import CircuitBreaker
from meshlayer.proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from meshlayer.proxy.balancer import EndpointState
    from meshlayer.proxy.tls import MeshTls

IDLE = 0
CONNECT = 1
WAIT = 2
OVERFLOW = 3


class ServicePool:
    """Connections to all endpoints of one service."""

    def __init__(self, limits: CircuitBreaker, idle_timeout: float = 60.0) -> None:
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.idle: dict[EndpointState, list[UpstreamConnection]] = {}
        self.connections = 0  # open or opening
        self.pending: deque[Callable[[UpstreamConnection | None], None]] = deque()
        self.on_change: Callable[[int], None] | None = None
        self.tls: MeshTls | None = None
        """Set once a meshed (mTLS) connection was opened: such connections are closed,
        not reused, when the sidecar's identity has expired or been cleared."""

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self.idle.values())
        return (
            f"<ServicePool connections={self.connections} idle={idle} pending={len(self.pending)}>"
        )

    def checkout(self, endpoint: EndpointState) -> tuple[int, UpstreamConnection | None]:
        """Plan what a request to ``endpoint`` gets. No I/O."""
        conns = self.idle.get(endpoint)
        while conns:
            conn = conns.pop()
            if not conn.closed:
                if self._expired(conn):
                    conn.close()  # its slot is freed when it has closed
                    continue
                return IDLE, conn
        if self.connections < self.limits.max_connections:
            self.connections += 1
            self._changed(1)
            return CONNECT, None
        if len(self.pending) < self.limits.max_pending:
            return WAIT, None
        return OVERFLOW, None

    async def open(
        self,
        endpoint: EndpointState,
        timeout: float,
        factory: type[UpstreamConnection],
        tls: MeshTls | None = None,
        service: str = "",
    ) -> UpstreamConnection:
        """Open a connection counted by ``checkout``; on failure the slot is given back.

        ``tls``: a meshed endpoint gets mTLS and must present its registered
        SPIFFE ID (raises NoIdentity without a certificate, PeerRejected, or
        ssl.SSLError — all OSErrors)."""
        loop = asyncio.get_running_loop()
        ep = endpoint.endpoint
        try:
            if tls is not None and ep.meshed:
                ctx = tls.client_ssl()
                try:
                    async with asyncio.timeout(timeout):
                        transport, proto = await loop.create_connection(
                            lambda: factory(self, endpoint),
                            ep.host,
                            ep.port,
                            ssl=ctx,
                            server_hostname="",
                            ssl_handshake_timeout=timeout,
                        )
                except OSError as exc:
                    tls.handshake_failed("client", exc)
                    raise
                try:
                    tls.check_server(transport, tls.expected_server(ep.identity, service))
                except BaseException:
                    proto.pool = _DETACHED  # the slot is given back below, not again
                    transport.abort()
                    raise
                self.tls = tls
                return proto
            async with asyncio.timeout(timeout):
                _, proto = await loop.create_connection(
                    lambda: factory(self, endpoint), ep.host, ep.port
                )
        except BaseException:
            self._slot_freed()
            raise
        return proto

    def release(self, conn: UpstreamConnection, now: float = 0.0) -> None:
        """Return a connection whose exchange has ended cleanly (``now``: time.monotonic)."""
        conn.exchange = None
        if self._expired(conn):
            conn.close()  # its slot is freed (and a waiter woken) when it has closed
            return
        if conn.reading_paused:
            conn.resume_reading()
        if self.pending:
            waiter = self.pending.popleft()
            waiter(conn)
            return
        conn.idle_since = now or time.monotonic()
        conns = self.idle.get(conn.endpoint)
        if conns is None:
            self.idle[conn.endpoint] = [conn]
        else:
            conns.append(conn)

    def _expired(self, conn: UpstreamConnection) -> bool:
        """A meshed connection made with an identity that has expired or been cleared
        (failing closed covers connections busy at expiry, not only idle ones)."""
        tls = self.tls
        return tls is not None and conn.endpoint.endpoint.meshed and not tls.usable()

    def on_closed(self, conn: UpstreamConnection) -> None:
        """A connection closed (either side): free its slot."""
        conns = self.idle.get(conn.endpoint)
        if conns and conn in conns:
            conns.remove(conn)
        self._slot_freed()

    def _slot_freed(self) -> None:
        self.connections -= 1
        self._changed(-1)
        if self.pending and self.connections < self.limits.max_connections:
            waiter = self.pending.popleft()
            self.connections += 1
            self._changed(1)
            waiter(None)  # None: the waiter may open a new connection

    def _changed(self, delta: int) -> None:
        if self.on_change is not None:
            self.on_change(delta)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than ``idle_timeout`` (``now``: time.monotonic)."""
        for conns in self.idle.values():
            for conn in [c for c in conns if now - c.idle_since > self.idle_timeout]:
                conns.remove(conn)
                conn.close()

    def close_idle(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
            conns.clear()


class _Detached(ServicePool):
    """Where a rejected connection reports its end: nowhere (its slot is freed).

    A real ServicePool, not a stand-in: the mypyc build (``MESHLAYER_MYPYC=1``)
    checks the type of ``UpstreamConnection.pool`` at run time."""

    def on_closed(self, conn: UpstreamConnection) -> None:
        pass


_DETACHED = _Detached(CircuitBreaker())
