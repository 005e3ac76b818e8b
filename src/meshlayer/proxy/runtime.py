"""Per-service runtime state built from config, and the router that finds it.

A ``ServiceRuntime`` bundles what the request path needs for one destination:
its config, balancer, pool (with circuit breaker), retry budget and in-flight
count. The ``Router`` maps a request's authority to one. Both are rebuilt
when config changes; a runtime whose endpoints did not change is kept, so its
pools and balancer statistics survive.

The Router also compiles the config's HTTPRoutes (:mod:`meshlayer.proxy.routes`)
and hangs each parent service's table on its runtime as ``routes`` (None for
a service no route names); a route's backends are runtimes of the same
Router. A service that a route names but the config does not define (the
control plane's registry may add it later) gets a runtime with default
settings and no endpoints.
"""

from __future__ import annotations

from meshlayer.config.model import MeshConfig, Service
from meshlayer.proxy.balancer import Balancer
from meshlayer.proxy.errors import MeshError
from meshlayer.proxy.pool import ServicePool
from meshlayer.proxy.resilience import RetryBudget
from meshlayer.proxy.routes import ServiceRoutes, compile_routes


class ServiceRuntime:
    """Everything the request path needs for one destination service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.name = service.name
        self.balancer = Balancer(
            service.endpoints, service.load_balancer, service.outlier_detection
        )
        self.pool = ServicePool(service.circuit_breaker)
        self.budget = RetryBudget(service.retries.budget_percent, service.retries.min_per_second)
        self.in_flight = 0
        self.routes: ServiceRoutes[ServiceRuntime] | None = None
        """HTTPRoute table when routes name this service as parent (set by the Router)."""

    def __repr__(self) -> str:
        return f"<ServiceRuntime {self.name} in_flight={self.in_flight} {self.pool!r}>"


def _authority_host(authority: bytes) -> str:
    host = authority.strip().lower()
    if host.startswith(b"["):
        host = host[1 : host.find(b"]")]
    else:
        host = host.rsplit(b":", 1)[0] if b":" in host else host
    return host.decode("latin-1").rstrip(".")


class Router:
    """Authority → service runtime, for the outbound side."""

    def __init__(self, config: MeshConfig, previous: Router | None = None) -> None:
        self.config = config
        self.services: dict[str, ServiceRuntime] = {}
        self._resolved: dict[bytes, ServiceRuntime] = {}  # authority as sent -> runtime
        wanted = dict(config.services)
        for route in config.routes:  # names routes use but the config lacks: defaults
            for name in route.parent_refs:
                wanted.setdefault(name, Service(name))
            for rule in route.rules:
                for ref in rule.backend_refs:
                    wanted.setdefault(ref.name, Service(ref.name))
        for name, svc in wanted.items():
            old = previous.services.get(name) if previous else None
            if old is not None and old.service == svc:
                self.services[name] = old
            else:
                self.services[name] = ServiceRuntime(svc)
        tables = compile_routes(config.routes, wanted, self.services.__getitem__)
        for name, rt in self.services.items():  # kept runtimes get the new table too
            rt.routes = tables.get(name)

    def resolve(self, authority: bytes) -> ServiceRuntime:
        """Find the service an authority names. Raises MeshError (404) when none."""
        rt = self._resolved.get(authority)
        if rt is not None:
            return rt
        rt = self._resolve(authority)
        if len(self._resolved) < 1024:  # authorities come from clients: a bounded few
            self._resolved[authority] = rt
        return rt

    def _resolve(self, authority: bytes) -> ServiceRuntime:
        host = _authority_host(authority)
        rt = self.services.get(host)
        if rt is None and "." in host:
            rt = self.services.get(host.split(".", 1)[0])
        if rt is None:
            raise MeshError(404, "no-route", f"no service named {host!r} in the mesh")
        return rt


def split_target(target: bytes) -> tuple[bytes | None, bytes]:
    """Split a request target into (authority of an absolute-form URI, origin-form path).

    Raises MeshError (400) for schemes other than http.
    """
    if target[:1] == b"/" or target == b"*":
        return None, target
    lower = target[:8].lower()
    if lower.startswith(b"http://"):
        rest = target[7:]
    elif lower.startswith(b"https://"):
        raise MeshError(400, "bad-target", "https:// targets need CONNECT, which is not supported")
    else:
        raise MeshError(400, "bad-target", "request target must be a path or an http:// URI")
    slash = rest.find(b"/")
    q = rest.find(b"?")
    cut = min(i for i in (slash, q, len(rest)) if i >= 0)
    authority, path = rest[:cut], rest[cut:]
    if b"@" in authority or not authority:
        raise MeshError(400, "bad-target", "absolute URI has no valid authority")
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path
