"""The sidecar process: config, listeners, admin, sweeper, graceful shutdown.

This is the one place where the request path is assembled (linkerd's
``sidecar.rs``): the outbound listener routes by authority to a service of
the mesh, the inbound listener always to the local app; both run the same
exchange pipeline (route → circuit breaker → balance → pool → forward →
observe) and differ only in the policy callbacks given to ``Listener``; the
inbound one also authorizes first when AuthorizationPolicies (or a mesh
default of deny) apply to the local service (``Listener.authz``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from meshlayer.config import ConfigError, Endpoint, MeshConfig, Service, load_file
from meshlayer.config.load import parse_address
from meshlayer.config.model import PriorityClass
from meshlayer.config.priority import by_rank
from meshlayer.proxy.acceptor import MeshAcceptor
from meshlayer.proxy.admin import AdminProtocol, AdminState
from meshlayer.proxy.admission import AdmissionControl
from meshlayer.proxy.authz import AuthzStage
from meshlayer.proxy.classes import ClassTable
from meshlayer.proxy.control_client import ControlClient, ControlOptions, load_saved
from meshlayer.proxy.control_http import parse_control_url
from meshlayer.proxy.errors import MeshError
from meshlayer.proxy.exchange import Exchange
from meshlayer.proxy.loop import loop_name, run
from meshlayer.proxy.metrics import Metrics
from meshlayer.proxy.netmarks import warn_class_marks
from meshlayer.proxy.pool import layout_view
from meshlayer.proxy.runtime import Router, ServiceRuntime
from meshlayer.proxy.server import Listener
from meshlayer.proxy.tls import MeshTls

log = logging.getLogger("meshlayer.sidecar")

SWEEP_INTERVAL = 0.1
MAX_SOURCES = 256  # distinct source labels kept on inbound metrics
_SOURCE_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class SidecarOptions:
    """How one sidecar is started (the ``meshlayer sidecar`` flags)."""

    service: str
    """Name of the local service."""
    app: tuple[str, int]
    """The local app's listener."""
    inbound: tuple[str, int]
    """Inbound listener address."""
    outbound: tuple[str, int]
    """Outbound listener address."""
    admin: tuple[str, int]
    """Admin listener address."""
    grace: float = 20.0
    """Seconds in-flight requests get to finish on SIGTERM."""
    header_timeout: float = 10.0
    """Seconds a client has to send a whole request head."""
    idle_timeout: float = 60.0
    """Seconds a keep-alive client connection may sit idle."""
    access_log: bool = False
    """One log line per request."""
    control: ControlOptions | None = None
    """Follow a control plane (``--control``); None: the static config only."""
    token: str = ""
    """Join token (``--token``/``MESHLAYER_TOKEN``): get a certificate, speak mTLS."""
    priority: bool = True
    """``--priority on``: per-class queues, pools and marks; off: FIFO, one of each."""
    gateway: bool = False
    """Gateway mode (``meshlayer gateway``): no app, no inbound listener; the outbound
    listener (at ``outbound``) faces outside clients (:mod:`meshlayer.proxy.gateway`)."""


