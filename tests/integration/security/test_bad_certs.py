"""Certificates the mesh must refuse, against real sidecars: the handshake fails (or
the peer is aborted right after it) and the app behind receives nothing."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.security.mesh import (
    Mesh,
    RootCA,
    sidecar_view,
    spiffe,
    start_mesh,
    tls_attempt,
    wait_identity,
)
from tests.support.procs import Cluster, Upstream, raw, request


@pytest.fixture
def mesh(cluster: Cluster) -> Mesh:
    return start_mesh(cluster)


def _app_untouched(up: Upstream, before: dict[str, int]) -> None:
    """Only the /stats calls themselves reached the app."""
    after = up.stats()
    assert after["connections"] == before["connections"] + 1, (before, after)
    assert after["requests"] == before["requests"] + 1, (before, after)


def test_inbound_refuses_bad_client_certificates(cluster: Cluster, mesh: Mesh) -> None:
    up = cluster.upstream("b")
    b = mesh.sidecar("b", up.address)
    wait_identity(b)
    ca, roots = mesh.ca, mesh.ca.pem
    foreign = RootCA("foreign root")
    cases = {  # reason counted -> the certificate the client shows
        "no-certificate": None,
        "expired": ca.leaf(spiffe("a"), start=-7200, end=-3600),
        "not-yet-valid": ca.leaf(spiffe("a"), start=3600, end=7200),
        "unknown-ca": foreign.leaf(spiffe("a")),
        "wrong-trust-domain": ca.leaf(spiffe("a", "other.local")),
        "ca-as-leaf": ca.leaf(spiffe("a"), ca=True),
        "bad-spiffe-id": ca.leaf("https://a.example/"),
    }
    for reason, cert in cases.items():
        before = up.stats()
        got = tls_attempt(b.inbound, cluster.tmp, roots, cert)
        assert got == b"", f"{reason}: answered {got[:80]!r}"
        _app_untouched(up, before)
        counted = b.metric("meshlayer_tls_handshake_failures_total", side="server", reason=reason)
        assert counted == 1, (reason, b.admin_get("/metrics")[1])
    assert b.metric("meshlayer_tls_handshakes_total") == 0

    # the same client with a good certificate gets through (the test can fail)
    got = tls_attempt(b.inbound, cluster.tmp, roots, ca.leaf(spiffe("a")))
    assert got.startswith(b"HTTP/1.1 200"), got
    assert b.metric("meshlayer_tls_handshakes_total", side="server") == 1


def test_plaintext_refused_in_strict_served_in_permissive(cluster: Cluster, mesh: Mesh) -> None:
    up = cluster.upstream("b")
    b = mesh.sidecar("b", up.address)
    wait_identity(b)
    plain = b"GET /headers HTTP/1.1\r\nhost: b\r\nx-meshlayer-peer-identity: forged\r\n\r\n"
    before = up.stats()
    try:
        refused = raw(b.inbound, plain, timeout=3)
    except ConnectionResetError:
        refused = b""
    assert refused == b""
    _app_untouched(up, before)
    assert b.metric("meshlayer_tls_handshake_failures_total", reason="plaintext") == 1

    mesh.apply(
        {
            "apiVersion": "meshlayer/v1",
            "kind": "Mesh",
            "metadata": {"name": "default"},
            "spec": {"mtls": {"mode": "permissive"}},
        }
    )
    deadline = time.monotonic() + 10
    while sidecar_view(b)["control"]["identity"]["mode"] != "permissive":
        assert time.monotonic() < deadline, "mode never became permissive"
        time.sleep(0.05)
    status, _, answer = request(
        b.inbound, path="/headers", host="b", headers={"x-meshlayer-peer-identity": "forged"}
    )
    assert status == 200, answer
    body = json.loads(answer)
    names = [k.lower() for k, _ in body["headers"]]
    assert "x-meshlayer-peer-identity" not in names  # plaintext: no identity, forged one gone
    # TLS still works in permissive mode, with the verified identity
    got = tls_attempt(
        b.inbound,
        cluster.tmp,
        mesh.ca.pem,
        mesh.ca.leaf(spiffe("a")),
        b"GET /headers HTTP/1.1\r\nhost: b\r\nconnection: close\r\n"
        b"x-meshlayer-peer-identity: forged\r\n\r\n",
        until_close=True,
    )
    assert got.startswith(b"HTTP/1.1 200"), got
    body = json.loads(got.split(b"\r\n\r\n", 1)[1])
    seen = [v for k, v in body["headers"] if k.lower() == "x-meshlayer-peer-identity"]
    assert seen == [spiffe("a")], seen


class FakePeer:
    """A TLS server with a given certificate that answers 200 to anything; counts the
    application bytes it receives."""

    def __init__(self, tmp: Path, cert: tuple[bytes, bytes], roots: bytes) -> None:
        cp, kp = tmp / f"peer-{id(self)}.pem", tmp / f"peer-{id(self)}-key.pem"
        cp.write_bytes(cert[0])
        kp.write_bytes(cert[1])
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cp), str(kp))
        self.ctx.load_verify_locations(cadata=roots.decode())
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(c, server_side=True) as s:
                s.settimeout(5)
                while data := s.recv(65536):
                    self.received += len(data)
                    s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peers() -> Iterator[list[FakePeer]]:
    box: list[FakePeer] = []
    yield box
    for p in box:
        p.close()


def test_outbound_refuses_a_server_with_the_wrong_identity(
    cluster: Cluster, mesh: Mesh, peers: list[FakePeer]
) -> None:
    wrong = FakePeer(cluster.tmp, mesh.ca.leaf(spiffe("c")), mesh.ca.pem)  # poses as b
    right = FakePeer(cluster.tmp, mesh.ca.leaf(spiffe("d")), mesh.ca.pem)
    peers += [wrong, right]
    for name, peer in (("b", wrong), ("d", right)):
        mesh.apply(
            {
                "apiVersion": "meshlayer/v1",
                "kind": "Service",
                "metadata": {"name": name},
                "spec": {
                    "endpoints": [{"address": f"127.0.0.1:{peer.port}", "meshed": True}],
                    "retries": {"attempts": 0},
                },
            }
        )
    a = mesh.sidecar("a", "127.0.0.1:9")
    wait_identity(a, ("b", "d"))
    status, headers, body = request(a.outbound, path="/", host="d")
    assert status == 200 and body == b"ok", (status, body)
    assert right.received > 0
    status, headers, body = request(a.outbound, path="/secret", host="b")
    assert status == 503, (status, body)
    assert headers.get("x-meshlayer-error") == "connect-failure", headers
    assert wrong.accepted >= 1  # it was reached, and told nothing
    assert wrong.received == 0
    assert a.metric("meshlayer_tls_handshake_failures_total", reason="wrong-identity") >= 1
