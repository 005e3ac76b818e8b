"""Validate ``kind: AuthorizationPolicy`` and ``kind: Mesh`` documents.

Theory of operation: as for HTTPRoutes (:mod:`meshlayer.config.httproute`),
:mod:`meshlayer.config.load` reads a document's envelope and hands the
document's reader here; ``spec`` is read field by field through the same
strict reader, so an unknown field or a bad value is an error naming the
document and the field path, e.g. ``mesh.yaml#4
(AuthorizationPolicy/catalog-readers): spec.rules[0].from[0].identities[1]:
must be a SPIFFE ID spiffe://<trust-domain>/ns/<namespace>/sa/<service>``.

A policy's paths are compared with the *normalised* request path
(:mod:`meshlayer.proxy.pathnorm`), so a path in a policy must itself be in
normal form: a value that normalisation would change (``/a//b``, ``/a/./b``,
``/%61dmin``) could never match and is refused with its normal form in the
message. The identity headers the mesh sets cannot be used in header
conditions (the sidecar strips client copies; use ``from`` instead).

The target service need not exist among the documents: the control plane's
registry may supply it, and a policy for a service nobody runs is harmless.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshlayer.config.errors import ConfigError
from meshlayer.config.fields import (
    SPIFFE_RE,
    entries,
    header_name,
    header_value,
    is_name,
    normal_path,
    service_names,
    spiffe_ids,
    strings,
)
from meshlayer.config.model import (
    AUTHZ_ACTIONS,
    AUTHZ_DEFAULTS,
    MTLS_MODES,
    ROUTE_METHODS,
    AuthorizationPolicy,
    HeaderMatch,
    MeshSettings,
    PolicyOperation,
    PolicyPath,
    PolicyRule,
    PolicySource,
)

if TYPE_CHECKING:
    from meshlayer.config.load import _Reader

MESH_NAME = "default"
IDENTITY_HEADERS = ("x-meshlayer-peer-identity", "x-forwarded-client-cert")
"""Headers the mesh sets from the verified peer certificate; stripped from what clients send."""


def parse_authorization_policy(r: _Reader, name: str) -> AuthorizationPolicy:
    """Read the ``spec`` of an AuthorizationPolicy document. Raises ConfigError."""
    spec = r.child("spec", required=True)
    tr = spec.child("targetRef", required=True)
    kind = tr.get("kind", "Service")
    if kind != "Service":
        raise tr.error("kind", f"must be Service, got {kind!r}")
    target = tr.string("name", required=True)
    if not is_name(target):
        raise tr.error("name", f"must be a service name (lowercase DNS name), got {target!r}")
    tr.finish()
    action = spec.string("action", required=True)
    if action not in AUTHZ_ACTIONS:
        raise spec.error("action", f"must be one of {', '.join(AUTHZ_ACTIONS)}, got {action!r}")
    dry_run = spec.boolean("dryRun", False)
    rules = tuple(_rule(rr) for rr in spec.each("rules"))
    if not rules:
        raise spec.error("rules", "must hold at least one rule (a rule {} matches every request)")
    spec.finish()
    return AuthorizationPolicy(name, target, action, dry_run, rules)


def parse_mesh(r: _Reader, name: str) -> MeshSettings:
    """Read the ``spec`` of the Mesh document (name ``default``). Raises ConfigError."""
    if name != MESH_NAME:
        raise r.error("metadata.name", f"must be {MESH_NAME!r} (there is one Mesh), got {name!r}")
    spec = r.child("spec")
    mr = spec.child("mtls")
    mode = mr.string("mode", "strict")
    if mode not in MTLS_MODES:
        raise mr.error("mode", f"must be one of {', '.join(MTLS_MODES)}, got {mode!r}")
    mr.finish()
    ar = spec.child("authorization")
    default = ar.string("default", "allow")
    if default not in AUTHZ_DEFAULTS:
        raise ar.error("default", f"must be one of {', '.join(AUTHZ_DEFAULTS)}, got {default!r}")
    dry_run = ar.boolean("dryRun", False)
    ar.finish()
    spec.finish()
    return MeshSettings(mode, default, dry_run)


def service_of(identity: str) -> str | None:
    """The service of a SPIFFE ID in namespace ``default``, else None."""
    m = SPIFFE_RE.match(identity)
    if m is None or m.group(2) != "default":
        return None
    return m.group(4)


def _rule(r: _Reader) -> PolicyRule:
    sources = tuple(_source(sr) for sr in entries(r, "from"))
    operations = tuple(_operation(orr) for orr in entries(r, "to"))
    r.finish()
    return PolicyRule(sources, operations)


def _source(r: _Reader) -> PolicySource:
    identities = spiffe_ids(r, "identities")
    services = service_names(r, "services")
    r.finish()
    if not identities and not services:
        raise _whole(r, "must name identities or services")
    return PolicySource(tuple(identities), tuple(services))


def _operation(r: _Reader) -> PolicyOperation:
    methods = []
    for where, value in strings(r, "methods"):
        if value not in ROUTE_METHODS:
            raise r.error(where, f"must be one of {', '.join(ROUTE_METHODS)}, got {value!r}")
        methods.append(value)
    paths = [_path(pr) for pr in r.each("paths")]
    if r.has("paths") and not paths:
        raise r.error("paths", "must not be empty (leave it out to match any)")
    headers = []
    for hr in r.each("headers"):
        hname = header_name(hr)
        if hname.lower() in IDENTITY_HEADERS:
            raise hr.error(
                "name", f"{hname!r} is set by the mesh from the peer certificate; use 'from'"
            )
        hvalue = header_value(hr)
        hr.finish()
        headers.append(HeaderMatch(hname.lower(), hvalue))
    if r.has("headers") and not headers:
        raise r.error("headers", "must not be empty (leave it out to match any)")
    r.finish()
    if not methods and not paths and not headers:
        raise _whole(r, "must name methods, paths or headers")
    return PolicyOperation(tuple(methods), tuple(paths), tuple(headers))


def _path(r: _Reader) -> PolicyPath:
    kinds = [k for k in ("exact", "prefix") if r.has(k)]
    if len(kinds) != 1:
        r.get("exact")
        r.get("prefix")
        r.finish()
        raise _whole(r, "must have exactly one of exact or prefix")
    kind = kinds[0]
    value = normal_path(r, kind, r.string(kind, required=True))
    r.finish()
    return PolicyPath(value, kind == "prefix")


def _whole(r: _Reader, problem: str) -> ConfigError:
    """An error about the mapping ``r`` reads itself (not one of its fields)."""
    return ConfigError(r.doc, r.path, problem)
