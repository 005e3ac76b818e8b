"""Timeouts, retries, the retry budget and circuit breaking, with real processes.

Every response the mesh makes up itself must carry ``x-meshlayer-error`` and a
JSON body naming the same reason; an upstream's own 5xx is relayed untouched.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.support.procs import (
    Cluster,
    free_port,
    parallel,
    request,
    service_yaml,
    upstream_with,
)


def assert_mesh_error(
    resp: tuple[int, dict[str, str], bytes], status: int, reason: str
) -> dict[str, object]:
    """``resp`` is a response the mesh made: status, header and JSON body agree."""
    got_status, headers, body = resp
    assert got_status == status, (got_status, headers, body)
    assert headers.get("x-meshlayer-error") == reason, headers
    assert headers.get("content-type") == "application/json"
    doc = json.loads(body)
    assert doc["error"] == reason
    assert doc["status"] == status
    assert doc["message"]
    return dict(doc)


def assert_app_response(resp: tuple[int, dict[str, str], bytes], status: int) -> None:
    """``resp`` was relayed from the app: no mesh error marker."""
    got_status, headers, body = resp
    assert got_status == status, (got_status, headers, body)
    assert "x-meshlayer-error" not in headers, headers


# -- connect failures and timeouts ---------------------------------------------


def test_connect_failure_is_a_mesh_503(cluster: Cluster) -> None:
    dead = f"127.0.0.1:{free_port()}"
    sc = cluster.sidecar(service_yaml("svc", [dead]))
    t0 = time.monotonic()
    resp = request(sc.outbound, path="/", host="svc", timeout=5)
    assert time.monotonic() - t0 < 1.0
    doc = assert_mesh_error(resp, 503, "connect-failure")
    assert dead in str(doc["message"])
    assert sc.metric("meshlayer_mesh_errors_total", reason="connect-failure") == 1


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An address whose SYNs go unanswered: a listener with a full accept queue."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    addr = lsock.getsockname()
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue; later SYNs are dropped
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(addr)
            fillers.append(c)
        time.sleep(0.1)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(addr)
            pytest.skip("this kernel completes connects beyond the listen backlog")
        except (TimeoutError, OSError):
            pass
        finally:
            probe.close()
        yield f"{addr[0]}:{addr[1]}"
    finally:
        for c in fillers:
            c.close()
        lsock.close()


def test_connect_timeout_is_a_mesh_503(cluster: Cluster, blackhole: str) -> None:
    spec = """
timeouts: {connect: 300ms}
retries: {attempts: 0}
"""
    sc = cluster.sidecar(service_yaml("svc", [blackhole], spec=spec))
    t0 = time.monotonic()
    resp = request(sc.outbound, path="/", host="svc", timeout=5)
    elapsed = time.monotonic() - t0
    assert_mesh_error(resp, 503, "connect-timeout")
    assert 0.25 <= elapsed < 1.0, elapsed


def test_request_timeout_is_a_mesh_504(cluster: Cluster) -> None:
    up = cluster.upstream("slow")
    sc = cluster.sidecar(service_yaml("svc", [up.address], spec="timeouts: {request: 500ms}"))
    t0 = time.monotonic()
    resp = request(sc.outbound, path="/delay/3000", host="svc", timeout=5)
    elapsed = time.monotonic() - t0
    assert_mesh_error(resp, 504, "timeout")
    assert 0.45 <= elapsed < 1.0, elapsed
    # a timeout is not retried: the upstream saw the request once
    assert up.stats()["paths"].count("/delay/3000") == 1
    assert sc.metric("meshlayer_retries_total", destination="svc") == 0
    # and a fast request on the same service still works
    assert request(sc.outbound, path="/id", host="svc", timeout=5)[0] == 200


# -- client-side timeouts ------------------------------------------------------


def _read_until_close(s: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Read until the peer closes; returns (data, seconds until the close)."""
    t0 = time.monotonic()
    data = b""
    s.settimeout(timeout)
    while True:
        try:
            piece = s.recv(65536)
        except ConnectionResetError:
            break
        if not piece:
            break
        data += piece
    return data, time.monotonic() - t0


