"""Config resources as frozen dataclasses.

Every value here has been validated by :mod:`meshlayer.config.load`; code that
receives a ``MeshConfig`` never re-checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshlayer.config.classification import ClassificationRule
from meshlayer.config.fields import ROUTE_METHODS as _ROUTE_METHODS

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
    identity: str = ""
    """SPIFFE ID the registry says this endpoint presents ("": its service's)."""

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
    """Upstream connections open to all of the service's endpoints, per priority class pool."""
    max_pending: int = 1024
    """Requests waiting for an upstream connection, per priority class pool."""
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


ADMISSION_MODES = ("adaptive", "unlimited")


@dataclass(frozen=True, slots=True)
class Admission:
    """``spec.inbound`` / ``spec.outbound``: how many requests go to the destination at once.

    Above the limit requests wait in one queue per priority class (see
    :mod:`meshlayer.proxy.admission`).
    """

    concurrency: str | int = "adaptive"
    """``adaptive`` (learned from latency), ``unlimited``, or a fixed limit (an integer >= 1)."""
    initial_limit: int = 20
    """Adaptive: the limit before any latency has been measured."""
    min_limit: int = 1
    """Adaptive: the limit never goes below this (and probes the no-load latency at it)."""
    max_limit: int = 1000
    """Adaptive: the limit never goes above this."""
    tolerance: float = 1.5
    """Adaptive: the limit is at most this multiple of the concurrency the destination
    serves (latency up to this multiple of the no-load minimum is not congestion)."""
    sample_window: float = 0.1
    """Adaptive: seconds of latency samples averaged per limit update (at least 5 samples)."""
    probe_interval: float = 60.0
    """Adaptive: seconds between re-measurements of the no-load latency (jittered)."""


def _outbound_admission() -> Admission:
    return Admission("unlimited")


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
    priority_class: str = "default"
    """``spec.priorityClass``: the class of requests to this service that carry none."""
    inbound: Admission = field(default_factory=Admission)
    """``spec.inbound``: admission to the local app at its sidecar (default adaptive)."""
    outbound: Admission = field(default_factory=_outbound_admission)
    """``spec.outbound``: admission to this service at each caller's sidecar (default unlimited)."""


ROUTE_METHODS = _ROUTE_METHODS
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


AUTHZ_ACTIONS = ("ALLOW", "DENY")
MTLS_MODES = ("strict", "permissive")
AUTHZ_DEFAULTS = ("allow", "deny")


@dataclass(frozen=True, slots=True)
class PolicySource:
    """One ``from`` entry of an authorization rule: the caller is one of these."""

    identities: tuple[str, ...] = ()
    """Verified peer SPIFFE IDs, matched exactly."""
    services: tuple[str, ...] = ()
    """Service names: the peer ID's path is ``/ns/default/sa/<name>`` (any listed)."""


@dataclass(frozen=True, slots=True)
class PolicyPath:
    """A path condition of an authorization rule, on the normalised path."""

    value: str
    """The path (``exact``) or the path prefix (``prefix``); in normal form, starts with ``/``."""
    prefix: bool = False
    """True: ``value`` and everything under it on whole segments; False: exactly ``value``."""


@dataclass(frozen=True, slots=True)
class PolicyOperation:
    """One ``to`` entry of an authorization rule: every condition given must hold."""

    methods: tuple[str, ...] = ()
    """Request methods, any of them (empty: any method)."""
    paths: tuple[PolicyPath, ...] = ()
    """Path conditions, any of them (empty: any path)."""
    headers: tuple[HeaderMatch, ...] = ()
    """Header conditions, all of them (exact values, names case-insensitive)."""


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """A request matches a rule when it matches a ``from`` entry and a ``to`` entry."""

    sources: tuple[PolicySource, ...] = ()
    """``from``: any of these (empty: any caller, even one without identity)."""
    operations: tuple[PolicyOperation, ...] = ()
    """``to``: any of these (empty: any request)."""


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """``kind: AuthorizationPolicy``: allow or deny requests to one service."""

    name: str
    """``metadata.name``; named in denials and metrics."""
    target: str
    """``spec.targetRef.name``: the destination service whose inbound side enforces it."""
    action: str = "ALLOW"
    """``ALLOW`` or ``DENY``."""
    dry_run: bool = False
    """Log and count what would be denied, deny nothing."""
    rules: tuple[PolicyRule, ...] = ()
    """Any one of these must match for the policy to apply."""


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """``kind: Mesh`` (name ``default``): mesh-wide settings."""

    mtls_mode: str = "strict"
    """``spec.mtls.mode``: ``strict`` (TLS only inbound) or ``permissive`` (plaintext too)."""
    authz_default: str = "allow"
    """``spec.authorization.default``: what happens to a request no policy decides."""
    authz_dry_run: bool = False
    """``spec.authorization.dryRun``: every policy and the default only log and count."""


@dataclass(frozen=True, slots=True)
class PriorityClass:
    """``kind: PriorityClass``: a level of service, its queueing and its network marks."""

    name: str
    """``metadata.name``: what ``x-meshlayer-priority`` and routes name."""
    rank: int
    """Order among classes: higher is more important."""
    weight: int = 10
    """Share guaranteed under contention, relative to the other classes (1..1000)."""
    queue_delay_target: float = 0.1
    """Seconds of queueing delay past which the class's requests are shed."""
    max_queue_length: int = 1000
    """Requests of the class that may wait in one queue; more get a 503."""
    dscp: int = 0
    """DSCP code point of its packets (0..63; ``IP_TOS``/``IPV6_TCLASS`` carry it << 2)."""
    so_priority: int = 0
    """``SO_PRIORITY`` of its sockets (0..6 for anyone; 7..15 need CAP_NET_ADMIN or CAP_NET_RAW)."""
    congestion_control: str | None = None
    """``TCP_CONGESTION`` of its sockets (cubic, bbr, reno ...); None: the kernel default."""


DEFAULT_PRIORITY_CLASSES = (
    PriorityClass("critical", 100, weight=60, queue_delay_target=0.5, dscp=46, so_priority=6),
    PriorityClass("default", 50, weight=30, queue_delay_target=0.1, dscp=0, so_priority=0),
    PriorityClass("batch", 10, weight=10, queue_delay_target=0.05, dscp=8, so_priority=1),
)
"""Shipped classes: DSCP EF / 0 / CS1; a PriorityClass document of the same name replaces one."""


def _default_priority_classes() -> dict[str, PriorityClass]:
    return {c.name: c for c in DEFAULT_PRIORITY_CLASSES}


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
    policies: tuple[AuthorizationPolicy, ...] = ()
    """AuthorizationPolicies, in document order."""
    mesh: MeshSettings = field(default_factory=MeshSettings)
    """Mesh-wide settings (``kind: Mesh``; defaults when there is none)."""
    priority_classes: dict[str, PriorityClass] = field(default_factory=_default_priority_classes)
    """PriorityClasses by name: the shipped ones, each replaced by a document of its name."""
    classification_rules: tuple[ClassificationRule, ...] = ()
    """ClassificationRules (the gateway's), in document order."""

    def to_dict(self) -> dict[str, object]:
        """A JSON-able view, as served on the admin ``/config`` page."""
        return {
            "version": self.version,
            "source": self.source,
            "priorityClasses": {
                c.name: {
                    "rank": c.rank,
                    "weight": c.weight,
                    "queueDelayTarget": c.queue_delay_target,
                    "maxQueueLength": c.max_queue_length,
                    "dscp": c.dscp,
                    "soPriority": c.so_priority,
                    "congestionControl": c.congestion_control,
                }
                for c in sorted(self.priority_classes.values(), key=lambda c: -c.rank)
            },
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
                    "inbound": _admission_dict(svc.inbound),
                    "outbound": _admission_dict(svc.outbound),
                }
                for name, svc in sorted(self.services.items())
            },
            "routes": [_route_dict(route) for route in self.routes],
            "authorizationPolicies": [_policy_dict(p) for p in self.policies],
            "mesh": {
                "mtls": {"mode": self.mesh.mtls_mode},
                "authorization": {
                    "default": self.mesh.authz_default,
                    "dryRun": self.mesh.authz_dry_run,
                },
            },
        }


