"""Prometheus metrics of one sidecar.

The hot path touches only plain integers kept per (direction, source,
destination, priority class): one status count and one histogram bucket per
request, read by a collector at scrape time. Gauges that describe state (ejected endpoints, pool
sizes, in-flight) are read at scrape time by a collector, costing nothing per
request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.openmetrics.exposition import escape_label_name, escape_metric_name
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _untyped_go_float

from meshlayer.proxy.admission import DELAY_BUCKETS

if TYPE_CHECKING:
    from meshlayer.proxy.admission import AdmissionControl

# the request-duration histogram: admission's delay buckets and one for slow responses
BUCKETS: Final[tuple[float, ...]] = (*DELAY_BUCKETS, 30.0)  # variable-length: indexed in place
STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Prometheus text format families whose extra samples go in a gauge family of their own
OM_SUFFIXES: Final = ("_created", "_gsum", "_gcount")
TYPE_NAMES: Final = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram",
                     "unknown": "untyped"}  # fmt: skip
go_float: Final[Callable[[float], str]] = _untyped_go_float  # Go's float format (+Inf, 1e+06)
MAX_CACHED: Final = 20000  # sample names cached by the exposition before it starts afresh


class RouteMetrics:
    """Request counts and a latency histogram for one (direction, source, destination,
    priority).

    Plain integers, no locks: the sidecar is one thread, and the scrape reads
    them through ``_RouteCollector``.
    """

    __slots__ = ("buckets", "labels", "statuses", "total_seconds")

    def __init__(self, direction: str, source: str, destination: str, priority: str) -> None:
        self.labels = (direction, source, destination, priority)
        self.statuses = [0, 0, 0, 0, 0]
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total_seconds = 0.0

    def observe(self, status: int, seconds: float) -> None:
        idx = status // 100 - 1
        if 0 <= idx < 5:
            self.statuses[idx] += 1
        i = 0  # bisect_left(BUCKETS, seconds), by a loop that compiles to float compares
        for bound in BUCKETS:
            if seconds <= bound:
                break
            i += 1
        self.buckets[i] += 1
        self.total_seconds += seconds


class _RouteCollector(Collector):
    def __init__(self, routes: dict[tuple[str, str, str, str], RouteMetrics]) -> None:
        self._routes = routes

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "meshlayer_requests",
            "Requests handled, by direction, source, destination, priority and status class",
            labels=["direction", "source", "destination", "priority", "status_class"],
        )
        duration = HistogramMetricFamily(
            "meshlayer_request_duration_seconds",
            "Time from the request head to the end of the response, by priority class",
            labels=["direction", "source", "destination", "priority"],
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
            "meshlayer_upstream_pool_connections": (
                "Upstream connections open or opening, by service and priority class pool "
                "('*': the one pool with --priority off)",
                ["service", "priority"],
            ),
        }
        for name, (doc, labels) in specs.items():
            fam = GaugeMetricFamily(name, doc, labels=labels)
            for values, v in state.get(name, []):
                fam.add_metric(list(values), v)
            yield fam

    def describe(self) -> list[Any]:
        return []


class _AdmissionCollector(Collector):
    """Queues, sheds and limits of admission control (``meshlayer.proxy.admission``),
    read at scrape time from its plain counters."""

    def __init__(self, read: Callable[[], list[tuple[str, str, AdmissionControl]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        labels = ["direction", "service", "priority"]
        length = GaugeMetricFamily(
            "meshlayer_queue_length", "Requests waiting for admission, by class", labels=labels
        )
        shed = CounterMetricFamily(
            "meshlayer_shed",
            "Requests shed (503 x-meshlayer-error: shed) at arrival or from the queue",
            labels=labels,
        )
        delay = HistogramMetricFamily(
            "meshlayer_queue_delay_seconds",
            "Time requests that had to queue waited for admission, by class",
            labels=labels,
        )
        limit = GaugeMetricFamily(
            "meshlayer_concurrency_limit",
            "Requests admitted at once to a destination (adaptive or fixed)",
            labels=["direction", "service"],
        )
        in_use = GaugeMetricFamily(
            "meshlayer_admitted_in_flight",
            "Requests holding an admission slot",
            labels=["direction", "service"],
        )
        for direction, service, adm in self._read():
            limit.add_metric([direction, service], adm.limit)
            in_use.add_metric([direction, service], adm.in_use)
            for q in adm.classes():
                key = [direction, service, q.name]
                length.add_metric(key, q.count)
                shed.add_metric(key, q.shed_total)
                cumulative, acc = [], 0
                for bound, n in zip([*DELAY_BUCKETS, float("inf")], q.buckets, strict=True):
                    acc += n
                    cumulative.append(("+Inf" if bound == float("inf") else repr(bound), acc))
                delay.add_metric(key, cumulative, q.delay_sum)
        yield length
        yield shed
        yield delay
        yield limit
        yield in_use

    def describe(self) -> list[Any]:
        return []


class _PlainCounters(Collector):
    """A counter family of two labels kept as plain integers (first → second → count),
    read at scrape time."""

    def __init__(
        self, name: str, doc: str, labels: list[str], values: dict[str, dict[str, int]]
    ) -> None:
        self._family = (name, doc, labels)
        self._values = values

    def collect(self) -> Iterator[CounterMetricFamily]:
        name, doc, labels = self._family
        fam = CounterMetricFamily(name, doc, labels=labels)
        for first, counts in list(self._values.items()):
            for second, n in list(counts.items()):
                fam.add_metric([first, second], n)
        yield fam

    def describe(self) -> list[Any]:
        return []


class Exposition:
    """The Prometheus text format (0.0.4) of a registry: byte for byte what
    ``prometheus_client.generate_latest`` writes, at a fraction of its cost.

    A scrape runs on the sidecar's one event loop, so while it renders no
    request moves: ``generate_latest`` validates and escapes every label of
    every sample on every scrape (about 1 ms for a sidecar's ~150 samples,
    measured; the priority benchmark saw each scrape stall the app's core).
    Here the text before each value (``name{labels}``) is made once per
    sample identity, by the same escaping functions, and cached; values of
    the common kind (finite, not negative, below 1e6: Go and Python print
    them alike) are formatted directly, the rest by prometheus_client's own
    ``floatToGoString``.
    """

    __slots__ = ("_heads", "_prefixes")

    def __init__(self) -> None:
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._heads: dict[tuple[str, str, str], tuple[str, str]] = {}

    def render(self, registry: Collector) -> bytes:
        out: list[str] = []
        prefixes = self._prefixes
        if len(prefixes) > MAX_CACHED:  # label values that come and go: start afresh
            prefixes.clear()
            self._heads.clear()
        for metric in registry.collect():
            head, om_head = self._head(metric.name, metric.type, metric.documentation)
            out.append(head)
            om: dict[str, list[str]] = {}
            for s in metric.samples:
                key = (s.name, tuple(s.labels.items()))
                prefix = prefixes.get(key)
                if prefix is None:
                    prefix = prefixes[key] = _prefix(s.name, s.labels)
                v = s.value
                value = repr(float(v)) if 0 <= v < 1e6 else go_float(v)
                if s.timestamp is not None:
                    value += f" {int(float(s.timestamp) * 1000):d}"
                line = f"{prefix} {value}\n"
                suffix = s.name[len(metric.name) :] if s.name.startswith(metric.name) else ""
                if suffix in OM_SUFFIXES:
                    om.setdefault(suffix, []).append(line)
                else:
                    out.append(line)
            for suffix, lines in sorted(om.items()):
                name = escape_metric_name(metric.name + suffix)
                out.append(f"# HELP {name} {om_head}\n# TYPE {name} gauge\n")
                out.extend(lines)
        return "".join(out).encode()

    def _head(self, name: str, mtype: str, doc: str) -> tuple[str, str]:
        """The HELP and TYPE lines of a family, and its escaped documentation."""
        key = (name, mtype, doc)
        head = self._heads.get(key)
        if head is None:
            if mtype == "counter":
                name += "_total"
            elif mtype == "info":
                name += "_info"
            mtype = TYPE_NAMES.get(mtype, mtype)
            help_ = doc.replace("\\", r"\\").replace("\n", r"\n")
            name = escape_metric_name(name)
            head = self._heads[key] = (f"# HELP {name} {help_}\n# TYPE {name} {mtype}\n", help_)
        return head


def _prefix(name: str, labels: dict[str, str]) -> str:
    """``name{label="value",...}`` of one sample, labels sorted and escaped as the
    text format wants (label values may be any UTF-8)."""
    if not labels:
        return escape_metric_name(name)
    pairs = ",".join(
        '{}="{}"'.format(
            escape_label_name(k),
            v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\""),
        )
        for k, v in sorted(labels.items())
    )
    return f"{escape_metric_name(name)}{{{pairs}}}"


class Metrics:
    """All metrics of one sidecar, in their own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._exposition = Exposition()
        self._routes: dict[tuple[str, str, str, str], RouteMetrics] = {}
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
        self.priority_missing: dict[str, dict[str, int]] = {}
        """direction → service → requests that carried no known class (plain ints)."""
        r.register(
            _PlainCounters(
                "meshlayer_priority_missing",
                "Requests that carried no known priority class and got their service's default",
                ["direction", "service"],
                self.priority_missing,
            )
        )
        self.control_connected = Gauge(
            "meshlayer_control_connected",
            "1 while the watch stream to the control plane is open",
            registry=r,
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text format (``/metrics``)."""
        return self._exposition.render(self.registry)

    def route(
        self, direction: str, source: str, destination: str, priority: str = "default"
    ) -> RouteMetrics:
        key = (direction, source, destination, priority)
        rm = self._routes.get(key)
        if rm is None:
            rm = self._routes[key] = RouteMetrics(direction, source, destination, priority)
        return rm

    def add_admission_collector(
        self, read: Callable[[], list[tuple[str, str, AdmissionControl]]]
    ) -> None:
        """Export admission control: ``read`` gives (direction, service, admission)."""
        self.registry.register(_AdmissionCollector(read))

    def add_state_collector(
        self, read: Callable[[], dict[str, list[tuple[tuple[str, ...], float]]]]
    ) -> None:
        self.registry.register(_StateCollector(read))
