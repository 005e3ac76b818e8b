"""Prometheus metrics of one sidecar.

The hot path touches only plain integers kept per (direction, source,
destination): one status count and one histogram bucket per request, read by
a collector at scrape time. Gauges that describe state (ejected endpoints, pool
sizes, in-flight) are read at scrape time by a collector, costing nothing per
request.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class RouteMetrics:
    """Request counts and a latency histogram for one (direction, source, destination).

    Plain integers, no locks: the sidecar is one thread, and the scrape reads
    them through ``_RouteCollector``.
    """

    __slots__ = ("buckets", "labels", "statuses", "total_seconds")

    def __init__(self, direction: str, source: str, destination: str) -> None:
        self.labels = (direction, source, destination)
        self.statuses = [0, 0, 0, 0, 0]
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total_seconds = 0.0

    def observe(self, status: int, seconds: float) -> None:
        idx = status // 100 - 1
        if 0 <= idx < 5:
            self.statuses[idx] += 1
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.total_seconds += seconds


class _RouteCollector(Collector):
    def __init__(self, routes: dict[tuple[str, str, str], RouteMetrics]) -> None:
        self._routes = routes

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "meshlayer_requests",
            "Requests handled, by direction, source, destination and status class",
            labels=["direction", "source", "destination", "status_class"],
        )
        duration = HistogramMetricFamily(
            "meshlayer_request_duration_seconds",
            "Time from the request head to the end of the response",
            labels=["direction", "source", "destination"],
        )
        for rm in list(self._routes.values()):
            for cls, n in zip(STATUS_CLASSES, rm.statuses, strict=True):
                requests.add_metric([*rm.labels, cls], n)
            cumulative, acc = [], 0
            for bound, n in zip([*BUCKETS, float("inf")], rm.buckets, strict=True):
                acc += n
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            duration.add_metric(list(rm.labels), cumulative, rm.total_seconds)
        yield requests
        yield duration

    def describe(self) -> list[Any]:
        return []


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
        self._routes: dict[tuple[str, str, str], RouteMetrics] = {}
        r.register(_RouteCollector(self._routes))
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
        self.config_version = Gauge(
            "meshlayer_config_version",
            "Mesh version of the config in force (0: a static file)",
            registry=r,
        )
        self.config_rejected = Counter(
            "meshlayer_config_rejected",
            "Configs pushed by the control plane that failed validation and were not applied",
            registry=r,
        )
        self.control_connected = Gauge(
            "meshlayer_control_connected",
            "1 while the watch stream to the control plane is open",
            registry=r,
        )

    def route(self, direction: str, source: str, destination: str) -> RouteMetrics:
        key = (direction, source, destination)
        rm = self._routes.get(key)
        if rm is None:
            rm = self._routes[key] = RouteMetrics(direction, source, destination)
        return rm

    def add_state_collector(
        self, read: Callable[[], dict[str, list[tuple[tuple[str, ...], float]]]]
    ) -> None:
        self.registry.register(_StateCollector(read))
