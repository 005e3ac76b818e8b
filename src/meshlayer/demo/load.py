"""What the demo measures: the sidecars' metrics, and a load generator's own view.

:class:`RouteStats` sums the inbound requests a sidecar's ``/metrics`` counted
for its service (status classes and the latency histogram), so the demo can
take the difference of two scrapes around its load. Requests without a
meshed caller (``source="unknown"``: the control plane's health probes, a
curl straight at an inbound port) are left out: the table counts the mesh's
own traffic. :class:`LoadGenerator` sends GETs of the frontend through the
edge sidecar from a few keep-alive clients and records what it saw end to
end, including which catalog replica served each answer.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

HOST = "127.0.0.1"

# -- metrics --------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """The samples of a Prometheus text exposition: (name, labels, value)."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        yield m.group(1), dict(_LABEL.findall(m.group(2) or "")), value


@dataclass
class RouteStats:
    """Requests one or more sidecars took in for a service: status classes and a histogram."""

    statuses: Counter[str] = field(default_factory=Counter)
    buckets: dict[float, float] = field(default_factory=dict)
    """Cumulative counts by upper bound (``le``), +Inf included."""

    @classmethod
    def from_metrics(cls, text: str, service: str) -> RouteStats:
        """The inbound requests to ``service`` in one sidecar's /metrics from meshed
        callers, all of them summed (``source="unknown"``, e.g. health probes, left out)."""
        st = cls()
        for name, labels, value in parse_metrics(text):
            if labels.get("direction") != "inbound" or labels.get("destination") != service:
                continue
            if labels.get("source", "unknown") == "unknown":
                continue
            if name == "meshlayer_requests_total":
                st.statuses[labels.get("status_class", "?")] += int(value)
            elif name == "meshlayer_request_duration_seconds_bucket" and "le" in labels:
                le = float(labels["le"])  # "+Inf" parses as inf
                st.buckets[le] = st.buckets.get(le, 0.0) + value
        return st

    def __add__(self, other: RouteStats) -> RouteStats:
        buckets = dict(self.buckets)
        for le, n in other.buckets.items():
            buckets[le] = buckets.get(le, 0.0) + n
        return RouteStats(self.statuses + other.statuses, buckets)

    def __sub__(self, other: RouteStats) -> RouteStats:
        statuses: Counter[str] = Counter()
        for k, v in self.statuses.items():
            statuses[k] = v - other.statuses.get(k, 0)
        buckets = {le: n - other.buckets.get(le, 0.0) for le, n in self.buckets.items()}
        return RouteStats(statuses, buckets)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return self.total - self.statuses.get("5xx", 0)

    def quantile(self, q: float) -> float | None:
        """Seconds, interpolated within the bucket as Prometheus' ``histogram_quantile``."""
        bounds = sorted(self.buckets)
        if not bounds or self.buckets[bounds[-1]] <= 0:
            return None
        rank = q * self.buckets[bounds[-1]]
        lower, below = 0.0, 0.0
        for le in bounds:
            count = self.buckets[le]
            if count >= rank:
                if math.isinf(le):
                    return lower  # beyond the last finite bound: the best we can say
                if count == below:
                    return le
                return lower + (le - lower) * (rank - below) / (count - below)
            lower, below = le, count
        return lower


# -- load -----------------------------------------------------------------------


@dataclass
class LoadResult:
    """What the load generator saw, end to end through the edge."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    catalog_replicas: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if status < 500)

    def merge(self, other: LoadResult) -> None:
        self.latencies.extend(other.latencies)
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        self.catalog_replicas.update(other.catalog_replicas)

    def quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class LoadGenerator:
    """``total`` GETs of the frontend through the edge, ``concurrency`` keep-alive clients."""

    def __init__(self, port: int, total: int, concurrency: int) -> None:
        self.port = port
        self.total = total
        self.concurrency = max(1, min(concurrency, total))
        self.result = LoadResult()
        self.done = 0
        self._issued = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._started = time.perf_counter()
        for n in range(self.concurrency):
            t = threading.Thread(target=self._worker, name=f"load-{n}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, tick: Callable[[int], None], interval: float = 0.2) -> LoadResult:
        """Wait for the workers, calling ``tick(done)`` every ``interval`` seconds."""
        while any(t.is_alive() for t in self._threads):
            time.sleep(interval)
            tick(self.done)
        for t in self._threads:
            t.join()
        self.result.elapsed = time.perf_counter() - self._started
        return self.result

    def _next(self) -> bool:
        with self._lock:
            if self._stop.is_set() or self._issued >= self.total:
                return False
            self._issued += 1
            return True

    def _worker(self) -> None:
        mine = LoadResult()
        conn: http.client.HTTPConnection | None = None
        try:
            while self._next():
                if conn is None:
                    conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
                started = time.perf_counter()
                try:
                    conn.request("GET", "/", headers={"Host": "frontend"})
                    resp = conn.getresponse()
                    body = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    mine.errors[type(e).__name__] += 1
                    conn.close()
                    conn = None
                else:
                    mine.latencies.append(time.perf_counter() - started)
                    mine.statuses[resp.status] += 1
                    if resp.status == 200:
                        mine.catalog_replicas[_catalog_replica(body)] += 1
                    if resp.will_close:
                        conn.close()
                        conn = None
                with self._lock:
                    self.done += 1
        finally:
            if conn is not None:
                conn.close()
            with self._lock:
                self.result.merge(mine)


def _catalog_replica(body: bytes) -> str:
    try:
        served = json.loads(body)["served_by"]["catalog"]
    except (ValueError, KeyError, TypeError):
        return "?"
    return str(served)