def test_slowloris_header_timeout(cluster: Cluster) -> None:
    up = cluster.upstream("svc")
    sc = cluster.sidecar(service_yaml("svc", [up.address]), extra=["--header-timeout", "0.5"])
    head = b"GET /id HTTP/1.1\r\nHost: svc\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", sc.outbound), timeout=5)
    t0 = time.monotonic()
    data = b""
    closed = False
    try:
        for i in range(0, len(head), 2):  # two bytes every 0.2 s: would take ~4 s
            try:
                s.sendall(head[i : i + 2])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            readable, _, _ = select.select([s], [], [], 0.2)
            if readable:
                rest, _ = _read_until_close(s, 2.0)
                data += rest
                closed = True
                break
            assert time.monotonic() - t0 < 2.0, "header trickle was not cut off"
    finally:
        s.close()
    elapsed = time.monotonic() - t0
    assert closed
    assert 0.4 <= elapsed < 1.2, elapsed
    assert data.startswith(b"HTTP/1.1 408 "), data
    head_part, _, body = data.partition(b"\r\n\r\n")
    assert b"x-meshlayer-error: header-timeout" in head_part.lower()
    assert json.loads(body)["error"] == "header-timeout"
    assert up.stats()["paths"].count("/id") == 0  # nothing was forwarded


def test_idle_keepalive_connection_is_closed(cluster: Cluster) -> None:
    up = cluster.upstream("svc")
    sc = cluster.sidecar(service_yaml("svc", [up.address]), extra=["--idle-timeout", "0.5"])
    with socket.create_connection(("127.0.0.1", sc.outbound), timeout=5) as s:
        s.sendall(b"GET /id HTTP/1.1\r\nHost: svc\r\n\r\n")
        first = b""
        while not first.endswith(b"\r\n\r\nsvc"):  # the whole response; kept alive
            piece = s.recv(65536)
            assert piece, first
            first += piece
        assert first.startswith(b"HTTP/1.1 200 ")
        data, elapsed = _read_until_close(s, 3.0)
    assert data == b""  # closed silently, no response to a request never sent
    assert 0.4 <= elapsed < 1.2, elapsed
    # a connection that never sends anything is closed too
    with socket.create_connection(("127.0.0.1", sc.outbound), timeout=5) as s:
        data, elapsed = _read_until_close(s, 3.0)
    assert data == b""
    assert 0.4 <= elapsed < 1.2, elapsed


# -- retries -------------------------------------------------------------------

NO_EJECTION = "outlierDetection: {consecutiveFailures: 1000}"


def test_idempotent_requests_are_retried_on_another_endpoint(cluster: Cluster) -> None:
    good = cluster.upstream("good")
    bad = upstream_with(cluster, "bad", "--fail-status", "503")
    spec = f"loadBalancer: round-robin\n{NO_EJECTION}"
    sc = cluster.sidecar(service_yaml("svc", [good.address, bad.address], spec=spec))
    for _ in range(20):
        status, _, body = request(sc.outbound, path="/id", host="svc", timeout=5)
        assert (status, body) == (200, b"good")
    bad_hits = bad.stats()["paths"].count("/id")
    assert bad_hits >= 5  # round-robin really did send some to the failing one
    assert sc.metric("meshlayer_retries_total", destination="svc", cause="503") == bad_hits
    assert good.stats()["paths"].count("/id") == 20


def test_non_idempotent_requests_are_not_retried(cluster: Cluster) -> None:
    good = cluster.upstream("good")
    bad = upstream_with(cluster, "bad", "--fail-status", "503")
    spec = f"loadBalancer: round-robin\n{NO_EJECTION}"
    sc = cluster.sidecar(service_yaml("svc", [good.address, bad.address], spec=spec))
    statuses: Counter[int] = Counter()
    for _ in range(20):
        resp = request(sc.outbound, "POST", "/id", host="svc", body=b"payload", timeout=5)
        if resp[0] == 503:
            assert_app_response(resp, 503)  # the app's own 503, relayed
            assert resp[2] == b"status 503"
        else:
            assert (resp[0], resp[2]) == (200, b"good")
        statuses[resp[0]] += 1
    assert statuses == {200: 10, 503: 10}
    assert sc.metric("meshlayer_retries_total", destination="svc") == 0
    assert bad.stats()["paths"].count("/id") == 10


