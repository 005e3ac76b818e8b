"""Join tokens are reusable until they expire (bound to one service), so a sidecar
whose key lived only in memory proves itself again: after a restart, and after its
certificate expired while the control plane was away. ``--single-use`` tokens buy
one certificate."""

from __future__ import annotations

import time

from tests.integration.security.mesh import (
    ADMIN,
    Mesh,
    sidecar_view,
    start_mesh,
    wait_identity,
)
from tests.support.control import Control, start_control
from tests.support.procs import Cluster, Sidecar, request, run_meshlayer


def _with_token(mesh: Mesh, service: str, app: str, token: str) -> Sidecar:
    return mesh.sidecar(service, app, extra=[f"--token={token}"], token=False)


def _restart_control(cluster: Cluster, mesh: Mesh, cert_ttl: str) -> Control:
    """The same control plane (store, ports, CA) started again."""
    cert, key = cluster.tmp / "ca.pem", cluster.tmp / "ca-key.pem"
    return start_control(
        cluster.tmp,
        mesh.ctl.store_url,
        [
            "--listen-mtls",
            f"127.0.0.1:{mesh.mtls_port}",
            "--cert-ttl",
            cert_ttl,
            "--ca-cert",
            str(cert),
            "--ca-key",
            str(key),
        ],
        port=mesh.ctl.port,
        procs=cluster.procs,
        plaintext_sidecars=False,
    )


def _until_ok(port: int, timeout: float) -> tuple[int, dict[str, str], bytes]:
    deadline = time.monotonic() + timeout
    out: tuple[int, dict[str, str], bytes] = (0, {}, b"")
    while time.monotonic() < deadline:
        try:
            out = request(port, path="/id", host="b", timeout=3)
        except OSError:
            pass
        if out[0] == 200:
            return out
        time.sleep(0.2)
    return out


def test_a_restarted_sidecar_gets_a_certificate_again_with_its_token(cluster: Cluster) -> None:
    mesh = start_mesh(cluster)
    up = cluster.upstream("b")
    token = mesh.token("b")
    b = _with_token(mesh, "b", up.address, token)
    first = wait_identity(b)
    assert b.proc.stop() == 0  # its key is gone with it
    b = _with_token(mesh, "b", up.address, token)  # same token, new process, new key
    again = wait_identity(b)
    assert again["identity"] == first["identity"]
    a = mesh.sidecar("a", "127.0.0.1:9")
    wait_identity(a, ("b",))
    status, _, body = _until_ok(a.outbound, 10)
    assert (status, body) == (200, b"b"), b.proc.log()
    assert b.metric("meshlayer_tls_handshakes_total", side="server") >= 1
    assert b.metric("meshlayer_cert_expiry_seconds") > 0


def test_identity_recovers_after_expiring_during_a_control_plane_outage(
    cluster: Cluster,
) -> None:
    mesh = start_mesh(cluster, cert_ttl="2s")
    up = cluster.upstream("b")
    b = mesh.sidecar("b", up.address)
    a = mesh.sidecar("a", "127.0.0.1:9")
    wait_identity(b)
    wait_identity(a, ("b",))
    assert request(a.outbound, path="/id", host="b")[0] == 200
    mesh.ctl.stop()
    deadline = time.monotonic() + 10
    while (
        a.metric("meshlayer_cert_expiry_seconds") >= 0
        or b.metric("meshlayer_cert_expiry_seconds") >= 0
    ):
        assert time.monotonic() < deadline, "certificates never expired"
        time.sleep(0.1)
    time.sleep(0.3)
    status, headers, _ = request(a.outbound, path="/id", host="b")
    assert (status, headers.get("x-meshlayer-error")) == (503, "no-identity")

    ctl = _restart_control(cluster, mesh, "2s")
    status, _, body = _until_ok(a.outbound, 20)
    assert (status, body) == (200, b"b"), (a.proc.log(), ctl.log()[-3000:])
    for sc in (a, b):
        ident = sidecar_view(sc)["control"]["identity"]
        assert ident["notAfter"] > time.time() - 1, ident
        assert sc.metric("meshlayer_cert_expiry_seconds") > -1
    assert "already used" not in ctl.log()


def test_single_use_tokens_buy_one_certificate(cluster: Cluster) -> None:
    mesh = start_mesh(cluster)
    base = ["token", "create", "--service", "b", "--control", mesh.ctl.url]
    out = run_meshlayer([*base, "--admin-token", ADMIN, "--single-use", "--json"])
    assert out.returncode == 0, out.stderr
    assert '"singleUse": true' in out.stdout
    once = run_meshlayer([*base, "--admin-token", ADMIN, "--single-use"]).stdout.strip()
    up = cluster.upstream("b")
    b = _with_token(mesh, "b", up.address, once)
    wait_identity(b)
    assert b.proc.stop() == 0
    b = _with_token(mesh, "b", up.address, once)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and "already used" not in b.proc.log():
        time.sleep(0.1)
    assert "already used" in b.proc.log(), b.proc.log()
    assert sidecar_view(b)["control"]["identity"]["notAfter"] is None
