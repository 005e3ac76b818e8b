"""The distributed store: the mesh's state in an etcd cluster.

Theory of operation
-------------------
Several ``meshlayer control`` processes may share one etcd cluster; there is
no leader of our own, etcd is the source of truth. Everything lives under a
key prefix (default ``/meshlayer/``)::

    PREFIX m/version              the mesh version (see below)
    PREFIX m/res/KIND/NAME        a resource: its spec as canonical JSON
    PREFIX m/reg/SIDECAR          a registry entry, attached to an etcd lease
    PREFIX m/down/KEY             a static endpoint failing its health check
    PREFIX s/SIDECAR              what a sidecar last applied (not mesh state)
    PREFIX w/SIDECAR              which control process holds its watch stream (same)
    PREFIX b/NAME                 a blob: CA state, join tokens (compare-and-set)
    PREFIX id                     the store's identity: a random id, created once

Everything that makes up the mesh is under ``m/``, so one range read of
``m/`` is a consistent snapshot and one watch of ``m/`` sees every change,
while acknowledgements (``s/``) and stream holders (``w/``) neither show up
in the watch nor count. Both are put on the sidecar's registration lease, so
they go when it does.

**Mesh version.** The mesh version is the ``mod_revision`` of the
``m/version`` key. Every write of mesh state (apply, delete, register,
deregister, health) is one etcd transaction that also puts ``m/version``,
so the version *is* the etcd revision of the change, and a resource's
``resourceVersion`` (its key's ``mod_revision``) equals the version that
wrote it. One key gives monotonic versions across control processes for
free: etcd revisions only grow, and whichever process asks gets the same
answer. (Taking the largest ``mod_revision`` of the mesh keys instead would
go backwards when the newest key is deleted.)

The one change that is not our transaction is a lease lapsing: etcd deletes
the registry key by itself. Every control process watches ``m/``; when it
sees a registry key deleted at revision R without a version put in the same
revision, it puts ``m/version`` guarded by ``mod_revision(m/version) < R``:
exactly one process wins, the others' guards fail, and the bump is the new
version. ``changes()`` starts its watch at the current version + 1, so a
lapse that happened while no control process was running is caught up on
start. A process's own writes wake its ``changes()`` at once (the version is
in the transaction's answer); other processes' writes arrive by the watch.

**apply** reads the named keys and ``m/version`` in one transaction, checks
the ``resourceVersion`` preconditions (409 on a mismatch), then writes every
changed document plus ``m/version`` in one transaction that compares each
key's ``mod_revision`` with what was read: all or nothing, and a concurrent
writer from another control process makes the compare fail and the apply
re-read (bounded retries) rather than lose an update.

**Registry.** One key per sidecar, attached to a lease of the TTL (whole
seconds, at least 1); renew is a lease keep-alive; deregister deletes the
key with the version put and revokes the lease. ``set_health`` rewrites the
key keeping its lease.

**Identity.** The first control process to open the prefix puts ``id``
with a transaction guarded by ``create_revision(id) == 0``; the others (and
it, when another won) read the winner's value. Snapshots read it in the same
transaction as ``m/``, so a prefix wiped under a running control process
shows up as a new id (created again on the next read).

**Failover** between etcd members is the client's job
(:mod:`meshlayer.control.etcd_client`): short timeouts, the next endpoint,
``Unavailable`` when none answers. A write whose answer was lost may be
retried by the caller; the compares make that safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from meshlayer.control.etcd_client import EtcdClient, EtcdError, b64, prefix_end, unb64
from meshlayer.control.store import (
    ApplyResult,
    Conflict,
    NotFound,
    Registration,
    Resource,
    SidecarStatus,
    Snapshot,
    StoreError,
    Unavailable,
    Write,
    is_static_key,
)

log = logging.getLogger("meshlayer.control.etcd")

_RETRIES = 8  # compare-and-swap attempts before giving up under contention
_NOT_FOUND = 5  # gRPC NotFound (e.g. lease lapsed)


def canonical(spec: dict[str, Any]) -> str:
    """The stored form of a spec: compact JSON with sorted keys (equal specs, equal text)."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def parse_url(url: str) -> tuple[list[str], str]:
    """``etcd://H:P[,H:P...][/prefix/]`` → (endpoints, key prefix)."""
    parts = urlsplit(url)
    if parts.scheme != "etcd" or not parts.netloc:
        raise ValueError(f"store {url!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
    endpoints = [e.strip() for e in parts.netloc.split(",") if e.strip()]
    for e in endpoints:
        host, _, port = e.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"store {url!r}: endpoint {e!r} is not HOST:PORT")
    prefix = parts.path if parts.path not in ("", "/") else "/meshlayer/"
    if not prefix.endswith("/"):
        prefix += "/"
    return endpoints, prefix


