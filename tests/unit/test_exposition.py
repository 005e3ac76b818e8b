"""The sidecar's /metrics text: byte for byte what prometheus_client writes."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
    generate_latest,
)

from meshlayer.proxy.metrics import Exposition, Metrics


def busy_registry() -> tuple[CollectorRegistry, Counter, Gauge]:
    r = CollectorRegistry()
    c = Counter("c_requests", "Requests\nwith a \\ newline", ["path", "code"], registry=r)
    c.labels('/a"b', "200").inc(3)
    c.labels("/back\\slash\nnewline", "500").inc()
    c.labels("/ünïcode", "200").inc(2.5)
    g = Gauge("g_level", "A gauge", ["kind"], registry=r)
    g.labels("big").set(123456789.0)  # Go's exponent form: 1.23456789e+08
    g.labels("negative").set(-3.25)
    g.labels("nan").set(float("nan"))
    g.labels("inf").set(float("inf"))
    g.labels("ninf").set(float("-inf"))
    g.labels("small").set(1e-7)
    g.labels("edge").set(999999.5)
    Gauge("g_plain", "No labels", registry=r).set(7)
    h = Histogram("h_seconds", "A histogram", ["route"], registry=r, buckets=(0.005, 0.1, 2.5))
    for v in (0.001, 0.05, 0.05, 3.0):
        h.labels("x").observe(v)
    Summary("s_bytes", "A summary", registry=r).observe(512)
    Info("build", "Build info", registry=r).info({"version": "1.2.3", "commit": "abc"})
    Enum("state", "A state", states=["up", "down"], registry=r).state("down")
    return r, c, g


def test_the_text_is_prometheus_clients_own() -> None:
    r, c, g = busy_registry()
    exp = Exposition()
    assert exp.render(r) == generate_latest(r)
    # the cached prefixes must not freeze the values, nor miss new label sets
    c.labels('/a"b', "200").inc()
    g.labels("big").set(0)
    g.labels("new").set(2_000_000)
    assert exp.render(r) == generate_latest(r)


def test_a_sidecars_metrics_render_as_before() -> None:
    m = Metrics()
    for direction in ("inbound", "outbound"):
        for cls in ("critical", "batch"):
            rm = m.route(direction, "web", "api", cls)
            for i in range(50):
                rm.observe(200 if i % 7 else 503, 0.0004 * i)
    m.connections.labels("downstream", "outbound").inc()
    m.errors.labels("inbound", "shed").inc(4)
    m.priority_missing.setdefault("outbound", {})["api"] = 3
    m.config_info.labels("v7").set(1)
    first = m.render()
    assert first == generate_latest(m.registry)
    assert b'meshlayer_requests_total{destination="api",direction="inbound",' in first
    m.route("inbound", "web", "api", "critical").observe(200, 0.2)
    assert m.render() == generate_latest(m.registry) != first
