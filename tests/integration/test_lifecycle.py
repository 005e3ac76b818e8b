"""A sidecar's life: streaming in bounded memory, graceful shutdown, admin, inbound, loop."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.procs import Cluster, RssSampler, Sidecar, Upstream, request, service_yaml

GiB = 1 << 30
MiB = 1 << 20
RSS_LIMIT = 64 * MiB
BLOCK = b"m" * MiB


def _blocks(total: int) -> Iterator[bytes]:
    """``total`` bytes in 1 MiB pieces, generated as they are sent (never held at once)."""
    view = memoryview(BLOCK)
    while total > 0:
        n = min(total, len(BLOCK))
        total -= n
        yield BLOCK if n == len(BLOCK) else bytes(view[:n])


def _upload(port: int, host: str, total: int, chunked: bool) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Host": host}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    else:
        headers["Content-Length"] = str(total)
    conn.request("POST", "/sink", body=_blocks(total), headers=headers, encode_chunked=chunked)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def _download(port: int, host: str, total: int) -> tuple[int, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", f"/bytes/{total}", headers={"Host": host})
    resp = conn.getresponse()
    buf = bytearray(MiB)
    got = 0
    while n := resp.readinto(buf):
        got += n
    conn.close()
    return resp.status, got


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread; the dict gets "result" or "error"."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except Exception as exc:
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"not within {timeout}s: {what}")


def _upstream_saw(up: Upstream, path: str) -> Callable[[], bool]:
    return lambda: path in up.stats()["paths"]


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True


def _samples(text: str, metric: str, **labels: str) -> dict[str, float]:
    """Samples of ``metric`` whose labels include ``labels``, by their ``name`` label."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(metric + "{"):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if all(found.get(k) == v for k, v in labels.items()):
            out[found.get("name", "")] = float(value)
    return out


# -- 1. streaming with bounded memory ---------------------------------------------


@pytest.mark.slow
def test_gigabyte_streams_both_ways_in_bounded_memory(cluster: Cluster) -> None:
    up = cluster.upstream("bulk")
    sc = cluster.sidecar(service_yaml("bulk", [up.address]))
    pid = sc.proc.pid
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    with RssSampler(pid) as rss:
        status, body = _upload(sc.outbound, "bulk", GiB, chunked=False)
    timings["upload 1 GiB (content-length)"] = time.monotonic() - t0
    assert (status, body) == (200, b"1073741824")
    assert rss.samples >= 5
    assert rss.peak < RSS_LIMIT, f"sidecar RSS peaked at {rss.peak / MiB:.1f} MiB (upload)"

    t0 = time.monotonic()
    with RssSampler(pid) as rss:
        status, got = _download(sc.outbound, "bulk", GiB)
    timings["download 1 GiB"] = time.monotonic() - t0
    assert (status, got) == (200, GiB)
    assert rss.peak < RSS_LIMIT, f"sidecar RSS peaked at {rss.peak / MiB:.1f} MiB (download)"

    t0 = time.monotonic()
    with RssSampler(pid) as rss:
        status, body = _upload(sc.outbound, "bulk", 256 * MiB, chunked=True)
    timings["upload 256 MiB (chunked)"] = time.monotonic() - t0
    assert (status, body) == (200, str(256 * MiB).encode())
    assert rss.peak < RSS_LIMIT, f"sidecar RSS peaked at {rss.peak / MiB:.1f} MiB (chunked)"

    print("streaming timings:", {k: round(v, 2) for k, v in timings.items()})
    assert sum(timings.values()) < 60
    assert sc.metric("meshlayer_requests_total", destination="bulk", status_class="2xx") == 3


@pytest.mark.slow
def test_slow_reader_does_not_make_the_sidecar_buffer(cluster: Cluster) -> None:
    """A client that reads slowly: backpressure reaches the upstream instead of RAM."""
    up = cluster.upstream("bulk")
    sc = cluster.sidecar(service_yaml("bulk", [up.address]))
    total = 512 * MiB
    with RssSampler(sc.proc.pid) as rss:
        s = socket.create_connection(("127.0.0.1", sc.outbound), timeout=30)
        s.sendall(f"GET /bytes/{total} HTTP/1.1\r\nHost: bulk\r\n\r\n".encode())
        time.sleep(1.0)  # the upstream can send far more than 64 MiB meanwhile
        mid = rss.peak
        got = 0
        buf = bytearray(MiB)
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            got += n
            if got >= total:  # head + body; the body ends exactly at total
                break
        s.close()
    assert mid < RSS_LIMIT, f"sidecar RSS {mid / MiB:.1f} MiB while the client did not read"
    assert rss.peak < RSS_LIMIT
    assert got >= total


# -- 2. graceful shutdown ---------------------------------------------------------


def test_sigterm_drains_in_flight_requests_then_exits_0(cluster: Cluster) -> None:
    up = cluster.upstream("slow")
    sc = cluster.sidecar(service_yaml("slow", [up.address]), extra=["--grace", "10"])
    thread, out = _in_thread(lambda: request(sc.outbound, path="/delay/1500", host="slow"))
    _wait_for(_upstream_saw(up, "/delay/1500"), 2, "the request reached the upstream")
    time.sleep(0.2)
    t_term = time.monotonic()
    sc.proc.signal(signal.SIGTERM)

    _wait_for(lambda: sc.admin_get("/ready")[0] == 503, 1, "/ready turns 503")
    assert sc.admin_get("/live")[0] == 200
    _wait_for(lambda: _refused(sc.outbound), 1, "the outbound port refuses connections")
    assert _refused(sc.inbound)
    assert thread.is_alive(), "the in-flight request must still be running"

    thread.join(5)
    assert "error" not in out, out
    status, headers, body = out["result"]
    assert (status, body) == (200, b"late")
    assert headers.get("connection") == "close"
    rc = sc.proc.popen.wait(5)
    elapsed = time.monotonic() - t_term
    assert rc == 0, sc.proc.log()
    assert elapsed < 1.5 + 1.0, f"exit took {elapsed:.2f}s after SIGTERM"
    assert "grace period over" not in sc.proc.log()


def test_idle_sidecar_exits_at_once_on_sigterm(cluster: Cluster) -> None:
    up = cluster.upstream("svc")
    sc = cluster.sidecar(service_yaml("svc", [up.address]))
    # an idle keep-alive client connection must not hold the shutdown
    conn = http.client.HTTPConnection("127.0.0.1", sc.outbound, timeout=5)
    conn.request("GET", "/id", headers={"Host": "svc"})
    assert conn.getresponse().read() == b"svc"
    t_term = time.monotonic()
    sc.proc.signal(signal.SIGINT)
    assert sc.proc.popen.wait(5) == 0
    assert time.monotonic() - t_term < 1.0
    conn.close()


def test_grace_period_cuts_long_requests(cluster: Cluster) -> None:
    up = cluster.upstream("slow")
    sc = cluster.sidecar(service_yaml("slow", [up.address]), extra=["--grace", "0.5"])
    thread, out = _in_thread(lambda: request(sc.outbound, path="/delay/5000", host="slow"))
    _wait_for(_upstream_saw(up, "/delay/5000"), 2, "the request reached the upstream")
    t_term = time.monotonic()
    sc.proc.signal(signal.SIGTERM)
    rc = sc.proc.popen.wait(5)
    elapsed = time.monotonic() - t_term
    assert rc == 0, sc.proc.log()
    assert 0.4 <= elapsed < 1.5, f"exit {elapsed:.2f}s after SIGTERM with --grace 0.5"
    thread.join(5)
    assert not thread.is_alive()
    assert "result" not in out, f"the cut request must not look complete: {out}"
    assert isinstance(out["error"], (http.client.HTTPException, ConnectionError)), out
    assert "grace period over" in sc.proc.log()


# -- 3. admin ---------------------------------------------------------------------


def test_admin_pages(cluster: Cluster) -> None:
    up = cluster.upstream("catalog")
    sc = cluster.sidecar(service_yaml("catalog", [up.address]), service="shop")
    assert sc.admin_get("/live") == (200, "live\n")
    assert sc.admin_get("/ready") == (200, "ready\n")
    assert sc.admin_get("/nope")[0] == 404

    for _ in range(3):
        assert request(sc.outbound, path="/id", host="catalog")[0] == 200
    assert request(sc.outbound, path="/status/503", host="catalog")[0] == 503

    status, text = sc.admin_get("/metrics")
    assert status == 200
    route = {"direction": "outbound", "source": "shop", "destination": "catalog"}
    assert sc.metric("meshlayer_requests_total", **route, status_class="2xx") == 3
    # 503 is retried (attempts: 2 by default) and still 503 in the end: one 5xx request
    assert sc.metric("meshlayer_requests_total", **route, status_class="5xx") == 1
    assert sc.metric("meshlayer_requests_total", **route) == 4
    assert "# TYPE meshlayer_request_duration_seconds histogram" in text
    assert sc.metric("meshlayer_request_duration_seconds_count", **route) == 4
    assert sc.metric("meshlayer_request_duration_seconds_bucket", **route, le="+Inf") == 4
    assert sc.metric("meshlayer_request_duration_seconds_bucket", **route, le="10.0") == 4
    assert "# TYPE meshlayer_open_connections gauge" in text
    upstream_conns = _samples(text, "meshlayer_open_connections", side="upstream")
    assert upstream_conns["catalog"] == 1  # the kept-alive connection
    downstream = _samples(text, "meshlayer_open_connections", side="downstream")
    assert set(downstream) == {"outbound", "inbound"}
    assert 'meshlayer_ejected_endpoints{service="catalog"} 0.0' in text

    status, body = sc.admin_get("/config")
    assert status == 200
    view = json.loads(body)
    assert isinstance(view["version"], str) and view["version"]
    assert list(view["services"]) == ["catalog"]
    svc = view["services"]["catalog"]
    assert svc["endpoints"] == [{"address": up.address, "meshed": False}]
    assert svc["loadBalancer"] == "p2c-ewma"
    assert view["sidecar"]["service"] == "shop"
    assert view["sidecar"]["outbound"] == f"127.0.0.1:{sc.outbound}"
    assert sc.metric("meshlayer_config_info", version=view["version"]) == 1


def test_app_and_same_named_service_have_separate_connection_gauges(cluster: Cluster) -> None:
    """A sidecar's config usually lists its own service too; the two pools are not one."""
    up = cluster.upstream("catalog")
    sc = cluster.sidecar(service_yaml("catalog", [up.address]), service="catalog", app=up.address)
    assert request(sc.inbound, path="/id")[2] == b"catalog"
    assert request(sc.outbound, path="/id", host="catalog")[2] == b"catalog"
    text = sc.admin_get("/metrics")[1]
    assert _samples(text, "meshlayer_open_connections", side="upstream") == {
        "catalog": 1,
        "catalog(app)": 1,
    }
    assert 'meshlayer_endpoints{service="catalog(app)"} 1.0' in text


def test_admin_answers_head_and_refuses_other_methods(cluster: Cluster) -> None:
    sc = cluster.sidecar(service_yaml("x", ["127.0.0.1:9"]))
    conn = http.client.HTTPConnection("127.0.0.1", sc.admin, timeout=5)
    conn.request("HEAD", "/ready")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"")
    conn.request("POST", "/ready", body=b"")
    assert conn.getresponse().status == 405
    conn.close()


