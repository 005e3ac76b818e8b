"""The inbound listener when the sidecar has an identity: sniff, handshake, verify.

Theory of operation. The sidecar accepts inbound connections itself (one
accept loop) instead of through ``create_server``, because what a connection
becomes depends on its first byte and on the mesh's state at that moment:

* the first byte is peeked (``MSG_PEEK``: nothing is consumed). A TLS
  handshake starts with 0x16. Anything else is plaintext: served without an
  identity in ``permissive`` mode, closed unanswered in ``strict`` mode.
* a TLS connection gets the server context in force *now*
  (:meth:`MeshTls.server_ssl`), so a renewed certificate or a new trust
  bundle applies to the next handshake while established connections stay.
  No context (the certificate expired): the connection is closed.
* after the handshake, before any application data is read, the peer's
  certificate is checked (:func:`~meshlayer.proxy.tls.verify_peer`); a
  rejected peer is aborted, so the app behind receives nothing. An accepted
  one's SPIFFE ID is ``peer_identity`` on the downstream connection, for
  authorization and for the ``x-meshlayer-peer-identity`` header.
* once the sidecar's own certificate has expired (or was cleared), a verified
  connection is closed after its current exchange: no request is served over
  material that is no longer valid (idle ones are closed at expiry by the
  sidecar).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

from meshlayer.proxy.exchange import Exchange
from meshlayer.proxy.server import DownstreamConnection, Listener
from meshlayer.proxy.tls import MeshTls, PeerRejected

log = logging.getLogger("meshlayer.tls")

TLS_HANDSHAKE = 0x16


class VerifiedConnection(DownstreamConnection):
    """A downstream connection that exists only once its peer's certificate passed."""

    __slots__ = ("mesh_tls",)

    def __init__(self, listener: Listener, mesh_tls: MeshTls) -> None:
        super().__init__(listener)
        self.mesh_tls = mesh_tls

    def connection_made(self, transport: Any) -> None:
        try:
            self.peer_identity = self.mesh_tls.check_client(transport)
        except PeerRejected:
            self.closed = True
            transport.abort()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:  # rejected in connection_made: never counted
            return
        super().connection_lost(exc)

    def exchange_done(self, ex: Exchange, now: float = 0.0) -> None:
        if not self.mesh_tls.usable():  # our identity expired: no further exchange
            ex.close_after = True
        super().exchange_done(ex, now)


class MeshAcceptor:
    """Accepts inbound connections and gives each TLS, plaintext or nothing."""

    def __init__(
        self,
        listener: Listener,
        mesh_tls: MeshTls,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.listener = listener
        self.tls = mesh_tls
        self.handshake_timeout = handshake_timeout
        self.sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> MeshAcceptor:
        """Bind and start accepting. Raises OSError."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())
        return self

    def close(self) -> None:
        """Stop accepting (established connections are the listener's business)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self._pending):
            task.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        sock = self.sock
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: do not spin
                log.warning("inbound accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._serve(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            first = await self._peek(conn)
        except (OSError, TimeoutError):
            conn.close()
            return
        if first is None:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        if first == TLS_HANDSHAKE:
            ctx = self.tls.server_ssl()
            if ctx is None:
                self.tls.metrics.failures.labels("server", "no-identity").inc()
                conn.close()
                return
            try:
                await loop.connect_accepted_socket(
                    self._verified,
                    conn,
                    ssl=ctx,
                    ssl_handshake_timeout=self.handshake_timeout,
                )
            except (ssl.SSLError, OSError, TimeoutError) as exc:
                self.tls.handshake_failed("server", exc)
                conn.close()
            return
        if self.tls.mode == "permissive":
            try:
                await loop.connect_accepted_socket(self._plain, conn)
            except OSError as exc:
                log.info("inbound plaintext connection failed: %s", exc)
                conn.close()
            return
        self.tls.metrics.failures.labels("server", "plaintext").inc()
        log.info("inbound plaintext connection refused (mtls mode strict)")
        conn.close()

    def _verified(self) -> VerifiedConnection:
        return VerifiedConnection(self.listener, self.tls)

    def _plain(self) -> DownstreamConnection:
        return self.listener.protocol()

    async def _peek(self, conn: socket.socket) -> int | None:
        """The first byte, left in the socket; None when the peer closed first."""
        loop = asyncio.get_running_loop()
        fd = conn.fileno()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await ready
        finally:
            loop.remove_reader(fd)
        data = conn.recv(1, socket.MSG_PEEK)
        return data[0] if data else None
