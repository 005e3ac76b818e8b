"""Upstream connection pools: one per (service, priority class), sharing the
service's circuit breaker.

Theory of operation (httpcore's split): ``checkout`` decides synchronously
what a request gets, doing no I/O: an idle keep-alive connection to the chosen
endpoint, leave to open a new one, a place in the pending queue, or an
overflow. The caller then does the awaiting (``open``) outside any shared
state. Idle connections are kept per endpoint, most recently used first;
when one closes, or returns to the pool, a pending request is woken.

Classes. A service's runtime holds one ``ClassPools``: a ``ServicePool`` per
priority class (``pools[ClassState.index]``, most important first), so a
critical request never waits behind a batch request on a busy connection, and
each class's new sockets carry the class's marks — DSCP (``IP_TOS`` /
``IPV6_TCLASS``), ``SO_PRIORITY``, ``TCP_CONGESTION`` — set before
``connect``, so the SYN carries the DSCP already (:mod:`meshlayer.proxy.netmarks`;
with mTLS the handshake runs on the marked socket). A class whose marks are
all the kernel's defaults connects the plain way. With priority off (FIFO)
every index maps to one pool, marked as the ``default`` class.

Circuit breaker. Like Envoy's per-priority thresholds, the service's
``maxConnections`` and ``maxPending`` bound each class pool on its own: a
class's connections (open or opening) to all the service's endpoints, and its
requests waiting for one. So batch requests that fill their pool never make a
critical request wait, and the service as a whole has at most (number of
classes) x ``maxConnections`` connections — exactly ``maxConnections`` with
priority off. ``maxRequests`` (requests in flight) stays one count for the
whole service (:class:`~meshlayer.proxy.runtime.ServiceRuntime`).

Reload. The class table may change with config: ``ClassPools.set_classes``
keeps the pool (and connections) of every class whose name and marks are
unchanged, makes pools for new ones and retires the rest. A retired pool
closes its idle connections, gets no new requests, closes each busy
connection when its exchange ends, and still serves the waiters it has; it is
forgotten once its last connection is gone.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any, Final

from meshlayer.config.model import CircuitBreaker, PriorityClass
from meshlayer.proxy.netmarks import SocketMarks, class_mark_problems, marked_socket
from meshlayer.proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from meshlayer.proxy.balancer import EndpointState
    from meshlayer.proxy.tls import MeshTls

IDLE: Final = 0
CONNECT: Final = 1
WAIT: Final = 2
OVERFLOW: Final = 3

FIFO: Final = "*"
"""Name of the one pool of a service when priority is off."""
FIFO_MARKS_CLASS: Final = "default"
"""With priority off, sockets carry this class's marks."""

PoolKey = tuple[str, SocketMarks | None]


def pool_layout(classes: Iterable[PriorityClass], fifo: bool = False) -> list[PoolKey]:
    """The pool each class index uses, as (name, marks); ``classes`` ordered by rank
    (most important first, as ``ClassTable.ordered``). Marks are None when they are
    all the kernel's defaults. With ``fifo`` every index gets the same one pool."""
    ordered = list(classes)
    if fifo or not ordered:
        base = next((c for c in ordered if c.name == FIFO_MARKS_CLASS), None)
        key = (FIFO, _marks(base) if base is not None else None)
        return [key] * max(1, len(ordered))
    return [(c.name, _marks(c)) for c in ordered]


def layout_view(classes: Iterable[PriorityClass], fifo: bool = False) -> dict[str, object]:
    """The priority classes in force as the pools see them (the admin ``/config`` page):
    mode, the classes by index with the pool and socket marks each uses, and the marks
    this host will not apply."""
    ordered = list(classes)
    view: dict[str, object] = {
        "mode": "off (FIFO)" if fifo else "on",
        "classes": [
            {
                "index": i,
                "name": cls.name,
                "rank": cls.rank,
                "pool": name,
                "marks": None
                if marks is None
                else {
                    "dscp": marks.dscp,
                    "tos": f"{marks.dscp << 2:#04x}",
                    "soPriority": marks.so_priority,
                    "congestionControl": marks.congestion_control,
                },
            }
            for i, (cls, (name, marks)) in enumerate(
                zip(ordered, pool_layout(ordered, fifo), strict=False)
            )
        ],
        "notApplied": class_mark_problems(ordered),
    }
    return view


def _marks(cls: PriorityClass) -> SocketMarks | None:
    marks = SocketMarks(cls.dscp, cls.so_priority, cls.congestion_control or None)
    return None if marks == (0, 0, None) else marks