def _rev(obj: dict[str, Any], name: str = "mod_revision") -> int:
    return int(obj.get(name, 0))


def _put(key: str, value: str, lease: int = 0) -> dict[str, Any]:
    put: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


def _range(key: str) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def _mod_is(key: str, op: str, revision: int) -> dict[str, Any]:
    return {"target": "MOD", "key": b64(key), "result": op, "mod_revision": str(revision)}


class EtcdStore:
    """:class:`~meshlayer.control.store.Store` over an etcd cluster (v3 JSON gateway)."""

    def __init__(
        self,
        endpoints: list[str],
        prefix: str = "/meshlayer/",
        connect_timeout: float = 0.5,
        request_timeout: float = 2.0,
    ) -> None:
        self.endpoints = list(endpoints)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.description = "etcd://" + ",".join(self.endpoints) + self.prefix
        self._client = EtcdClient(self.endpoints, connect_timeout, request_timeout)
        self._mesh = self.prefix + "m/"
        self._version_key = self._mesh + "version"
        self._res = self._mesh + "res/"
        self._reg = self._mesh + "reg/"
        self._down = self._mesh + "down/"
        self._status = self.prefix + "s/"
        self._streams = self.prefix + "w/"
        self._blobs = self.prefix + "b/"
        self._id_key = self.prefix + "id"
        self._version_op = _put(self._version_key, "")
        self._leases: dict[str, int] = {}  # sidecar -> lease id, as last seen
        self._seen = 0  # newest mesh version this process knows of
        self._wake = asyncio.Event()
        self._open = False

    @classmethod
    def from_url(cls, url: str) -> EtcdStore:
        """A store for ``etcd://HOST:PORT[,HOST:PORT...][/prefix/]``."""
        endpoints, prefix = parse_url(url)
        return cls(endpoints, prefix)

    def __repr__(self) -> str:
        return f"<EtcdStore {self.description} {self._client!r}>"

    # -- plumbing ---------------------------------------------------------

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._client.call(path, body)
        except EtcdError as exc:
            raise StoreError(f"{self.description}: {exc}") from None

    async def _txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"compare": compare, "success": success}
        if failure:
            body["failure"] = failure
        answer = await self._call("/v3/kv/txn", body)
        if answer.get("succeeded") and self._version_op in success:
            self._notify(_rev(answer["header"], "revision"))
        return answer

    async def _range_prefix(self, prefix: str) -> tuple[int, list[dict[str, Any]]]:
        """(store revision, kvs) of every key under ``prefix``."""
        answer = await self._call(
            "/v3/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)}
        )
        return _rev(answer["header"], "revision"), list(answer.get("kvs", []))

    async def _get_kv(self, key: str) -> dict[str, Any] | None:
        answer = await self._call("/v3/kv/range", {"key": b64(key)})
        kvs = answer.get("kvs", [])
        return dict(kvs[0]) if kvs else None

    def _version_put(self) -> dict[str, Any]:
        return self._version_op

    @staticmethod
    def _version_of(kvs_by_key: dict[str, dict[str, Any]], key: str) -> int:
        kv = kvs_by_key.get(key)
        return _rev(kv) if kv else 0

    # -- lifecycle --------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            return
        self._seen = await self.version()  # also says whether etcd answers
        await self.identity()
        self._open = True

    async def close(self) -> None:
        self._open = False
        await self._client.close()

    async def ping(self) -> None:
        try:
            await self._client.call("/v3/kv/range", {"key": b64(self._version_key)})
        except EtcdError as exc:
            raise Unavailable(f"{self.description}: {exc}") from None

    async def version(self) -> int:
        kv = await self._get_kv(self._version_key)
        return _rev(kv) if kv else 0

    async def identity(self) -> str:
        kv = await self._get_kv(self._id_key)
        return unb64(kv.get("value", "")).decode() if kv else await self._create_identity()

    async def _create_identity(self) -> str:
        """Put a new id unless one exists; the id that is stored either way."""
        mine = "e" + uuid.uuid4().hex
        answer = await self._txn(
            [
                {
                    "target": "CREATE",
                    "key": b64(self._id_key),
                    "result": "EQUAL",
                    "create_revision": "0",
                }
            ],
            [_put(self._id_key, mine)],
            [_range(self._id_key)],
        )
        if answer.get("succeeded"):
            log.info("new store: identity %s under %s", mine, self.prefix)
            return mine
        kvs = answer["responses"][0].get("response_range", {}).get("kvs", [])
        return unb64(kvs[0].get("value", "")).decode() if kvs else mine

    # -- resources --------------------------------------------------------

    def _res_key(self, kind: str, name: str) -> str:
        return f"{self._res}{kind}/{name}"

    def _resource(self, kv: dict[str, Any]) -> Resource:
        rest = unb64(kv["key"]).decode()[len(self._res) :]
        kind, _, name = rest.partition("/")
        spec = json.loads(unb64(kv.get("value", "")) or b"{}")
        return Resource(kind, name, spec, _rev(kv))

    async def apply(self, writes: Sequence[Write]) -> ApplyResult:
        keys = [self._res_key(w.resource.kind, w.resource.name) for w in writes]
        unique = list(dict.fromkeys(keys))
        for _ in range(_RETRIES):
            answer = await self._txn([], [_range(k) for k in [*unique, self._version_key]])
            kvs: dict[str, dict[str, Any]] = {}
            for resp in answer.get("responses", []):
                for kv in resp.get("response_range", {}).get("kvs", []):
                    kvs[unb64(kv["key"]).decode()] = kv
            current = self._version_of(kvs, self._version_key)
            planned: list[tuple[str, str, str, str]] = []  # key, kind/name, text, action
            puts: dict[str, str] = {}
            for w, key in zip(writes, keys, strict=True):
                r = w.resource
                kv = kvs.get(key)
                have = _rev(kv) if kv else 0
                if w.expect_version is not None and have != w.expect_version:
                    state = f"is at {have}" if kv else "does not exist"
                    raise Conflict(
                        f"{r.kind}/{r.name}: resourceVersion {w.expect_version} is stale "
                        f"(the stored resource {state}); get it again and retry"
                    )
                text = canonical(r.spec)
                stored = puts.get(key, unb64(kv.get("value", "")).decode() if kv else None)
                if stored is None:
                    action = "created"
                elif stored == text:
                    action = "unchanged"
                else:
                    action = "configured"
                if action != "unchanged":
                    puts[key] = text
                planned.append((key, f"{r.kind}/{r.name}", text, action))
            if not puts:
                return ApplyResult(
                    current,
                    tuple(
                        (w.resource.kind, w.resource.name, _rev(kvs[k]), "unchanged")
                        for w, k in zip(writes, keys, strict=True)
                    ),
                )
            compare = [_mod_is(k, "EQUAL", _rev(kvs[k]) if k in kvs else 0) for k in unique]
            success = [_put(k, text) for k, text in puts.items()] + [self._version_put()]
            done = await self._txn(compare, success)
            if not done.get("succeeded"):
                continue  # someone wrote meanwhile: read again
            new = _rev(done["header"], "revision")
            actions = []
            for w, (key, _, _, action) in zip(writes, planned, strict=True):
                rv = new if key in puts else _rev(kvs[key])
                if action == "unchanged" and key in puts:
                    action = "configured"  # the same key named twice, changed by the other
                actions.append((w.resource.kind, w.resource.name, rv, action))
            return ApplyResult(new, tuple(actions))
        raise Unavailable(f"{self.description}: apply kept racing other writers; retry")

    async def delete(self, kind: str, name: str, expect_version: int | None = None) -> int:
        key = self._res_key(kind, name)
        for _ in range(_RETRIES):
            kv = await self._get_kv(key)
            if kv is None:
                raise NotFound(f"{kind}/{name} not found")
            have = _rev(kv)
            if expect_version is not None and have != expect_version:
                raise Conflict(
                    f"{kind}/{name}: resourceVersion {expect_version} is stale "
                    f"(the stored resource is at {have}); get it again and retry"
                )
            done = await self._txn(
                [_mod_is(key, "EQUAL", have)],
                [{"request_delete_range": {"key": b64(key)}}, self._version_put()],
            )
            if done.get("succeeded"):
                return _rev(done["header"], "revision")
        raise Unavailable(f"{self.description}: delete kept racing other writers; retry")

    async def get(self, kind: str, name: str) -> Resource | None:
        kv = await self._get_kv(self._res_key(kind, name))
        return self._resource(kv) if kv else None

    async def items(self, kind: str | None = None) -> list[Resource]:
        _, kvs = await self._range_prefix(self._res if kind is None else f"{self._res}{kind}/")
        return sorted((self._resource(kv) for kv in kvs), key=lambda r: (r.kind, r.name))

    # -- registry ---------------------------------------------------------

    def _registration(self, kv: dict[str, Any], expires_in: float = 0.0) -> Registration:
        data = json.loads(unb64(kv.get("value", "")))
        return Registration(
            sidecar=unb64(kv["key"]).decode()[len(self._reg) :],
            service=str(data["service"]),
            address=str(data["address"]),
            healthy=bool(data.get("healthy", True)),
            expires_in=expires_in,
        )

    async def register(self, reg: Registration, ttl: float) -> int:
        key = self._reg + reg.sidecar
        kv = await self._get_kv(key)
        if kv is not None:
            old = json.loads(unb64(kv.get("value", "")))
            if (old.get("service"), old.get("address"), old.get("ttl")) == (
                reg.service,
                reg.address,
                ttl,
            ):
                # The same endpoint again (e.g. after a control restart): refresh its lease.
                with contextlib.suppress(NotFound):
                    await self._keepalive(int(kv.get("lease", 0)))
                    self._leases[reg.sidecar] = int(kv.get("lease", 0))
                    return await self.version()
        grant = await self._call("/v3/lease/grant", {"TTL": str(max(1, math.ceil(ttl)))})
        lease = int(grant["ID"])
        value = json.dumps(
            {"service": reg.service, "address": reg.address, "healthy": reg.healthy, "ttl": ttl},
            separators=(",", ":"),
        )
        done = await self._txn([], [_put(key, value, lease), self._version_put()], None)
        self._leases[reg.sidecar] = lease
        old_lease = int(kv.get("lease", 0)) if kv else 0
        if old_lease and old_lease != lease:
            await self._revoke(old_lease)
        return _rev(done["header"], "revision")

    async def _keepalive(self, lease: int) -> int:
        """Renew a lease once; returns its TTL. Raises NotFound when it lapsed."""
        if not lease:
            raise NotFound("no lease")
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        ttl = int(answer.get("result", answer).get("TTL", 0))
        if ttl <= 0:
            raise NotFound(f"lease {lease:x} lapsed")
        return ttl

    async def _revoke(self, lease: int) -> None:
        try:
            await self._client.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if exc.code != _NOT_FOUND:
                raise StoreError(f"{self.description}: {exc}") from None

    async def renew(self, sidecar: str) -> float:
        cached = self._leases.get(sidecar, 0)
        if cached:
            with contextlib.suppress(NotFound):
                await self._keepalive(cached)
                kv = await self._get_kv(self._reg + sidecar)
                if kv is not None and int(kv.get("lease", 0)) == cached:
                    return float(json.loads(unb64(kv["value"])).get("ttl", 0))
        kv = await self._get_kv(self._reg + sidecar)
        if kv is None:
            self._leases.pop(sidecar, None)
            raise NotFound(f"sidecar {sidecar!r} is not registered (lease lapsed?)")
        lease = int(kv.get("lease", 0))
        try:
            await self._keepalive(lease)
        except NotFound:
            self._leases.pop(sidecar, None)
            raise NotFound(f"sidecar {sidecar!r} is not registered (lease lapsed)") from None
        self._leases[sidecar] = lease
        return float(json.loads(unb64(kv["value"])).get("ttl", 0))

    async def deregister(self, sidecar: str) -> None:
        key = self._reg + sidecar
        self._leases.pop(sidecar, None)
        kv = await self._get_kv(key)
        if kv is None:
            return
        await self._txn(
            [_mod_is(key, "GREATER", 0)],
            [
                {"request_delete_range": {"key": b64(key)}},
                {"request_delete_range": {"key": b64(self._status + sidecar)}},
                {"request_delete_range": {"key": b64(self._streams + sidecar)}},
                self._version_put(),
            ],
        )
        lease = int(kv.get("lease", 0))
        if lease:
            await self._revoke(lease)

    async def set_health(self, sidecar: str, healthy: bool) -> None:
        if is_static_key(sidecar):
            key = self._down + sidecar
            if healthy:
                # Delete only when present, so a no-op does not raise the version.
                await self._txn(
                    [_mod_is(key, "GREATER", 0)],
                    [{"request_delete_range": {"key": b64(key)}}, self._version_put()],
                )
            else:
                await self._txn([_mod_is(key, "EQUAL", 0)], [_put(key, "1"), self._version_put()])
            return
        key = self._reg + sidecar
        for _ in range(_RETRIES):
            kv = await self._get_kv(key)
            if kv is None:
                raise NotFound(f"sidecar {sidecar!r} is not registered")
            data = json.loads(unb64(kv["value"]))
            if bool(data.get("healthy", True)) == healthy:
                return
            data["healthy"] = healthy
            done = await self._txn(
                [_mod_is(key, "EQUAL", _rev(kv))],
                [
                    _put(key, json.dumps(data, separators=(",", ":")), int(kv.get("lease", 0))),
                    self._version_put(),
                ],
            )
            if done.get("succeeded"):
                return
        raise Unavailable(f"{self.description}: set_health kept racing other writers; retry")

    async def registrations(self) -> list[Registration]:
        _, kvs = await self._range_prefix(self._reg)
        leases = {int(kv.get("lease", 0)) for kv in kvs} - {0}
        ttls = dict(
            zip(leases, await asyncio.gather(*(self._time_to_live(x) for x in leases)), strict=True)
        )
        regs = [self._registration(kv, ttls.get(int(kv.get("lease", 0)), 0.0)) for kv in kvs]
        return sorted(regs, key=lambda r: (r.service, r.address, r.sidecar))

    async def _time_to_live(self, lease: int) -> float:
        try:
            answer = await self._client.call("/v3/lease/timetolive", {"ID": str(lease)})
        except EtcdError:
            return 0.0
        return max(0.0, float(answer.get("TTL", 0)))

    async def report(self, status: SidecarStatus) -> None:
        value = json.dumps(
            {
                "applied": status.applied,
                "error": status.error,
                "updated": status.updated or time.time(),
            },
            separators=(",", ":"),
        )
        await self._put_on_lease(status.sidecar, self._status + status.sidecar, value)

    async def _put_on_lease(
        self, sidecar: str, key: str, value: str, need_lease: bool = False
    ) -> None:
        """Put ``key`` on the sidecar's registration lease, so it goes when the entry does
        (without one: a plain key, or nothing when ``need_lease``)."""
        lease = self._leases.get(sidecar)
        for _ in range(2):
            if lease is None:
                kv = await self._get_kv(self._reg + sidecar)
                lease = int(kv.get("lease", 0)) if kv else 0
            if not lease and need_lease:
                return
            try:
                await self._client.call("/v3/kv/put", _put(key, value, lease)["request_put"])
                return
            except EtcdError as exc:
                if exc.code != _NOT_FOUND:
                    raise StoreError(f"{self.description}: {exc}") from None
                self._leases.pop(sidecar, None)  # re-registered since: read it again
                lease = None
        if not need_lease:
            await self._call("/v3/kv/put", _put(key, value)["request_put"])

    async def set_stream(self, sidecar: str, holder: str) -> None:
        await self._put_on_lease(sidecar, self._streams + sidecar, holder, need_lease=True)

    async def clear_stream(self, sidecar: str, holder: str) -> None:
        key = self._streams + sidecar
        await self._txn(
            [{"target": "VALUE", "key": b64(key), "result": "EQUAL", "value": b64(holder)}],
            [{"request_delete_range": {"key": b64(key)}}],
        )

    async def streams(self) -> dict[str, str]:
        answer = await self._txn(
            [],
            [
                {"request_range": {"key": b64(p), "range_end": prefix_end(p), "keys_only": k}}
                for p, k in ((self._streams, False), (self._reg, True))
            ],
        )
        stream_kvs, reg_kvs = (
            r.get("response_range", {}).get("kvs", []) for r in answer["responses"]
        )
        live = {unb64(kv["key"]).decode()[len(self._reg) :] for kv in reg_kvs}
        out = {}
        for kv in stream_kvs:
            sidecar = unb64(kv["key"]).decode()[len(self._streams) :]
            if sidecar in live:
                out[sidecar] = unb64(kv.get("value", "")).decode()
        return out

    async def statuses(self) -> list[SidecarStatus]:
        answer = await self._txn(
            [],
            [
                {"request_range": {"key": b64(p), "range_end": prefix_end(p), "keys_only": k}}
                for p, k in ((self._status, False), (self._reg, True))
            ],
        )
        status_kvs, reg_kvs = (
            r.get("response_range", {}).get("kvs", []) for r in answer["responses"]
        )
        live = {unb64(kv["key"]).decode()[len(self._reg) :] for kv in reg_kvs}
        out = []
        for kv in status_kvs:
            sidecar = unb64(kv["key"]).decode()[len(self._status) :]
            if sidecar not in live:
                continue
            data = json.loads(unb64(kv["value"]))
            out.append(
                SidecarStatus(
                    sidecar, int(data["applied"]), data.get("error"), float(data["updated"])
                )
            )
        return sorted(out, key=lambda s: s.sidecar)

    # -- snapshots and changes ---------------------------------------------

    async def snapshot(self) -> Snapshot:
        answer = await self._txn(
            [],
            [
                {"request_range": {"key": b64(self._mesh), "range_end": prefix_end(self._mesh)}},
                _range(self._id_key),
            ],
        )
        mesh, ident = (r.get("response_range", {}).get("kvs", []) for r in answer["responses"])
        kvs = list(mesh)
        store = unb64(ident[0].get("value", "")).decode() if ident else await self.identity()
        version = 0
        resources: list[Resource] = []
        regs: list[Registration] = []
        down: set[str] = set()
        for kv in kvs:
            key = unb64(kv["key"]).decode()
            if key == self._version_key:
                version = _rev(kv)
            elif key.startswith(self._res):
                resources.append(self._resource(kv))
            elif key.startswith(self._reg):
                reg = self._registration(kv)
                regs.append(reg)
                self._leases[reg.sidecar] = int(kv.get("lease", 0))
            elif key.startswith(self._down):
                down.add(key[len(self._down) :])
        endpoints: dict[str, list[Registration]] = {}
        for reg in sorted(regs, key=lambda r: (r.service, r.address, r.sidecar)):
            endpoints.setdefault(reg.service, []).append(reg)
        return Snapshot(
            version,
            tuple(sorted(resources, key=lambda r: (r.kind, r.name))),
            {svc: tuple(v) for svc, v in endpoints.items()},
            frozenset(down),
            store,
        )

    async def get_blob(self, name: str) -> bytes | None:
        kv = await self._get_kv(self._blobs + name)
        return None if kv is None else unb64(str(kv.get("value", "")))

    async def put_blob(
        self, name: str, data: bytes, expect: bytes | None, bump: bool = False
    ) -> bool:
        key = self._blobs + name
        if expect is None:
            cmp = {"target": "CREATE", "key": b64(key), "result": "EQUAL", "create_revision": "0"}
        else:
            cmp = {"target": "VALUE", "key": b64(key), "result": "EQUAL", "value": b64(expect)}
        ops = [{"request_put": {"key": b64(key), "value": b64(data)}}]
        if bump:
            ops.append(self._version_put())
        answer = await self._txn([cmp], ops)
        return bool(answer.get("succeeded"))

    def _notify(self, version: int) -> None:
        """A newer mesh version is known (our own write, or the watch saw one)."""
        if version > self._seen:
            self._seen = version
            wake, self._wake = self._wake, asyncio.Event()
            wake.set()

    async def changes(self) -> AsyncIterator[int]:
        """Yield each new mesh version: this process's writes at once, others' via the watch."""
        if not self._open:
            self._notify(await self.version())
        follower = asyncio.create_task(self._follow(self._seen), name="etcd-watch")
        last = self._seen
        try:
            while True:
                if self._seen > last:
                    last = self._seen
                    yield last
                    continue
                waiter = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait([waiter, follower], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if follower.done():
                    return  # the store was closed
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    async def _follow(self, last: int) -> None:
        """Feed ``_notify`` from one etcd watch of ``m/``, resumed after errors, until closed."""
        start = last + 1  # replays lapses since the last version, so they get bumped
        backoff = 0.05
        while not self._client.closed:
            try:
                async for event_rev, version in self._watch(start):
                    backoff = 0.05
                    start = event_rev + 1
                    self._notify(version)
            except Unavailable as exc:
                if self._client.closed:
                    return
                log.warning("etcd watch interrupted (resuming at revision %d): %s", start, exc)
            except _Compacted as exc:
                log.warning("etcd history compacted past %d; resuming at %d", start, exc.revision)
                start = exc.revision
                with contextlib.suppress(StoreError):
                    await self._bump(exc.revision)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _watch(self, start: int) -> AsyncIterator[tuple[int, int]]:
        """(revision, mesh version or 0) for each revision with events on ``m/``."""
        request = {
            "create_request": {
                "key": b64(self._mesh),
                "range_end": prefix_end(self._mesh),
                "start_revision": str(max(start, 1)),
                "prev_kv": True,  # a lapsed entry's value, to say whose lease it was
            }
        }
        async for message in self._client.stream("/v3/watch", request):
            result = message.get("result", {})
            if int(result.get("compact_revision", 0)):
                raise _Compacted(int(result["compact_revision"]))
            if result.get("canceled"):
                raise Unavailable(f"watch canceled: {result.get('cancel_reason', '')}")
            by_rev: dict[int, list[dict[str, Any]]] = {}
            for ev in result.get("events", []):
                by_rev.setdefault(_rev(ev["kv"]), []).append(ev)
            for rev in sorted(by_rev):
                events = by_rev[rev]
                keys = {unb64(ev["kv"]["key"]).decode() for ev in events}
                if self._version_key in keys:
                    yield rev, rev
                    continue
                lapsed = [
                    self._describe(ev)
                    for ev in events
                    if ev.get("type") == "DELETE"
                    and unb64(ev["kv"]["key"]).decode().startswith(self._reg)
                ]
                if lapsed:
                    version = await self._bump(rev)
                    for what in lapsed if version else ():
                        log.info("sidecar %s expired: lease lapsed (version %d)", what, version)
                yield rev, 0

    def _describe(self, event: dict[str, Any]) -> str:
        """``ID (SERVICE at ADDRESS)`` of a deleted registry entry."""
        sidecar = unb64(event["kv"]["key"]).decode()[len(self._reg) :]
        prev = event.get("prev_kv")
        if not prev:
            return sidecar
        with contextlib.suppress(ValueError, KeyError):
            reg = self._registration(prev)
            return f"{sidecar} ({reg.service} at {reg.address})"
        return sidecar

    async def _bump(self, revision: int) -> int:
        """Raise the version for a change at ``revision`` that did not (a lease lapse).

        Returns the new version, or 0 when another control process (or an
        earlier watch) already did. Raises Unavailable when etcd does not
        answer; the watch then resumes at ``revision`` and tries again.
        """
        done = await self._txn(
            [_mod_is(self._version_key, "LESS", revision)], [self._version_put()]
        )
        return _rev(done["header"], "revision") if done.get("succeeded") else 0


class _Compacted(Exception):
    """The watch's start revision was compacted away."""

    def __init__(self, revision: int) -> None:
        super().__init__(revision)
        self.revision = revision