# -- 4. inbound listener ----------------------------------------------------------


def test_inbound_reaches_the_local_app(cluster: Cluster) -> None:
    app = cluster.upstream("app")
    sc = cluster.sidecar(service_yaml("other", ["127.0.0.1:9"]), service="web", app=app.address)
    status, _, body = request(sc.inbound, path="/id", host="whatever")
    assert (status, body) == (200, b"app")
    assert sc.metric("meshlayer_requests_total", direction="inbound", destination="web") == 1
    # no x-meshlayer-source header: a caller outside the mesh
    assert sc.metric("meshlayer_requests_total", direction="inbound", source="unknown") == 1


def _chain(cluster: Cluster) -> tuple[Upstream, Sidecar, Sidecar]:
    app = cluster.upstream("server-app")
    server = cluster.sidecar(
        service_yaml("unrelated", ["127.0.0.1:9"]), service="server", app=app.address
    )
    client = cluster.sidecar(
        service_yaml("server", [f"127.0.0.1:{server.inbound}"], meshed=True), service="client"
    )
    return app, server, client


def test_two_sidecar_chain_carries_the_source(cluster: Cluster) -> None:
    app, server, client = _chain(cluster)
    status, _, body = request(client.outbound, path="/id", host="server")
    assert (status, body) == (200, b"server-app")
    # a client may not claim another source: its own sidecar says who it is
    status, _, body = request(
        client.outbound, path="/headers", host="server", headers={"x-meshlayer-source": "evil"}
    )
    assert status == 200
    seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert "x-meshlayer-source" not in seen  # mesh-internal; the app never sees it
    assert seen["host"] == "server"
    assert seen["x-forwarded-for"] == "127.0.0.1, 127.0.0.1"
    assert app.stats()["paths"][:2] == ["/id", "/headers"]

    inbound = server.metric(
        "meshlayer_requests_total", direction="inbound", source="client", destination="server"
    )
    assert inbound == 2
    assert server.metric("meshlayer_requests_total", source="evil") == 0
    outbound = client.metric(
        "meshlayer_requests_total", direction="outbound", source="client", destination="server"
    )
    assert outbound == 2


# -- 5. event loop ----------------------------------------------------------------


def test_runs_on_uvloop(cluster: Cluster) -> None:
    sc = cluster.sidecar(service_yaml("x", ["127.0.0.1:9"]))
    view = json.loads(sc.admin_get("/config")[1])
    assert view["sidecar"]["loop"] == "uvloop"
