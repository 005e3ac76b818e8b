"""Prometheus metrics of one sidecar.

The hot path touches only pre-resolved label children, cached per
(direction, source, destination): one counter increment and one histogram
observation per request. Gauges that describe state (ejected endpoints, pool
sizes, in-flight) are read at scrape time by a collector, costing nothing per
request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class RouteMetrics:
    """Label children for one (direction, source, destination)."""

    __slots__ = ("duration", "statuses")

    def __init__(self, m: Metrics, direction: str, source: str, destination: str) -> None:
        self.statuses = [
            m.requests.labels(direction, source, destination, cls) for cls in STATUS_CLASSES
        ]
        self.duration = m.duration.labels(direction, source, destination)

    def observe(self, status: int, seconds: float) -> None:
        idx = status // 100 - 1
        if 0 <= idx < 5:
            self.statuses[idx].inc()
        self.duration.observe(seconds)


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, list[tuple[tuple[str, ...], float]]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._read()
        specs = {
            "meshlayer_ejected_endpoints": ("Endpoints ejected by outlier detection", ["service"]),
            "meshlayer_endpoints": ("Endpoints configured", ["service"]),
            "meshlayer_upstream_in_flight": ("Requests in flight to a service", ["service"]),
            "meshlayer_upstream_pending": ("Requests waiting for a connection", ["service"]),
        }
        for name, (doc, labels) in specs.items():
            fam = GaugeMetricFamily(name, doc, labels=labels)
            for values, v in state.get(name, []):
                fam.add_metric(list(values), v)
            yield fam

    def describe(self) -> list[Any]:
        return []


class Metrics:
    """All metrics of one sidecar, in their own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "meshlayer_requests",
            "Requests handled, by direction, source, destination and status class",
            ["direction", "source", "destination", "status_class"],
            registry=r,
        )
        self.duration = Histogram(
            "meshlayer_request_duration_seconds",
            "Time from the request head to the end of the response",
            ["direction", "source", "destination"],
            buckets=BUCKETS,
            registry=r,
        )
        self.connections = Gauge(
            "meshlayer_open_connections",
            "Open connections: downstream (clients) by listener, upstream by service",
            ["side", "name"],
            registry=r,
        )
        self.errors = Counter(
            "meshlayer_mesh_errors",
            "Responses the mesh made itself (x-meshlayer-error), by reason",
            ["direction", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "meshlayer_retries",
            "Retries sent, by destination and cause",
            ["destination", "cause"],
            registry=r,
        )
        self.config_info = Gauge(
            "meshlayer_config_info", "The config in force (value 1)", ["version"], registry=r
        )
        self._routes: dict[tuple[str, str, str], RouteMetrics] = {}

    def route(self, direction: str, source: str, destination: str) -> RouteMetrics:
        key = (direction, source, destination)
        rm = self._routes.get(key)
        if rm is None:
            rm = self._routes[key] = RouteMetrics(self, direction, source, destination)
        return rm

    def add_state_collector(
        self, read: Callable[[], dict[str, list[tuple[tuple[str, ...], float]]]]
    ) -> None:
        self.registry.register(_StateCollector(read))
