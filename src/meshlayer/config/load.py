"""Load and validate YAML config documents.

Theory of operation: a file holds one or more Kubernetes-style documents
(``apiVersion``, ``kind``, ``metadata``, ``spec``). Each document is read
through a :class:`_Reader`, which knows the document's name and the dotted path
of the field being read, so every error names both. Unknown fields are errors,
never ignored: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from meshlayer.config.admission import parse_admission
from meshlayer.config.authz import parse_authorization_policy, parse_mesh
from meshlayer.config.classification import (
    ClassificationRule,
    check_rule_refs,
    parse_classification_rule,
)
from meshlayer.config.errors import ConfigError
from meshlayer.config.fields import is_name
from meshlayer.config.httproute import check_refs, parse_http_route
from meshlayer.config.model import (
    LB_POLICIES,
    Admission,
    AuthorizationPolicy,
    CircuitBreaker,
    Endpoint,
    HealthCheck,
    HTTPRoute,
    MeshConfig,
    MeshSettings,
    OutlierDetection,
    PriorityClass,
    RetryPolicy,
    Service,
    Timeouts,
)
from meshlayer.config.priority import merge_defaults, parse_priority_class

API_VERSION = "meshlayer/v1"
KINDS = (
    "Service",
    "HTTPRoute",
    "PriorityClass",
    "AuthorizationPolicy",
    "Mesh",
    "ClassificationRule",
)

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class _Reader:
    """Reads fields of one mapping, tracking the document and field path."""

    def __init__(self, doc: str, path: str, data: object) -> None:
        self.doc = doc
        self.path = path
        if not isinstance(data, Mapping):
            raise ConfigError(doc, path, f"must be a mapping, got {_typename(data)}")
        self.data: Mapping[str, Any] = data
        self._seen: set[str] = set()

    def _sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.doc, self._sub(key), problem)

    def get(self, key: str, default: Any = None) -> Any:
        self._seen.add(key)
        return self.data.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.data

    def child(self, key: str, required: bool = False) -> _Reader:
        self._seen.add(key)
        if key not in self.data:
            if required:
                raise self.error(key, "is required")
            return _Reader(self.doc, self._sub(key), {})
        return _Reader(self.doc, self._sub(key), self.data[key])

    def string(self, key: str, default: str | None = None, required: bool = False) -> str:
        value = self.get(key)
        if value is None:
            if required or default is None:
                raise self.error(key, "is required")
            return default
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        value = self.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def number(
        self, key: str, default: float, minimum: float = 0.0, maximum: float = 1e12
    ) -> float:
        value = self.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.error(key, f"must be a number, got {value!r}")
        if not minimum <= value <= maximum:
            raise self.error(key, f"must be between {minimum:g} and {maximum:g}, got {value!r}")
        return float(value)

    def duration(self, key: str, default: float) -> float:
        """A duration: ``250ms``, ``5s``, ``1m``, ``1h``, or a number of seconds."""
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION_RE.match(value.strip())):
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
        else:
            raise self.error(key, f"must be a duration like 250ms, 5s or 1m, got {value!r}")
        if not seconds > 0:  # NaN too: it would never fire
            raise self.error(key, f"must be positive, got {value!r}")
        if seconds == float("inf"):
            raise self.error(key, f"must be finite, got {value!r}")
        return seconds

    def items(self, key: str) -> list[_Reader | object]:
        value = self.get(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, got {_typename(value)}")
        return list(value)

    def each(self, key: str) -> list[_Reader]:
        """Readers for the mappings of a list field (``key[0]``, ``key[1]``, ...)."""
        base = self._sub(key)
        return [_Reader(self.doc, f"{base}[{i}]", v) for i, v in enumerate(self.items(key))]

    def finish(self) -> None:
        """Unknown fields are errors."""
        for key in self.data:
            if key not in self._seen:
                raise self.error(str(key), "unknown field")


def _typename(value: object) -> str:
    names: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6). Raises ValueError."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"{text!r} has no valid IPv6 address in brackets: {exc}") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not HOST:PORT")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port in {text!r} must be 1-65535")
    return host, int(port)


def _service(r: _Reader, name: str) -> Service:
    spec = r.child("spec", required=True)
    endpoints = []
    for i, raw in enumerate(spec.items("endpoints")):
        er = _Reader(r.doc, f"spec.endpoints[{i}]", raw)
        address = er.string("address", required=True)
        try:
            host, port = parse_address(address)
        except ValueError as exc:
            raise er.error("address", str(exc)) from None
        endpoints.append(Endpoint(host, port, er.boolean("meshed", True)))
        er.finish()
    policy = spec.string("loadBalancer", "p2c-ewma")
    if policy not in LB_POLICIES:
        raise spec.error("loadBalancer", f"must be one of {', '.join(LB_POLICIES)}, got {policy!r}")

    t = spec.child("timeouts")
    timeouts = Timeouts(
        connect=t.duration("connect", 5.0),
        request=t.duration("request", 15.0),
        idle=t.duration("idle", 300.0),
    )
    t.finish()

    rr = spec.child("retries")
    statuses = rr.get("onStatus", [503])
    if not isinstance(statuses, list) or not all(
        isinstance(s, int) and 500 <= s <= 599 for s in statuses
    ):
        raise rr.error("onStatus", f"must be a list of 5xx statuses, got {statuses!r}")
    retries = RetryPolicy(
        attempts=rr.integer("attempts", 2),
        budget_percent=rr.number("budgetPercent", 20.0, 0.0, 1000.0),
        min_per_second=rr.number("minPerSecond", 10.0, 0.0, 1e6),
        on_status=tuple(statuses),
    )
    rr.finish()

    cb = spec.child("circuitBreaker")
    breaker = CircuitBreaker(
        max_connections=cb.integer("maxConnections", 1024, 1),
        max_pending=cb.integer("maxPendingRequests", 1024, 0),
        max_requests=cb.integer("maxRequests", 1024, 1),
    )
    cb.finish()

    od = spec.child("outlierDetection")
    outlier = OutlierDetection(
        consecutive_failures=od.integer("consecutiveFailures", 5, 1),
        base_ejection=od.duration("baseEjectionTime", 10.0),
        max_ejection=od.duration("maxEjectionTime", 300.0),
        max_ejected_percent=od.number("maxEjectionPercent", 50.0, 0.0, 100.0),
    )
    od.finish()
    health = _health_check(spec) if spec.has("healthCheck") else None
    priority_class = spec.string("priorityClass", "default")
    inbound = parse_admission(spec, "inbound", Admission())
    outbound = parse_admission(spec, "outbound", Admission("unlimited"))
    spec.finish()
    return Service(
        name,
        tuple(endpoints),
        policy,
        timeouts,
        retries,
        breaker,
        outlier,
        health,
        priority_class=priority_class,
        inbound=inbound,
        outbound=outbound,
    )


def _health_check(spec: _Reader) -> HealthCheck:
    hc = spec.child("healthCheck")
    path = hc.string("path", "/healthz")
    if not path.startswith("/") or any(c.isspace() or ord(c) < 0x21 for c in path):
        raise hc.error("path", f"must be an absolute path without spaces, got {path!r}")
    check = HealthCheck(
        path=path,
        interval=hc.duration("interval", 5.0),
        timeout=hc.duration("timeout", 1.0),
        unhealthy_threshold=hc.integer("unhealthyThreshold", 3, 1),
        healthy_threshold=hc.integer("healthyThreshold", 2, 1),
    )
    hc.finish()
    return check


class Resources(NamedTuple):
    """The validated resources of a set of documents, in document order."""

    services: list[Service]
    """``kind: Service`` documents."""
    routes: list[HTTPRoute]
    """``kind: HTTPRoute`` documents."""
    priority_classes: list[PriorityClass]
    """``kind: PriorityClass`` documents (without the shipped defaults)."""
    policies: list[AuthorizationPolicy]
    """``kind: AuthorizationPolicy`` documents."""
    mesh: MeshSettings
    """The ``kind: Mesh`` document's settings (defaults when there is none)."""
    classification_rules: list[ClassificationRule]
    """``kind: ClassificationRule`` documents (the gateway's)."""


