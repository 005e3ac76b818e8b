"""Failing closed covers connections that are busy when the certificate expires:
no request is served over mTLS after expiry, neither by the outbound pool (a
connection is closed on release, not reused) nor by the inbound side (closed
after its current exchange)."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

from tests.integration.security.mesh import sidecar_view, spiffe, start_mesh, wait_identity
from tests.integration.security.test_bad_certs import FakePeer
from tests.support.procs import Cluster, upstream_with

DELAY_MS = 100  # every response: the connections are busy nearly all the time


@dataclass
class Clients:
    """Keep-alive clients in a loop; each result is (start, status, error header)."""

    make: object  # () -> http.client.HTTPConnection
    host: str
    workers: int = 4
    results: list[tuple[float, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        return threads

    def _loop(self) -> None:
        conn: http.client.HTTPConnection | None = None
        for _ in range(2000):  # bounded: ~100 ms a request
            if self.stop.is_set():
                break
            t0 = time.time()
            try:
                if conn is None:
                    conn = self.make()  # type: ignore[operator]
                conn.request("GET", "/id", headers={"host": self.host})
                resp = conn.getresponse()
                resp.read()
                self.results.append((t0, resp.status, resp.getheader("x-meshlayer-error", "")))
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                self.results.append((t0, 0, type(exc).__name__))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.02)
        if conn is not None:
            conn.close()


def test_no_request_over_mtls_after_expiry_even_on_busy_connections(cluster: Cluster) -> None:
    mesh = start_mesh(cluster, cert_ttl="3s")
    up = upstream_with(cluster, "b", "--delay-ms", str(DELAY_MS))
    b = mesh.sidecar("b", up.address)
    a = mesh.sidecar("a", "127.0.0.1:9")
    wait_identity(b)
    wait_identity(a, ("b",))
    # outbound: the app → a → (mTLS) → b; inbound: a meshed peer straight to b's listener
    cert, key = mesh.ca.leaf(spiffe("a"))
    (cluster.tmp / "peer.pem").write_bytes(cert + key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=mesh.ca.pem.decode())
    ctx.load_cert_chain(cluster.tmp / "peer.pem")
    outbound = Clients(lambda: http.client.HTTPConnection("127.0.0.1", a.outbound, timeout=5), "b")
    inbound = Clients(
        lambda: http.client.HTTPSConnection("127.0.0.1", b.inbound, timeout=5, context=ctx), "b"
    )
    threads = outbound.run() + inbound.run()
    try:
        time.sleep(0.5)
        mesh.ctl.stop()  # nobody renews now
        time.sleep(0.3)  # a renewal in flight has landed
        a_end = float(sidecar_view(a)["control"]["identity"]["notAfter"])
        b_end = float(sidecar_view(b)["control"]["identity"]["notAfter"])
        time.sleep(max(0.0, max(a_end, b_end) - time.time()) + 1.5)
    finally:
        outbound.stop.set()
        inbound.stop.set()
        for t in threads:
            t.join(10)
    margin = 0.3  # the sidecar's expiry timer, scheduling
    for name, clients, end in (("outbound", outbound, a_end), ("inbound", inbound, b_end)):
        before = [r for r in clients.results if r[0] < end - 0.5]
        after = [r for r in clients.results if r[0] > end + margin]
        assert sum(r[1] == 200 for r in before) >= 10, (name, before[-5:])
        assert len(after) >= 5, (name, clients.results[-5:])
        served = [r for r in after if r[1] == 200]
        assert served == [], f"{name}: {len(served)}/{len(after)} served after expiry"
    # outbound, once a's own certificate is gone: 503 no-identity, never plaintext
    late = [r for r in outbound.results if r[0] > a_end + margin]
    assert late and all(r[1:] == (503, "no-identity") for r in late), late[:5]
    assert a.metric("meshlayer_tls_handshake_failures_total", reason="no-identity") >= 1


class SlowPeer(FakePeer):
    """A meshed endpoint whose certificate outlives the sidecar's: answers each
    request after DELAY_MS on a keep-alive connection."""

    def _serve(self, c: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(c, server_side=True) as s:
                s.settimeout(5)
                while data := s.recv(65536):
                    self.received += len(data)
                    time.sleep(DELAY_MS / 1000)
                    s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except (OSError, ssl.SSLError):
            pass


def test_the_pool_drops_busy_connections_when_its_own_certificate_expires(
    cluster: Cluster,
) -> None:
    """The peer stays valid, so only the outbound pool's own check can stop the traffic."""
    mesh = start_mesh(cluster, cert_ttl="3s")
    peer = SlowPeer(cluster.tmp, mesh.ca.leaf(spiffe("b")), mesh.ca.pem)
    try:
        mesh.apply(
            {
                "apiVersion": "meshlayer/v1",
                "kind": "Service",
                "metadata": {"name": "b"},
                "spec": {
                    "endpoints": [{"address": f"127.0.0.1:{peer.port}", "meshed": True}],
                    "retries": {"attempts": 0},
                },
            }
        )
        a = mesh.sidecar("a", "127.0.0.1:9")
        wait_identity(a, ("b",))
        clients = Clients(
            lambda: http.client.HTTPConnection("127.0.0.1", a.outbound, timeout=5), "b"
        )
        threads = clients.run()
        try:
            time.sleep(0.5)
            mesh.ctl.stop()
            time.sleep(0.3)
            end = float(sidecar_view(a)["control"]["identity"]["notAfter"])
            time.sleep(max(0.0, end - time.time()) + 1.5)
        finally:
            clients.stop.set()
            for t in threads:
                t.join(10)
    finally:
        peer.close()
    assert sum(r[1] == 200 for r in clients.results if r[0] < end - 0.5) >= 10
    after = [r for r in clients.results if r[0] > end + 0.3]
    assert len(after) >= 5, clients.results[-5:]
    served = [r for r in after if r[1] == 200]
    assert served == [], f"{len(served)}/{len(after)} served over mTLS after expiry"
    assert all(r[1:] == (503, "no-identity") for r in after), after[:5]
