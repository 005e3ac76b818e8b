"""One request/response exchange through a listener: the request path.

Theory of operation: the listener's connection parses a request head and
makes an ``Exchange``; ``start`` runs the stages in one straight line —
authorize (inbound, only when policies apply: :mod:`meshlayer.proxy.authz`
normalises the path and may answer 403/400; a gateway normalises it too, so
its routes, rules and app see one path: :mod:`meshlayer.proxy.classify`),
route (authority to service;
then, when HTTPRoutes govern that service, its matching rule picks the
backend service and may override the request timeout and retries:
``conf``), classify (``prio``; the client socket takes the class's marks for the
response bytes), circuit breaker, admission (the destination's
concurrency limit: a request over it waits in its class's queue or is shed,
:mod:`meshlayer.proxy.admission`), balance, pool checkout — and sends the head on an
upstream connection (opening one in a task when none is idle). From then on
everything is driven by callbacks, with no task per request: request body
pieces from the client go straight to the upstream transport, response events
from the upstream parser go straight to the client transport, and each side's
write buffer pauses the other side's reading. A request that fails before any
response byte reached the client may be retried (connect failures always;
the configured statuses and resets of reused connections only for idempotent
methods with a replayable body) within the service's retry budget; otherwise
the mesh answers with its own error (``x-meshlayer-error``).

A request answered by the mesh before its body arrived (shed, overflow, 403...)
keeps the client's connection when the rest of the body is small: it is read
and dropped (``DISCARD_LIMIT``), so a shed POST does not cost a reconnect.

Timeouts are deadlines on the client connection that one sweeper checks: the
response head must arrive within the service's request timeout (504), and a
streaming exchange must not sit idle longer than its idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Final

from meshlayer.baggage import stamp_class
from meshlayer.proxy.classes import BAGGAGE, ClassState
from meshlayer.proxy.classes import HEADER as PRIORITY_HEADER
from meshlayer.proxy.classify import gateway_path
from meshlayer.proxy.codec import ProtocolError, RequestHead, ResponseHead
from meshlayer.proxy.codec.events import CHUNKED, LENGTH, NO_BODY, UNTIL_CLOSE, Headers
from meshlayer.proxy.codec.serialize import build_head, chunk, last_chunk, without
from meshlayer.proxy.errors import MeshError, render
from meshlayer.proxy.pool import CONNECT, IDLE, OVERFLOW, ServicePool
from meshlayer.proxy.runtime import ServiceRuntime, Settings, split_target
from meshlayer.proxy.tls import NoIdentity
from meshlayer.proxy.upstream import UpstreamConnection

REQUEST: Final = 3  # deadline kinds of the client connection (see server.py)
STREAM: Final = 4

if TYPE_CHECKING:
    from meshlayer.config.model import Service
    from meshlayer.proxy.admission import AdmissionControl
    from meshlayer.proxy.balancer import EndpointState
    from meshlayer.proxy.server import DownstreamConnection

log = logging.getLogger("meshlayer.proxy")

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
REPLAY_LIMIT: Final = 64 * 1024  # request bodies up to this size are kept for retries
BUFFER_LIMIT: Final = 64 * 1024  # request body buffered before an upstream connection exists
# the rest of a refused request's body is read and dropped, up to this, to keep the connection
DISCARD_LIMIT: Final = REPLAY_LIMIT

SOURCE_HEADER: Final = b"x-meshlayer-source"
# Identity the mesh sets from the verified peer certificate: a client's copies are never
# forwarded (watching them takes them out of the head's lines at no cost per request).
IDENTITY_HEADERS: Final = frozenset({b"x-meshlayer-peer-identity", b"x-forwarded-client-cert"})
# Fields the client side's parser hands out apart, because the exchange rewrites them.
WATCHED = (
    frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id", SOURCE_HEADER})
    | IDENTITY_HEADERS
    | {PRIORITY_HEADER, BAGGAGE}
)
_HOST: Final = frozenset({b"host"})
_FORWARDED: Final = b"x-forwarded-for: %b\r\nx-forwarded-proto: %b\r\nx-request-id: %b\r\n%b"

# response phases
WAITING: Final = 0  # no final response head yet
STREAMING: Final = 1  # final head written to the client
DONE: Final = 2


_STATUS_LINES: Final[dict[int, tuple[bytes, bytes]]] = {}  # status -> (reason, line)


def _status_line(status: int, reason: bytes) -> bytes:
    """The status line forwarded to the client, formatted once per status and reason
    (the last reason seen for a status is kept: at most one entry per status)."""
    seen = _STATUS_LINES.get(status)
    if seen is not None and seen[0] == reason:
        return seen[1]
    line = b"HTTP/1.1 %d %b" % (status, reason)
    if len(reason) <= 64:  # an upstream's odd long phrase is formatted, not kept
        _STATUS_LINES[status] = (reason, line)
    return line


class Exchange:
    """One request and its response."""

    __slots__ = (
        "adm",
        "attempts",
        "authority",
        "body",
        "body_size",
        "chunked_out",
        "close_after",
        "conf",
        "conn",
        "down",
        "endpoint",
        "error",
        "head",
        "out_head",
        "path",
        "phase",
        "pool",
        "pool_wait",
        "prio",
        "prio_missing",
        "replayable",
        "req_done",
        "request_id",
        "service",
        "settings",
        "source",
        "started",
        "status",
        "t0",
        "t_admit",
        "t_attempt",
        "trailers",
        "tried",
        "tunnel",
        "tunnel_buf",
    )

    conf: Service
    """The destination's effective config (HTTPRoute overrides applied); set with ``service``."""
    settings: Settings
    """What the request path reads of ``conf``, as plain fields."""
    prio: ClassState
    """The request's priority class (:mod:`meshlayer.proxy.classes`); set in ``start``."""

    def __init__(self, down: DownstreamConnection, head: RequestHead) -> None:
        self.down = down
        self.head = head
        self.started = False
        self.req_done = False
        self.body: list[bytes] | None = None  # made on the first piece: most requests have none
        self.body_size = 0
        self.replayable = True
        self.trailers: Headers | None = None
        self.conn: UpstreamConnection | None = None
        self.service: ServiceRuntime | None = None
        self.pool: ServicePool | None = None  # the class's pool, chosen at the first attempt
        self.endpoint: EndpointState | None = None
        self.phase = WAITING
        self.status = 0
        self.attempts = 0
        self.tried: list[EndpointState] = []
        self.chunked_out = False
        self.close_after = not head.keep_alive
        self.error: ProtocolError | None = None
        self.tunnel = False
        self.tunnel_buf: list[bytes] | None = None
        self.out_head = b""
        self.request_id = b""
        self.source = ""
        self.authority: bytes | None = None
        self.path = b""
        self.t0 = 0.0
        self.t_attempt = 0.0
        self.adm: AdmissionControl | None = None  # queued (t_admit 0) or holding a slot
        self.t_admit = 0.0
        self.prio_missing = False
        self.pool_wait = False  # in its pool's pending queue

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.head.method.decode()} {self.head.target[:60]!r} phase={self.phase} "
            f"attempts={self.attempts} conn={self.conn!r}>"
        )

    # -- the request path ----------------------------------------------------

    def start(self) -> None:
        """Route, admit, balance and send. Called when the exchange reaches the front."""
        self.started = True
        down = self.down
        self.t0 = now = time.monotonic()
        if self.error is not None:  # the request was refused before its turn came
            self._fail(MeshError(self.error.status, "bad-request", self.error.reason))
            return
        try:
            self.authority, self.path = split_target(self.head.target)
            authz = down.listener.authz
            if authz is not None:  # inbound, with policies: may rewrite self.path
                authz.authorize(self)
            listener = down.listener
            if listener.classify is not None:  # a gateway: route, classify, forward the normal form
                self.path = gateway_path(self.path)
            svc = listener.route(self)
            conf = svc.service
            settings = svc.settings
            if svc.routes is not None:  # HTTPRoutes: the backend and the rule's policy
                svc, conf = svc.routes.select(self.head.method, self.path, self.head.headers)
                settings = svc.settings if conf is svc.service else Settings(conf)
            if listener.classify is not None:  # a gateway: its rules, never the client's claim
                self.prio = listener.classify(self, svc, conf)
            else:
                prio = listener.classes.read(self.head.picked)
                if prio is None:
                    prio = listener.classes.default_for(settings.priority_class)
                    self.prio_missing = True
                    listener.missing_class(svc.name)
                self.prio = prio
        except MeshError as err:
            self._fail(err)
            return
        # The class this request is queued and marked as: with --priority off, one FIFO
        # queue and the default class's marks for everyone.
        prio = listener.classes.fallback if svc.fifo else self.prio
        if prio.spec is not down.marks:  # the response bytes leave with the class's marks
            down.mark(prio.spec)
        adm = svc.admission
        if svc.in_flight >= svc.settings.max_requests and (
            adm is None or not adm.queued or not adm.make_room(prio, now)
        ):  # (make_room: a lower class's newest waiter gives its place up)
            self._fail(MeshError(503, "overflow", f"{svc.name}: max requests in flight reached"))
            return
        self.service = svc
        self.conf = conf
        self.settings = settings
        svc.in_flight += 1  # the breaker counts queued requests too
        self.out_head = self._build_request_head()
        if self.req_done:
            down.set_deadline(REQUEST, settings.request_timeout, now)
        else:  # the request timeout starts when the whole request has arrived
            down.set_deadline(STREAM, settings.idle_timeout, now)
        if adm is not None:  # the destination's concurrency limit (None: unlimited)
            self.adm = adm
            if down.eof and adm.would_wait(prio):
                self.adm = None  # the client half-closed before its turn: abandoned
                self._client_gone()
                return
            got = adm.enter(self, prio, now)  # True: a slot now; False: queued; or shed
            if got is not True:
                if got is not False:
                    self.adm = None
                    self._fail(got)
                return
            self.t_admit = now
        svc.budget.deposit(now)
        self._attempt(now)

    def admitted(self, now: float) -> None:
        """Admission gave this queued request a slot: balance and send."""
        self.t_admit = now
        svc = self.service
        assert svc is not None
        prio = self.prio
        classes = self.down.listener.classes
        ordered = classes.ordered
        if prio.index >= len(ordered) or ordered[prio.index] is not prio:
            # A reload changed the class table while it waited: its pool is the one of
            # its class by name now (or the destination's default class).
            self.prio = classes.get(prio.name) or classes.default_for(self.settings.priority_class)
        svc.budget.deposit(now)
        self._attempt(now)

    def shed(self, err: MeshError) -> None:
        """Admission shed this request from its queue."""
        self.adm = None
        self._fail(err)

    def _attempt(self, now: float = 0.0) -> None:
        svc = self.service
        assert svc is not None
        ep = svc.balancer.pick(self.tried)
        if ep is None:
            self._fail(MeshError(503, "no-endpoints", f"{svc.name} has no endpoints"))
            return
        self.endpoint = ep
        self.attempts += 1
        self.tried.append(ep)
        ep.in_flight += 1
        self.t_attempt = now or time.monotonic()
        pool = self.pool
        if pool is None:  # the pool of the request's class; its retries use it again
            try:
                pool = svc.pools[self.prio.index]
            except IndexError:  # fewer classes since this request was classified
                pool = svc.pools[-1]
            self.pool = pool
        plan, conn = pool.checkout(ep)
        if plan == IDLE:
            assert conn is not None
            self._send(conn)
        elif plan == CONNECT:
            asyncio.get_running_loop().create_task(self._connect(ep))
        elif plan == OVERFLOW:
            ep.in_flight -= 1
            self.endpoint = None
            self._fail(
                MeshError(
                    503, "overflow", f"{svc.name}: connection and pending limits ({pool.name} pool)"
                )
            )
        else:
            self.pool_wait = True
            pool.pending.append(self._on_pool_slot)

    def _on_pool_slot(self, conn: UpstreamConnection | None) -> None:
        """Woken from the pending queue with a connection or a slot to open one."""
        self.pool_wait = False
        pool = self.pool
        assert pool is not None
        if self.phase != WAITING or self.conn is not None:
            if conn is not None:  # we gave up meanwhile: pass it on
                pool.release(conn)
            else:
                pool._slot_freed()
            return
        if conn is not None:
            ep = self.endpoint
            assert ep is not None
            if conn.endpoint is not ep:
                ep.in_flight -= 1
                self.endpoint = conn.endpoint
                conn.endpoint.in_flight += 1
            self._send(conn)
        else:
            assert self.endpoint is not None
            asyncio.get_running_loop().create_task(self._connect(self.endpoint))

    async def _connect(self, ep: EndpointState) -> None:
        svc = self.service
        pool = self.pool
        assert svc is not None and pool is not None
        try:
            conn = await pool.open(
                ep,
                svc.settings.connect_timeout,
                UpstreamConnection,
                self.down.listener.upstream_tls,
                svc.name,
            )
        except (OSError, TimeoutError) as exc:
            if self.phase != WAITING or self.conn is not None:
                return
            reason = "connect-timeout" if isinstance(exc, TimeoutError) else "connect-failure"
            if isinstance(exc, NoIdentity):
                reason = NoIdentity.reason
            self._attempt_failed(
                MeshError(
                    503, reason, f"{svc.name}: cannot connect to {ep.endpoint.address}: {exc}"
                ),
                safe=True,
            )
            return
        if self.phase != WAITING or self.down.closed:
            pool.release(conn)
            return
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.attach(self, self.head.method)
        if conn.endpoint.endpoint.meshed and self.down.listener.source_line:
            conn.write(self.out_head[:-2] + self.down.listener.source_line + b"\r\n\r\n")
        else:
            conn.write(self.out_head)
        body = self.body
        if body:
            chunked = self.head.framing == CHUNKED
            for piece in body:
                conn.write(chunk(piece) if chunked else piece)
            if not self.replayable:
                self.body = []
        if self.req_done and self.head.framing == CHUNKED:
            self._write_request_end(conn)
        if self.down.paused & 4:
            self.down.resume(4)

    def _write_request_end(self, conn: UpstreamConnection) -> None:
        if self.head.framing == CHUNKED:
            conn.write(last_chunk(self.trailers))

    def _build_request_head(self) -> bytes:
        head = self.head
        down = self.down
        picked = head.picked
        lines = head.lines
        if head.conn_tokens:
            lines = without(lines, head.conn_tokens)
        if self.authority is not None:  # absolute-form: its authority is the Host
            lines = [b"host: " + self.authority, *without(lines, _HOST)]
        self.source = down.listener.source_label(picked.get(SOURCE_HEADER, b""))
        xff = picked.get(b"x-forwarded-for")
        rid = picked.get(b"x-request-id")
        if not rid:
            rid = down.listener.request_id()
        self.request_id = rid
        # The mesh's own fields and the framing, after the end-to-end lines.
        tail = _FORWARDED % (
            xff + b", " + down.peer_ip if xff else down.peer_ip,
            picked.get(b"x-forwarded-proto", b"http"),
            rid,
            self.prio.header_line,
        )
        baggage = picked.get(BAGGAGE)
        if down.listener.classify is not None:  # a gateway: its class, never the client's claim
            baggage = stamp_class(baggage, self.prio.name.encode())
        if baggage is not None:
            tail += b"\r\nbaggage: " + baggage
        if down.peer_identity is not None:  # verified by the inbound mTLS handshake
            tail += b"\r\nx-meshlayer-peer-identity: " + down.peer_identity.encode()
        if head.upgrade is not None:
            tail += b"\r\nconnection: upgrade\r\nupgrade: " + head.upgrade
        if head.framing == LENGTH:
            tail += b"\r\ncontent-length: " + str(head.content_length).encode()
        elif head.framing == CHUNKED:
            tail += b"\r\ntransfer-encoding: " + head.transfer_encoding
        return b"%b %b HTTP/1.1\r\n%b%b\r\n\r\n" % (
            head.method,
            self.path,
            b"\r\n".join(lines) + b"\r\n" if lines else b"",
            tail,
        )

    # -- request body from the client ----------------------------------------

    def on_request_body(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            conn.write(chunk(data) if self.head.framing == CHUNKED else data)
            if not self.replayable:
                return
        elif self.body_size < 0:  # answered already: the rest of the body is discarded
            self.body_size -= len(data)
            if self.body_size < -DISCARD_LIMIT:
                self.down.close()  # more than promised: the connection goes after all
            return
        if self.body is None:
            self.body = [data]
        else:
            self.body.append(data)
        self.body_size += len(data)
        if self.body_size > REPLAY_LIMIT and self.replayable:
            self.replayable = False
            if conn is not None:
                self.body = []
        if conn is None and self.body_size > BUFFER_LIMIT:
            self.down.pause(4)

    def on_request_end(self, trailers: Headers | None) -> None:
        self.req_done = True
        self.trailers = trailers
        if self.conn is not None:
            self._write_request_end(self.conn)
        if self.started and self.phase == WAITING and self.service is not None:
            self.down.set_deadline(REQUEST, self.settings.request_timeout)

    def on_request_error(self, err: ProtocolError) -> None:
        """The client broke framing in the middle of this request's body."""
        self.error = err
        self.close_after = True
        if not self.started:
            return  # start() answers it without forwarding anything
        if self.phase == DONE:  # answered while its body was being discarded
            self.down.close()
            return
        if self.conn is not None:
            self.conn.abort()  # the upstream sees a truncated request, never a whole one
            self.conn = None
        if self.phase == WAITING:
            self._fail(MeshError(err.status, "bad-request", err.reason), count=False)
        else:
            self.down.abort()

    # -- tunnel (after 101) ----------------------------------------------------

    def on_tunnel_down(self, data: bytes) -> None:
        if self.tunnel and self.conn is not None:
            self.conn.write(data)
        elif self.tunnel_buf is None:
            self.tunnel_buf = [data]
        else:
            self.tunnel_buf.append(data)

    def on_tunnel_up(self, data: bytes) -> None:
        self.down.write(data)

    def on_tunnel_eof(self) -> None:
        """The client half-closed the tunnel: half-close the upstream side too."""
        if self.tunnel and self.conn is not None:
            self.conn.write_eof()

    # -- the response, from the upstream connection ----------------------------

    def on_response_head(self, resp: ResponseHead) -> None:
        status = resp.status
        down = self.down
        if 100 <= status < 200 and status != 101:
            if self.head.version == b"1.1" and self.phase == WAITING:
                down.write(
                    build_head(b"HTTP/1.1 %d %b" % (status, resp.reason), _response_lines(resp))
                )
            return
        svc = self.service
        ep = self.endpoint
        assert svc is not None and ep is not None
        now = time.monotonic()
        shed = status == 503 and _is_shed(resp)
        if (
            status in self.settings.retry_on
            and not shed  # a peer shedding load: retrying would only add to it
            and self.head.method in IDEMPOTENT
            and self._can_retry()
        ):
            svc.balancer.report(ep, False, now - self.t_attempt, now)
            down.listener.metrics.retries.labels(svc.name, str(status)).inc()
            conn = self.conn
            self.conn = None
            ep.in_flight -= 1
            if conn is not None:
                conn.close()
            self._attempt()
            return
        # A shed is the peer working as designed, not failing: no outlier ejection for it.
        svc.balancer.report(ep, status < 500 or shed, now - self.t_attempt, now)
        adm = self.adm
        if adm is not None:  # latency from admission to the response head: a service
            adm.sample(now - self.t_admit, now, status < 500)  # time, unless an error
        self.status = status
        self.phase = STREAMING
        lines = resp.lines  # the parser makes a fresh list per message: ours to extend
        if resp.conn_tokens:
            lines = without(lines, resp.conn_tokens)
        framing = resp.framing
        if status == 101 and self.head.upgrade is not None:
            self.tunnel = True
            lines.append(b"connection: upgrade")
            for name, value in resp.headers:
                if name.lower() == b"upgrade":
                    lines.append(b"upgrade: " + value)
            down.set_deadline(STREAM, svc.settings.idle_timeout, now)
            down.write(build_head(b"HTTP/1.1 101 %b" % resp.reason, lines))
            if adm is not None:  # a tunnel is no request any more: it holds no slot
                self.adm = None
                adm.release(now)
            conn = self.conn
            if conn is not None:
                for piece in self.tunnel_buf or ():
                    conn.write(piece)
                if down.eof:  # the client half-closed before the switch
                    conn.write_eof()
            self.tunnel_buf = None
            return
        http11 = self.head.version == b"1.1"
        if framing == LENGTH:
            lines.append(b"content-length: " + str(resp.content_length).encode())
        elif framing == NO_BODY:
            if resp.content_length >= 0 and status != 204:
                lines.append(b"content-length: " + str(resp.content_length).encode())
        elif http11:  # CHUNKED or UNTIL_CLOSE
            self.chunked_out = True
            lines.append(b"transfer-encoding: chunked")
        else:
            self.close_after = True  # an HTTP/1.0 client reads to the close
        if self.head.upgrade is not None or down.listener.closing or self.error is not None:
            self.close_after = True
        if self.close_after:
            lines.append(b"connection: close")
        elif not http11:
            lines.append(b"connection: keep-alive")
        down.set_deadline(STREAM, svc.settings.idle_timeout, now)
        down.write(build_head(_status_line(status, resp.reason), lines))
        if framing == UNTIL_CLOSE:
            pass  # body pieces follow; the end comes with the upstream's close

    def on_response_body(self, data: bytes) -> None:
        if self.phase != STREAMING:
            return
        self.down.write(chunk(data) if self.chunked_out else data)

    def on_response_end(self, trailers: Headers | None) -> None:
        if self.phase != STREAMING:
            return
        if self.chunked_out:
            self.down.write(last_chunk(trailers))
        self._finish()

    def on_upstream_error(self, err: ProtocolError) -> None:
        """The upstream broke framing: 502, and the connection is never reused."""
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.abort()
        if self.phase == WAITING:
            assert self.endpoint is not None and self.service is not None
            self.service.balancer.report(self.endpoint, False, time.monotonic() - self.t_attempt)
            self.endpoint.in_flight -= 1
            self.endpoint = None
            self._fail(MeshError(502, "bad-upstream-response", err.reason))
        else:
            self.status = 502
            self.down.abort()
            self._finish(ok=False)

    def on_upstream_lost(self, exc: Exception | None) -> None:
        """The upstream connection closed under us."""
        self.conn = None
        if self.phase == STREAMING:
            if self.tunnel:
                self.down.close()
                self._finish()
                return
            self.down.abort()  # a truncated response must look truncated
            self._finish(ok=False)
            return
        if self.phase != WAITING:
            return
        svc = self.service
        ep = self.endpoint
        assert svc is not None and ep is not None
        msg = f"{svc.name}: {ep.endpoint.address} closed the connection before responding"
        self._attempt_failed(
            MeshError(502, "upstream-reset", msg),
            safe=self.head.method in IDEMPOTENT,
        )

    def _can_retry(self) -> bool:
        svc = self.service
        assert svc is not None
        if not self.replayable or self.attempts > self.settings.retry_attempts:
            return False
        if self.down.closed or self.error is not None:
            return False
        return svc.budget.withdraw()

    def _attempt_failed(self, err: MeshError, safe: bool) -> None:
        svc = self.service
        ep = self.endpoint
        assert svc is not None and ep is not None
        svc.balancer.report(ep, False, time.monotonic() - self.t_attempt)
        ep.in_flight -= 1
        self.endpoint = None
        if self.conn is not None:
            self.conn.abort()
            self.conn = None
        if safe and self._can_retry():
            self.down.listener.metrics.retries.labels(svc.name, err.reason).inc()
            self._attempt()
            return
        self._fail(err)

    # -- endings -------------------------------------------------------------

    def on_deadline(self) -> None:
        """The client connection's deadline passed while this exchange was active."""
        if self.phase == WAITING:
            svc = self.service
            name = svc.name if svc else "?"
            if self.endpoint is not None and svc is not None:
                svc.balancer.report(self.endpoint, False, time.monotonic() - self.t_attempt)
                self.endpoint.in_flight -= 1
                self.endpoint = None
            if self.conn is not None:
                self.conn.abort()
                self.conn = None
            adm = self.adm
            if adm is not None and self.t_admit:  # admitted: its latency is at least this
                now = time.monotonic()
                adm.sample(now - self.t_admit, now)
            timeout = self.settings.request_timeout if svc else 0
            self._fail(MeshError(504, "timeout", f"{name}: no response within {timeout:g}s"))
        else:
            self.down.abort()
            self._finish(ok=False)

    def on_client_eof(self) -> bool:
        """The client half-closed while this request waits in an admission queue: taken
        as abandoned (as nginx takes it), it leaves the queue. True if it did."""
        if self.adm is None or self.t_admit or self.phase != WAITING:
            return False
        self._client_gone()
        return True

    def _client_gone(self) -> None:
        """End a request whose client half-closed before it got a slot: nothing went
        upstream. Counted as 499 (metrics, access log) like nginx, but unlike nginx it
        is answered: a client that half-closed after sending may still read, and a
        ``503`` with ``x-meshlayer-error: client-closed`` tells it the request was never
        forwarded (safe to repeat); a client that is gone altogether costs one write.
        The connection closes once the queue is empty (``DownstreamConnection.eof``)."""
        down = self.down
        # Pipelined requests after it are answered in turn; the last answer says close.
        last = len(down.queue) <= 1 or self.close_after
        listener = down.listener
        listener.metrics.errors.labels(listener.direction, "client-closed").inc()
        msg = "the client half-closed the connection before the request was admitted"
        down.write(render(503, "client-closed", msg, listener.sidecar, last, self.request_id))
        self.status = 499
        self.phase = STREAMING
        self._finish(ok=False)

    def on_downstream_lost(self) -> None:
        """The client went away."""
        if self.phase == DONE:
            return
        if self.conn is not None:
            self.conn.abort()
            self.conn = None
        if self.endpoint is not None:
            self.endpoint.in_flight -= 1
            self.endpoint = None
        if not self.status:
            self.status = 499
        adm = self.adm
        if adm is not None and self.t_admit and self.phase == WAITING:
            now = time.monotonic()  # admitted, no answer yet: its latency is at least this
            adm.sample(now - self.t_admit, now)
        self._finish(ok=False)

    def _fail(self, err: MeshError, count: bool = True) -> None:
        """Answer with a mesh error (when nothing was sent yet) and end."""
        down = self.down
        if self.endpoint is not None:
            self.endpoint.in_flight -= 1
            self.endpoint = None
        if self.phase == STREAMING:
            down.abort()
            self._finish(ok=False)
            return
        self.status = err.status
        if err.status in (400, 504) or self.head.upgrade is not None:
            self.close_after = True  # a broken or stalled request, or a refused upgrade
        elif not self.req_done and not self.close_after:  # e.g. a shed POST: keep the
            # connection when the rest of its body is small
            self.close_after = not self._discard_rest()
        if down.listener.closing:
            self.close_after = True
        listener = down.listener
        listener.metrics.errors.labels(listener.direction, err.reason).inc()
        level = logging.DEBUG if err.reason == "shed" else logging.INFO
        if log.isEnabledFor(level):  # (admission logs when shedding starts and stops)
            log.log(
                level,
                "%s %s %s -> %d %s: %s",
                listener.direction,
                self.head.method.decode(),
                self.head.target[:200].decode("latin-1"),
                err.status,
                err.reason,
                err.message,
            )
        down.write(
            render(
                err.status,
                err.reason,
                err.message,
                listener.sidecar,
                self.close_after,
                self.request_id,
                err.retry_after,
                err.policy,
            )
        )
        self.phase = STREAMING
        self._finish(ok=False)

    def _discard_rest(self) -> bool:
        """Answered before the whole body arrived (a shed POST): whether the connection
        can stay, the rest of the body read and dropped. It can when the rest is known
        to be at most ``DISCARD_LIMIT`` bytes (content-length), or is chunked (the
        connection closes if it grows past that). ``body_size`` < 0 marks the
        discarding, counting down the bytes dropped."""
        head = self.head
        if head.framing == LENGTH:
            if head.content_length - self.body_size > DISCARD_LIMIT:
                return False
        elif head.framing != CHUNKED:
            return False
        self.body = None
        self.body_size = -1
        return True

    def _finish(self, ok: bool = True) -> None:
        if self.phase == DONE:
            return
        self.phase = DONE
        now = time.monotonic()
        svc = self.service
        conn = self.conn
        self.conn = None
        if conn is not None:
            if ok and self.req_done and conn.reusable and self.pool is not None:
                self.pool.release(conn, now)
            else:
                conn.close()
        if self.endpoint is not None:
            self.endpoint.in_flight -= 1
            self.endpoint = None
        if svc is not None:
            svc.in_flight -= 1
            if not self.req_done and self.body_size >= 0:  # (< 0: _discard_rest keeps it)
                self.close_after = True
            if self.pool_wait:  # gave up waiting for a connection: no pending place
                self.pool_wait = False
                pool = self.pool
                if pool is not None:
                    with contextlib.suppress(ValueError):
                        pool.pending.remove(self._on_pool_slot)
        adm = self.adm
        if adm is not None:
            self.adm = None
            if self.t_admit:  # held a slot: the next waiter's turn
                adm.release(now)
            else:  # still queued: the client went, the deadline passed, the body broke
                adm.leave(self)
        down = self.down
        if down.paused & 6:
            down.resume(2 | 4)  # whatever this exchange paused, it no longer needs
        down.listener.observe(self, now - self.t0)
        down.exchange_done(self, now)


def _is_shed(resp: ResponseHead) -> bool:
    """Whether a 503 is a mesh peer's load shedding (``x-meshlayer-error: shed``)."""
    for name, value in resp.headers:
        if value == b"shed" and name.lower() == b"x-meshlayer-error":
            return True
    return False


def _response_lines(resp: ResponseHead) -> list[bytes]:
    if resp.conn_tokens:
        return without(resp.lines, resp.conn_tokens)
    return resp.lines.copy()
