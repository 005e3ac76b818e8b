"""The authorization stage: AuthorizationPolicies compiled per target service.

Theory of operation: :func:`compile_policies` turns the policies of a config
and its mesh settings into one :class:`ServiceAuthz` per service that needs
checking; a service that no policy targets, under a mesh default of
``allow`` without dry-run, gets none, so the inbound request path pays one
``is None`` test and nothing else (the common case).

A ``ServiceAuthz`` runs on the inbound side, before routing to the app
(:meth:`ServiceAuthz.authorize`):

1. The path is normalised (:mod:`meshlayer.proxy.pathnorm`); a path that
   cannot be normalised safely (an encoded ``/`` or ``\\``, a raw backslash,
   a malformed escape) is refused with 400 ``bad-path``. The normalised path
   replaces the request's, so the app sees the path that was authorised.
2. The decision, as Istio's: any matching DENY policy denies; else, when
   ALLOW policies target the service, one of them must match; else the mesh
   default decides. A denial is a 403 with ``x-meshlayer-error: denied``,
   ``x-meshlayer-policy: <name>`` and the name in the JSON body's
   ``policy``: the DENY policy that matched, the ALLOW policies (names
   joined by ``,``) none of which matched, or ``default``.
3. Dry-run: the same decision is also taken as if every dry-run policy (and,
   with the mesh's ``authorization.dryRun``, every policy and the default)
   were enforced. When that *shadow* decision denies a request the enforced
   one lets through, nothing is denied: the would-be denial is logged and
   counted in ``meshlayer_authz_dry_run_denied_total{policy}`` (Envoy's
   shadow rules).

Conditions: a rule matches when one of its ``from`` entries matches the
caller and one of its ``to`` entries matches the request (a missing list
matches anything). The caller is the SPIFFE ID of the verified peer
certificate (``peer_identity`` on the downstream connection); a plaintext
caller (None) never matches a ``from`` entry. Paths compare with the
normalised path without its query: ``exact`` is equality, ``prefix`` is the
value and everything under it on whole segments (``/admin`` covers
``/admin`` and ``/admin/x``, not ``/administrator``; a trailing ``/`` is
ignored, as routing ignores it: :mod:`meshlayer.proxy.match`). Methods match
exactly; header values exactly, names case-insensitively, and all must hold.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter

from meshlayer.config.authz import service_of
from meshlayer.config.model import AuthorizationPolicy, MeshConfig, MeshSettings
from meshlayer.proxy.errors import MeshError
from meshlayer.proxy.match import header_map, segment_prefix, under
from meshlayer.proxy.pathnorm import PathError, normalize

if TYPE_CHECKING:
    from meshlayer.proxy.exchange import Exchange

log = logging.getLogger("meshlayer.authz")

Headers = list[tuple[bytes, bytes]]
DEFAULT = "default"


@lru_cache(maxsize=1024)
def _service_of(identity: str) -> str | None:
    return service_of(identity)


class _Operation:
    __slots__ = ("any_path", "exact", "headers", "methods", "prefixes")

    def __init__(
        self,
        methods: frozenset[bytes],
        exact: frozenset[bytes],
        prefixes: tuple[bytes, ...],
        headers: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        self.methods = methods
        self.exact = exact
        self.prefixes = prefixes
        self.headers = headers
        self.any_path = not exact and not prefixes

    def matches(self, method: bytes, path: bytes, hmap: dict[bytes, list[bytes]]) -> bool:
        if self.methods and method not in self.methods:
            return False
        if not self.any_path and path not in self.exact:
            for prefix in self.prefixes:
                if under(path, prefix):
                    break
            else:
                return False
        for name, value in self.headers:
            values = hmap.get(name)
            if values is None or value not in values:
                return False
        return True


class _Rule:
    __slots__ = ("identities", "operations", "services")

    def __init__(
        self,
        identities: frozenset[str] | None,
        services: frozenset[str],
        operations: tuple[_Operation, ...],
    ) -> None:
        self.identities = identities  # None: no `from`, any caller
        self.services = services
        self.operations = operations

    def matches(
        self, method: bytes, path: bytes, hmap: dict[bytes, list[bytes]], identity: str | None
    ) -> bool:
        if self.identities is not None:
            if identity is None:
                return False
            if identity not in self.identities and _service_of(identity) not in self.services:
                return False
        if not self.operations:
            return True
        for op in self.operations:  # noqa: SIM110 (no generator per request)
            if op.matches(method, path, hmap):
                return True
        return False


class CompiledPolicy:
    """One AuthorizationPolicy, ready to test."""

    __slots__ = ("action", "dry_run", "name", "needs_headers", "rules")

    def __init__(self, policy: AuthorizationPolicy, dry_run: bool) -> None:
        self.name = policy.name
        self.action = policy.action
        self.dry_run = dry_run
        rules = []
        needs_headers = False
        for rule in policy.rules:
            identities: frozenset[str] | None = None
            services: frozenset[str] = frozenset()
            if rule.sources:
                identities = frozenset(i for s in rule.sources for i in s.identities)
                services = frozenset(n for s in rule.sources for n in s.services)
            ops = []
            for op in rule.operations:
                headers = tuple(
                    (h.name.encode("ascii"), h.value.encode("ascii")) for h in op.headers
                )
                needs_headers = needs_headers or bool(headers)
                ops.append(
                    _Operation(
                        frozenset(m.encode("ascii") for m in op.methods),
                        frozenset(p.value.encode("ascii") for p in op.paths if not p.prefix),
                        tuple(
                            segment_prefix(p.value.encode("ascii")) for p in op.paths if p.prefix
                        ),
                        headers,
                    )
                )
            rules.append(_Rule(identities, services, tuple(ops)))
        self.rules = tuple(rules)
        self.needs_headers = needs_headers

    def matches(
        self, method: bytes, path: bytes, hmap: dict[bytes, list[bytes]], identity: str | None
    ) -> bool:
        for rule in self.rules:  # noqa: SIM110 (no generator per request)
            if rule.matches(method, path, hmap, identity):
                return True
        return False

    def __repr__(self) -> str:
        dry = " dry-run" if self.dry_run else ""
        return f"<CompiledPolicy {self.name} {self.action}{dry} rules={len(self.rules)}>"


class _Decision:
    """One set of policies and a default: the enforced set, or the shadow one."""

    __slots__ = ("allow", "allow_name", "default_deny", "deny")

    def __init__(self, policies: Iterable[CompiledPolicy], default_deny: bool) -> None:
        policies = list(policies)
        self.deny = tuple(p for p in policies if p.action == "DENY")
        self.allow = tuple(p for p in policies if p.action != "DENY")
        self.allow_name = ",".join(sorted({p.name for p in self.allow}))
        """What a denial for want of a matching ALLOW policy carries."""
        self.default_deny = default_deny

    def decide(
        self, method: bytes, path: bytes, hmap: dict[bytes, list[bytes]], identity: str | None
    ) -> str | None:
        """The name a denial carries, or None when the request is allowed."""
        for p in self.deny:
            if p.matches(method, path, hmap, identity):
                return p.name
        if self.allow:
            for p in self.allow:
                if p.matches(method, path, hmap, identity):
                    return None
            return self.allow_name
        return DEFAULT if self.default_deny else None


class ServiceAuthz:
    """The compiled policies of one target service, and the mesh default."""

    __slots__ = ("enforced", "name", "needs_headers", "policies", "shadow", "stage")

    def __init__(self, name: str, policies: list[CompiledPolicy], mesh: MeshSettings) -> None:
        self.name = name
        self.policies = tuple(policies)
        """Every policy targeting the service, dry-run ones included, in document order."""
        deny_default = mesh.authz_default == "deny"
        enforced = [p for p in policies if not p.dry_run]
        self.enforced = _Decision(enforced, deny_default and not mesh.authz_dry_run)
        self.shadow: _Decision | None = None
        """Set when some decision is dry-run: all policies and the default, enforced."""
        if len(enforced) != len(policies) or (deny_default and mesh.authz_dry_run):
            self.shadow = _Decision(policies, deny_default)
        self.needs_headers = any(p.needs_headers for p in policies)
        self.stage: AuthzStage | None = None

    def check(
        self, method: bytes, target: bytes, headers: Headers, identity: str | None
    ) -> tuple[str | None, str | None]:
        """Decide on a request whose target is already normalised.

        Returns:
            (the name the denial carries or None when allowed, the name a
            dry-run denial would carry or None).
        """
        q = target.find(b"?")
        path = target[:q] if q >= 0 else target
        hmap = header_map(headers) if self.needs_headers else {}
        denied = self.enforced.decide(method, path, hmap, identity)
        if denied is not None or self.shadow is None:
            return denied, None
        return None, self.shadow.decide(method, path, hmap, identity)

    def authorize(self, ex: Exchange) -> None:
        """The request-path stage: normalise ``ex.path``, then decide. Raises MeshError."""
        try:
            ex.path = path = normalize(ex.path)
        except PathError as exc:
            raise MeshError(400, "bad-path", f"{exc}: refused by authorization") from None
        identity = ex.down.peer_identity
        head = ex.head
        denied, dry = self.check(head.method, path, head.headers, identity)
        stage = self.stage
        if denied is not None:
            if stage is not None:
                stage.denied.labels(denied).inc()
            raise MeshError(
                403,
                "denied",
                f"{head.method.decode('latin-1')} {path[:200].decode('latin-1')} to "
                f"{self.name} from {identity or 'a caller without identity'}: denied by "
                + ("the mesh default" if denied == DEFAULT else f"AuthorizationPolicy {denied}"),
                policy=denied,
            )
        if dry is not None:
            if stage is not None:
                stage.dry_run_denied.labels(dry).inc()
            log.info(
                "dry-run: would deny %s %s to %s from %s (policy %s)",
                head.method.decode("latin-1"),
                path[:200].decode("latin-1"),
                self.name,
                identity or "no identity",
                dry,
            )

    def __repr__(self) -> str:
        deny = self.enforced.default_deny
        return f"<ServiceAuthz {self.name} {list(self.policies)} default_deny={deny}>"


def compile_policies(
    policies: Iterable[AuthorizationPolicy], mesh: MeshSettings, services: Iterable[str] = ()
) -> dict[str, ServiceAuthz]:
    """One ServiceAuthz per service that needs checking.

    Args:
        policies: the config's AuthorizationPolicies.
        mesh: the mesh settings (default and mesh-wide dry-run).
        services: further services to compile for; they get a table only when the
            mesh default makes one necessary.
    """
    by_target: dict[str, list[CompiledPolicy]] = {}
    for p in policies:
        by_target.setdefault(p.target, []).append(
            CompiledPolicy(p, p.dry_run or mesh.authz_dry_run)
        )
    for name in services:
        if mesh.authz_default == "deny":
            by_target.setdefault(name, [])
    return {name: ServiceAuthz(name, compiled, mesh) for name, compiled in by_target.items()}


class AuthzStage:
    """The inbound authorization of one sidecar: its metrics and its current table."""

    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        self.service = service
        self.denied = Counter(
            "meshlayer_authz_denied",
            "Inbound requests denied by authorization, by policy (or default)",
            ["policy"],
            registry=registry,
        )
        self.dry_run_denied = Counter(
            "meshlayer_authz_dry_run_denied",
            "Inbound requests a dry-run policy would have denied, by policy",
            ["policy"],
            registry=registry,
        )
        self.table: ServiceAuthz | None = None

    def update(self, config: MeshConfig) -> ServiceAuthz | None:
        """Compile ``config`` for this sidecar's service; None when nothing needs checking."""
        table = compile_policies(
            (p for p in config.policies if p.target == self.service),
            config.mesh,
            (self.service,),
        ).get(self.service)
        if table is not None:
            table.stage = self
        self.table = table
        return table