class Sidecar:
    """One sidecar: two proxy listeners and an admin listener."""

    def __init__(self, opts: SidecarOptions, config: MeshConfig) -> None:
        self.opts = opts
        self.name = opts.service
        self.metrics = Metrics()
        self.config = config
        self.router = Router(config, fifo=not opts.priority)
        self.classes_config: dict[str, PriorityClass] = {}
        self.classes: ClassTable
        warn_class_marks(config.priority_classes.values())
        self.app = ServiceRuntime(
            self._app_service(config), config.priority_classes, not opts.priority, "inbound"
        )
        self.admin_state = AdminState(self.metrics, self._config_view)
        self.metrics.config_info.labels(config.version).set(1)
        self.metrics.config_version.set(_mesh_version(config))
        self.control: ControlClient | None = None
        self._retired: list[ServiceRuntime] = []
        self.metrics.add_state_collector(self._state)
        self.metrics.add_admission_collector(self._admissions)
        common = {
            "sidecar": opts.service,
            "metrics": self.metrics,
            "header_timeout": opts.header_timeout,
            "idle_timeout": opts.idle_timeout,
            "access": opts.access_log,
        }
        self.outbound = Listener(
            "outbound",
            route=self._route_outbound,
            source_label=lambda _v: self.name,
            destination_label=lambda ex: ex.service.name if ex.service else "unknown",
            source_line=b"x-meshlayer-source: " + opts.service.encode(),
            **common,  # type: ignore[arg-type]
        )
        self.inbound = Listener(
            "inbound",
            route=lambda _ex: self.app,
            source_label=self._inbound_source,
            destination_label=lambda _ex: self.name,
            **common,  # type: ignore[arg-type]
        )
        self.authz = AuthzStage(opts.service, self.metrics.registry)
        self.inbound.authz = self.authz.update(config)
        self._set_classes(config)
        self._sources: set[str] = set(config.services)
        self.tls: MeshTls | None = None
        """The identity's TLS material (with a join token): inbound and outbound mTLS."""
        if opts.token and opts.control is not None:
            self.tls = MeshTls(opts.service, self.metrics.registry)
            self.tls.mode = config.mesh.mtls_mode
            self.tls.on_clear = self._fail_closed
            self.outbound.upstream_tls = self.tls
        self._servers: list[asyncio.Server | MeshAcceptor] = []
        self._stop = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None

    def _set_classes(self, config: MeshConfig) -> None:
        """The priority classes in force, for both listeners."""
        if config.priority_classes != self.classes_config:
            self.classes = ClassTable(config.priority_classes)
            self.classes_config = config.priority_classes
        self.outbound.classes = self.inbound.classes = self.classes

    def _app_service(self, config: MeshConfig) -> Service:
        host, port = self.opts.app
        own = config.services.get(self.name)
        base = own if own is not None else Service(self.name)
        return replace(
            base, endpoints=(Endpoint(host, port, meshed=False),), load_balancer="round-robin"
        )

    # -- policy callbacks ------------------------------------------------------

    def _route_outbound(self, ex: Exchange) -> ServiceRuntime:
        authority = ex.authority if ex.authority is not None else ex.head.host
        if not authority:
            raise MeshError(
                400, "no-authority", "request names no service (no Host, no absolute URI)"
            )
        return self.router.resolve(authority)

    def _inbound_source(self, value: bytes) -> str:
        """The caller's service, as its sidecar said; bounded so labels stay few."""
        if not value:
            return "unknown"
        name = value.decode("latin-1")
        if name in self._sources:
            return name
        if len(self._sources) < MAX_SOURCES and _SOURCE_RE.match(name):
            self._sources.add(name)
            return name
        return "unknown"

    def _config_view(self) -> dict[str, Any]:
        view = self.config.to_dict()
        view["sidecar"] = {
            "service": self.name,
            "app": "{}:{}".format(*self.opts.app),
            "inbound": "{}:{}".format(*self.opts.inbound),
            "outbound": "{}:{}".format(*self.opts.outbound),
            "admin": "{}:{}".format(*self.opts.admin),
            "loop": loop_name(),
        }
        view["priority"] = layout_view(
            by_rank(self.config.priority_classes.values()), self.router.fifo
        )
        if self.control is not None:
            view["control"] = self.control.view()
        return view

    def _state(self) -> dict[str, list[tuple[tuple[str, ...], float]]]:
        out: dict[str, list[tuple[tuple[str, ...], float]]] = {
            "meshlayer_ejected_endpoints": [],
            "meshlayer_endpoints": [],
            "meshlayer_upstream_in_flight": [],
            "meshlayer_upstream_pending": [],
            "meshlayer_upstream_pool_connections": [],
        }
        for rt in [*self.router.services.values(), self.app]:
            label = (rt.name if rt is not self.app else f"{rt.name}(app)",)
            out["meshlayer_ejected_endpoints"].append((label, rt.balancer.ejected_count))
            out["meshlayer_endpoints"].append((label, len(rt.balancer.states)))
            out["meshlayer_upstream_in_flight"].append((label, rt.in_flight))
            out["meshlayer_upstream_pending"].append((label, rt.class_pools.pending_count()))
            for pool in rt.class_pools.distinct:
                out["meshlayer_upstream_pool_connections"].append(
                    ((*label, pool.name), pool.connections)
                )
        return out

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Bind all listeners; raises OSError naming the one that failed."""
        loop = asyncio.get_running_loop()
        binds = [
            (
                "listen" if self.opts.gateway else "outbound",
                self.opts.outbound,
                self.outbound.protocol,
            ),
            ("inbound", self.opts.inbound, self.inbound.protocol),
            ("admin", self.opts.admin, lambda: AdminProtocol(self.admin_state)),
        ]
        if self.opts.gateway:  # one listener for outside clients, and the admin one
            del binds[1]
        for what, addr, factory in binds:
            try:
                server: asyncio.Server | MeshAcceptor
                if what == "inbound" and self.tls is not None:  # sniff, mTLS, verify
                    server = await MeshAcceptor(self.inbound, self.tls).start(*addr)
                else:
                    server = await loop.create_server(
                        factory, addr[0], addr[1], reuse_address=True, backlog=1024
                    )
            except OSError as exc:
                for s in self._servers:
                    s.close()
                raise OSError(f"cannot listen on {what} {addr[0]}:{addr[1]}: {exc}") from exc
            self._servers.append(server)
        for rt in [*self.router.services.values(), self.app]:
            self._watch_pool(rt)
        self._sweeper = loop.create_task(self._sweep())
        self.admin_state.ready = True
        if self.opts.gateway:
            return  # the gateway logs its own line
        log.info(
            "sidecar %s ready: outbound %s:%d, inbound %s:%d -> app %s:%d, admin %s:%d (%s, "
            "config %s with %d services)",
            self.name,
            *self.opts.outbound,
            *self.opts.inbound,
            *self.opts.app,
            *self.opts.admin,
            loop_name(),
            self.config.version,
            len(self.config.services),
        )

    def _fail_closed(self) -> None:
        """The certificate expired: drop idle meshed connections both ways (new ones
        cannot be made until a certificate arrives)."""
        for rt in self.router.services.values():
            rt.class_pools.close_idle()
        for conn in list(self.inbound.connections):
            if conn.peer_identity is not None and not conn.queue:
                conn.close()

    def _watch_pool(self, rt: ServiceRuntime) -> None:
        name = rt.name if rt is not self.app else f"{rt.name}(app)"  # as in _state
        gauge = self.metrics.connections.labels("upstream", name)
        rt.class_pools.on_change = gauge.inc

    def reload(self, config: MeshConfig) -> None:
        """Switch to ``config`` between two requests; nothing in flight is dropped.

        The router keeps the runtime (pool, balancer state, in-flight count) of
        every service whose config did not change. Requests in flight hold on
        to the runtime they started with; a replaced runtime is retired: its
        idle connections are closed as its last requests finish.
        """
        old = self.config
        old_runtimes = [*self.router.services.values(), self.app]
        self.router = Router(config, self.router)
        app_service = self._app_service(config)
        if app_service != self.app.service:
            app = ServiceRuntime(app_service, config.priority_classes, self.router.fifo, "inbound")
            app.carry_admission(self.app)  # one limit for the app, its queues kept
            self.app = app
        else:
            self.app.set_classes(config.priority_classes, self.router.fifo)
        self.config = config
        warn_class_marks(config.priority_classes.values())
        self.inbound.authz = self.authz.update(config)
        self._set_classes(config)
        if self.tls is not None:
            self.tls.mode = config.mesh.mtls_mode
        current = [*self.router.services.values(), self.app]
        kept = {id(rt) for rt in current}
        was = {id(rt) for rt in old_runtimes}
        for rt in current:
            if id(rt) not in was:
                self._watch_pool(rt)
        for rt in old_runtimes:
            if id(rt) not in kept:
                rt.class_pools.close_idle()
                self._retired.append(rt)
        for name in config.services:
            if len(self._sources) < MAX_SOURCES:
                self._sources.add(name)
        if old.version != config.version:
            self.metrics.config_info.labels(config.version).set(1)
            try:
                self.metrics.config_info.remove(old.version)
            except KeyError:
                pass
        self.metrics.config_version.set(_mesh_version(config))

    def _sweep_retired(self) -> None:
        for rt in self._retired:
            rt.class_pools.close_idle()
        self._retired = [rt for rt in self._retired if rt.class_pools.connections or rt.in_flight]

    def _admissions(self) -> list[tuple[str, str, AdmissionControl]]:
        """(direction, service, admission) of each destination with a concurrency limit."""
        out = [("outbound", rt.name, rt.admission) for rt in self.router.services.values()]
        out.append(("inbound", self.app.name, self.app.admission))
        return [(d, name, adm) for d, name, adm in out if adm is not None]

    async def _sweep(self) -> None:
        last_pool_sweep = 0.0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            self.outbound.sweep(now)
            self.inbound.sweep(now)
            for _, _, adm in self._admissions():
                adm.tick(now)
            if self._retired:
                self._sweep_retired()
            if now - last_pool_sweep > 5.0:
                last_pool_sweep = now
                for rt in [*self.router.services.values(), self.app]:
                    rt.class_pools.sweep(now)

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        """Run until stopped, then shut down gracefully."""
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Readiness off, stop accepting, let in-flight requests finish within the grace."""
        self.admin_state.ready = False
        log.info("sidecar %s shutting down (grace %.1fs)", self.name, self.opts.grace)
        if self.control is not None:
            await self.control.close()  # deregister first: peers stop sending new requests
        for server in self._servers[:-1]:  # the admin listener is the last
            server.close()
        for listener in (self.outbound, self.inbound):
            listener.begin_shutdown()
        deadline = time.monotonic() + self.opts.grace
        while time.monotonic() < deadline:
            if not self.outbound.connections and not self.inbound.connections:
                break
            await asyncio.sleep(0.02)
        left = len(self.outbound.connections) + len(self.inbound.connections)
        if left:
            log.warning("grace period over: closing %d connections with requests in flight", left)
            for listener in (self.outbound, self.inbound):
                for conn in list(listener.connections):
                    conn.abort()
        for rt in [*self.router.services.values(), self.app]:
            rt.class_pools.close_idle()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._servers[-1].close()
        await asyncio.sleep(0)
        log.info("sidecar %s stopped", self.name)


