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
import struct
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


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_lower_classes_are_shed_first_under_overload(cluster: Cluster, direction: str) -> None:
    """Limit 2 at 50 ms: 40/s. Shipped targets: critical 500 ms, default 100 ms, batch
    50 ms. Twelve closed-loop clients, four per class. Outbound: the same per
    destination service, when its ``spec.outbound.concurrency`` sets a limit."""
    up = upstream_with(cluster, "web", "--delay-ms", "50")
    if direction == "inbound":
        sc = cluster.sidecar(mesh(up), service="web", app=up.address)
        port = sc.inbound
    else:
        sc = cluster.sidecar(mesh(up, outbound="{concurrency: 2}"))
        port = sc.outbound
    warm = Client(port, "critical")
    for _ in range(3):  # the service time is known before the load starts
        assert warm.get("/")[0] == 200
    warm.close()
    results = closed_loops(
        port,
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
        assert sc.metric("meshlayer_shed_total", priority=cls, direction=direction) == shed[cls]
    assert sc.metric("meshlayer_queue_length", direction=direction) == 0
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
    status, headers, _ = request(  # (critical: shed only after 2 x 500 ms of waiting)
        sc.inbound, path="/late", host="web", headers={"x-meshlayer-priority": "critical"}
    )
    elapsed = time.monotonic() - t0
    assert status == 504 and headers["x-meshlayer-error"] == "timeout"
    assert 0.25 < elapsed < 1.0  # the request timeout, though it never left the queue
    assert sc.metric("meshlayer_queue_length", direction="inbound") == 0
    blocker.sendall(b"0\r\n\r\n")  # the blocker ends: its slot is free
    blocker.recv(65536)
    blocker.close()
    assert wait_metric(sc, "meshlayer_admitted_in_flight", 0) == 0
    after = request(sc.inbound, path="/after", host="web")
    assert after[0] == 200, after
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
    """maxRequests counts queued requests too; when batch fills it, a critical request
    takes the place of the newest batch waiter instead of getting ``overflow``."""
    up = cluster.upstream("web")
    extra = "  circuitBreaker: {maxRequests: 3}\n"
    sc = cluster.sidecar(
        mesh(up, inbound="{concurrency: 1}", target="60s", extra=extra),
        service="web",
        app=up.address,
    )
    blocker = _open_echo(sc.inbound)
    got: dict[str, int] = {}

    def send(cls: str, path: str) -> None:
        got[path] = Client(sc.inbound, cls).get(path)[0]

    threads = [in_thread(lambda: send("batch", "/b0"))]
    assert wait_metric(sc, "meshlayer_queue_length", 1, priority="batch") == 1
    threads.append(in_thread(lambda: send("batch", "/b1")))
    assert wait_metric(sc, "meshlayer_queue_length", 2, priority="batch") == 2
    status, headers, _ = request(
        sc.inbound, path="/over", host="web", headers={"x-meshlayer-priority": "batch"}
    )
    assert status == 503 and headers["x-meshlayer-error"] == "overflow"  # nobody lower
    threads.append(in_thread(lambda: send("critical", "/c")))
    assert wait_metric(sc, "meshlayer_queue_length", 1, priority="critical") == 1
    assert sc.metric("meshlayer_shed_total", priority="batch") == 1
    blocker.sendall(b"0\r\n\r\n")
    blocker.recv(65536)
    blocker.close()
    for t in threads:
        t.join(5)
    assert got == {"/b0": 200, "/b1": 503, "/c": 200}
    assert [p for p in up.stats()["paths"] if p != "/stats"] == ["/echo", "/c", "/b0"]


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


def _load(sc: Sidecar, port: int, clients: int, seconds: float) -> tuple[list[int], float]:
    """``clients`` closed-loop critical clients for ``seconds``; (statuses, the limit's
    lowest value seen from the second half on)."""
    stop = threading.Event()
    seen: list[int] = []

    def loop() -> None:
        client = Client(port, "critical")
        for _ in range(10_000):  # bounded; the clock stops it first
            if stop.is_set():
                break
            seen.append(client.get("/")[0])
        client.close()

    threads = [in_thread(loop) for _ in range(clients)]
    lowest = float("inf")
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            time.sleep(0.1)
            if time.monotonic() - t0 > seconds / 2:
                lowest = min(lowest, _limit(sc))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    return seen, lowest


def _warmed(
    cluster: Cluster, inbound: str, cls: str, n: int, *app: str
) -> tuple[Upstream, Sidecar]:
    """The test upstream (``app`` flags) behind a sidecar with ``inbound`` admission, after
    ``n`` sequential ``cls`` requests: the no-load latency is measured."""
    up = upstream_with(cluster, "web", *app)
    sc = cluster.sidecar(mesh(up, inbound=inbound, target="5s"), service="web", app=up.address)
    warm = Client(sc.inbound, cls)
    for _ in range(n):
        assert warm.get("/")[0] == 200
    warm.close()
    return up, sc


@pytest.mark.slow
def test_adaptive_limit_follows_contention_in_the_app(cluster: Cluster) -> None:
    """An app with 4 workers at 10 ms each: 16 clients crowd it, latency grows with
    concurrency (40 ms), and the limit comes down towards where it fits (about 9)."""
    up = upstream_with(cluster, "web", "--delay-ms", "10", "--workers", "4")
    inbound = (
        "{concurrency: adaptive, initialLimit: 20, minLimit: 2, sampleWindow: 50ms, "
        "probeInterval: 1s}"
    )
    sc = cluster.sidecar(mesh(up, inbound=inbound, target="5s"), service="web", app=up.address)
    seen, lowest = _load(sc, sc.inbound, 16, 6.0)
    assert lowest <= 12, lowest
    assert seen and all(s == 200 for s in seen)
    assert "concurrency limit" in sc.proc.logfile.read_text()


def test_adaptive_limit_stays_when_latency_rises_without_contention(cluster: Cluster) -> None:
    """The app sleeps (a slow backend, say): latency rises eightfold when 8 clients come.
    The limit had followed the light load down (to 3), so at first it reads the latency
    as queueing and binds; an upward trial shows throughput growing with the slots, the
    80 ms become the no-load latency, and the limit climbs past the 8 clients."""
    inbound = "{concurrency: adaptive, initialLimit: 20, minLimit: 2, sampleWindow: 50ms}"
    up, sc = _warmed(cluster, inbound, "critical", 10, "--delay-ms", "10")
    request(up.port, path="/set-delay/80")
    seen, lowest = _load(sc, sc.inbound, 8, 3.0)
    assert lowest >= 9, lowest  # the 8 clients are not throttled in the second half
    assert seen and all(s == 200 for s in seen)


@pytest.mark.slow
def test_a_critical_request_waits_only_for_the_work_in_service(cluster: Cluster) -> None:
    """A one-worker app at 20 ms per request, crowded by 6 batch clients: the adaptive
    limit comes down to the app's concurrency (1, with one-window trials at 2) and the
    critical client's requests take the reserved slot, so each waits for at most the
    request in service — not for a queue of batch requests inside the app."""
    inbound = "{concurrency: adaptive, sampleWindow: 50ms}"
    _, sc = _warmed(cluster, inbound, "batch", 5, "--delay-ms", "20", "--workers", "1")
    stop = threading.Event()
    crit: list[tuple[int, float]] = []

    def critical() -> None:
        client = Client(sc.inbound, "critical")
        for _ in range(200):  # bounded; the event ends it first
            if stop.wait(0.07):
                break
            status, _, _, dt = client.get("/")
            crit.append((status, dt))
        client.close()

    t = in_thread(critical)
    try:
        batch = closed_loops(sc.inbound, {"batch": 6}, 5.0)
    finally:
        stop.set()
        t.join(10)
    assert batch and all(r[2] == 200 for r in batch)
    assert _limit(sc) <= 2
    later = [dt for status, dt in crit[len(crit) // 3 :] if status == 200]
    assert len(later) >= 10 and len(later) == len(crit) - len(crit) // 3, crit
    # residual of the batch request in service + its own 20 ms (+ the path), where a
    # limit of 4-6 made it wait for 3-5 batch requests (80-120 ms)
    assert statistics.median(later) < 0.05, sorted(later)


# -- review fixes: reload, lost clients --------------------------------------------------


def test_a_client_that_gives_up_still_teaches_the_service_time(cluster: Cluster) -> None:
    """A slow request whose client goes away is a latency sample (a lower bound): the
    next prediction knows the app is slow and sheds batch at arrival."""
    up = cluster.upstream("web")
    sc = cluster.sidecar(mesh(up, inbound="{concurrency: 1}"), service="web", app=up.address)
    quitter = socket.create_connection(("127.0.0.1", sc.inbound), timeout=5)
    quitter.sendall(b"GET /delay/1000 HTTP/1.1\r\nHost: web\r\n\r\n")
    time.sleep(0.2)
    quitter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    quitter.close()  # gave up after 200 ms (a reset): no response head ever came
    t_gone = time.monotonic()
    assert wait_metric(sc, "meshlayer_admitted_in_flight", 0) == 0
    assert time.monotonic() - t_gone < 0.5  # its slot went with it, before the app answered
    holder = in_thread(lambda: Client(sc.inbound, "critical").get("/delay/1000"))
    assert wait_metric(sc, "meshlayer_admitted_in_flight", 1) == 1
    status, headers, body, dt = Client(sc.inbound, "batch").get("/")
    assert_shed(status, headers, body)  # ~200 ms predicted, target 50 ms
    assert dt < 0.05, dt
    holder.join(5)


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_a_reload_keeps_one_limit_and_its_queue(cluster: Cluster, direction: str) -> None:
    """The control plane adds an endpoint (outbound) or changes a timeout (inbound)
    while requests wait: the runtime is rebuilt, its admission control is not — the
    queue keeps its place and nobody gets in beside the limit."""
    from tests.support.control import start_control
    from tests.support.procs import run_meshlayer, wait_for

    ctl = start_control(cluster.tmp, f"sqlite:{cluster.tmp / 'control.db'}", procs=cluster.procs)
    env = {"MESHLAYER_ADMIN_TOKEN": ctl.admin_token or ""}
    up1, up2 = cluster.upstream("web1"), cluster.upstream("web2")
    limit = "{concurrency: 1}"
    inbound, outbound = (limit, "{concurrency: unlimited}")
    if direction == "outbound":
        inbound, outbound = outbound, limit

    def apply(extra: str, *ups: Upstream) -> None:
        doc = mesh(ups[0], inbound=inbound, outbound=outbound, target="60s", extra=extra)
        if len(ups) > 1:
            first = f'[{{address: "{ups[0].address}", meshed: false}}]'
            both = first[:-1] + f', {{address: "{ups[1].address}", meshed: false}}]'
            doc = doc.replace(first, both, 1)
        path = cluster.write_config(doc, f"web-{len(ups)}-{len(extra)}.yaml")
        out = run_meshlayer(["apply", "--control", ctl.url, "-f", str(path)], env=env)
        assert out.returncode == 0, out.stderr

    apply("", up1)
    if direction == "outbound":
        sc = cluster.sidecar(None, service="client", control=ctl.url)
        port = sc.outbound
    else:
        sc = cluster.sidecar(None, service="web", app=up1.address, control=ctl.url)
        port = sc.inbound
    wait_for("the config", lambda: request(port, path="/id", host="web")[0] == 200)
    blocker = _open_echo(port)
    got: list[int] = []
    threads = [in_thread(lambda: got.append(Client(port, "critical").get("/q")[0]))]
    assert wait_metric(sc, "meshlayer_queue_length", 1, direction=direction) == 1
    if direction == "outbound":
        apply("", up1, up2)
        wait_for("the new endpoint", lambda: up2.address in sc.admin_get("/config")[1])
    else:
        apply("  timeouts: {request: 20s}\n", up1)
        wait_for("the new timeout", lambda: "20" in sc.admin_get("/config")[1])
    assert sc.metric("meshlayer_queue_length", direction=direction) == 1  # still queued
    threads.append(in_thread(lambda: got.append(Client(port, "critical").get("/new")[0])))
    assert wait_metric(sc, "meshlayer_queue_length", 2, direction=direction) == 2
    assert sc.metric("meshlayer_admitted_in_flight", direction=direction) == 1
    time.sleep(0.1)
    paths = up1.stats()["paths"] + up2.stats()["paths"]
    assert "/q" not in paths and "/new" not in paths  # nobody got in beside the blocker
    blocker.sendall(b"0\r\n\r\n")
    blocker.recv(65536)
    blocker.close()
    for t in threads:
        t.join(5)
    assert got == [200, 200]


def test_a_request_queued_across_a_class_table_change_keeps_its_class_pool(
    cluster: Cluster,
) -> None:
    """A new top class shifts every class's index while a batch request waits: admitted
    after the reload, it must use batch's connection pool, not the one now at its old
    index (default's)."""
    from tests.support.control import start_control
    from tests.support.procs import run_meshlayer, wait_for

    ctl = start_control(cluster.tmp, f"sqlite:{cluster.tmp / 'control.db'}", procs=cluster.procs)
    env = {"MESHLAYER_ADMIN_TOKEN": ctl.admin_token or ""}
    up = cluster.upstream("web")

    def apply(doc: str, name: str) -> None:
        path = cluster.write_config(doc, name)
        out = run_meshlayer(["apply", "--control", ctl.url, "-f", str(path)], env=env)
        assert out.returncode == 0, out.stderr

    apply(mesh(up, inbound="{concurrency: 1}", target="60s"), "web.yaml")
    sc = cluster.sidecar(None, service="web", app=up.address, control=ctl.url)
    wait_for("the config", lambda: request(sc.inbound, path="/id", host="web")[0] == 200)

    def peer(cls: str) -> int:
        status, _, body, _ = Client(sc.inbound, cls).get("/peer")
        assert status == 200, body
        return int(json.loads(body)["port"])

    ports = {cls: peer(cls) for cls in ("default", "batch")}  # one idle connection each
    assert ports["default"] != ports["batch"]
    blocker = _open_echo(sc.inbound)
    got: list[int] = []
    waiter = in_thread(lambda: got.append(peer("batch")))
    assert wait_metric(sc, "meshlayer_queue_length", 1, priority="batch") == 1
    urgent = (
        "apiVersion: meshlayer/v1\nkind: PriorityClass\nmetadata: {name: urgent}\n"
        "spec: {rank: 200, weight: 10, queueDelayTarget: 60s}\n"
    )
    apply(urgent, "urgent.yaml")
    wait_for("the new class", lambda: "urgent" in sc.admin_get("/config")[1])
    blocker.sendall(b"0\r\n\r\n")
    blocker.recv(65536)
    blocker.close()
    waiter.join(5)
    assert got == [ports["batch"]], (got, ports)
