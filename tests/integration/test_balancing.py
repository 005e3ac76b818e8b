"""Load balancing and outlier detection, through a real sidecar to real upstreams."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from tests.support.procs import (
    Cluster,
    Sidecar,
    free_port,
    parallel,
    request,
    service_yaml,
    upstream_with,
)


def _ids(sc: Sidecar, n: int, host: str = "svc", method: str = "GET") -> Counter[str]:
    """Send ``n`` sequential /id requests; count which upstream answered (all must be 200)."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, _, body = request(sc.outbound, method, "/id", host=host, timeout=5)
        assert status == 200, body
        seen[body.decode()] += 1
    return seen


def test_round_robin_spreads_exactly_evenly(cluster: Cluster) -> None:
    ups = [cluster.upstream(n) for n in ("a", "b", "c")]
    sc = cluster.sidecar(
        service_yaml("svc", [u.address for u in ups], spec="loadBalancer: round-robin")
    )
    seen = _ids(sc, 300)
    assert seen == {"a": 100, "b": 100, "c": 100}
    # the upstreams agree: each was asked for /id exactly 100 times
    assert [u.stats()["paths"].count("/id") for u in ups] == [100, 100, 100]


def test_least_request_spreads_equal_upstreams_roughly_evenly(cluster: Cluster) -> None:
    ups = [cluster.upstream(n) for n in ("a", "b")]
    sc = cluster.sidecar(
        service_yaml("svc", [u.address for u in ups], spec="loadBalancer: least-request")
    )
    seen = _ids(sc, 200)
    assert sum(seen.values()) == 200
    # ties are broken at random: binomial(200, 0.5) is within 60..140 with p > 1 - 1e-8
    assert 60 <= seen["a"] <= 140, seen


def test_least_request_prefers_the_upstream_with_fewer_in_flight(cluster: Cluster) -> None:
    fast = cluster.upstream("fast")
    slow = upstream_with(cluster, "slow", "--delay-ms", "300")
    sc = cluster.sidecar(
        service_yaml("svc", [fast.address, slow.address], spec="loadBalancer: least-request")
    )

    def worker() -> tuple[int, dict[str, str], bytes]:
        seen: Counter[str] = Counter()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            status, _, body = request(sc.outbound, path="/id", host="svc", timeout=5)
            assert status == 200
            seen[body.decode()] += 1
        return 200, {}, json.dumps(seen).encode()

    results = parallel([worker] * 6, timeout=10)
    total: Counter[str] = Counter()
    for _, (_, _, body) in results:
        total.update(json.loads(body))
    # the slow one holds a request for 300 ms, so it is busy and skipped nearly always
    assert total["fast"] > 5 * total["slow"], total
    assert total["slow"] >= 1  # it was not simply left out


def test_p2c_ewma_default_sends_most_traffic_to_the_fast_upstream(cluster: Cluster) -> None:
    fast = cluster.upstream("fast")
    slow = upstream_with(cluster, "slow", "--delay-ms", "50")
    sc = cluster.sidecar(service_yaml("svc", [fast.address, slow.address]))  # default policy
    seen = _ids(sc, 100)
    assert sum(seen.values()) == 100
    assert seen["fast"] >= 90, seen


def test_outlier_detection_ejects_failing_endpoint_and_returns_it(cluster: Cluster) -> None:
    good = cluster.upstream("good")
    bad = upstream_with(cluster, "bad", "--fail-status", "500")
    spec = """
loadBalancer: round-robin
retries: {attempts: 0}
outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 1s}
"""
    sc = cluster.sidecar(service_yaml("svc", [good.address, bad.address], spec=spec))
    assert sc.metric("meshlayer_ejected_endpoints", service="svc") == 0
    statuses: Counter[int] = Counter()
    for _ in range(6):  # round-robin: 3 to each, so 3 consecutive 500s from bad
        status, headers, _ = request(sc.outbound, path="/id", host="svc", timeout=5)
        assert "x-meshlayer-error" not in headers  # the app's 500 is relayed as is
        statuses[status] += 1
    assert statuses == {200: 3, 500: 3}
    assert sc.metric("meshlayer_ejected_endpoints", service="svc") == 1
    ejected_at = time.monotonic()
    assert bad.stats()["paths"].count("/id") == 3

    # while ejected, everything goes to the healthy one
    assert _ids(sc, 20) == {"good": 20}
    assert bad.stats()["paths"].count("/id") == 3
    assert time.monotonic() - ejected_at < 1.0, "took too long to check the ejection"

    # after baseEjectionTime the next pick returns it to rotation
    time.sleep(max(0.0, ejected_at + 1.2 - time.monotonic()))
    statuses.clear()
    for _ in range(2):
        status, _, _ = request(sc.outbound, path="/id", host="svc", timeout=5)
        statuses[status] += 1
    assert statuses == {200: 1, 500: 1}
    assert bad.stats()["paths"].count("/id") == 4
    assert sc.metric("meshlayer_ejected_endpoints", service="svc") == 0


