"""The control-plane process: API routes over a store, watch hub, health checker.

Routes are a table of (path pattern, {method: handler}); ``{name}`` segments
capture. A path that matches with a method that does not gets 405 with
``Allow``; no match gets 404. Store errors carry their HTTP status
(404/409/503) and become JSON errors. ``docs/control-plane.md`` is the
contract and :mod:`meshlayer.control.openapi` its machine-readable copy:
change all three together.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from meshlayer.config.load import parse_address
from meshlayer.control import openapi
from meshlayer.control.health import HealthChecker
from meshlayer.control.http import (
    HTTPError,
    HttpServer,
    Request,
    Response,
    Stream,
    StreamOut,
    json_response,
)
from meshlayer.control.resources import (
    canonical_kind,
    parse_apply,
    parse_resource_version,
)
from meshlayer.control.store import (
    Registration,
    SidecarStatus,
    Store,
    StoreError,
    static_key,
)
from meshlayer.control.watch import WatchHub

log = logging.getLogger("meshlayer.control")

DEFAULT_TTL = 10.0
MAX_TTL = 3600.0

Handler = Callable[[Request, dict[str, str]], Awaitable[Response | Stream]]


class ControlPlane:
    """One control process: ``start()``, serve until ``close()``."""

    def __init__(
        self,
        store: Store,
        host: str = "127.0.0.1",
        port: int = 15000,
        keepalive: float = 5.0,
        health_checks: bool = True,
        max_body: int = 8 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.hub = WatchHub(store, keepalive)
        self.health = HealthChecker(store) if health_checks else None
        self.http = HttpServer(self.handle, host, port, max_body=max_body)
        self.routes: list[tuple[tuple[str, ...], dict[str, Handler]]] = [
            (("healthz",), {"GET": self.healthz}),
            (("openapi.json",), {"GET": self.openapi}),
            (("v1", "apply"), {"POST": self.apply}),
            (("v1", "resources"), {"GET": self.list_resources}),
            (("v1", "resources", "{kind}"), {"GET": self.list_resources}),
            (("v1", "resources", "{kind}", "{name}"), {"GET": self.get, "DELETE": self.delete}),
            (("v1", "registry"), {"GET": self.registry, "POST": self.register}),
            (("v1", "registry", "{id}"), {"DELETE": self.deregister}),
            (("v1", "registry", "{id}", "renew"), {"POST": self.renew}),
            (("v1", "watch"), {"GET": self.watch}),
            (("v1", "status"), {"GET": self.status}),
            (("v1", "status", "{id}"), {"POST": self.report}),
        ]

    async def start(self) -> None:
        await self.store.open()
        log.info(
            "store opened: %s (version %d)", self.store.description, await self.store.version()
        )
        await self.hub.start()
        if self.health is not None:
            await self.health.start()
        await self.http.start()
        log.info("listening on %s:%d", self.http.host, self.http.port)

    async def close(self) -> None:
        await self.http.close()
        if self.health is not None:
            await self.health.close()
        await self.hub.close()
        await self.store.close()

    # -- dispatch ---------------------------------------------------------

    async def handle(self, req: Request) -> Response | Stream:
        segments = tuple(s for s in req.path.split("/") if s)
        for pattern, methods in self.routes:
            params = _match(pattern, segments)
            if params is None:
                continue
            handler = methods.get(req.method)
            if handler is None and req.method == "HEAD":
                handler = methods.get("GET")
            if handler is None:
                allow = ", ".join(methods)
                err = HTTPError(405, "method-not-allowed", f"{req.method} {req.path}: use {allow}")
                err.headers.append(("allow", allow))
                raise err
            try:
                return await handler(req, params)
            except StoreError as exc:
                raise HTTPError(exc.status, exc.reason, str(exc)) from None
        raise HTTPError(404, "not-found", f"no such path: {req.path}")

    # -- resources --------------------------------------------------------

    async def healthz(self, req: Request, p: dict[str, str]) -> Response:
        try:
            await self.store.ping()
        except StoreError as exc:
            return json_response(503, {"ok": False, "detail": str(exc)})
        return json_response(200, {"ok": True})

    async def openapi(self, req: Request, p: dict[str, str]) -> Response:
        return Response(200, openapi.document_bytes(), "application/json")

    async def apply(self, req: Request, p: dict[str, str]) -> Response:
        writes = parse_apply(req.json())
        result = await self.store.apply(writes)
        results = [
            {"kind": k, "name": n, "resourceVersion": rv, "action": a}
            for k, n, rv, a in result.actions
        ]
        changed = [f"{a} {k}/{n}" for k, n, _, a in result.actions if a != "unchanged"]
        if changed:
            log.info("applied version %d: %s", result.version, ", ".join(changed))
        else:
            log.info(
                "apply of %d documents: all unchanged (version %d)", len(writes), result.version
            )
        return json_response(200, {"version": result.version, "results": results})

    async def list_resources(self, req: Request, p: dict[str, str]) -> Response:
        kind = canonical_kind(p["kind"]) if "kind" in p else None
        version = await self.store.version()
        items = await self.store.items(kind)
        return json_response(200, {"version": version, "items": [r.to_doc() for r in items]})

    async def get(self, req: Request, p: dict[str, str]) -> Response:
        kind = canonical_kind(p["kind"])
        res = await self.store.get(kind, p["name"])
        if res is None:
            raise HTTPError(404, "not-found", f"{kind}/{p['name']} not found")
        return json_response(200, res.to_doc())

    async def delete(self, req: Request, p: dict[str, str]) -> Response:
        kind = canonical_kind(p["kind"])
        expect = parse_resource_version(req.query.get("resourceVersion"))
        version = await self.store.delete(kind, p["name"], expect)
        log.info("applied version %d: deleted %s/%s", version, kind, p["name"])
        return json_response(200, {"version": version})

    # -- registry ---------------------------------------------------------

    async def register(self, req: Request, p: dict[str, str]) -> Response:
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "bad-request", "body must be a JSON object")
        unknown = set(body) - {"service", "address", "ttl", "sidecar"}
        if unknown:
            raise HTTPError(400, "bad-request", f"{sorted(unknown)[0]}: unknown field")
        service = _string(body, "service")
        address = _string(body, "address")
        try:
            parse_address(address)
        except ValueError as exc:
            raise HTTPError(400, "bad-request", f"address: {exc}") from None
        sidecar = _string(body, "sidecar") if "sidecar" in body else uuid.uuid4().hex
        ttl = body.get("ttl", DEFAULT_TTL)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0 < ttl <= MAX_TTL:
            raise HTTPError(400, "bad-request", f"ttl: must be seconds in (0, {MAX_TTL:g}]")
        before = await self.store.version()
        version = await self.store.register(Registration(sidecar, service, address), float(ttl))
        if version != before:
            log.info(
                "sidecar %s registered: %s at %s, ttl %gs (version %d)",
                sidecar,
                service,
                address,
                ttl,
                version,
            )
        return json_response(200, {"sidecar": sidecar, "ttl": ttl, "version": version})

    async def renew(self, req: Request, p: dict[str, str]) -> Response:
        ttl = await self.store.renew(p["id"])
        return json_response(200, {"ttl": ttl})

    async def deregister(self, req: Request, p: dict[str, str]) -> Response:
        await self.store.deregister(p["id"])
        log.info("sidecar %s deregistered", p["id"])
        return json_response(200, {"sidecar": p["id"]})

    async def registry(self, req: Request, p: dict[str, str]) -> Response:
        snap = await self.store.snapshot()
        regs = await self.store.registrations()
        static = []
        for res in snap.resources:
            if res.kind != "Service":
                continue
            for ep in res.spec.get("endpoints", []):
                address = str(ep.get("address"))
                static.append(
                    {
                        "service": res.name,
                        "address": address,
                        "meshed": bool(ep.get("meshed", True)),
                        "healthy": static_key(res.name, address) not in snap.down,
                    }
                )
        endpoints = [
            {
                "sidecar": r.sidecar,
                "service": r.service,
                "address": r.address,
                "healthy": r.healthy,
                "expires_in": round(r.expires_in, 3),
            }
            for r in regs
        ]
        return json_response(
            200, {"version": snap.version, "endpoints": endpoints, "static": static}
        )

    # -- watch and status -------------------------------------------------

    async def watch(self, req: Request, p: dict[str, str]) -> Stream:
        sidecar = req.query.get("sidecar", "")
        if not sidecar:
            raise HTTPError(400, "bad-request", "sidecar: query parameter is required")

        async def run(out: StreamOut) -> None:
            await self.hub.serve(sidecar, out)

        return Stream(run)

    async def report(self, req: Request, p: dict[str, str]) -> Response:
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "bad-request", "body must be a JSON object")
        version = body.get("version")
        error = body.get("error")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise HTTPError(400, "bad-request", "version: must be an integer >= 0")
        if error is not None and not isinstance(error, str):
            raise HTTPError(400, "bad-request", "error: must be a string or null")
        applied = version
        if error is not None:  # rejected: it still runs what it applied before
            previous = {s.sidecar: s for s in await self.store.statuses()}.get(p["id"])
            applied = previous.applied if previous else 0
            log.warning("sidecar %s rejected version %d: %s", p["id"], version, error)
            error = f"version {version}: {error}"
        else:
            log.debug("sidecar %s applied version %d", p["id"], version)
        await self.store.report(SidecarStatus(p["id"], applied, error, time.time()))
        return json_response(204, None)

    async def status(self, req: Request, p: dict[str, str]) -> Response:
        store: dict[str, Any] = {"ok": True, "detail": self.store.description}
        try:
            await self.store.ping()
            version = await self.store.version()
            regs = await self.store.registrations()
            reports = {s.sidecar: s for s in await self.store.statuses()}
        except StoreError as exc:
            store = {"ok": False, "detail": str(exc)}
            version = self.hub.frame.version if self.hub.frame else 0
            regs, reports = [], {}
        connected = self.hub.connected()
        sidecars: list[dict[str, Any]] = []
        seen = set()
        for r in regs:
            seen.add(r.sidecar)
            st = reports.get(r.sidecar)
            sidecars.append(
                {
                    "sidecar": r.sidecar,
                    "service": r.service,
                    "address": r.address,
                    "healthy": r.healthy,
                    "applied": st.applied if st else 0,
                    "error": st.error if st else None,
                    "connected": connected[r.sidecar] > 0,
                }
            )
        for sid in sorted(set(connected) - seen):
            sidecars.append(
                {
                    "sidecar": sid,
                    "service": None,
                    "address": None,
                    "healthy": None,
                    "applied": 0,
                    "error": None,
                    "connected": True,
                }
            )
        return json_response(200, {"version": version, "store": store, "sidecars": sidecars})


def _match(pattern: tuple[str, ...], segments: tuple[str, ...]) -> dict[str, str] | None:
    if len(pattern) != len(segments):
        return None
    params: dict[str, str] = {}
    for pat, seg in zip(pattern, segments, strict=True):
        if pat.startswith("{"):
            params[pat[1:-1]] = seg
        elif pat != seg:
            return None
    return params


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value or len(value) > 253:
        raise HTTPError(400, "bad-request", f"{key}: must be a non-empty string, got {value!r}")
    return value
