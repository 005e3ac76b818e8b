"""What the demo reads from its sidecars' ``/metrics``, by class and by service.

One :class:`Scrape` is everything one sidecar's ``/metrics`` said at one
moment that the live view needs, summed over the labels it does not show:

- requests (status classes and the latency histogram) by
  ``(direction, service, priority)``: the gateway's own listener's requests
  give the per-class rows, each app's sidecar's inbound requests give the
  per-service rows. Requests without a meshed caller (``source="unknown"``,
  e.g. the control plane's health probes) are left out of the inbound side;
- ``meshlayer_shed_total`` and ``meshlayer_queue_length`` by
  ``(direction, priority)``, ``meshlayer_concurrency_limit`` by direction.

Rates and windowed percentiles are the difference of two scrapes
(:meth:`Traffic.__sub__`). A sidecar without the ``priority`` label (priority
off, or an older sidecar) puts everything under the class ``"-"``.
"""

from __future__ import annotations

import http.client
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from meshlayer.demo.procs import http_get

NO_CLASS = "-"
"""The class of samples that carry no ``priority`` label."""

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
class Traffic:
    """Requests: counts by status class and a cumulative latency histogram."""

    statuses: Counter[str] = field(default_factory=Counter)
    buckets: dict[float, float] = field(default_factory=dict)
    """Cumulative counts by upper bound (``le``), +Inf included."""

    def __add__(self, other: Traffic) -> Traffic:
        buckets = dict(self.buckets)
        for le, n in other.buckets.items():
            buckets[le] = buckets.get(le, 0.0) + n
        return Traffic(self.statuses + other.statuses, buckets)

    def __sub__(self, other: Traffic) -> Traffic:
        statuses: Counter[str] = Counter()
        for k, v in self.statuses.items():
            statuses[k] = max(0, v - other.statuses.get(k, 0))
        buckets = {le: max(0.0, n - other.buckets.get(le, 0.0)) for le, n in self.buckets.items()}
        return Traffic(statuses, buckets)

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


Key = tuple[str, str, str]
"""(direction, service, priority)."""


@dataclass
class Scrape:
    """What one sidecar's ``/metrics`` said (see the module docstring)."""

    at: float = 0.0
    requests: dict[Key, Traffic] = field(default_factory=dict)
    shed: Counter[tuple[str, str]] = field(default_factory=Counter)
    queued: Counter[tuple[str, str]] = field(default_factory=Counter)
    limit: dict[str, float] = field(default_factory=dict)
    ok: bool = True
    """False when the sidecar did not answer (everything else is then empty)."""

    @classmethod
    def parse(cls, text: str, at: float) -> Scrape:
        sc = cls(at)
        for name, labels, value in parse_metrics(text):
            direction = labels.get("direction", "?")
            prio = labels.get("priority") or NO_CLASS
            if name == "meshlayer_requests_total" or (
                name == "meshlayer_request_duration_seconds_bucket" and "le" in labels
            ):
                if direction == "inbound" and labels.get("source", "unknown") == "unknown":
                    continue
                key = (direction, labels.get("destination", "?"), prio)
                t = sc.requests.get(key)
                if t is None:
                    t = sc.requests[key] = Traffic()
                if name == "meshlayer_requests_total":
                    t.statuses[labels.get("status_class", "?")] += int(value)
                else:
                    le = float(labels["le"])  # "+Inf" parses as inf
                    t.buckets[le] = t.buckets.get(le, 0.0) + value
            elif name == "meshlayer_shed_total":
                sc.shed[(direction, prio)] += int(value)
            elif name == "meshlayer_queue_length":
                sc.queued[(direction, prio)] += int(value)
            elif name == "meshlayer_concurrency_limit":
                sc.limit[direction] = sc.limit.get(direction, 0.0) + value
        return sc

    @classmethod
    def fetch(cls, admin_port: int, timeout: float = 2.0) -> Scrape:
        """``GET /metrics`` of the sidecar whose admin listener is ``admin_port``."""
        at = time.monotonic()
        try:
            status, body = http_get(admin_port, "/metrics", timeout=timeout)
        except (OSError, http.client.HTTPException):
            return cls(at, ok=False)
        if status != 200:
            return cls(at, ok=False)
        return cls.parse(body.decode(errors="replace"), at)

    def traffic(
        self,
        *,
        direction: str | None = None,
        not_direction: str | None = None,
        service: str | None = None,
        priority: str | None = None,
    ) -> Traffic:
        """The requests that match every filter given, summed."""
        out = Traffic()
        for (d, s, p), t in self.requests.items():
            if direction is not None and d != direction:
                continue
            if not_direction is not None and d == not_direction:
                continue
            if service is not None and s != service:
                continue
            if priority is not None and p != priority:
                continue
            out = out + t
        return out

    def classes(self) -> set[str]:
        return {p for _, _, p in self.requests} | {p for _, p in self.shed}

    def shed_of(self, priority: str | None = None, direction: str | None = None) -> int:
        return sum(
            n
            for (d, p), n in self.shed.items()
            if (priority is None or p == priority) and (direction is None or d == direction)
        )

    def queued_of(self, priority: str, direction: str | None = None) -> int:
        return sum(
            n
            for (d, p), n in self.queued.items()
            if p == priority and (direction is None or d == direction)
        )
