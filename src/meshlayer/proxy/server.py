"""Listeners: the client side of the sidecar (inbound and outbound).

Theory of operation: a ``DownstreamConnection`` is the parser's feeder and the
owner of its exchanges. All events of one read are handled before any
exchange starts, so a request whose body turns out malformed in the same read
is refused without a byte going upstream. Pipelined requests queue as
exchanges and are answered strictly in order: only the front one runs; the
next starts when it finishes. Reading pauses for three reasons, kept as bits
(1: the client's pipeline queue is deep, 2: the upstream cannot take the
request body as fast, 4: a body is arriving before any upstream connection
exists), and resumes when the last reason clears.

Responses leave on the client's socket, so it carries the marks (DSCP,
SO_PRIORITY, congestion control) of the class of the request being answered:
set when an exchange is classified and its class's marks differ from the
socket's (``mark``; :func:`meshlayer.proxy.netmarks.remark`).

Each connection has one deadline (header read, idle keep-alive, request
timeout or streaming idle) that the listener's sweeper checks, so no timer is
created per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from random import getrandbits
from typing import TYPE_CHECKING, Any, Final

from meshlayer.config.model import DEFAULT_PRIORITY_CLASSES
from meshlayer.proxy.classes import ClassState, ClassTable
from meshlayer.proxy.codec import Body, EndOfMessage, ProtocolError, RequestHead, TunnelData
from meshlayer.proxy.codec.request import RequestParser
from meshlayer.proxy.errors import render
from meshlayer.proxy.exchange import WATCHED, Exchange
from meshlayer.proxy.metrics import Metrics, RouteMetrics
from meshlayer.proxy.netmarks import remark
from meshlayer.proxy.runtime import ServiceRuntime
from meshlayer.proxy.upstream import unconnected

if TYPE_CHECKING:
    from meshlayer.config.model import PriorityClass, Service
    from meshlayer.proxy.authz import ServiceAuthz
    from meshlayer.proxy.tls import MeshTls

log = logging.getLogger("meshlayer.proxy")
access_log = logging.getLogger("meshlayer.access")

PIPELINE_DEPTH: Final = 16

# deadline kinds
NONE: Final = 0
IDLE: Final = 1
HEADER: Final = 2
REQUEST: Final = 3
STREAM: Final = 4


class Listener:
    """Shared, per-listener state and policy: what differs between inbound and outbound."""

    def __init__(
        self,
        direction: str,
        sidecar: str,
        metrics: Metrics,
        route: Callable[[Exchange], ServiceRuntime],
        source_label: Callable[[bytes], str],
        destination_label: Callable[[Exchange], str],
        header_timeout: float,
        idle_timeout: float,
        source_line: bytes = b"",
        access: bool = False,
    ) -> None:
        self.direction = direction
        self.sidecar = sidecar
        self.metrics = metrics
        self.route = route
        self.source_label = source_label
        self.destination_label = destination_label
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.source_line = source_line
        self.access = access
        self.authz: ServiceAuthz | None = None
        """Inbound authorization when policies or the mesh default apply (set by the sidecar)."""
        self.upstream_tls: MeshTls | None = None
        """mTLS to meshed endpoints (outbound, when the sidecar has an identity)."""
        self.classes = ClassTable({c.name: c for c in DEFAULT_PRIORITY_CLASSES})
        """The priority classes in force (set by the sidecar, again on each reload)."""
        self.classify: Callable[[Exchange, ServiceRuntime, Service], ClassState] | None = None
        """A gateway's ClassificationRules: when set, a client's own class is never read."""
        self.closing = False
        self._id_prefix = b"%016x-" % getrandbits(64)
        self._id_count = 0
        self._missing = metrics.priority_missing.setdefault(direction, {})
        self.connections: set[DownstreamConnection] = set()
        self.server: asyncio.Server | None = None
        self._gauge = metrics.connections.labels("downstream", direction)
        # source -> destination -> priority class -> its metrics: no key tuple per request
        self._route_metrics: dict[str, dict[str, dict[str, RouteMetrics]]] = {}

    def protocol(self) -> DownstreamConnection:
        return DownstreamConnection(self)

    def request_id(self) -> bytes:
        """A fresh ``x-request-id``: 64 random bits drawn when the listener starts, then
        a count (unique without drawing and formatting 128 random bits per request)."""
        self._id_count += 1
        return self._id_prefix + str(self._id_count).encode()

    def missing_class(self, service: str) -> None:
        """Count a request that carried no known class (it got ``service``'s default)."""
        counts = self._missing
        n = counts.get(service)
        if n is not None:
            counts[service] = n + 1
        elif len(counts) < 2048:  # names come from config, but stay bounded
            counts[service] = 1

    def observe(self, ex: Exchange, seconds: float) -> None:
        source = ex.source
        if not source:
            source = ex.source = self.source_label(b"")
        destination = self.destination_label(ex)
        by_destination = self._route_metrics.get(source)
        if by_destination is None:
            by_destination = self._route_metrics[source] = {}
        by_priority = by_destination.get(destination)
        if by_priority is None:
            by_priority = by_destination[destination] = {}
        try:
            priority = ex.prio.name
        except AttributeError:  # refused before it was classified
            priority = "unknown"
        rm = by_priority.get(priority)
        if rm is None:
            rm = by_priority[priority] = self.metrics.route(
                self.direction, source, destination, priority
            )
        rm.observe(ex.status, seconds)
        if self.access:
            access_log.info(
                '%s "%s %s HTTP/%s" %d %.1fms src=%s dst=%s prio=%s rid=%s',
                self.direction,
                ex.head.method.decode(),
                ex.head.target[:500].decode("latin-1"),
                ex.head.version.decode(),
                ex.status,
                seconds * 1000,
                ex.source or "unknown",
                self.destination_label(ex),
                priority,
                ex.request_id.decode("latin-1"),
            )

    def sweep(self, now: float) -> None:
        for conn in list(self.connections):
            if conn.deadline and now >= conn.deadline:
                conn.on_deadline(now)

    def begin_shutdown(self) -> None:
        """Stop reusing connections; close the idle ones now."""
        self.closing = True
        for conn in list(self.connections):
            if not conn.queue and not conn.parser.in_head:
                conn.close()


class DownstreamConnection(asyncio.Protocol):
    """One client connection to a listener."""

    __slots__ = (
        "closed",
        "corked",
        "deadline",
        "deadline_kind",
        "eof",
        "listener",
        "marks",
        "parser",
        "paused",
        "peer_identity",
        "peer_ip",
        "queue",
        "reading",
        "send",
        "stream_idle",
        "transport",
        "write_paused",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.parser = RequestParser(watch=WATCHED)
        self.queue: deque[Exchange] = deque()
        self.reading: Exchange | None = None
        self.transport: asyncio.Transport | None = None
        self.send: Callable[[bytes], object] = unconnected
        """``transport.write``, looked up once (a method lookup per write is not free)."""
        self.peer_ip = b"unknown"
        self.peer_identity: str | None = None
        """The peer's SPIFFE ID from its verified certificate (inbound mTLS only)."""
        self.closed = False
        self.corked: list[bytes] | None = None
        self.eof = False
        """The client half-closed: it sends no more; it may still read (see ``eof_received``)."""
        self.marks: PriorityClass | None = None
        """The class whose marks the client socket carries (None: the kernel's defaults)."""
        self.paused = 0
        self.write_paused = False
        self.deadline = 0.0
        self.deadline_kind = NONE
        self.stream_idle = 0.0

    def __repr__(self) -> str:
        return (
            f"<DownstreamConnection {self.listener.direction} {self.peer_ip.decode()} "
            f"queue={len(self.queue)} paused={self.paused}>"
        )

    # -- asyncio callbacks -----------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.send = transport.write
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = str(peer[0]).encode()
        self.listener.connections.add(self)
        self.listener._gauge.inc()
        self._set_idle()

    def data_received(self, data: bytes) -> None:
        events = self.parser.feed(data)
        queue = self.queue
        for ev in events:
            t = type(ev)
            if t is RequestHead:
                ex = Exchange(self, ev)  # type: ignore[arg-type]
                queue.append(ex)
                self.reading = ex
            elif t is Body:
                if self.reading is not None:
                    self.reading.on_request_body(ev.data)  # type: ignore[attr-defined]
            elif t is EndOfMessage:
                if self.reading is not None:
                    self.reading.on_request_end(ev.trailers)  # type: ignore[attr-defined]
                    self.reading = None
            elif t is TunnelData:
                if queue:
                    queue[-1].on_tunnel_down(ev.data)  # type: ignore[attr-defined]
            else:
                assert isinstance(ev, ProtocolError)
                self._protocol_error(ev)
        if self.deadline_kind == STREAM:
            self.deadline = time.monotonic() + self.stream_idle
        if queue:
            front = queue[0]
            if not front.started:
                front.start()
            if len(queue) > PIPELINE_DEPTH:
                self.pause(1)
        elif self.parser.in_head and self.deadline_kind != HEADER:
            self.deadline_kind = HEADER
            self.deadline = time.monotonic() + self.listener.header_timeout

    def _protocol_error(self, err: ProtocolError) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
        reading = self.reading
        if reading is not None:
            self.reading = None
            reading.on_request_error(err)
            return
        if not self.queue:
            self._refuse(err)
            return
        # Answer the requests before it in order, then refuse: a placeholder exchange
        # (a bare head) carries the error to its turn.
        placeholder = Exchange(self, _ERROR_HEAD)
        placeholder.error = err
        placeholder.req_done = True
        placeholder.close_after = True
        self.queue.append(placeholder)

    def _refuse(self, err: ProtocolError) -> None:
        listener = self.listener
        listener.metrics.errors.labels(listener.direction, "bad-request").inc()
        log.info(
            "%s refused a request from %s: %d %s",
            listener.direction,
            self.peer_ip.decode(),
            err.status,
            err.reason,
        )
        self.write(render(err.status, "bad-request", err.reason, listener.sidecar, True))
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.parser.close()
        self.listener.connections.discard(self)
        self.listener._gauge.dec()
        queue = self.queue
        while queue:
            ex = queue.popleft()
            if ex.started:
                ex.on_downstream_lost()
        self.queue = deque()

    def eof_received(self) -> bool:
        # The client is done sending. A request in flight (sent upstream) finishes and
        # is answered, as are pipelined ones that get a slot at once; one that waits in
        # an admission queue, now or when its turn comes (Exchange.start), is taken as
        # abandoned (see Exchange.on_client_eof). The connection closes when the queue
        # is empty.
        self.eof = True
        if self.parser.tunnel and self.queue:
            self.queue[-1].on_tunnel_eof()  # a half-close travels through a tunnel
        elif self.queue and self.queue[0].started:
            self.queue[0].on_client_eof()  # may finish it, and start the next
        return bool(self.queue) and not self.closed

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.queue:
            conn = self.queue[0].conn
            if conn is not None:
                conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue:
            conn = self.queue[0].conn
            if conn is not None:
                conn.resume_reading()

    # -- used by exchanges -----------------------------------------------------

    def mark(self, marks: PriorityClass) -> None:
        """Give the client socket ``marks`` (a class's DSCP, SO_PRIORITY, congestion
        control) for the response bytes; the exchange calls it when they differ from
        ``self.marks``. A connection whose requests alternate classes is re-marked on
        each change (a few setsockopt calls): its bytes in flight then leave with the
        marks of the response being written, which is the one the client waits for."""
        old = self.marks
        self.marks = marks
        if old is None and not (marks.dscp or marks.so_priority or marks.congestion_control):
            return  # a fresh socket already carries the kernel's defaults
        transport = self.transport
        if transport is None or self.closed:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            remark(sock, old, marks)

    def write(self, data: bytes) -> None:
        if self.corked is not None:
            self.corked.append(data)
            return
        if not self.closed and self.transport is not None:
            self.send(data)
            if self.deadline_kind == STREAM:
                self.deadline = time.monotonic() + self.stream_idle

    def cork(self) -> None:
        """Gather writes until ``uncork``: one send for a head and a small body."""
        if self.corked is None:
            self.corked = []

    def uncork(self) -> None:
        pieces = self.corked
        self.corked = None
        if pieces:
            self.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if (
            not self.paused
            and self.transport is not None
            and not self.closed
            and self.parser.error is None
        ):
            self.transport.resume_reading()

    def close(self) -> None:
        if self.corked:
            self.uncork()
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def exchange_done(self, ex: Exchange, now: float = 0.0) -> None:
        queue = self.queue
        if queue and queue[0] is ex:
            queue.popleft()
        if self.closed:
            return
        if ex.close_after or self.listener.closing:
            self.close()
            return
        if not queue and (self.eof or self.parser.error is not None):
            self.close()
            return
        if queue:
            if len(queue) <= PIPELINE_DEPTH:
                self.resume(1)
            queue[0].start()
        else:
            self._set_idle(now)
            if self.parser.in_head:
                self.deadline_kind = HEADER
                self.deadline = (now or time.monotonic()) + self.listener.header_timeout

    # -- deadlines -------------------------------------------------------------

    def set_deadline(self, kind: int, seconds: float, now: float = 0.0) -> None:
        """Arm the connection's one deadline; ``now`` saves a clock read when known."""
        self.deadline_kind = kind
        self.stream_idle = seconds
        self.deadline = (now or time.monotonic()) + seconds

    def _set_idle(self, now: float = 0.0) -> None:
        self.deadline_kind = IDLE
        self.deadline = (now or time.monotonic()) + self.listener.idle_timeout

    def on_deadline(self, now: float) -> None:
        kind = self.deadline_kind
        self.deadline = 0.0
        self.deadline_kind = NONE
        if self.queue and self.queue[0].started:
            self.queue[0].on_deadline()
            return
        if kind == HEADER:
            err = ProtocolError(408, "request header not received in time")
            self.listener.metrics.errors.labels(self.listener.direction, "header-timeout").inc()
            self.write(render(408, "header-timeout", err.reason, self.listener.sidecar, True))
        self.close()


_ERROR_HEAD = RequestHead(b"GET", b"/", b"1.1", [], False, 0, 0, b"", None, None, False)
