"""Sidecar-to-sidecar mTLS with identities from the control plane's CA.

Real processes: a control plane with a test-owned root, sidecars with join
tokens, test upstreams, a TCP relay that records what goes over the wire.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.security.mesh import (
    Mesh,
    Relay,
    call,
    sidecar_view,
    spiffe,
    start_mesh,
    wait_identity,
)
from tests.support.procs import Cluster, free_port, request, run_meshlayer


@pytest.fixture
def mesh(cluster: Cluster) -> Mesh:
    return start_mesh(cluster)


@pytest.fixture
def relay_box() -> Iterator[list[Relay]]:
    box: list[Relay] = []
    yield box
    for r in box:
        r.close()


def test_two_sidecars_talk_mtls_on_the_wire(
    cluster: Cluster, mesh: Mesh, relay_box: list[Relay]
) -> None:
    up = cluster.upstream("b")
    inbound_b = free_port()
    relay = Relay(inbound_b)
    relay_box.append(relay)
    b = mesh.sidecar(
        "b",
        up.address,
        ["--inbound", f"127.0.0.1:{inbound_b}", "--advertise", f"127.0.0.1:{relay.port}"],
    )
    a = mesh.sidecar("a", "127.0.0.1:9")
    wait_identity(b)
    ident = wait_identity(a, ("b",))
    assert ident["identity"] == spiffe("a")

    status, _, body = request(a.outbound, path="/headers", host="b")
    assert status == 200, body
    seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert seen["x-meshlayer-peer-identity"] == spiffe("a")
    # the bytes that crossed to B's inbound port are a TLS handshake, not HTTP
    assert relay.first, "nothing went through the relay"
    assert all(f[:1] == b"\x16" and f[1:3] == b"\x03\x01" for f in relay.first), relay.first

    # many requests on fresh client connections: the sidecars' connection is pooled
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: request(a.outbound, path="/id", host="b")[0], range(60)))
    assert statuses == [200] * 60
    handshakes = b.metric("meshlayer_tls_handshakes_total", side="server")
    assert 1 <= handshakes <= 4, handshakes
    assert len(relay.first) == handshakes
    assert a.metric("meshlayer_tls_handshakes_total", side="client") == handshakes


def test_token_from_env_and_the_wrong_or_no_token(
    cluster: Cluster, mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MESHLAYER_TOKEN works like --token
    monkeypatch.setenv("MESHLAYER_TOKEN", mesh.token("b"))
    b = mesh.sidecar("b", "127.0.0.1:9", token=False)
    assert wait_identity(b)["identity"] == spiffe("b")
    monkeypatch.delenv("MESHLAYER_TOKEN")
    # another service's token gets no certificate; no token: no plaintext registration
    thief = mesh.sidecar("c", "127.0.0.1:9", extra=[f"--token={mesh.token('b')}"], token=False)
    plain = mesh.sidecar("d", "127.0.0.1:9", token=False)
    time.sleep(2.0)
    for sc in (thief, plain):
        control = sidecar_view(sc)["control"]
        assert not control["registered"], control
        assert not (control["identity"] or {}).get("notAfter"), control
    assert "403" in thief.proc.log() or "forbidden" in thief.proc.log(), thief.proc.log()
    _, registry = call(mesh.ctl.port, "GET", "/v1/registry")
    assert {e["service"] for e in registry["endpoints"]} == {"b"}, registry
    # --token needs --control
    out = run_meshlayer(["sidecar", "--service", "x", "--config", "/dev/null", "--token=t"])
    assert out.returncode == 2 and "--token" in out.stderr, out.stderr
