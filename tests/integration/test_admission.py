"""Admission control with real processes: class order, weights, shedding, the adaptive limit.

A sidecar sits in front of the h11 test upstream (``--delay-ms`` gives it a
fixed service time, ``/set-delay/<ms>`` changes it under load). Requests
carry their class in ``x-meshlayer-priority``. The upstream records the
paths it received in order, which is the order the sidecar admitted them.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.support.procs import Cluster, Sidecar, Upstream, request, upstream_with

CLASSES = (("critical", 100, 60), ("default", 50, 30), ("batch", 10, 10))


def mesh(
    up: Upstream,
    inbound: str = "{concurrency: 2}",
    outbound: str = "{concurrency: unlimited}",
    target: str | None = None,
    extra: str = "",
) -> str:
    """Service ``web`` (the upstream); ``target``: every class gets this queueDelayTarget
    (and a long queue), else the shipped classes."""
    text = (
        "apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: web}\nspec:\n"
        f'  endpoints: [{{address: "{up.address}", meshed: false}}]\n'
        f"  inbound: {inbound}\n  outbound: {outbound}\n{extra}"
    )
    return text + (_classes(target) if target else "")


def _classes(target: str) -> str:
    return "".join(
        f"---\napiVersion: meshlayer/v1\nkind: PriorityClass\nmetadata: {{name: {name}}}\n"
        f"spec: {{rank: {rank}, weight: {weight}, queueDelayTarget: {target}, "
        "maxQueueLength: 10000}\n"
        for name, rank, weight in CLASSES
    )


class Client:
    """One keep-alive client connection sending requests of one class."""

    def __init__(self, port: int, cls: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        self.cls = cls

    def get(self, path: str) -> tuple[int, dict[str, str], bytes, float]:
        t0 = time.perf_counter()
        self.conn.request("GET", path, headers={"Host": "web", "x-meshlayer-priority": self.cls})
        resp = self.conn.getresponse()
        body = resp.read()
        elapsed = time.perf_counter() - t0
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, elapsed

    def close(self) -> None:
        self.conn.close()


def wait_metric(sc: Sidecar, name: str, want: float, seconds: float = 2.0, **labels: str) -> float:
    """Poll a metric until it equals ``want`` (or the time is up); its last value."""
    deadline = time.monotonic() + seconds
    value = sc.metric(name, **labels)
    while value != want and time.monotonic() < deadline:
        time.sleep(0.01)
        value = sc.metric(name, **labels)
    return value


def in_thread(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def assert_shed(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 503, (status, headers, body)
    assert headers.get("x-meshlayer-error") == "shed", headers
    assert int(headers["retry-after"]) >= 1
    doc = json.loads(body)
    assert doc["error"] == "shed" and doc["status"] == 503


def closed_loops(
    port: int, clients: dict[str, int], seconds: float, path: str = "/", pause_after_shed: float = 0
) -> list[tuple[str, float, int, dict[str, str], bytes, float]]:
    """``clients[cls]`` closed-loop clients per class for ``seconds``; every answer as
    (class, time since start, status, headers, body, latency)."""
    results: list[tuple[str, float, int, dict[str, str], bytes, float]] = []
    lock = threading.Lock()
    start = time.monotonic()
    end = start + seconds

    def loop(cls: str) -> None:
        client = Client(port, cls)
        try:
            for _ in range(100_000):  # bounded; the clock ends it first
                if time.monotonic() >= end:
                    break
                status, headers, body, dt = client.get(path)
                with lock:
                    results.append((cls, time.monotonic() - start, status, headers, body, dt))
                if status == 503 and pause_after_shed:
                    time.sleep(pause_after_shed)
        finally:
            client.close()

    threads = [in_thread(lambda c=cls: loop(c)) for cls, n in clients.items() for _ in range(n)]
    for t in threads:
        t.join(seconds + 30)
    return results


# -- order -----------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_a_burst_is_admitted_in_strict_rank_order(cluster: Cluster, direction: str) -> None:
    up = upstream_with(cluster, "web", "--delay-ms", "400")
    if direction == "inbound":
        sc = cluster.sidecar(mesh(up, target="60s"), service="web", app=up.address)
        port = sc.inbound
    else:
        sc = cluster.sidecar(mesh(up, outbound="{concurrency: 2}", target="60s"))
        port = sc.outbound
    statuses: list[int] = []

    def send(cls: str, path: str) -> None:
        statuses.append(Client(port, cls).get(path)[0])

    threads = [in_thread(lambda: send("batch", "/blocker/0"))]
    time.sleep(0.06)  # the two slots free 60 ms apart: one admission at a time
    threads.append(in_thread(lambda: send("batch", "/blocker/1")))
    time.sleep(0.06)
    expected = []
    for cls in ("batch", "critical", "default"):
        for i in range(4):
            threads.append(in_thread(lambda c=cls, i=i: send(c, f"/{c}/{i}")))
            time.sleep(0.01)
    for cls in ("critical", "default", "batch"):
        expected += [f"/{cls}/{i}" for i in range(4)]
    assert wait_metric(sc, "meshlayer_queue_length", 12, direction=direction) == 12
    for t in threads:
        t.join(15)
    assert statuses == [200] * 14
    paths = [p for p in up.stats()["paths"] if p != "/stats"]
    assert paths == ["/blocker/0", "/blocker/1", *expected]
    assert sc.metric("meshlayer_concurrency_limit", direction=direction) == 2
    assert sc.metric("meshlayer_queue_delay_seconds_count", direction=direction) == 12


def test_priority_off_is_one_fifo_queue(cluster: Cluster) -> None:
    up = upstream_with(cluster, "web", "--delay-ms", "400")
    sc = cluster.sidecar(
        mesh(up, inbound="{concurrency: 1}", target="60s"),
        service="web",
        app=up.address,
        extra=["--priority", "off"],
    )
    threads = [in_thread(lambda: Client(sc.inbound, "batch").get("/blocker"))]
    time.sleep(0.05)
    sent = []
    for i, cls in enumerate(["batch", "critical", "default", "batch", "critical"]):
        path = f"/{cls}/{i}"
        threads.append(in_thread(lambda c=cls, p=path: Client(sc.inbound, c).get(p)))
        sent.append(path)
        time.sleep(0.02)
    assert wait_metric(sc, "meshlayer_queue_length", 5, priority="default") == 5
    for t in threads:
        t.join(10)
    assert [p for p in up.stats()["paths"] if p != "/stats"] == ["/blocker", *sent]


def test_backlogged_classes_share_completions_by_weight(cluster: Cluster) -> None:
    up = upstream_with(cluster, "web", "--delay-ms", "20")
    sc = cluster.sidecar(mesh(up, target="60s"), service="web", app=up.address)
    results = closed_loops(sc.inbound, {"critical": 6, "default": 6, "batch": 6}, seconds=4.0)
    done = Counter(cls for cls, t, status, *_ in results if status == 200 and t > 1.0)
    total = sum(done.values())
    assert total > 150, done  # ~100/s at limit 2 and 20 ms
    for name, _, weight in CLASSES:
        assert done[name] / total == pytest.approx(weight / 100, abs=0.07), done
    assert all(status == 200 for _, _, status, *_ in results)


# -- shedding --------------------------------------------------------------------


def test_lower_classes_are_shed_first_under_overload(cluster: Cluster) -> None:
    """Limit 2 at 50 ms: 40/s. Shipped targets: critical 500 ms, default 100 ms, batch
    50 ms. Twelve closed-loop clients, four per class."""
    up = upstream_with(cluster, "web", "--delay-ms", "50")
    sc = cluster.sidecar(mesh(up), service="web", app=up.address)
    warm = Client(sc.inbound, "critical")
    for _ in range(3):  # the service time is known before the load starts
        assert warm.get("/")[0] == 200
    warm.close()
    results = closed_loops(
        sc.inbound,
        {"critical": 4, "default": 4, "batch": 4},
        seconds=3.0,
        pause_after_shed=0.01,
    )
    shed: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for cls, _, status, headers, body, _ in results:
        total[cls] += 1
        if status != 200:
            assert_shed(status, headers, body)
            shed[cls] += 1
    rate = {cls: shed[cls] / total[cls] for cls in total}
    assert rate["critical"] == 0, (shed, total)
    assert rate["batch"] > rate["default"], (shed, total)
    assert rate["batch"] > 0.5, (shed, total)
    for cls in ("critical", "default", "batch"):  # every shed was counted, and answered
        assert sc.metric("meshlayer_shed_total", priority=cls, direction="inbound") == shed[cls]
    assert sc.metric("meshlayer_queue_length", direction="inbound") == 0
    assert "shedding class batch" in sc.proc.logfile.read_text()


def test_shed_answers_arrive_within_5ms(cluster: Cluster) -> None:
    up = cluster.upstream("web")
    sc = cluster.sidecar(mesh(up, inbound="{concurrency: 1}"), service="web", app=up.address)
    warm = Client(sc.inbound, "critical")
    for _ in range(3):
        assert warm.get("/delay/100")[0] == 200  # service time: 100 ms
    warm.close()
    threads = [in_thread(lambda: Client(sc.inbound, "critical").get("/delay/2000"))]
    time.sleep(0.05)
    for _ in range(3):  # queued behind it: a batch request would wait ~400 ms (target 50)
        threads.append(in_thread(lambda: Client(sc.inbound, "critical").get("/delay/10")))
    assert wait_metric(sc, "meshlayer_queue_length", 3, priority="critical") == 3
    client = Client(sc.inbound, "batch")
    times = []
    for _ in range(30):
        status, headers, body, dt = client.get("/")
        assert_shed(status, headers, body)
        times.append(dt)
    client.close()
    times.sort()
    assert statistics.median(times) < 0.005, times
    assert times[int(len(times) * 0.9)] < 0.005, times
    assert times[-1] < 0.02, times
    for t in threads:
        t.join(10)
    assert "/" not in up.stats()["paths"]  # no shed request reached the app


# -- leaving the queue -------------------------------------------------------------


def _open_echo(port: int) -> socket.socket:
    """A request that holds its slot until its chunked body ends (the response head came)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(
        b"POST /echo HTTP/1.1\r\nHost: web\r\nx-meshlayer-priority: critical\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    return s


def test_queued_requests_leave_when_the_client_goes_or_time_out(cluster: Cluster) -> None:
    up = cluster.upstream("web")
    extra = "  timeouts: {request: 300ms}\n"
    sc = cluster.sidecar(
        mesh(up, inbound="{concurrency: 1}", extra=extra), service="web", app=up.address
    )
    blocker = _open_echo(sc.inbound)
    gone = socket.create_connection(("127.0.0.1", sc.inbound), timeout=5)
    gone.sendall(b"GET /gone HTTP/1.1\r\nHost: web\r\nx-meshlayer-priority: critical\r\n\r\n")
    assert wait_metric(sc, "meshlayer_queue_length", 1, priority="critical") == 1
    gone.close()  # the client goes away while queued
    t0 = time.monotonic()
    status, headers, _ = request(
        sc.inbound, path="/late", host="web", headers={"x-meshlayer-priority": "default"}
    )
    elapsed = time.monotonic() - t0
    assert status == 504 and headers["x-meshlayer-error"] == "timeout"
    assert 0.25 < elapsed < 1.0  # the request timeout, though it never left the queue
    assert sc.metric("meshlayer_queue_length", direction="inbound") == 0
    blocker.sendall(b"0\r\n\r\n")  # the blocker ends: its slot is free
    blocker.recv(65536)
    blocker.close()
    assert request(sc.inbound, path="/after", host="web")[0] == 200
    paths = up.stats()["paths"]
    assert "/after" in paths
    assert "/gone" not in paths and "/late" not in paths


def test_a_tunnel_gives_its_slot_back_at_the_switch(cluster: Cluster) -> None:
    up = cluster.upstream("web")
    sc = cluster.sidecar(mesh(up, inbound="{concurrency: 1}"), service="web", app=up.address)
    ws = socket.create_connection(("127.0.0.1", sc.inbound), timeout=5)
    ws.sendall(
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert ws.recv(65536).startswith(b"HTTP/1.1 101")
    t0 = time.monotonic()
    assert request(sc.inbound, path="/id", host="web", timeout=5)[0] == 200
    assert time.monotonic() - t0 < 0.5
    assert sc.metric("meshlayer_queue_delay_seconds_count") == 0  # it never queued
    ws.sendall(b"ping")
    assert ws.recv(65536) == b"echo:ping"
    ws.close()


def test_the_breaker_counts_queued_requests(cluster: Cluster) -> None:
    up = cluster.upstream("web")
    extra = "  circuitBreaker: {maxRequests: 3}\n"
    sc = cluster.sidecar(
        mesh(up, inbound="{concurrency: 1}", target="60s", extra=extra),
        service="web",
        app=up.address,
    )
    blocker = _open_echo(sc.inbound)
    threads = [in_thread(lambda: Client(sc.inbound, "critical").get("/q")) for _ in range(2)]
    assert wait_metric(sc, "meshlayer_queue_length", 2) == 2
    status, headers, _ = request(sc.inbound, path="/over", host="web", timeout=5)
    assert status == 503 and headers["x-meshlayer-error"] == "overflow"
    blocker.sendall(b"0\r\n\r\n")
    blocker.recv(65536)
    blocker.close()
    for t in threads:
        t.join(5)
    assert up.stats()["paths"].count("/q") == 2


# -- the adaptive limit ------------------------------------------------------------------


def _limit(sc: Sidecar) -> float:
    return sc.metric("meshlayer_concurrency_limit", direction="inbound")


def _wait_limit(sc: Sidecar, ok: Callable[[float], bool], seconds: float) -> float:
    deadline = time.monotonic() + seconds
    value = _limit(sc)
    while time.monotonic() < deadline and not ok(value):
        time.sleep(0.1)
        value = _limit(sc)
    return value


@pytest.mark.slow
def test_adaptive_limit_drops_when_latency_rises_and_recovers(cluster: Cluster) -> None:
    up = upstream_with(cluster, "web", "--delay-ms", "10")
    inbound = "{concurrency: adaptive, initialLimit: 20, minLimit: 2, sampleWindow: 50ms}"
    sc = cluster.sidecar(mesh(up, inbound=inbound, target="5s"), service="web", app=up.address)
    stop = threading.Event()
    seen: list[int] = []

    def loop() -> None:
        client = Client(sc.inbound, "critical")
        for _ in range(10_000):  # bounded; the test stops it first
            if stop.is_set():
                break
            seen.append(client.get("/")[0])
        client.close()

    threads = [in_thread(loop) for _ in range(8)]
    try:
        time.sleep(1.5)
        start = _limit(sc)
        assert start >= 16  # at the no-load latency 8 clients never crowd it
        request(up.port, path="/set-delay/80")  # the app slows down eightfold
        dropped = _wait_limit(sc, lambda v: v <= 6, 5.0)
        assert dropped <= 6, (start, dropped)
        request(up.port, path="/set-delay/10")  # and recovers
        recovered = _wait_limit(sc, lambda v: v >= 12, 5.0)
        assert recovered >= 12, (start, dropped, recovered)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert seen and all(s == 200 for s in seen)
    assert "concurrency limit" in sc.proc.logfile.read_text()
