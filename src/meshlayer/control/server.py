"""The control-plane process: API routes over a store, watch hub, health checker.

Routes are a table of (path pattern, {method: handler}); ``{name}`` segments
capture. A path that matches with a method that does not gets 405 with
``Allow``; no match gets 404. Store errors carry their HTTP status
(404/409/503) and become JSON errors. ``docs/control-plane.md`` is the
contract and :mod:`meshlayer.control.openapi` its machine-readable copy:
change all three together.

Two listeners share the routes. The **API** listener (plain HTTP) serves
operators and the CLI: reads are open, writes need the admin token, and a
join token buys a sidecar its first certificate. The **mesh** listener
(mTLS, :mod:`meshlayer.control.mesh_tls`) serves sidecars: the client
certificate's SPIFFE ID says which service the caller is, and it may only
register, renew, report and get certificates for that service. The sidecar
endpoints answer on the API listener only with ``--allow-plaintext-sidecars``
(or the admin token). See ``docs/security.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from meshlayer.config.load import parse_address
from meshlayer.control import openapi
from meshlayer.control.ca import (
    NAMESPACE,
    CAError,
    CertificateAuthority,
    Root,
    check_csr,
    is_ca,
    parse_spiffe_id,
    pem,
    spiffe_id,
    uri_sans,
)
from meshlayer.control.health import HealthChecker, Target
from meshlayer.control.http import (
    HTTPError,
    HttpServer,
    Request,
    Response,
    Stream,
    StreamOut,
    json_response,
)
from meshlayer.control.mesh_tls import MeshTLS
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
    is_static_key,
    static_key,
)
from meshlayer.control.tokens import (
    DEFAULT_TOKEN_TTL,
    MAX_TOKEN_TTL,
    TokenError,
    admin_token_matches,
    bearer,
    create_join_token,
    peek_join_token,
    redeem_join_token,
)
from meshlayer.control.watch import WatchHub

log = logging.getLogger("meshlayer.control")

DEFAULT_TTL = 10.0
MAX_TTL = 3600.0

Handler = Callable[[Request, dict[str, str]], Awaitable[Response | Stream]]

OPEN, ADMIN, SIDECAR, CERT = "open", "admin", "sidecar", "cert"
"""Who may call a route: anyone; the admin token (API listener only); a sidecar
(its certificate on the mesh listener, or plaintext when allowed); a certificate
request (join token on the API listener, certificate on the mesh listener)."""
CERT_BLOB = "sidecar-cert/"
ADDED_BLOB = "ca-added-at"
MAINTAIN_EVERY = 1.0


@dataclass(frozen=True, slots=True)
class Security:
    """The control plane's security settings (``meshlayer control`` flags)."""

    admin_token: str | None = None
    """Required on writes; None: writes are open (library use only)."""
    trust_domain: str = "meshlayer.local"
    cert_ttl: float = 86400.0
    supplied_root: Root | None = None
    mtls_host: str = "127.0.0.1"
    mtls_port: int | None = 15012
    """None: no mesh listener."""
    allow_plaintext_sidecars: bool = False


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
        security: Security | None = None,
    ) -> None:
        self.store = store
        self.security = sec = security or Security(mtls_port=None, allow_plaintext_sidecars=True)
        self.ca = CertificateAuthority(store, sec.trust_domain, sec.cert_ttl, sec.supplied_root)
        self.tls = MeshTLS(self.ca)
        self.hub = WatchHub(store, keepalive, self._decorate)
        self.health = HealthChecker(store, self._probe_tls) if health_checks else None
        self.http = HttpServer(self.handle, host, port, max_body=max_body)
        self.mesh: HttpServer | None = None
        self._maintain: asyncio.Task[None] | None = None
        self.routes: list[tuple[tuple[str, ...], dict[str, tuple[Handler, str]]]] = [
            (("healthz",), {"GET": (self.healthz, OPEN)}),
            (("openapi.json",), {"GET": (self.openapi, OPEN)}),
            (("v1", "apply"), {"POST": (self.apply, ADMIN)}),
            (("v1", "resources"), {"GET": (self.list_resources, OPEN)}),
            (("v1", "resources", "{kind}"), {"GET": (self.list_resources, OPEN)}),
            (
                ("v1", "resources", "{kind}", "{name}"),
                {"GET": (self.get, OPEN), "DELETE": (self.delete, ADMIN)},
            ),
            (
                ("v1", "registry"),
                {"GET": (self.registry, OPEN), "POST": (self.register, SIDECAR)},
            ),
            (("v1", "registry", "{id}"), {"DELETE": (self.deregister, SIDECAR)}),
            (("v1", "registry", "{id}", "renew"), {"POST": (self.renew, SIDECAR)}),
            (("v1", "watch"), {"GET": (self.watch, SIDECAR)}),
            (("v1", "status"), {"GET": (self.status, OPEN)}),
            (("v1", "status", "{id}"), {"POST": (self.report, SIDECAR)}),
            (("v1", "tokens"), {"POST": (self.create_token, ADMIN)}),
            (("v1", "certificates"), {"POST": (self.certificate, CERT)}),
            (("v1", "ca"), {"GET": (self.ca_show, OPEN)}),
            (("v1", "ca", "rotate"), {"POST": (self.ca_rotate, ADMIN)}),
        ]
        self._callers: dict[bytes, str] = {}

    async def start(self) -> None:
        await self.store.open()
        log.info(
            "store opened: %s (version %d)", self.store.description, await self.store.version()
        )
        state, created = await self.ca.load()
        log.info(
            "CA %s: trust domain %s, signing root %s.., generation %d, %d root(s)",
            "created" if created else "loaded",
            self.ca.trust_domain,
            state.signing[:12],
            state.generation,
            len(state.roots),
        )
        await self.hub.start()
        if self.health is not None:
            await self.health.start()
        await self.http.start()
        log.info("listening on %s:%d", self.http.host, self.http.port)
        sec = self.security
        if sec.mtls_port is not None:
            self.tls.rebuild()
            self.mesh = HttpServer(
                self.handle,
                sec.mtls_host,
                sec.mtls_port,
                self.http.max_body,
                ssl=self.tls.listening,
            )
            await self.mesh.start()
            log.info("mesh listener (mTLS) on %s:%d", self.mesh.host, self.mesh.port)
            self._maintain = asyncio.create_task(self._keep_tls(), name="mesh-tls")
        if sec.allow_plaintext_sidecars:
            log.warning("sidecars may use the plain API listener (--allow-plaintext-sidecars)")

    async def _probe_tls(self, target: Target) -> tuple[ssl.SSLContext, str] | None:
        """Health probes of a sidecar that holds a mesh certificate speak mTLS."""
        if self.mesh is None or self.tls.client is None or is_static_key(target.key):
            return None
        try:
            meshed = await self.store.get_blob(CERT_BLOB + target.key) is not None
        except StoreError:
            meshed = False
        if not meshed:
            return None
        return self.tls.client, spiffe_id(self.ca.trust_domain, target.service)

    def _tls_follow(self) -> None:
        """Give the mesh listener the CA's current bundle now (not at the next tick)."""
        if self.mesh is not None:
            self.tls.maybe_rebuild()

    async def _keep_tls(self) -> None:
        """Follow the CA (other control processes rotate too); renew our certificate."""
        while True:
            await asyncio.sleep(MAINTAIN_EVERY)
            try:
                await self.ca.refresh()
            except StoreError as exc:  # keep renewing our certificate from what we have
                log.warning("CA refresh failed: %s", exc)
            try:
                self.tls.maybe_rebuild()
            except Exception:
                log.exception("mesh listener TLS refresh failed")

    async def close(self) -> None:
        if self._maintain is not None:
            self._maintain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintain
        if self.mesh is not None:
            await self.mesh.close()
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
            entry = methods.get(req.method)
            if entry is None and req.method == "HEAD":
                entry = methods.get("GET")
            if entry is None:
                allow = ", ".join(methods)
                err = HTTPError(405, "method-not-allowed", f"{req.method} {req.path}: use {allow}")
                err.headers.append(("allow", allow))
                raise err
            handler, access = entry
            try:
                await self._authorize(req, access, params)
                return await handler(req, params)
            except StoreError as exc:
                raise HTTPError(exc.status, exc.reason, str(exc)) from None
            except (CAError, TokenError) as exc:
                raise HTTPError(exc.status, exc.reason, str(exc)) from None
        raise HTTPError(404, "not-found", f"no such path: {req.path}")

    # -- who may call -----------------------------------------------------

    def _is_admin(self, req: Request) -> bool:
        """Raise 401/403 unless the request carries the admin token."""
        expected = self.security.admin_token
        if expected is None:
            return True
        ok = admin_token_matches(expected, req.headers.get("authorization"))
        if ok is None:
            raise HTTPError(
                401,
                "unauthorized",
                "this call needs the admin token: Authorization: Bearer TOKEN "
                "(meshlayer CLI: --admin-token, MESHLAYER_ADMIN_TOKEN, or --admin-token-file "
                "naming the admin-token file this control plane logged at start)",
            )
        if not ok:
            raise HTTPError(403, "forbidden", "wrong admin token")
        return True

    async def _authorize(self, req: Request, access: str, params: dict[str, str]) -> None:
        mesh = req.peer_cert is not None
        if access in (OPEN, CERT):
            return
        if access == ADMIN:
            if mesh:
                raise HTTPError(403, "forbidden", "admin calls go to the API listener")
            self._is_admin(req)
            return
        # SIDECAR
        if mesh:
            service = self.caller(req)
            sid = params.get("id")
            if sid is not None:
                owner = {r.sidecar: r.service for r in await self.store.registrations()}.get(sid)
                if owner is not None and owner != service:
                    raise HTTPError(
                        403, "forbidden", f"sidecar {sid} serves {owner!r}; you are {service!r}"
                    )
            return
        if self.security.allow_plaintext_sidecars:
            return
        if req.headers.get("authorization") and self._is_admin(req):
            return
        raise HTTPError(
            401,
            "unauthorized",
            "sidecars must use the mesh listener (mTLS): start the sidecar with a join "
            "token (--token, from `meshlayer token create --service NAME`), or run the "
            "control plane with --allow-plaintext-sidecars",
        )

    def caller(self, req: Request) -> str:
        """The service a mesh-listener caller's certificate names (403 if it names none)."""
        der = req.peer_cert
        if der is None:
            raise HTTPError(401, "unauthorized", "no client certificate")
        known = self._callers.get(der)
        if known is not None:
            return known
        cert = x509.load_der_x509_certificate(der)
        uris = uri_sans(cert)
        if is_ca(cert):
            raise HTTPError(403, "forbidden", "a CA certificate is not a workload identity")
        parsed = parse_spiffe_id(uris[0]) if len(uris) == 1 else None
        if parsed is None or parsed[0] != self.ca.trust_domain or parsed[1] != NAMESPACE:
            raise HTTPError(403, "forbidden", f"not a workload identity of this mesh: {uris}")
        if len(self._callers) > 4096:
            self._callers.clear()
        self._callers[der] = parsed[2]
        return parsed[2]

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
        if req.peer_cert is not None and service != self.caller(req):
            raise HTTPError(
                403,
                "forbidden",
                f"service: your certificate is for {self.caller(req)!r}, not {service!r}",
            )
        address = _string(body, "address")
        try:
            parse_address(address)
        except ValueError as exc:
            raise HTTPError(400, "bad-request", f"address: {exc}") from None
        sidecar = _string(body, "sidecar") if "sidecar" in body else uuid.uuid4().hex
        ttl = body.get("ttl", DEFAULT_TTL)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0 < ttl <= MAX_TTL:
            raise HTTPError(400, "bad-request", f"ttl: must be seconds in (0, {MAX_TTL:g}]")
        owner = {r.sidecar: r.service for r in await self.store.registrations()}.get(sidecar)
        if req.peer_cert is not None and owner is not None and owner != service:
            raise HTTPError(403, "forbidden", f"sidecar {sidecar} is registered for {owner!r}")
        before = await self.store.version()
        version = await self.store.register(Registration(sidecar, service, address), float(ttl))
        await self._note_peer_cert(req, sidecar)
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
        await self._note_peer_cert(req, p["id"])
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
        cert = body.get("cert")
        if cert is not None:
            issuer, not_after = (
                cert.get(k) if isinstance(cert, dict) else None for k in ("issuer", "notAfter")
            )
            if not isinstance(issuer, str) or not isinstance(not_after, int | float):
                raise HTTPError(
                    400, "bad-request", 'cert: must be {"issuer": fingerprint, "notAfter": unix}'
                )
            await self._note_cert(p["id"], issuer.lower(), float(not_after))
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
        streams: dict[str, str] = {}  # sidecar -> holder, on any control process
        try:
            await self.store.ping()
            version = await self.store.version()
            store["id"] = await self.store.identity()
            regs = await self.store.registrations()
            reports = {s.sidecar: s for s in await self.store.statuses()}
            streams = await self.store.streams()
        except StoreError as exc:
            store = {"ok": False, "detail": str(exc)}
            version = self.hub.frame.version if self.hub.frame else 0
            regs, reports = [], {}
        connected = self.hub.connected()  # streams on this process
        sidecars: list[dict[str, Any]] = []
        seen = set()
        certs = await self._certs([r.sidecar for r in regs]) if store["ok"] else {}
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
                    "connected": connected[r.sidecar] > 0 or r.sidecar in streams,
                    "cert": certs.get(r.sidecar),
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
                    "cert": None,
                }
            )
        return json_response(200, {"version": version, "store": store, "sidecars": sidecars})

    # -- identity: tokens, certificates, CA ---------------------------------

    async def _note_cert(self, sidecar: str, issuer: str, not_after: float) -> None:
        """Remember which root a sidecar's certificate comes from (for ``retire``).

        The newest certificate (latest ``notAfter``) wins: a report or a
        connection made with an older one (a pooled connection that predates
        a renewal) does not undo a newer one.
        """
        name = CERT_BLOB + sidecar
        data = json.dumps({"issuer": issuer, "notAfter": int(not_after)}).encode()
        for _ in range(4):
            have = await self.store.get_blob(name)
            if have is not None and int(json.loads(have).get("notAfter", 0)) > int(not_after):
                return
            if have == data or await self.store.put_blob(name, data, have):
                return

    async def _note_peer_cert(self, req: Request, sidecar: str) -> None:
        """Note the root of the client certificate a mesh-listener call came with."""
        if req.peer_cert is None:
            return
        cert = x509.load_der_x509_certificate(req.peer_cert)
        issuer = self.ca.issuer_of(cert)
        if issuer is not None:
            await self._note_cert(sidecar, issuer, cert.not_valid_after_utc.timestamp())

    async def _certs(self, sidecars: list[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for sid in sidecars:
            raw = await self.store.get_blob(CERT_BLOB + sid)
            if raw is not None:
                out[sid] = json.loads(raw)
        return out

    async def create_token(self, req: Request, p: dict[str, str]) -> Response:
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "bad-request", "body must be a JSON object")
        unknown = set(body) - {"service", "ttl", "singleUse"}
        if unknown:
            raise HTTPError(400, "bad-request", f"{sorted(unknown)[0]}: unknown field")
        single_use = body.get("singleUse", False)
        if not isinstance(single_use, bool):
            raise HTTPError(400, "bad-request", "singleUse: must be true or false")
        service = _string(body, "service")
        if "/" in service or parse_spiffe_id(spiffe_id(self.ca.trust_domain, service)) is None:
            raise HTTPError(400, "bad-request", f"service: {service!r} is not a valid name")
        ttl = body.get("ttl", DEFAULT_TOKEN_TTL)
        if (
            not isinstance(ttl, int | float)
            or isinstance(ttl, bool)
            or not 0 < ttl <= MAX_TOKEN_TTL
        ):
            raise HTTPError(400, "bad-request", f"ttl: must be seconds in (0, {MAX_TOKEN_TTL:g}]")
        token, expires = await create_join_token(self.store, service, float(ttl), single_use)
        log.info(
            "join token created for service %s, valid %gs%s",
            service,
            ttl,
            ", single-use" if single_use else "",
        )
        return json_response(
            200,
            {"token": token, "service": service, "expires": int(expires), "singleUse": single_use},
        )

    async def certificate(self, req: Request, p: dict[str, str]) -> Response:
        body = req.json()
        if not isinstance(body, dict) or not isinstance(body.get("csr"), str):
            raise HTTPError(400, "bad-request", 'body must be {"csr": PEM}')
        csr, wanted = check_csr(body["csr"])
        await self.ca.refresh()
        if req.peer_cert is not None:
            service = self.caller(req)
            how = "certificate"
        else:
            token = bearer(req.headers.get("authorization"))
            if not token:
                raise HTTPError(
                    401, "unauthorized", "a join token is required: Authorization: Bearer TOKEN"
                )
            service = (await peek_join_token(self.store, token)).service
            how = "join token"
        allowed = spiffe_id(self.ca.trust_domain, service)
        if wanted != allowed:
            raise HTTPError(
                403, "forbidden", f"csr: asks for {wanted!r}; your {how} allows only {allowed!r}"
            )
        if req.peer_cert is None:
            await redeem_join_token(self.store, token)
        issued = self.ca.sign(csr, allowed)
        log.info(
            "certificate issued to %s (%s) from root %s.., valid until %d",
            allowed,
            how,
            issued.issuer[:12],
            int(issued.expires),
        )
        state = self.ca.state
        mesh = f"{self.mesh.host}:{self.mesh.port}" if self.mesh is not None else None
        return json_response(
            200,
            {
                "certificate": pem(issued.cert),
                "chain": [],
                "roots": state.bundle_pem(),
                "expires": int(issued.expires),
                "issuer": issued.issuer,
                "generation": state.generation,
                "mesh": mesh,
                "trustDomain": self.ca.trust_domain,
                "identity": allowed,
            },
        )

    async def ca_show(self, req: Request, p: dict[str, str]) -> Response:
        state = await self.ca.refresh()
        return json_response(200, state.describe(self.ca.trust_domain))

    async def ca_rotate(self, req: Request, p: dict[str, str]) -> Response:
        body = req.json()
        if not isinstance(body, dict) or body.get("phase") not in ("add", "switch", "retire"):
            raise HTTPError(400, "bad-request", 'phase: must be "add", "switch" or "retire"')
        unknown = set(body) - {"phase", "force"}
        if unknown:
            raise HTTPError(400, "bad-request", f"{sorted(unknown)[0]}: unknown field")
        force = body.get("force", False) is True
        phase = body["phase"]
        if phase == "add":
            state = await self.ca.add_root()
            version = await self.store.version()
            for _ in range(4):
                have = await self.store.get_blob(ADDED_BLOB)
                if await self.store.put_blob(ADDED_BLOB, str(version).encode(), have):
                    break
        elif phase == "switch":
            if not force:
                await self._check_bundle_everywhere()
            state = await self.ca.switch()
        else:
            if not force:
                await self._check_no_old_certs()
            state = await self.ca.retire()
        self._tls_follow()
        log.info(
            "CA rotation: %s done; generation %d, signing %s.., bundle %s",
            phase,
            state.generation,
            state.signing[:12],
            ", ".join(r.fingerprint[:12] for r in state.roots),
        )
        return json_response(
            200,
            {
                "phase": phase,
                "generation": state.generation,
                "signing": state.signing,
                "roots": [r.fingerprint for r in state.roots],
            },
        )

    async def _meshed_sidecars(self) -> tuple[list[Registration], dict[str, dict[str, Any]]]:
        """Live sidecars that hold a mesh certificate, and what they reported of it."""
        regs = await self.store.registrations()
        certs = await self._certs([r.sidecar for r in regs])
        return [r for r in regs if r.sidecar in certs], certs

    async def _check_bundle_everywhere(self) -> None:
        raw = await self.store.get_blob(ADDED_BLOB)
        added = int(raw) if raw else 0
        regs, _ = await self._meshed_sidecars()
        applied = {s.sidecar: s.applied for s in await self.store.statuses()}
        behind = sorted(r.sidecar for r in regs if applied.get(r.sidecar, 0) < added)
        if behind:
            raise HTTPError(
                409,
                "bundle-not-everywhere",
                f"{len(behind)} of {len(regs)} sidecars have not applied version {added} "
                f"(the new trust bundle) yet: {', '.join(behind[:10])}",
                {"waiting": behind, "total": len(regs)},
            )

    async def _check_no_old_certs(self) -> None:
        state = await self.ca.refresh()
        regs, certs = await self._meshed_sidecars()
        old = sorted(r.sidecar for r in regs if certs[r.sidecar].get("issuer") != state.signing)
        if old:
            raise HTTPError(
                409,
                "old-certificates",
                f"{len(old)} of {len(regs)} live sidecars still hold a certificate from a "
                f"root being retired: {', '.join(old[:10])}",
                {"waiting": old, "total": len(regs)},
            )

    async def _decorate(self, data: dict[str, Any]) -> None:
        """Add ``trust`` and each endpoint's ``identity`` to a watch snapshot."""
        state = await self.ca.refresh()
        self._tls_follow()
        td = self.ca.trust_domain
        data["trust"] = {"domain": td, "roots": state.bundle_pem(), "generation": state.generation}
        for service, eps in data.get("endpoints", {}).items():
            for ep in eps:
                ep["identity"] = spiffe_id(td, service)


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
