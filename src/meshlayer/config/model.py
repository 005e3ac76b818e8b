"""Config resources as frozen dataclasses.

Every value here has been validated by :mod:`meshlayer.config.load`; code that
receives a ``MeshConfig`` never re-checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LB_POLICIES = ("round-robin", "least-request", "p2c-ewma")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One replica of a service."""

    host: str
    """IP address or host name to connect to."""
    port: int
    """TCP port."""
    meshed: bool = True
    """True: a peer sidecar's inbound listener; False: a plain server outside the mesh."""

    @property
    def address(self) -> str:
        """``HOST:PORT`` as written in config (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-service timeouts, in seconds."""

    connect: float = 5.0
    """Time allowed to open a TCP connection to an endpoint."""
    request: float = 15.0
    """Time from sending the request until the response headers arrive (504 after)."""
    idle: float = 300.0
    """A streaming exchange with no bytes either way for this long is aborted."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of idempotent requests, bounded by a budget (Linkerd's model)."""

    attempts: int = 2
    """Retries at most this many times per request (0 turns retries off)."""
    budget_percent: float = 20.0
    """Retries may add at most this percentage on top of the original requests."""
    min_per_second: float = 10.0
    """Retries always allowed per second, however few requests there are."""
    on_status: tuple[int, ...] = (503,)
    """Response statuses that are retried (connect failures always are)."""


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """Per-service limits; excess gets an immediate 503."""

    max_connections: int = 1024
    """Upstream connections open to all of the service's endpoints."""
    max_pending: int = 1024
    """Requests waiting for an upstream connection."""
    max_requests: int = 1024
    """Requests in flight to the service."""


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Passive health: eject endpoints that fail repeatedly."""

    consecutive_failures: int = 5
    """Consecutive connect failures or 5xx responses that eject an endpoint."""
    base_ejection: float = 10.0
    """First ejection lasts this long (seconds); each repeat doubles it."""
    max_ejection: float = 300.0
    """Upper bound on one ejection (seconds)."""
    max_ejected_percent: float = 50.0
    """At most this share of the endpoints is ejected at once."""


@dataclass(frozen=True, slots=True)
class Service:
    """``kind: Service``: a named set of endpoints and how to reach them."""

    name: str
    """``metadata.name``: the authority apps use (``http://<name>/``)."""
    endpoints: tuple[Endpoint, ...] = ()
    """The replicas."""
    load_balancer: str = "p2c-ewma"
    """One of ``round-robin``, ``least-request``, ``p2c-ewma``."""
    timeouts: Timeouts = field(default_factory=Timeouts)
    """Connect, request and idle timeouts."""
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    """Retry policy and budget."""
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    """Connection, pending and in-flight limits."""
    outlier_detection: OutlierDetection = field(default_factory=OutlierDetection)
    """Passive ejection of failing endpoints."""


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Everything a sidecar needs, at one version."""

    services: dict[str, Service] = field(default_factory=dict)
    """Services by name."""
    version: str = "0"
    """Version of this config (a content hash for static files)."""
    source: str = ""
    """Where it came from (file path, or the control plane URL)."""

    def to_dict(self) -> dict[str, object]:
        """A JSON-able view, as served on the admin ``/config`` page."""
        return {
            "version": self.version,
            "source": self.source,
            "services": {
                name: {
                    "loadBalancer": svc.load_balancer,
                    "endpoints": [
                        {"address": e.address, "meshed": e.meshed} for e in svc.endpoints
                    ],
                    "timeouts": {
                        "connect": svc.timeouts.connect,
                        "request": svc.timeouts.request,
                        "idle": svc.timeouts.idle,
                    },
                    "retries": {
                        "attempts": svc.retries.attempts,
                        "budgetPercent": svc.retries.budget_percent,
                        "minPerSecond": svc.retries.min_per_second,
                        "onStatus": list(svc.retries.on_status),
                    },
                    "circuitBreaker": {
                        "maxConnections": svc.circuit_breaker.max_connections,
                        "maxPendingRequests": svc.circuit_breaker.max_pending,
                        "maxRequests": svc.circuit_breaker.max_requests,
                    },
                    "outlierDetection": {
                        "consecutiveFailures": svc.outlier_detection.consecutive_failures,
                        "baseEjectionTime": svc.outlier_detection.base_ejection,
                        "maxEjectionTime": svc.outlier_detection.max_ejection,
                        "maxEjectionPercent": svc.outlier_detection.max_ejected_percent,
                    },
                }
                for name, svc in sorted(self.services.items())
            },
        }