def options_from_args(args: argparse.Namespace) -> SidecarOptions:
    """Validate the flags; raises ConfigError naming the flag."""
    inbound = flag_address("--inbound", args.inbound)
    return SidecarOptions(
        service=args.service,
        app=flag_address("--app", args.app),
        inbound=inbound,
        outbound=flag_address("--outbound", args.outbound),
        priority=getattr(args, "priority", "on") == "on",
        **common_options(args, args.service, inbound, "sidecar"),
    )


def flag_address(flag: str, value: str) -> tuple[str, int]:
    """The HOST:PORT a flag gives; raises ConfigError naming the flag."""
    try:
        return parse_address(value)
    except ValueError as exc:
        raise ConfigError("command line", flag, str(exc)) from None


def common_options(
    args: argparse.Namespace, service: str, listen: tuple[str, int], kind: str
) -> dict[str, Any]:
    """The options ``meshlayer sidecar`` and ``meshlayer gateway`` share, validated
    (:func:`meshlayer.cli.proxyflags.add_proxy_flags` defines their flags): timeouts,
    admin listener, access log, control plane (registered at ``listen`` unless
    ``--advertise``; state in ``.meshlayer/<kind>-<service>``) and join token.
    Raises ConfigError naming the flag."""
    for flag, value in (
        ("--grace", args.grace),
        ("--header-timeout", args.header_timeout),
        ("--idle-timeout", args.idle_timeout),
        ("--lease-ttl", args.lease_ttl),
        ("--reconnect-max", args.reconnect_max),
    ):
        if not 0 < value < float("inf"):  # argparse's float() also takes nan and inf
            raise ConfigError("command line", flag, f"must be positive and finite, got {value}")
    control = None
    if args.control:
        try:
            for url in args.control.split(","):
                parse_control_url(url.strip())
        except ValueError as exc:
            raise ConfigError("command line", "--control", str(exc)) from None
        if args.advertise:
            advertise = flag_address("--advertise", args.advertise)
        elif listen[0] in ("0.0.0.0", "::", ""):
            advertise = ("127.0.0.1", listen[1])
        else:
            advertise = listen
        control = ControlOptions(
            url=args.control.rstrip("/"),
            service=service,
            advertise=advertise,
            state_dir=Path(args.state_dir or f".meshlayer/{kind}-{service}"),
            ttl=args.lease_ttl,
            backoff_max=max(0.1, args.reconnect_max),
            reconnect_grace=2 * max(0.1, args.reconnect_max) + 1.0,
        )
    elif not args.config:
        raise ConfigError("command line", "--config", "is required unless --control is given")
    token = (args.token or os.environ.get("MESHLAYER_TOKEN", "")).strip()
    if token and control is None:
        raise ConfigError("command line", "--token", "needs --control (certificates come from it)")
    return {
        "admin": flag_address("--admin", args.admin),
        "grace": args.grace,
        "header_timeout": args.header_timeout,
        "idle_timeout": args.idle_timeout,
        "access_log": args.access_log,
        "control": control,
        "token": token,
    }