def test_outlier_detection_ejects_connect_failures_at_most_half(cluster: Cluster) -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    spec = """
retries: {attempts: 0}
outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 10s}
"""
    sc = cluster.sidecar(service_yaml("svc", dead, spec=spec))
    for _ in range(10):
        status, headers, _ = request(sc.outbound, path="/", host="svc", timeout=5)
        assert status == 503
        assert headers["x-meshlayer-error"] == "connect-failure"
    # both endpoints failed at least twice in a row, but maxEjectionPercent 50 keeps one
    assert sc.metric("meshlayer_ejected_endpoints", service="svc") == 1
    assert sc.metric("meshlayer_endpoints", service="svc") == 2


def test_ejected_endpoint_is_avoided_then_recovers_when_it_comes_back(cluster: Cluster) -> None:
    """A replica that is down (connect refused) is ejected; once it is up again and the
    ejection has expired, it serves traffic again."""
    good = cluster.upstream("good")
    port = free_port()
    spec = """
loadBalancer: round-robin
outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 1s}
"""
    sc = cluster.sidecar(service_yaml("svc", [good.address, f"127.0.0.1:{port}"], spec=spec))
    # connect failures are retried on the other endpoint: the client never notices
    assert _ids(sc, 10) == {"good": 10}
    assert sc.metric("meshlayer_ejected_endpoints", service="svc") == 1
    ejected_at = time.monotonic()
    cluster.upstream("back", port=port)
    assert _ids(sc, 10) == {"good": 10}  # still ejected
    time.sleep(max(0.0, ejected_at + 1.2 - time.monotonic()))
    seen = _ids(sc, 10)
    assert seen == {"good": 5, "back": 5}
    assert sc.metric("meshlayer_ejected_endpoints", service="svc") == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_p2c_ewma_returns_traffic_to_a_replica_that_failed_once(cluster: Cluster) -> None:
    """Under the default policy a connect failure charges a penalty that moves traffic
    away at once; it must decay within seconds, or one failure starves the replica
    (with the penalty folded into the 10 s latency EWMA it took about a minute)."""
    good = cluster.upstream("good")
    port = free_port()
    sc = cluster.sidecar(service_yaml("svc", [good.address, f"127.0.0.1:{port}"]))
    for _ in range(50):  # until the dead replica has been tried (and retried elsewhere)
        assert _ids(sc, 1) == {"good": 1}
        if sc.metric("meshlayer_retries_total", destination="svc", cause="connect-failure"):
            break
    else:
        pytest.fail("the never-used replica was never tried")
    assert sc.metric("meshlayer_ejected_endpoints", service="svc") == 0
    cluster.upstream("back", port=port)
    back_at = time.monotonic()
    deadline = back_at + 12
    seen: Counter[str] = Counter()
    while time.monotonic() < deadline and not seen["back"]:
        seen += _ids(sc, 1)
        time.sleep(0.02)
    took = time.monotonic() - back_at
    assert seen["back"] >= 1, f"replica got no traffic in {took:.0f} s after one failure: {seen}"


def test_p2c_ewma_does_not_starve_either_of_two_equal_upstreams(cluster: Cluster) -> None:
    """The replica not picked lately gets cheaper (its estimate decays) until it is picked:
    with sequential requests the one never measured must still be tried."""
    ups = [cluster.upstream(n) for n in ("a", "b")]
    sc = cluster.sidecar(service_yaml("svc", [u.address for u in ups]))  # default policy
    seen = _ids(sc, 50)
    assert sum(seen.values()) == 50
    assert min(seen["a"], seen["b"]) >= 1, seen
