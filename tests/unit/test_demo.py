"""The demo's pure parts: its mesh config, the metrics it reads, the load schedule, the view."""

from __future__ import annotations

import time
from pathlib import Path

from meshlayer.config.load import load_file
from meshlayer.config.model import DEFAULT_PRIORITY_CLASSES
from meshlayer.demo.layout import APPS, GATEWAY, INSTANCES, PORT_SPAN, busy_ports
from meshlayer.demo.load import Schedule, quantile
from meshlayer.demo.mesh import RECS_LIMIT, RULES, render_mesh
from meshlayer.demo.scrape import NO_CLASS, Scrape, Traffic
from meshlayer.demo.view import Monitor, Sample, class_rows, render_summary, service_rows


def test_the_mesh_config_loads_strictly_with_rules_classes_and_the_bottleneck(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(render_mesh("http://127.0.0.1:18009", str(path)))
    mesh = load_file(path)
    assert set(mesh.services) == {i.service for i in APPS}
    assert tuple(r.name for r in mesh.classification_rules) == RULES
    by_name = {r.name: r for r in mesh.classification_rules}
    assert by_name["crawlers"].priority_class == "batch"
    assert by_name["batch-jobs"].priority_class == "batch"
    assert by_name["shoppers"].priority_class == "critical"
    assert by_name["crawlers"].order < by_name["batch-jobs"].order < by_name["shoppers"].order
    # The shipped classes, written out: the same values.
    assert mesh.priority_classes == {c.name: c for c in DEFAULT_PRIORITY_CLASSES}
    assert mesh.services["recommendations"].inbound.concurrency == RECS_LIMIT
    assert mesh.services["frontend"].inbound.concurrency == "unlimited"
    assert all(503 not in s.retries.on_status for s in mesh.services.values())
    assert all(not s.endpoints for s in mesh.services.values()), "endpoints are registered"


def test_ports_do_not_overlap_and_fit_the_span() -> None:
    ports: list[int] = []
    for inst in INSTANCES:
        ports += [p for p, _ in inst.ports(0)]
    ports += [5, 6, 7, 8, 9]  # rabbitmq amqp, distribution, epmd; control mTLS, control
    assert len(ports) == len(set(ports))
    assert max(ports) < PORT_SPAN
    assert GATEWAY.outbound(18000) == 18000


def test_busy_ports_names_what_is_in_the_way() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        base = port - GATEWAY.admin(0)  # the gateway's admin port is taken
        busy = busy_ports(base)
    assert (port, "gateway sidecar admin") in busy


GW = 'direction="outbound",source="gateway",destination="frontend"'
RECS = 'direction="inbound",service="recommendations"'
DURATION = "meshlayer_request_duration_seconds_bucket"
METRICS = f"""\
# TYPE meshlayer_requests_total counter
meshlayer_requests_total{{{GW},priority="critical",status_class="2xx"}} 90.0
meshlayer_requests_total{{{GW},priority="critical",status_class="5xx"}} 10.0
meshlayer_requests_total{{{GW},priority="batch",status_class="5xx"}} 40.0
meshlayer_requests_total{{direction="inbound",source="unknown",status_class="2xx"}} 7
{DURATION}{{{GW},priority="critical",le="0.01"}} 50.0
{DURATION}{{{GW},priority="critical",le="0.1"}} 100.0
{DURATION}{{{GW},priority="critical",le="+Inf"}} 100.0
meshlayer_shed_total{{{RECS},priority="batch"}} 25.0
meshlayer_queue_length{{{RECS},priority="batch"}} 3.0
meshlayer_concurrency_limit{{{RECS}}} 2.0
"""


def test_a_scrape_sums_by_direction_service_and_class() -> None:
    sc = Scrape.parse(METRICS, 0.0)
    crit = sc.traffic(not_direction="inbound", priority="critical")
    assert (crit.total, crit.ok) == (100, 90)
    assert sc.traffic(not_direction="inbound", priority="batch").ok == 0
    # Health probes (source unknown) on the inbound side are not the mesh's traffic.
    assert sc.traffic(direction="inbound").total == 0
    assert sc.shed_of("batch") == 25 and sc.shed_of("critical") == 0
    assert sc.queued_of("batch", "inbound") == 3
    assert sc.limit == {"inbound": 2.0}
    assert sc.classes() == {"critical", "batch"}
    # Half the requests within 10 ms: the median is the bucket's bound.
    assert crit.quantile(0.5) == 0.01
    assert Traffic().quantile(0.5) is None


def test_samples_without_a_priority_label_fall_under_no_class() -> None:
    text = 'meshlayer_requests_total{direction="outbound",destination="x",status_class="2xx"} 3\n'
    assert Scrape.parse(text, 0.0).classes() == {NO_CLASS}


def _sample(at: float, text: str) -> Sample:
    scrapes = {inst.name: Scrape.parse(text if inst is GATEWAY else "", at) for inst in INSTANCES}
    return Sample(at, scrapes, {"broker": True, "sent": {"critical": 3}, "wait_ms": {}})


def test_class_rows_are_the_difference_of_two_samples() -> None:
    old = _sample(0.0, "")
    new = _sample(2.0, METRICS)
    rows, labelled = class_rows(old, new)
    assert labelled
    by = {r.name: r for r in rows}
    assert by["critical"].rate == 50.0 and by["critical"].shed == 0
    assert by["batch"].requests == 40 and by["batch"].shed == 25
    assert by["batch"].shed_rate == 12.5
    assert all(r.requests == 0 for r in service_rows(old, new))


def test_the_summary_covers_the_whole_run() -> None:
    mon = Monitor(base=18000)
    mon.samples.append(_sample(0.0, ""))
    mon.first = mon.samples[0]
    mon.samples.append(_sample(5.0, METRICS))
    text = render_summary(mon)
    assert "by class, at the gateway, the whole run (5s)" in text
    assert "critical" in text and "emails sent through RabbitMQ" in text


def test_the_schedule_is_calm_first_then_cycles() -> None:
    s = Schedule(calm=5, on=20, off=10)
    assert not s.batch_on(1) and s.batch_on(5) and s.batch_on(24.9)
    assert not s.batch_on(26) and s.batch_on(35.5)
    short = Schedule.for_duration(12)
    assert not short.batch_on(1) and all(short.batch_on(t) for t in (3, 8, 11.9, 100))


def test_quantile_is_nearest_rank() -> None:
    assert quantile([], 0.5) is None
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(100)], 0.99) == 98.0
    assert time.monotonic() > 0