def test_connect_failures_are_retried_even_for_post(cluster: Cluster) -> None:
    good = cluster.upstream("good")
    dead = f"127.0.0.1:{free_port()}"
    spec = f"loadBalancer: round-robin\n{NO_EJECTION}"
    sc = cluster.sidecar(service_yaml("svc", [good.address, dead], spec=spec))
    for method in ("GET", "POST"):
        for _ in range(10):
            status, _, body = request(
                sc.outbound, method, "/sink", host="svc", body=b"12345", timeout=5
            )
            assert (status, body) == (200, b"5")  # the body was replayed whole
    assert sc.metric("meshlayer_retries_total", destination="svc", cause="connect-failure") >= 5
    assert good.stats()["paths"].count("/sink") == 20


def test_retries_give_up_after_attempts(cluster: Cluster) -> None:
    bad = upstream_with(cluster, "bad", "--fail-status", "503")
    spec = f"retries: {{attempts: 2}}\n{NO_EJECTION}"
    sc = cluster.sidecar(service_yaml("svc", [bad.address], spec=spec))
    resp = request(sc.outbound, path="/x", host="svc", timeout=5)
    assert_app_response(resp, 503)  # the last attempt's answer is relayed
    assert bad.stats()["paths"].count("/x") == 3  # one try + two retries
    assert sc.metric("meshlayer_retries_total", destination="svc") == 2


def test_retry_budget_bounds_retries(cluster: Cluster) -> None:
    bad = upstream_with(cluster, "bad", "--fail-status", "503")
    spec = "retries: {attempts: 2, minPerSecond: 1, budgetPercent: 0}"
    sc = cluster.sidecar(service_yaml("svc", [bad.address], spec=spec))
    for _ in range(50):
        assert_app_response(request(sc.outbound, path="/x", host="svc", timeout=5), 503)
    # minPerSecond 1 over the 10 s window: 10 retries, not 50 * 2
    retries = sc.metric("meshlayer_retries_total", destination="svc")
    assert retries == 10
    assert bad.stats()["paths"].count("/x") == 60


# -- circuit breaking ----------------------------------------------------------


def test_max_requests_overflow_is_an_immediate_503(cluster: Cluster) -> None:
    up = cluster.upstream("svc")
    spec = "circuitBreaker: {maxRequests: 2, maxPendingRequests: 0, maxConnections: 2}"
    sc = cluster.sidecar(service_yaml("svc", [up.address], spec=spec))

    def call() -> tuple[int, dict[str, str], bytes]:
        return request(sc.outbound, path="/delay/500", host="svc", timeout=5)

    results = parallel([call] * 10)
    ok = [(t, r) for t, r in results if r[0] == 200]
    over = [(t, r) for t, r in results if r[0] != 200]
    assert len(ok) == 2, [r[0] for _, r in results]
    assert len(over) == 8
    for t, r in over:
        assert_mesh_error(r, 503, "overflow")
        assert t < 0.2, t
    for t, _ in ok:
        assert 0.45 <= t < 1.5
    assert up.stats()["paths"].count("/delay/500") == 2
    assert sc.metric("meshlayer_mesh_errors_total", reason="overflow") == 8
    # the breaker closes again once the requests are done
    assert request(sc.outbound, path="/id", host="svc", timeout=5)[0] == 200


def test_pending_queue_waits_for_a_connection(cluster: Cluster) -> None:
    up = cluster.upstream("svc")
    spec = "circuitBreaker: {maxConnections: 1, maxPendingRequests: 1}"
    sc = cluster.sidecar(service_yaml("svc", [up.address], spec=spec))
    conns_before = up.stats()["connections"]

    def call() -> tuple[int, dict[str, str], bytes]:
        return request(sc.outbound, path="/delay/300", host="svc", timeout=5)

    results = parallel([call] * 3)
    statuses = sorted(r[0] for _, r in results)
    assert statuses == [200, 200, 503], statuses
    times = sorted(t for t, r in results if r[0] == 200)
    assert 0.25 <= times[0] < 0.55  # had the connection
    assert 0.55 <= times[1] < 1.2  # waited for it, then reused it
    (over,) = [(t, r) for t, r in results if r[0] == 503]
    assert over[0] < 0.2
    assert_mesh_error(over[1], 503, "overflow")
    # one upstream connection served both requests (the other new one is /stats)
    assert up.stats()["connections"] - conns_before == 2
