"""The control plane's storage contract, shared by the SQLite and etcd stores.

Theory of operation
-------------------
A store holds three things:

* **resources**: validated config documents (``Service``, ``HTTPRoute``, ...),
  keyed by (kind, name), each stamped with the mesh version that last wrote it
  (``resourceVersion``);
* **registry entries**: one per registered sidecar (service, inbound address,
  health), alive only while its lease is renewed;
* **sidecar status**: the mesh version each sidecar last applied or rejected,
  and which control process holds its watch stream (``set_stream``: written
  by that process when the stream opens, cleared when it closes, gone with
  the registration, so a killed control process's claims last at most a
  lease). Status writes do *not* change the mesh version (otherwise every
  acknowledgement would trigger a new push).

It also keeps **blobs**: named opaque values written with compare-and-set
(the CA's roots and keys, join-token records, which root each sidecar's
certificate comes from), so several control processes share them.

Every store has an **identity**: a random id created with it (SQLite: a row
of the ``meta`` table; etcd: a key under the prefix, created by whichever
control process opens the store first). It travels in every snapshot
(``"store"``), so a sidecar can tell a store that is behind it (same id, an
older version: ignored) from a new, empty one (another id: followed).

The **mesh version** is one integer that every change to resources or to the
registry raises; it never goes backwards. SQLite keeps it as a counter in the
same transaction as the change; etcd uses the revision of the change, which is
global to the etcd cluster, so several control processes agree on it.

All methods are coroutines; a store serialises its own writes. ``apply`` is
all-or-nothing: either every document is written at one new version, or
nothing is and an exception says why.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class StoreError(Exception):
    """Root of the store's errors; ``status`` is the HTTP status to answer with."""

    status = 500
    reason = "store-error"


class Conflict(StoreError):
    """A write named a resourceVersion that is not the stored one."""

    status = 409
    reason = "conflict"


class NotFound(StoreError):
    """The resource or registry entry does not exist."""

    status = 404
    reason = "not-found"


class Unavailable(StoreError):
    """The backing store cannot be reached (etcd down, database locked too long)."""

    status = 503
    reason = "store-unavailable"


@dataclass(frozen=True, slots=True)
class Resource:
    """One stored config document."""

    kind: str
    """Canonical kind, e.g. ``Service``."""
    name: str
    """``metadata.name``."""
    spec: dict[str, Any]
    """The validated ``spec`` as plain JSON data."""
    resource_version: int = 0
    """Mesh version that last wrote it (0 before it is stored)."""

    def to_doc(self) -> dict[str, Any]:
        """The document as served by the API and pushed to sidecars."""
        return {
            "apiVersion": "meshlayer/v1",
            "kind": self.kind,
            "metadata": {"name": self.name, "resourceVersion": self.resource_version},
            "spec": self.spec,
        }


@dataclass(frozen=True, slots=True)
class Write:
    """One document of an apply: the resource and the version the writer expects."""

    resource: Resource
    expect_version: int | None = None
    """``metadata.resourceVersion`` sent by the client; None = unconditional."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What an apply did, per document, at which mesh version."""

    version: int
    """Mesh version after the apply (unchanged when nothing changed)."""
    actions: tuple[tuple[str, str, int, str], ...]
    """(kind, name, resourceVersion, "created" | "configured" | "unchanged")."""


@dataclass(frozen=True, slots=True)
class Registration:
    """A registered sidecar's endpoint."""

    sidecar: str
    """Sidecar id (unique per process; chosen by the sidecar)."""
    service: str
    """Service it serves."""
    address: str
    """Its inbound listener, ``HOST:PORT``, as peers should dial it."""
    healthy: bool = True
    """False while active health checks fail."""
    expires_in: float = 0.0
    """Seconds until the lease lapses (informational)."""


@dataclass(frozen=True, slots=True)
class SidecarStatus:
    """What a sidecar last reported."""

    sidecar: str
    applied: int
    """Mesh version it last applied (0: none yet)."""
    error: str | None = None
    """Why it rejected the newest snapshot, if it did."""
    updated: float = 0.0
    """Wall-clock time of the report (``time.time()``)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a sidecar needs, at one mesh version."""

    version: int
    resources: tuple[Resource, ...] = ()
    endpoints: dict[str, tuple[Registration, ...]] = field(default_factory=dict)
    down: frozenset[str] = frozenset()
    """Static endpoints failing their active health check, as :func:`static_key` keys."""
    store: str = ""
    """The store's identity (:meth:`Store.identity`); "" when unknown."""

    def to_json(self) -> dict[str, Any]:
        """The ``data`` of a watch-stream ``snapshot`` event.

        Static endpoints in ``down`` are left out of their Service's
        ``spec.endpoints`` here (the stored resource keeps them), so a sidecar
        takes them out of rotation without knowing about health checks.
        """
        out: dict[str, Any] = {"version": self.version}
        if self.store:
            out["store"] = self.store
        return out | {
            "resources": [_without_down(r, self.down).to_doc() for r in self.resources],
            "endpoints": {
                svc: [{"address": r.address, "healthy": r.healthy} for r in regs]
                for svc, regs in sorted(self.endpoints.items())
            },
        }


