"""HTTPRoute end to end: a sidecar started with a static config of Service and
HTTPRoute documents routes real requests to real upstreams by path, header and
method, splits a canary by weight, and applies per-rule timeouts and retries.

Which upstream answered is read from the upstream itself: ``/id`` answers with
its name, and every upstream lists the paths it received in ``/stats``.
"""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter

from tests.support.procs import Cluster, Sidecar, Upstream, request, service_yaml, upstream_with


def route_yaml(name: str, parent: str, rules: str) -> str:
    """A `kind: HTTPRoute` document; ``rules`` is YAML under ``spec.rules`` (indented 2)."""
    return (
        f"apiVersion: meshlayer/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\n"
        f"spec:\n  parentRefs: [{{name: {parent}}}]\n  rules:\n{rules}"
    )


def _mesh(cluster: Cluster, rules: str, **flags: list[str]) -> tuple[Sidecar, dict[str, Upstream]]:
    """Upstreams for ``catalog``, ``catalog-v1`` and ``catalog-v2`` (each named as its
    service), one sidecar with the three Services and an HTTPRoute on ``catalog``."""
    ups = {
        name: upstream_with(cluster, name, *flags.get(name, []))
        for name in ("catalog", "catalog-v1", "catalog-v2")
    }
    docs = [service_yaml(name, [up.address]) for name, up in ups.items()]
    docs.append(route_yaml("catalog-routes", "catalog", rules))
    return cluster.sidecar("---\n".join(docs)), ups


def _paths(up: Upstream) -> list[str]:
    return [p for p in up.stats()["paths"] if p != "/stats"]


def _mesh_error(resp: tuple[int, dict[str, str], bytes], status: int, reason: str) -> str:
    got, headers, body = resp
    assert got == status, resp
    assert headers.get("x-meshlayer-error") == reason, headers
    doc = json.loads(body)
    assert doc["error"] == reason
    return str(doc["message"])


def test_path_header_and_method_choose_the_service(cluster: Cluster) -> None:
    sc, ups = _mesh(
        cluster,
        """\
  - matches: [{path: {type: PathPrefix, value: /status}}]
    backendRefs: [{name: catalog-v1}]
  - matches: [{path: {type: Exact, value: /id}, headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: catalog-v2}]
  - matches: [{path: {type: Exact, value: /id}, method: DELETE}]
    backendRefs: [{name: catalog-v1}]
  - matches: [{path: {type: Exact, value: /id}}, {path: {value: /delay}}]
""",
    )

    def who(
        method: str = "GET", headers: dict[str, str] | None = None, host: str = "catalog"
    ) -> str:
        status, hdrs, body = request(sc.outbound, method, "/id", host=host, headers=headers)
        assert status == 200 and "x-meshlayer-error" not in hdrs, (status, hdrs, body)
        return body.decode()

    assert who() == "catalog"  # a rule without backendRefs: the parent service itself
    assert who(headers={"X-Canary": "1"}) == "catalog-v2"
    assert who(headers={"x-canary": "2"}) == "catalog"
    assert who("DELETE") == "catalog-v1"
    assert who("DELETE", {"x-canary": "1"}) == "catalog-v1"  # a method outranks headers
    assert who(host="catalog-v2") == "catalog-v2"  # a service without routes: as before

    # absolute-form targets are routed on their path too
    conn = http.client.HTTPConnection("127.0.0.1", sc.outbound, timeout=5)
    conn.request("GET", "http://catalog/id", headers={"x-canary": "1"})
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"catalog-v2")
    conn.close()
    # the query is not part of the path (the upstream sees it, and answers "ok")
    status, _, _ = request(sc.outbound, "GET", "/id?x=1", host="catalog", headers={"x-canary": "1"})
    assert status == 200

    status, _, body = request(sc.outbound, "GET", "/status/201", host="catalog")
    assert (status, body) == (201, b"status 201")
    status, _, _ = request(sc.outbound, "GET", "/delay/1", host="catalog")
    assert status == 200
    assert _paths(ups["catalog-v1"]) == ["/id", "/id", "/status/201"]
    assert _paths(ups["catalog-v2"]) == ["/id", "/id", "/id", "/id?x=1"]
    assert _paths(ups["catalog"]) == ["/id", "/id", "/delay/1"]

    # no rule matches: 404, nothing forwarded (prefixes match whole segments only)
    for path in ("/statusx/200", "/other", "/id/1"):
        msg = _mesh_error(request(sc.outbound, "GET", path, host="catalog"), 404, "no-route")
        assert "catalog" in msg and path in msg
    assert len(_paths(ups["catalog"])) == 3
    assert len(_paths(ups["catalog-v1"])) == 3


def test_weighted_canary_split(cluster: Cluster) -> None:
    sc, ups = _mesh(
        cluster,
        "  - backendRefs: [{name: catalog-v1, weight: 90}, {name: catalog-v2, weight: 10}]\n",
    )
    counts: Counter[str] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", sc.outbound, timeout=5)
    deadline = time.monotonic() + 30
    for _ in range(500):
        assert time.monotonic() < deadline, f"too slow: {counts}"
        conn.request("GET", "/id", headers={"Host": "catalog"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body)
        counts[body.decode()] += 1
    conn.close()
    assert set(counts) == {"catalog-v1", "catalog-v2"}, counts
    assert abs(counts["catalog-v2"] - 50) <= 15, counts  # 10% of 500, within 3 points
    assert counts["catalog-v1"] + counts["catalog-v2"] == 500
    assert not _paths(ups["catalog"])  # the parent itself gets nothing
    # metrics are labelled with the backend that served the request
    v2 = sc.metric("meshlayer_requests_total", direction="outbound", destination="catalog-v2")
    assert v2 == counts["catalog-v2"]


def test_rule_timeout_overrides_the_service_timeout(cluster: Cluster) -> None:
    sc, _ = _mesh(
        cluster,
        """\
  - matches: [{path: {value: /delay/1500}}]
    backendRefs: [{name: catalog-v1}]
    timeouts: {request: 300ms}
  - backendRefs: [{name: catalog-v1}]
""",
    )
    t0 = time.monotonic()
    resp = request(sc.outbound, "GET", "/delay/1500", host="catalog")
    elapsed = time.monotonic() - t0
    msg = _mesh_error(resp, 504, "timeout")
    assert "0.3s" in msg, msg
    assert 0.25 < elapsed < 1.2, elapsed
    # other paths keep the service's own request timeout (15 s)
    status, _, body = request(sc.outbound, "GET", "/delay/600", host="catalog")
    assert (status, body) == (200, b"late")


def test_rule_retries_override_the_service_retries(cluster: Cluster) -> None:
    sc, ups = _mesh(
        cluster,
        """\
  - matches: [{path: {value: /again}}]
    backendRefs: [{name: catalog-v1}]
    retry: {attempts: 3, codes: [502]}
  - matches: [{path: {value: /never}}]
    backendRefs: [{name: catalog-v1}]
    retry: {attempts: 0}
  - backendRefs: [{name: catalog-v1}]
""",
        **{"catalog-v1": ["--fail-status", "502"]},
    )
    for path in ("/again", "/never", "/plain"):
        status, headers, _ = request(sc.outbound, "GET", path, host="catalog")
        assert status == 502 and "x-meshlayer-error" not in headers, (status, headers)
    seen = Counter(_paths(ups["catalog-v1"]))
    # /again: 1 + 3 retries on 502; /never: none; /plain: the service's onStatus is [503]
    assert seen == {"/again": 4, "/never": 1, "/plain": 1}, seen
    assert sc.metric("meshlayer_retries_total") == 3
