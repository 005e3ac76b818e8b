"""The sidecar's certificate over time: renewal under a live connection, failing
closed when it cannot renew, the rotation bars of the issue."""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.integration.security.mesh import (
    ADMIN,
    Mesh,
    call,
    sidecar_view,
    spiffe,
    start_mesh,
    tls_attempt,
    wait_identity,
)
from tests.support.procs import Cluster, Sidecar, raw, request, run_meshlayer


def _identity(sc: Sidecar) -> dict[str, object]:
    return dict(sidecar_view(sc)["control"]["identity"])


@dataclass
class Load:
    """Steady traffic a → b: ``workers`` keep-alive clients plus one new connection per
    round, and one long-lived client connection that must survive throughout."""

    port: int
    workers: int = 3
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    long_ok: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for i in range(self.workers):
            self._threads.append(threading.Thread(target=self._run, args=(i,), daemon=True))
        self._threads.append(threading.Thread(target=self._long, daemon=True))
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                if n % 10 == 0:  # now and then a fresh connection too
                    status, _, _ = request(self.port, path="/id", host="b", timeout=10)
                else:
                    conn.request("GET", "/id", headers={"host": "b"})
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                if status == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"status {status}")
            except (OSError, http.client.HTTPException) as exc:
                self.failed.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            time.sleep(0.01)
        conn.close()

    def _long(self) -> None:
        """One connection, one request every 0.25 s, never reopened."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while not self._stop.is_set():
                conn.request("GET", "/id", headers={"host": "b"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    self.failed.append(f"long-lived: status {resp.status}")
                    return
                self.long_ok += 1
                self._stop.wait(0.25)
        except (OSError, http.client.HTTPException) as exc:
            self.failed.append(f"long-lived connection broke: {exc!r}")
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def _pair(cluster: Cluster, mesh: Mesh) -> tuple[Sidecar, Sidecar]:
    up = cluster.upstream("b")
    b = mesh.sidecar("b", up.address)
    a = mesh.sidecar("a", "127.0.0.1:9")
    wait_identity(b)
    wait_identity(a, ("b",))
    return a, b


def test_renewal_keeps_a_long_lived_connection(cluster: Cluster) -> None:
    mesh = start_mesh(cluster, cert_ttl="3s")
    a, b = _pair(cluster, mesh)
    first = _identity(a)["notAfter"]
    load = Load(a.outbound, workers=1)
    load.start()
    try:
        time.sleep(7.5)  # two and a half lifetimes
    finally:
        load.stop()
    assert load.failed == [], load.failed[:5]
    assert load.long_ok >= 20 and load.ok > 50, (load.long_ok, load.ok)
    for sc in (a, b):
        ident = _identity(sc)
        assert int(str(ident["renewals"])) >= 2, ident
    assert _identity(a)["notAfter"] != first
    # the a → b mTLS connection was never re-established for the renewals
    assert b.metric("meshlayer_tls_handshakes_total", side="server") <= 3
    assert a.metric("meshlayer_cert_expiry_seconds") > 0


def test_fails_closed_when_the_certificate_expires(cluster: Cluster) -> None:
    mesh = start_mesh(cluster, cert_ttl="2s")
    a, b = _pair(cluster, mesh)
    status, _, _ = request(a.outbound, path="/id", host="b")
    assert status == 200
    mesh.ctl.stop()  # nobody can renew now
    deadline = time.monotonic() + 10
    while (
        a.metric("meshlayer_cert_expiry_seconds") >= 0
        or b.metric("meshlayer_cert_expiry_seconds") >= 0
    ):
        assert time.monotonic() < deadline, "certificates never expired"
        time.sleep(0.1)
    time.sleep(0.3)  # the expiry timer (not the metric) drops the material
    status, headers, body = request(a.outbound, path="/id", host="b")
    assert status == 503, body
    assert headers["x-meshlayer-error"] == "no-identity", headers
    # b's inbound takes neither TLS (no certificate to show) nor plaintext
    good = mesh.ca.leaf(spiffe("a"))
    assert tls_attempt(b.inbound, cluster.tmp, mesh.ca.pem, good) == b""
    try:
        plain = raw(b.inbound, b"GET /id HTTP/1.1\r\nhost: b\r\n\r\n", timeout=3)
    except ConnectionResetError:
        plain = b""
    assert plain == b""
    assert b.metric("meshlayer_tls_handshake_failures_total", reason="no-identity") >= 1


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_rotation_under_load_ten_lifetimes(cluster: Cluster) -> None:
    """Linkerd's bar: certificates of ~20 s, steady load for 10 lifetimes, 100.00%
    success, and a long-lived connection that survives."""
    mesh = start_mesh(cluster, cert_ttl="20s")
    a, b = _pair(cluster, mesh)
    load = Load(a.outbound, workers=3)
    load.start()
    try:
        time.sleep(200)
    finally:
        load.stop()
    total = load.ok + len(load.failed)
    assert load.failed == [], f"{len(load.failed)}/{total} failed: {load.failed[:5]}"
    assert load.long_ok >= 700, load.long_ok
    for sc in (a, b):
        assert int(str(_identity(sc)["renewals"])) >= 12, _identity(sc)
    assert b.metric("meshlayer_tls_handshakes_total", side="server") <= 8


def test_trust_anchor_rotation_with_zero_failed_requests(cluster: Cluster) -> None:
    mesh = start_mesh(cluster, cert_ttl="1h")
    a, b = _pair(cluster, mesh)
    old = _identity(a)["issuer"]
    load = Load(a.outbound, workers=3)
    load.start()
    try:
        time.sleep(1.0)
        out = run_meshlayer(
            ["ca", "rotate", "--control", mesh.ctl.url, "--admin-token", ADMIN, "--wait", "60"],
            timeout=90,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        time.sleep(1.0)
    finally:
        load.stop()
    assert load.failed == [], load.failed[:5]
    assert load.ok > 100 and load.long_ok > 4, (load.ok, load.long_ok)
    _, ca = call(mesh.ctl.port, "GET", "/v1/ca")
    roots = [r["fingerprint"] for r in ca["roots"]]
    assert len(roots) == 1 and old not in roots, ca
    for sc in (a, b):
        assert _identity(sc)["issuer"] == roots[0]
    # new connections work under the new root alone
    status, _, _ = request(a.outbound, path="/id", host="b")
    assert status == 200
