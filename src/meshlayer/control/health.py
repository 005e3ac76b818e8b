"""Active health checks: take failing endpoints out of rotation, put them back.

Theory of operation
-------------------
A Service with ``spec.healthCheck`` has each of its endpoints probed: the
sidecars registered for it (their address is the peer sidecar's inbound
listener, which forwards the probe to its app, so the check covers both)
and the static ``spec.endpoints`` (``meshed: false`` servers and fixed peer
sidecars). A probe is ``GET <path>`` with ``Host: <service>`` on a fresh
connection; a 2xx status within ``timeout`` is a pass, anything else
(refused, reset, timeout, other status) a failure. A registered sidecar that
holds a mesh certificate is probed over mTLS with the control plane's own
certificate, and must present its service's SPIFFE ID.

One asyncio task per (target, check) runs the probes every ``interval``.
``unhealthyThreshold`` consecutive failures mark a healthy endpoint down,
``healthyThreshold`` consecutive passes mark it up again; a transition is
recorded with ``Store.set_health`` (registry id, or a static key), which
raises the mesh version, so the watch streams push the change.

The set of targets is reconciled from a snapshot whenever the mesh version
changes (and every few seconds in case a change notice was missed): new
targets get a task, vanished ones have theirs cancelled. Several control
processes sharing a store all probe; ``set_health`` is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography import x509

from meshlayer.config.errors import ConfigError
from meshlayer.config.load import parse_address, parse_documents
from meshlayer.config.model import HealthCheck
from meshlayer.control.store import Snapshot, Store, StoreError, static_key

log = logging.getLogger("meshlayer.control.health")

RECONCILE_EVERY = 5.0


@dataclass(frozen=True, slots=True)
class Target:
    """One endpoint to probe."""

    key: str
    """Registry id, or the static key."""
    service: str
    address: str
    healthy: bool
    """Health recorded in the store when the target was found."""


async def probe(
    address: str,
    service: str,
    path: str,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    peer_id: str | None = None,
) -> int | None:
    """GET ``path`` on ``address``; the status, or None if no valid answer came in time.

    With ``tls`` the probe speaks mTLS (a meshed sidecar's inbound listener) and,
    given ``peer_id``, the server's certificate must name that SPIFFE ID.
    """
    try:
        host, port = parse_address(address)
    except ValueError:
        return None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=tls)
            if tls is not None and peer_id is not None and _peer_id(writer) != peer_id:
                return None
            writer.write(
                f"GET {path} HTTP/1.1\r\nhost: {service}\r\n"
                "user-agent: meshlayer-health\r\nconnection: close\r\n\r\n".encode("latin-1")
            )
            line = await reader.readline()
    except (OSError, TimeoutError, ValueError, ssl.SSLError):
        return None
    finally:
        if writer is not None:
            writer.close()
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return None
    return int(parts[1])


def _peer_id(writer: asyncio.StreamWriter) -> str | None:
    sslobj = writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der:
        return None
    try:
        ext = x509.load_der_x509_certificate(der).extensions
        uris = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    names = uris.get_values_for_type(x509.UniformResourceIdentifier)
    return names[0] if len(names) == 1 else None


TlsFor = Callable[[Target], Awaitable[tuple[ssl.SSLContext, str] | None]]
"""Whether to probe a target over mTLS: (client context, expected SPIFFE ID) or None."""


def targets(snap: Snapshot) -> dict[tuple[str, str, HealthCheck], Target]:
    """Every endpoint to probe, keyed by (target key, address, its service's check)."""
    out: dict[tuple[str, str, HealthCheck], Target] = {}
    for res in snap.resources:
        if res.kind != "Service" or "healthCheck" not in res.spec:
            continue
        try:
            svc = parse_documents([res.to_doc()], "store", strict_refs=False).services[0]
        except ConfigError as exc:  # stored before a stricter loader: skip, say so
            log.warning("not checking %s: %s", res.name, exc)
            continue
        check = svc.health_check
        if check is None:
            continue
        for ep in svc.endpoints:
            key = static_key(svc.name, ep.address)
            out[(key, ep.address, check)] = Target(key, svc.name, ep.address, key not in snap.down)
        for reg in snap.endpoints.get(svc.name, ()):
            out[(reg.sidecar, reg.address, check)] = Target(
                reg.sidecar, svc.name, reg.address, reg.healthy
            )
    return out


class HealthChecker:
    """Runs the probes of every checked endpoint."""

    def __init__(self, store: Store, tls_for: TlsFor | None = None) -> None:
        self.store = store
        self.tls_for = tls_for
        self._probes: dict[tuple[str, str, HealthCheck], asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="health-checker")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._probes.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._probes.clear()

    async def _follow(self) -> None:
        changes = self.store.changes()
        next_change: asyncio.Future[int] | None = None
        try:
            while True:
                try:
                    await self.reconcile(await self.store.snapshot())
                except StoreError as exc:
                    log.warning("health checker: store failed: %s", exc)
                if next_change is None:
                    next_change = asyncio.ensure_future(anext(changes))
                done, _ = await asyncio.wait({next_change}, timeout=RECONCILE_EVERY)
                if done:
                    failure = next_change.exception()
                    next_change = None
                    if failure is not None:  # the iterator is done for: start another
                        log.warning("health checker: change feed failed: %r", failure)
                        changes = self.store.changes()
                        await asyncio.sleep(1.0)
        finally:
            if next_change is not None:
                next_change.cancel()

    async def reconcile(self, snap: Snapshot) -> None:
        """Start probes for new targets, stop those of vanished ones, and put back in
        rotation endpoints marked down that nothing checks any more (their Service
        dropped its healthCheck, or was deleted)."""
        want = targets(snap)
        for key in list(self._probes):
            if key not in want:
                self._probes.pop(key).cancel()
        checked = {key[0] for key in want}
        down = set(snap.down)
        down.update(r.sidecar for regs in snap.endpoints.values() for r in regs if not r.healthy)
        for gone in sorted(down - checked):
            log.info("health: %s is no longer checked; back in rotation", gone)
            await self.store.set_health(gone, True)
        for key, target in want.items():
            if key not in self._probes:
                self._probes[key] = asyncio.create_task(
                    self._run(target, key[2]), name=f"health-{target.key}"
                )

    async def _run(self, target: Target, check: HealthCheck) -> None:
        healthy = target.healthy
        passes = fails = 0
        await asyncio.sleep(random.uniform(0, check.interval))  # spread the probes
        while True:
            tls = await self.tls_for(target) if self.tls_for is not None else None
            status = await probe(
                target.address,
                target.service,
                check.path,
                check.timeout,
                tls[0] if tls else None,
                tls[1] if tls else None,
            )
            ok = status is not None and 200 <= status < 300
            if ok:
                passes, fails = passes + 1, 0
            else:
                passes, fails = 0, fails + 1
            if healthy and fails >= check.unhealthy_threshold:
                healthy = False
                await self._record(target, False, f"{fails} failed checks (last: {status})")
            elif not healthy and passes >= check.healthy_threshold:
                healthy = True
                await self._record(target, True, f"{passes} passed checks")
            await asyncio.sleep(check.interval)

    async def _record(self, target: Target, healthy: bool, why: str) -> None:
        state = "healthy" if healthy else "unhealthy"
        log.info(
            "health: %s endpoint %s (%s) is %s after %s",
            target.service,
            target.address,
            target.key,
            state,
            why,
        )
        try:
            await self.store.set_health(target.key, healthy)
        except StoreError as exc:
            log.warning("health: cannot record %s as %s: %s", target.key, state, exc)
