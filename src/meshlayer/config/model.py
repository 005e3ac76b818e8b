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
class HealthCheck:
    """Active health checks, run by the control plane (the sidecar ignores them)."""

    path: str = "/healthz"
    """HTTP path requested with GET on each endpoint; a 2xx answer is a pass."""
    interval: float = 5.0
    """Seconds between two checks of one endpoint."""
    timeout: float = 1.0
    """A check without an answer within this many seconds fails."""
    unhealthy_threshold: int = 3
    """Consecutive failures that take an endpoint out of rotation."""
    healthy_threshold: int = 2
    """Consecutive passes that put it back."""


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
    health_check: HealthCheck | None = None
    """Active health checks by the control plane; None: endpoints are not checked."""


ROUTE_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
PATH_MATCH_TYPES = ("PathPrefix", "Exact")


@dataclass(frozen=True, slots=True)
class PathMatch:
    """An HTTPRoute path condition (Gateway API ``HTTPPathMatch``)."""

    type: str = "PathPrefix"
    """``PathPrefix`` (whole path segments) or ``Exact``."""
    value: str = "/"
    """The path or prefix; starts with ``/``."""


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """An HTTPRoute header condition: the request has this header with exactly this value."""

    name: str
    """Header name (matched case-insensitively)."""
    value: str
    """Header value (matched exactly)."""


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """One match of a rule: all of its conditions must hold."""

    path: PathMatch = field(default_factory=PathMatch)
    """Path condition (default: every path)."""
    headers: tuple[HeaderMatch, ...] = ()
    """Header conditions, all required."""
    method: str | None = None
    """Request method, or None for any."""


@dataclass(frozen=True, slots=True)
class BackendRef:
    """A weighted destination of a rule: another service of the mesh."""

    name: str
    """The service that receives the traffic."""
    weight: int = 1
    """Share of the rule's traffic, relative to the other backends (0: none)."""


@dataclass(frozen=True, slots=True)
class RouteRetry:
    """Per-rule retry overrides; the retry budget stays the backend service's."""

    attempts: int | None = None
    """Retries per request, or None to keep the service's."""
    codes: tuple[int, ...] | None = None
    """Retried response statuses, or None to keep the service's."""


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Requests matching any of ``matches`` go to the weighted ``backend_refs``."""

    matches: tuple[RouteMatch, ...] = (RouteMatch(),)
    """Any one of these must match (an empty ``matches`` in YAML means every request)."""
    backend_refs: tuple[BackendRef, ...] = ()
    """Weighted backends; empty means the parent service itself."""
    request_timeout: float | None = None
    """Overrides the backend service's request timeout (seconds), or None."""
    retry: RouteRetry | None = None
    """Overrides the backend service's retry attempts and statuses, or None."""


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    """``kind: HTTPRoute``: how requests to the parent services are routed."""

    name: str
    """``metadata.name``."""
    parent_refs: tuple[str, ...]
    """Services whose traffic this route governs."""
    rules: tuple[RouteRule, ...] = ()
    """Rules; precedence follows the Gateway API, not list order alone."""


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Everything a sidecar needs, at one version."""

    services: dict[str, Service] = field(default_factory=dict)
    """Services by name."""
    version: str = "0"
    """Version of this config (a content hash for static files)."""
    source: str = ""
    """Where it came from (file path, or the control plane URL)."""
    routes: tuple[HTTPRoute, ...] = ()
    """HTTPRoutes, in document order."""

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
            "routes": [_route_dict(route) for route in self.routes],
        }


def _route_dict(route: HTTPRoute) -> dict[str, object]:
    rules: list[dict[str, object]] = []
    for rule in route.rules:
        out: dict[str, object] = {
            "matches": [
                {
                    "path": {"type": m.path.type, "value": m.path.value},
                    "headers": [{"name": h.name, "value": h.value} for h in m.headers],
                    **({"method": m.method} if m.method else {}),
                }
                for m in rule.matches
            ],
            "backendRefs": [{"name": b.name, "weight": b.weight} for b in rule.backend_refs],
        }
        if rule.request_timeout is not None:
            out["timeouts"] = {"request": rule.request_timeout}
        if rule.retry is not None:
            retry: dict[str, object] = {}
            if rule.retry.attempts is not None:
                retry["attempts"] = rule.retry.attempts
            if rule.retry.codes is not None:
                retry["codes"] = list(rule.retry.codes)
            out["retry"] = retry
        rules.append(out)
    parents = [{"name": p} for p in route.parent_refs]
    return {"name": route.name, "parentRefs": parents, "rules": rules}