class ClassPools:
    """The class pools of one service."""

    def __init__(self, limits: CircuitBreaker, idle_timeout: float = 60.0) -> None:
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.connections = 0
        """Open or opening, in all class pools (retired ones too): the gauge's count."""
        self.on_change: Callable[[int], None] | None = None
        self.pools: list[ServicePool] = []
        """By class index (``ClassState.index``); changed in place by ``set_classes``."""
        self.distinct: list[ServicePool] = []
        """Each current pool once, most important class first."""
        self.retired: list[ServicePool] = []
        self.layout: list[PoolKey] = []

    def __repr__(self) -> str:
        pools = " ".join(repr(p) for p in self.all())
        return f"<ClassPools connections={self.connections} {pools}>"

    def set_classes(self, classes: Iterable[PriorityClass], fifo: bool = False) -> None:
        """Lay the pools out for these classes (by rank, most important first)."""
        layout = pool_layout(classes, fifo)
        if layout == self.layout:
            return
        old = {p.key: p for p in self.distinct}
        made: dict[PoolKey, ServicePool] = {}
        pools = []
        for key in layout:
            pool = made.get(key)
            if pool is None:
                pool = old.pop(key, None) or ServicePool(self, *key)
                made[key] = pool
            pools.append(pool)
        for pool in old.values():
            pool.retire()
            self.retired.append(pool)
        self.pools[:] = pools
        self.distinct = list(made.values())
        self.layout = layout
        self.forget_retired()

    def all(self) -> Iterator[ServicePool]:
        """The current pools, then the retired ones."""
        yield from self.distinct
        yield from self.retired

    def pending_count(self) -> int:
        return sum(len(p.pending) for p in self.all())

    def _changed(self, delta: int) -> None:
        self.connections += delta
        if self.on_change is not None:
            self.on_change(delta)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than ``idle_timeout`` (``now``: time.monotonic)."""
        for pool in self.distinct:
            pool.sweep(now)
        self.forget_retired()

    def close_idle(self) -> None:
        for pool in self.all():
            pool.close_idle()

    def forget_retired(self) -> None:
        """Drop retired pools with no connection and no waiter left."""
        if self.retired:
            self.retired = [p for p in self.retired if p.connections or p.pending]


class ServicePool:
    """Connections of one priority class to all endpoints of one service."""

    def __init__(
        self, group: ClassPools, name: str = FIFO, marks: SocketMarks | None = None
    ) -> None:
        self.group = group
        self.limits = group.limits
        self.name = name
        self.marks = marks
        """Set on each new socket before it connects; None: none (all kernel defaults)."""
        self.key: PoolKey = (name, marks)
        self.idle: dict[EndpointState, list[UpstreamConnection]] = {}
        self.connections = 0  # of this pool, open or opening
        self.pending: deque[Callable[[UpstreamConnection | None], None]] = deque()
        self.retired = False
        self.tls: MeshTls | None = None
        """Set once a meshed (mTLS) connection was opened: such connections are closed,
        not reused, when the sidecar's identity has expired or been cleared."""

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self.idle.values())
        retired = " retired" if self.retired else ""
        return (
            f"<ServicePool {self.name}{retired} connections={self.connections} idle={idle} "
            f"pending={len(self.pending)}>"
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
            self.group._changed(1)
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

        The socket carries the pool's marks from before ``connect``. ``tls``: a
        meshed endpoint gets mTLS and must present its registered SPIFFE ID
        (raises NoIdentity without a certificate, PeerRejected, or ssl.SSLError —
        all OSErrors)."""
        loop = asyncio.get_running_loop()
        ep = endpoint.endpoint
        marks = self.marks
        try:
            if tls is not None and ep.meshed:
                ctx = tls.client_ssl()
                try:
                    async with asyncio.timeout(timeout):
                        where = await _where(loop, ep.host, ep.port, marks)
                        transport, proto = await loop.create_connection(
                            lambda: factory(self, endpoint),
                            **where,
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
                where = await _where(loop, ep.host, ep.port, marks)
                _, proto = await loop.create_connection(lambda: factory(self, endpoint), **where)
        except BaseException:
            self._slot_freed()
            raise
        return proto

    def release(self, conn: UpstreamConnection, now: float = 0.0) -> None:
        """Return a connection whose exchange has ended cleanly (``now``: time.monotonic)."""
        conn.exchange = None
        if self.retired or self._expired(conn):
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
        self.group._changed(-1)
        if self.pending and self.connections < self.limits.max_connections:
            waiter = self.pending.popleft()
            self.connections += 1
            self.group._changed(1)
            waiter(None)  # None: the waiter may open a new connection

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than ``idle_timeout`` (``now``: time.monotonic)."""
        timeout = self.group.idle_timeout
        for conns in self.idle.values():
            for conn in [c for c in conns if now - c.idle_since > timeout]:
                conns.remove(conn)
                conn.close()

    def close_idle(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
            conns.clear()

    def retire(self) -> None:
        """No new requests; idle connections close now, busy ones when their exchange ends."""
        self.retired = True
        self.close_idle()


@lru_cache(maxsize=256)
def _literal_family(host: str) -> int | None:
    """AF_INET/AF_INET6 for an IP literal, None for a name to resolve."""
    try:
        return socket.AF_INET6 if ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


async def _where(
    loop: asyncio.AbstractEventLoop, host: str, port: int, marks: SocketMarks | None
) -> dict[str, Any]:
    """``create_connection`` arguments: host and port, or a connected marked socket."""
    if marks is None:
        return {"host": host, "port": port}
    return {"sock": await _marked_connect(loop, host, port, marks)}


async def _marked_connect(
    loop: asyncio.AbstractEventLoop, host: str, port: int, marks: SocketMarks
) -> socket.socket:
    """A socket carrying ``marks``, connected to ``host``: each resolved address in turn."""
    family = _literal_family(host)
    if family is not None:
        addrs: list[tuple[int, Any]] = [(family, (host, port))]
    else:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addrs = [(info[0], info[4]) for info in infos]
    error: OSError = OSError(f"{host} resolves to no address")
    for family, addr in addrs:
        sock = marked_socket(family, marks)
        try:
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:  # cancelled (the connect timeout)
            sock.close()
            raise
        return sock
    raise error


class _Detached(ServicePool):
    """Where a rejected connection reports its end: nowhere (its slot is freed).

    A real ServicePool, not a stand-in: the mypyc build (``MESHLAYER_MYPYC=1``)
    checks the type of ``UpstreamConnection.pool`` at run time."""

    def on_closed(self, conn: UpstreamConnection) -> None:
        pass


_DETACHED = _Detached(ClassPools(CircuitBreaker()))