def _admission_dict(a: Admission) -> dict[str, object]:
    if a.concurrency != "adaptive":
        return {"concurrency": a.concurrency}
    return {
        "concurrency": a.concurrency,
        "initialLimit": a.initial_limit,
        "minLimit": a.min_limit,
        "maxLimit": a.max_limit,
        "tolerance": a.tolerance,
        "sampleWindow": a.sample_window,
        "probeInterval": a.probe_interval,
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


def _policy_dict(policy: AuthorizationPolicy) -> dict[str, object]:
    rules: list[dict[str, object]] = []
    for rule in policy.rules:
        out: dict[str, object] = {}
        if rule.sources:
            out["from"] = [
                {
                    **({"identities": list(s.identities)} if s.identities else {}),
                    **({"services": list(s.services)} if s.services else {}),
                }
                for s in rule.sources
            ]
        if rule.operations:
            out["to"] = [
                {
                    **({"methods": list(o.methods)} if o.methods else {}),
                    **(
                        {"paths": [{"prefix" if p.prefix else "exact": p.value} for p in o.paths]}
                        if o.paths
                        else {}
                    ),
                    **(
                        {"headers": [{"name": h.name, "value": h.value} for h in o.headers]}
                        if o.headers
                        else {}
                    ),
                }
                for o in rule.operations
            ]
        rules.append(out)
    return {
        "name": policy.name,
        "targetRef": {"name": policy.target},
        "action": policy.action,
        "dryRun": policy.dry_run,
        "rules": rules,
    }
