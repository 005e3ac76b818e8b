"""Per-service runtime state built from config, and the router that finds it.

A ``ServiceRuntime`` bundles what the request path needs for one destination:
its config, balancer, connection pools (one per priority class, each bounded
by the circuit breaker's connection and pending limits:
:mod:`meshlayer.proxy.pool`), retry budget and in-flight count (bounded by
``maxRequests`` for the service as a whole). The ``Router`` maps a request's
authority to one. Both are rebuilt when config changes; a runtime whose
service config did not change is kept, so its pools and balancer statistics
survive (its pools are laid out again for the new priority classes:
unchanged classes keep their connections). A runtime that is replaced hands
its admission control to its successor (``carry_admission``): a destination
keeps one concurrency limit and its queues across reloads.

The Router also compiles the config's HTTPRoutes (:mod:`meshlayer.proxy.routes`)
and hangs each parent service's table on its runtime as ``routes`` (None for
a service no route names); a route's backends are runtimes of the same
Router. A service that a route names but the config does not define (the
control plane's registry may add it later) gets a runtime with default
settings and no endpoints.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from meshlayer.config.model import Admission, MeshConfig, PriorityClass, Service
from meshlayer.config.priority import by_rank
from meshlayer.proxy.admission import admission_for
from meshlayer.proxy.balancer import Balancer
from meshlayer.proxy.classes import FALLBACK, ClassTable
from meshlayer.proxy.errors import MeshError
from meshlayer.proxy.pool import ClassPools, ServicePool
from meshlayer.proxy.resilience import RetryBudget
from meshlayer.proxy.routes import ServiceRoutes, compile_routes


class Settings:
    """What the request path reads of a Service's config, read once into plain fields
    (the config objects are interpreted dataclasses: every attribute is a lookup)."""

    def __init__(self, conf: Service) -> None:
        self.max_requests = conf.circuit_breaker.max_requests
        self.connect_timeout = conf.timeouts.connect
        self.request_timeout = conf.timeouts.request
        self.idle_timeout = conf.timeouts.idle
        self.retry_on = conf.retries.on_status
        self.retry_attempts = conf.retries.attempts
        self.priority_class = conf.priority_class


class ServiceRuntime:
    """Everything the request path needs for one destination service."""

    def __init__(
        self,
        service: Service,
        classes: Mapping[str, PriorityClass] | None = None,
        fifo: bool = False,
        direction: str = "outbound",
    ) -> None:
        self.service = service
        self.settings = Settings(service)
        self.name = service.name
        self.balancer = Balancer(
            service.endpoints, service.load_balancer, service.outlier_detection
        )
        self.class_pools = ClassPools(service.circuit_breaker)
        """The connection pools of all classes (and the retired ones, after a reload)."""
        self.pools: list[ServicePool] = self.class_pools.pools
        """The pool of each priority class, by ``ClassState.index`` (one pool, repeated,
        with priority off)."""
        self.direction = direction
        self.admission = admission_for(self._admission_spec(), direction, self.name)
        """Concurrency limit and class queues (``spec.inbound``/``outbound``); None: unlimited."""
        self.set_classes(classes or {}, fifo)
        self.budget = RetryBudget(service.retries.budget_percent, service.retries.min_per_second)
        self.in_flight = 0
        self.routes: ServiceRoutes[ServiceRuntime] | None = None
        """HTTPRoute table when routes name this service as parent (set by the Router)."""

    def __repr__(self) -> str:
        return f"<ServiceRuntime {self.name} in_flight={self.in_flight} {self.class_pools!r}>"

    def set_classes(self, classes: Mapping[str, PriorityClass], fifo: bool = False) -> None:
        """Lay the pools out for the priority classes in force (``fifo``: priority off)."""
        self.fifo = fifo
        """``--priority off``: one pool for all classes (and one queue, for admission)."""
        self.class_pools.set_classes(by_rank(classes.values()), fifo)
        if self.admission is not None:  # new settings now; removed classes go once empty
            self.admission.keep_classes(ClassTable(classes).ordered if classes else (), (FALLBACK,))

    def _admission_spec(self) -> Admission:
        svc = self.service
        return svc.inbound if self.direction == "inbound" else svc.outbound

    def carry_admission(self, old: ServiceRuntime) -> None:
        """This runtime replaces ``old`` after a reload (another endpoint, a new timeout):
        the destination's admission control carries over, so there is still one limit,
        and its slots in use, queues and measurements stay; new admission settings are
        applied to it (``unlimited``: its waiters are admitted, then it is dropped)."""
        adm = old.admission
        if adm is None or old.direction != self.direction:
            return
        spec = self._admission_spec()
        if spec != old._admission_spec():
            adm.reconfigure(spec, time.monotonic())
        self.admission = None if spec.concurrency == "unlimited" else adm


def _authority_host(authority: bytes) -> str:
    host = authority.strip().lower()
    if host.startswith(b"["):
        host = host[1 : host.find(b"]")]
    else:
        host = host.rsplit(b":", 1)[0] if b":" in host else host
    return host.decode("latin-1").rstrip(".")


class Router:
    """Authority → service runtime, for the outbound side."""

    def __init__(
        self, config: MeshConfig, previous: Router | None = None, fifo: bool | None = None
    ) -> None:
        """``fifo``: priority off, one pool per service (default: as ``previous``, else on)."""
        self.config = config
        self.fifo: bool = fifo if fifo is not None else previous is not None and previous.fifo
        classes = config.priority_classes
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
                old.set_classes(classes, self.fifo)
                self.services[name] = old
            else:
                rt = self.services[name] = ServiceRuntime(svc, classes, self.fifo)
                if old is not None:  # one admission control per destination, across reloads
                    rt.carry_admission(old)
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