STATIC_PREFIX = "static:"


def static_key(service: str, address: str) -> str:
    """The health key of a static endpoint: ``static:SERVICE/ADDRESS``.

    ``Store.set_health`` takes it in place of a sidecar id for endpoints
    listed in a Service's ``spec.endpoints`` (they have no registry entry).
    """
    return f"{STATIC_PREFIX}{service}/{address}"


def is_static_key(key: str) -> bool:
    """True for a :func:`static_key`, False for a sidecar id."""
    return key.startswith(STATIC_PREFIX)


def _without_down(res: Resource, down: frozenset[str]) -> Resource:
    if not down or res.kind != "Service":
        return res
    eps = res.spec.get("endpoints")
    if not isinstance(eps, list):
        return res
    keep = [
        e
        for e in eps
        if not (isinstance(e, dict) and static_key(res.name, str(e.get("address"))) in down)
    ]
    if len(keep) == len(eps):
        return res
    return Resource(res.kind, res.name, {**res.spec, "endpoints": keep}, res.resource_version)


class Store(Protocol):
    """What the control plane needs from a backing store."""

    description: str
    """Human-readable location, e.g. ``sqlite:.meshlayer/control.db``."""

    async def open(self) -> None:
        """Connect / create schema. Raises Unavailable when the store cannot be reached."""

    async def close(self) -> None:
        """Release connections; idempotent."""

    async def ping(self) -> None:
        """Raise Unavailable unless the store answers right now."""

    async def version(self) -> int:
        """Current mesh version."""

    async def identity(self) -> str:
        """The store's random id, created with the store (see the module docstring)."""

    async def apply(self, writes: Sequence[Write]) -> ApplyResult:
        """Write all documents at one new version, or none. Raises Conflict."""

    async def delete(self, kind: str, name: str, expect_version: int | None = None) -> int:
        """Delete one resource; returns the new mesh version. Raises NotFound, Conflict."""

    async def get(self, kind: str, name: str) -> Resource | None:
        """One resource, or None."""

    async def items(self, kind: str | None = None) -> list[Resource]:
        """All resources of a kind (all kinds when None), sorted by (kind, name)."""

    async def register(self, reg: Registration, ttl: float) -> int:
        """Create or replace a sidecar's registry entry with a lease; returns the mesh version."""

    async def renew(self, sidecar: str) -> float:
        """Extend a lease by its TTL; returns the TTL. Raises NotFound if it lapsed."""

    async def deregister(self, sidecar: str) -> None:
        """Remove an entry now (graceful shutdown); no error if already gone."""

    async def set_health(self, sidecar: str, healthy: bool) -> None:
        """Record an active health-check transition (raises the mesh version if it changed).

        ``sidecar`` is a registry id, or a :func:`static_key` for an endpoint
        listed in a Service's ``spec.endpoints``: failing static keys are kept
        (the store's own table/prefix) and returned in ``Snapshot.down``.
        """

    async def registrations(self) -> list[Registration]:
        """Live registry entries."""

    async def report(self, status: SidecarStatus) -> None:
        """Record what a sidecar applied; does not raise the mesh version."""

    async def statuses(self) -> list[SidecarStatus]:
        """Last reports of the sidecars that are still registered."""

    async def set_stream(self, sidecar: str, holder: str) -> None:
        """Record that ``holder`` (a control process's stream id) serves the sidecar's
        watch stream now, replacing any other holder; does not raise the mesh version."""

    async def clear_stream(self, sidecar: str, holder: str) -> None:
        """Forget the sidecar's stream if ``holder`` still holds it (a newer stream
        elsewhere stays); does not raise the mesh version."""

    async def streams(self) -> dict[str, str]:
        """Holder of each registered sidecar's watch stream, by sidecar id."""

    async def snapshot(self) -> Snapshot:
        """All resources and live registrations at one consistent version."""

    async def get_blob(self, name: str) -> bytes | None:
        """A named opaque value (CA state, join tokens, certificate reports), or None."""

    async def put_blob(
        self, name: str, data: bytes, expect: bytes | None, bump: bool = False
    ) -> bool:
        """Compare-and-set: write ``data`` if the stored value equals ``expect``
        (None: only if absent); False when it does not. ``bump`` raises the mesh
        version in the same write, so watch streams push a new snapshot."""

    def changes(self) -> AsyncIterator[int]:
        """Yield the new mesh version after each change (coalescing is fine).

        Must also notice lease expiry (SQLite: the store's own sweeper; etcd:
        the key deleted by etcd) and changes made by *other* control
        processes sharing the store (etcd watch; SQLite: polling the
        counter is acceptable).

        Callers (the watch hub, the health checker) keep one pending
        ``anext`` and never cancel it while the iterator is in use; if it
        raises, they call ``changes()`` again. They also look at the store
        every few seconds, so a missed notice costs latency, not correctness.
        """
        ...