def _mesh_version(config: MeshConfig) -> int:
    """The mesh version of a pushed config; 0 for a static file's content hash."""
    v = config.version
    return int(v) if v.isdigit() and len(v) < 12 else 0


def initial_config(
    opts: SidecarOptions, config_file: str | None
) -> tuple[MeshConfig, dict[str, Any] | None]:
    """What to serve before the control plane answers: the saved snapshot (returned
    as data too), else the static file, else an empty mesh. Raises ConfigError for a
    bad static file."""
    if opts.control is not None:
        saved = load_saved(opts.control.state_dir, opts.control.url)
        if saved is not None:
            return saved
    if config_file:
        return load_file(config_file), None
    return MeshConfig(version="0", source="empty: waiting for the control plane"), None


async def _main(
    opts: SidecarOptions,
    config: MeshConfig,
    saved: dict[str, Any] | None = None,
    factory: type[Sidecar] = Sidecar,
) -> int:
    sidecar = factory(opts, config)
    try:
        await sidecar.start()
    except OSError as exc:
        print(f"meshlayer {'gateway' if opts.gateway else 'sidecar'}: {exc}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sidecar.request_stop)
    if opts.control is not None:
        identity = None
        if sidecar.tls is not None:
            from meshlayer.proxy.identity import IdentityClient  # needs cryptography

            identity = IdentityClient(
                opts.service, opts.token, sidecar.tls, opts.control.request_timeout
            )
        sidecar.control = ControlClient(
            opts.control,
            sidecar.reload,
            sidecar.metrics,
            _mesh_version(config),
            saved,
            identity,
        )
        sidecar.control.start()
    await sidecar.serve()
    return 0


def run_sidecar_cli(args: argparse.Namespace) -> int:
    """``meshlayer sidecar``: exit 2 on bad flags or config, nothing started."""
    return run_cli(args, options_from_args, Sidecar, "sidecar")


def run_cli(
    args: argparse.Namespace,
    options: Callable[[argparse.Namespace], SidecarOptions],
    cls: type[Sidecar],
    kind: str,
) -> int:
    """``meshlayer <kind>``: validate the flags and the config, then run ``cls`` until
    stopped; exit 2 on bad flags or config, nothing started."""
    try:
        opts = options(args)
        config, saved = initial_config(opts, args.config)
    except ConfigError as exc:
        print(f"meshlayer {kind}: invalid config: {exc}", file=sys.stderr)
        return 2
    return run(_main(opts, config, saved, cls))