def parse_documents(docs: Iterable[object], source: str, *, strict_refs: bool = True) -> Resources:
    """Validate already-parsed YAML documents. Raises ConfigError.

    ``strict_refs``: an HTTPRoute's parentRefs and backendRefs must name a
    Service among ``docs`` (a static file), and a Service's priorityClass a
    PriorityClass; off for control-plane documents, whose store may supply
    them apart (a sidecar then uses ``default`` for an unknown class).
    """
    services: list[Service] = []
    routes: list[HTTPRoute] = []
    priority_classes: list[PriorityClass] = []
    policies: list[AuthorizationPolicy] = []
    mesh = MeshSettings()
    route_docs: list[str] = []
    rules: list[ClassificationRule] = []
    rule_docs: list[str] = []
    service_docs: list[str] = []
    names: set[tuple[str, str]] = set()
    for index, raw in enumerate(docs, 1):
        if raw is None:  # an empty document between two `---`
            continue
        label = f"{source}#{index}"
        r = _Reader(label, "", raw)
        api = r.get("apiVersion")
        if api != API_VERSION:
            raise r.error("apiVersion", f"must be {API_VERSION!r}, got {api!r}")
        kind = r.get("kind")
        if kind not in KINDS:
            raise r.error("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
        meta = r.child("metadata", required=True)
        name = meta.string("name", required=True)
        if not is_name(name):
            raise meta.error(
                "name", f"must be a DNS name (lowercase, digits, '-', '.'), got {name!r}"
            )
        if meta.has("labels"):
            raise meta.error("labels", "not supported: meshlayer stores no labels")
        namespace = meta.get("namespace", "default")
        if namespace != "default":  # services are flat names in one namespace
            raise meta.error("namespace", f"only 'default' is supported, got {namespace!r}")
        if meta.has("resourceVersion"):  # stamped by the control plane; informational
            meta.integer("resourceVersion", 0)
        meta.finish()
        r = _Reader(f"{label} ({kind}/{name})", "", raw)
        for key in ("apiVersion", "kind", "metadata"):
            r.get(key)
        if (kind, name) in names:
            raise r.error("metadata.name", f"duplicate {kind} {name!r}")
        names.add((kind, name))
        if kind == "HTTPRoute":
            routes.append(parse_http_route(r, name))
            route_docs.append(r.doc)
        elif kind == "PriorityClass":
            priority_classes.append(parse_priority_class(r, name))
        elif kind == "AuthorizationPolicy":
            policies.append(parse_authorization_policy(r, name))
        elif kind == "Mesh":
            mesh = parse_mesh(r, name)
        elif kind == "ClassificationRule":
            rules.append(parse_classification_rule(r, name))
            rule_docs.append(r.doc)
        else:
            services.append(_service(r, name))
            service_docs.append(r.doc)
        r.finish()
    if strict_refs:  # a control plane's store may hold the class, applied apart
        known = merge_defaults(priority_classes)
        for svc, doc in zip(services, service_docs, strict=True):
            if svc.priority_class not in known:
                raise ConfigError(
                    doc,
                    "spec.priorityClass",
                    f"names no PriorityClass: {svc.priority_class!r} "
                    f"(known: {', '.join(sorted(known))})",
                )
        defined = {s.name for s in services}
        for route, doc in zip(routes, route_docs, strict=True):
            check_refs(route, defined, doc)
        for rule, doc in zip(rules, rule_docs, strict=True):
            check_rule_refs(rule, known, defined, doc)
    return Resources(services, routes, priority_classes, policies, mesh, rules)


def load_documents(text: str, source: str, *, strict_refs: bool = True) -> MeshConfig:
    """Parse a YAML text of one or more documents into a MeshConfig.

    ``strict_refs`` as in :func:`parse_documents` (on for files).
    """
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, "", f"not valid YAML{where}: {exc}") from None
    services, routes, classes, policies, mesh, rules = parse_documents(
        docs, source, strict_refs=strict_refs
    )
    version = hashlib.sha256(text.encode()).hexdigest()[:12]
    return MeshConfig(
        {s.name: s for s in services},
        version,
        source,
        tuple(routes),
        priority_classes=merge_defaults(classes),
        policies=tuple(policies),
        mesh=mesh,
        classification_rules=tuple(rules),
    )


def load_file(path: str | Path) -> MeshConfig:
    """Read and validate a config file. Raises ConfigError (also for I/O errors)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), "", f"cannot read: {exc}") from None
    return load_documents(text, p.name)
