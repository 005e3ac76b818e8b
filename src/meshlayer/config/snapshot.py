"""Build a sidecar's config from a control-plane snapshot.

Theory of operation: a snapshot (the ``data`` of a watch-stream ``snapshot``
event, see ``docs/control-plane.md``) carries every config document plus the
live registry. The documents are validated with the same loader a static file
goes through (:func:`meshlayer.config.load.parse_documents`), so a pushed
config can never be laxer than a file. Then each service's registered healthy
endpoints are merged in as meshed endpoints; a service that has registered
endpoints but no ``Service`` document gets default settings. Last, every
HTTPRoute's parent and backend refs must name a service that exists in the
result: the rule a static file obeys, except that registrations count. The
result's version is the mesh version, as a string.

``carry_endpoints`` serves the sidecar's reconnect grace: right after a
control-plane outage longer than the leases, the registry is empty until every
sidecar has registered again, so registered endpoints that the previous
snapshot had and the new one lacks are kept for a while.

Everything here is pure: data in, ``MeshConfig`` out, ``ConfigError`` naming
the document or snapshot field when anything is wrong. The sidecar keeps its
last good config on error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from meshlayer.config.errors import ConfigError
from meshlayer.config.fields import is_name
from meshlayer.config.load import parse_address, parse_documents
from meshlayer.config.model import Endpoint, MeshConfig, Service
from meshlayer.config.priority import merge_defaults


def snapshot_version(data: object) -> int:
    """The mesh version of a snapshot. Raises ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError("snapshot", "", f"must be a JSON object, got {type(data).__name__}")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigError("snapshot", "version", f"must be an integer >= 0, got {version!r}")
    return version


def registered_endpoints(data: Mapping[str, Any], doc: str) -> dict[str, tuple[Endpoint, ...]]:
    """The healthy registered endpoints of a snapshot, by service. Raises ConfigError."""
    raw = data.get("endpoints", {})
    if not isinstance(raw, Mapping):
        raise ConfigError(doc, "endpoints", "must be a mapping of service name to endpoints")
    out: dict[str, tuple[Endpoint, ...]] = {}
    for name, entries in raw.items():
        if not is_name(name):
            raise ConfigError(doc, "endpoints", f"service name {name!r} is not a DNS name")
        if not isinstance(entries, list):
            raise ConfigError(doc, f"endpoints.{name}", "must be a list")
        eps: list[Endpoint] = []
        seen: set[tuple[str, int]] = set()
        for i, entry in enumerate(entries):
            where = f"endpoints.{name}[{i}]"
            if not isinstance(entry, Mapping):
                raise ConfigError(doc, where, "must be a mapping")
            address = entry.get("address")
            if not isinstance(address, str):
                raise ConfigError(doc, f"{where}.address", f"must be a string, got {address!r}")
            try:
                host, port = parse_address(address)
            except ValueError as exc:
                raise ConfigError(doc, f"{where}.address", str(exc)) from None
            healthy = entry.get("healthy", True)
            if not isinstance(healthy, bool):
                raise ConfigError(
                    doc, f"{where}.healthy", f"must be true or false, got {healthy!r}"
                )
            identity = entry.get("identity", "")
            if not isinstance(identity, str):
                raise ConfigError(doc, f"{where}.identity", f"must be a string, got {identity!r}")
            if healthy and (host, port) not in seen:
                seen.add((host, port))
                eps.append(Endpoint(host, port, meshed=True, identity=identity))
        out[name] = tuple(eps)
    return out


def _merge(service: Service, registered: tuple[Endpoint, ...]) -> Service:
    static = {(e.host, e.port) for e in service.endpoints}
    extra = tuple(e for e in registered if (e.host, e.port) not in static)
    return replace(service, endpoints=service.endpoints + extra) if extra else service


def config_from_snapshot(data: object, source: str) -> MeshConfig:
    """Validate a snapshot and build the config it describes.

    Args:
        data: the decoded JSON of a ``snapshot`` event.
        source: where it came from (the control plane URL), kept as the config's
            source. Errors name documents as ``snapshot vN#2 (HTTPRoute/x)``.

    Raises:
        ConfigError: the snapshot or one of its documents is invalid.
    """
    version = snapshot_version(data)
    assert isinstance(data, Mapping)
    doc = f"snapshot v{version}"
    resources = data.get("resources", [])
    if not isinstance(resources, list):
        raise ConfigError(doc, "resources", "must be a list of documents")
    services, routes, classes, policies, mesh, rules = parse_documents(
        resources, doc, strict_refs=False
    )
    merged: dict[str, Service] = {s.name: s for s in services}
    for name, eps in registered_endpoints(data, doc).items():
        svc = merged.get(name)
        merged[name] = _merge(svc if svc is not None else Service(name), eps)
    return MeshConfig(
        merged,
        str(version),
        source,
        tuple(routes),
        priority_classes=merge_defaults(classes),
        policies=tuple(policies),
        mesh=mesh,
        classification_rules=tuple(rules),
    )


def carry_endpoints(
    previous: Mapping[str, Any], data: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """``data`` with the registered endpoints of ``previous`` that it lacks added back.

    Both are snapshots (``previous`` already validated). An endpoint the new
    snapshot lists, healthy or not, is left as the new snapshot says. Returns
    the merged snapshot and the carried addresses by service.
    """
    new = data.get("endpoints", {})
    old = previous.get("endpoints")
    if not isinstance(new, Mapping) or not isinstance(old, Mapping):
        return dict(data), {}
    merged = {name: list(entries) for name, entries in new.items() if isinstance(entries, list)}
    carried: dict[str, list[str]] = {}
    for name, entries in old.items():
        listed = {e.get("address") for e in merged.get(name, []) if isinstance(e, Mapping)}
        for e in entries:
            if e.get("healthy", True) and e.get("address") not in listed:
                merged.setdefault(name, []).append({**e, "healthy": True})
                carried.setdefault(name, []).append(str(e["address"]))
    if not carried:
        return dict(data), {}
    return {**data, "endpoints": merged}, carried
