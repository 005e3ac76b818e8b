"""The sidecar's side of the control plane: register, renew, watch, apply, acknowledge.

Theory of operation (linkerd's ``tonic-watch``: a subscription is a
latest-value watch that reconnects with backoff). Two tasks run next to the
data plane and never touch it except through one call, ``apply(config)``:

* the **watch loop** registers the sidecar (``POST /v1/registry``: service
  and inbound address), opens ``GET /v1/watch`` and reads server-sent
  ``snapshot`` events. Each snapshot is validated
  (:func:`~meshlayer.config.snapshot.config_from_snapshot`); a good one is
  applied, saved to ``<state dir>/config.json`` and acknowledged
  (``POST /v1/status/{id}``); a bad one is acknowledged with its error and the
  last good config stays in force. When the stream breaks — refused, reset,
  silent past the keep-alive timeout — the loop waits (exponential backoff
  with jitter, 0.1 s doubling to 5 s, reset by the next snapshot) and starts
  over, registering again (registering the same id replaces the entry).
* the **lease loop** renews the registration every TTL/3 and registers again
  when the control plane says the lease already lapsed (404).

After an outage longer than the leases the control plane comes back with an
empty registry, and fills up again only as the sidecars reconnect, each on
its own backoff. A snapshot in that window would drop peers that are alive
and serving. So for a **reconnect grace** after each (re)connect, registered
endpoints that the last applied snapshot had and a new one lacks are carried
over (:func:`~meshlayer.config.snapshot.carry_endpoints`); when the grace
ends, the newest snapshot is applied as it is. A peer that really died
meanwhile is tolerated that long (connect failures are retried elsewhere).

Versions never go backwards for a given store. Each snapshot names the
store it comes from (``"store"``: a random id created with the store). A
snapshot older than the config in force is ignored when it comes from the
same store (a control process behind its store, or started on an old copy
of it); from another store (the old one was wiped or replaced) it is
followed, and the log says so loudly. The saved copy keeps the id, so this
holds across sidecar restarts too.

Everything the request path needs is local, so the control plane may be down
for as long as it likes: the sidecar keeps serving its last good config, and
a restarted sidecar serves the copy on disk before it reaches the control
plane. No exception escapes these tasks; they log what happens instead.

With a join token (``identity``), the sidecar first obtains a certificate
(:mod:`meshlayer.proxy.identity`) from the API listener, then makes every
call — register, renew, watch, acknowledge, deregister — to the mesh
listener named in the certificate answer, over mTLS, checking that the
server is ``spiffe://<td>/ns/meshlayer/sa/control``. Acknowledgements carry
the certificate's issuer and expiry (``cert``), and each snapshot's trust
bundle goes to the identity client before the config is applied. Without a
token the calls stay plain HTTP to the API listener.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from meshlayer.config.errors import ConfigError
from meshlayer.config.model import MeshConfig
from meshlayer.config.snapshot import carry_endpoints, config_from_snapshot, snapshot_version
from meshlayer.proxy.control_http import (
    ControlUnreachable,
    Response,
    TlsTarget,
    open_stream,
    parse_control_url,
    request,
)
from meshlayer.proxy.metrics import Metrics
from meshlayer.proxy.sse import SSEDecoder, SSEError

if TYPE_CHECKING:  # cryptography is imported only by sidecars that have an identity
    from meshlayer.proxy.identity import IdentityClient

log = logging.getLogger("meshlayer.control")

STATE_FILE = "config.json"


@dataclass(frozen=True)
class ControlOptions:
    """How a sidecar talks to the control plane (``--control`` and friends)."""

    url: str
    """Control plane base URL, ``http://HOST:PORT``."""
    service: str
    """Service this sidecar registers for."""
    advertise: tuple[str, int]
    """Inbound address peers should dial, as registered."""
    state_dir: Path
    """Where the last good snapshot is kept (``config.json``)."""
    ttl: float = 10.0
    """Registration lease; renewed every ttl/3."""
    backoff_min: float = 0.1
    """First reconnect delay (seconds)."""
    backoff_max: float = 5.0
    """Longest reconnect delay (seconds)."""
    stream_timeout: float = 15.0
    """Watch stream silent (no event, no keep-alive) this long counts as broken."""
    request_timeout: float = 5.0
    """Timeout of one API call."""
    reconnect_grace: float = 11.0
    """After a (re)connect, registered endpoints missing from snapshots are kept this long."""


def new_sidecar_id(service: str) -> str:
    """Unique per process: ``<service>-<hostname>-<pid>-<random>``."""
    host = socket.gethostname().split(".", 1)[0].lower() or "host"
    return f"{service}-{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Backoff:
    """Exponential backoff with jitter: each delay is in [d/2, d], d doubling to ``high``."""

    def __init__(self, low: float, high: float) -> None:
        self.low = low
        self.high = high
        self._next = low

    def reset(self) -> None:
        self._next = self.low

    def delay(self) -> float:
        d = self._next
        self._next = min(self.high, d * 2)
        return d * (0.5 + random.random() / 2)


# -- the last good snapshot on disk ---------------------------------------------------


def save_snapshot(state_dir: Path, text: str) -> None:
    """Write ``config.json`` atomically: temp file, fsync, rename, fsync the directory."""
    state_dir.mkdir(parents=True, exist_ok=True)
    final = state_dir / STATE_FILE
    tmp = state_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_saved(state_dir: Path, url: str) -> tuple[MeshConfig, dict[str, Any]] | None:
    """The saved snapshot, as a config and as data; None when there is none or it is
    unusable."""
    path = state_dir / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read saved config %s: %s", path, exc)
        return None
    try:
        data = json.loads(text)
        config = config_from_snapshot(data, f"{url} (saved copy)")
    except (ValueError, ConfigError) as exc:
        log.warning("ignoring saved config %s: %s", path, exc)
        return None
    log.info("loaded saved config version %s from %s", config.version, path)
    return config, data


# -- the client ---------------------------------------------------------------------


class ControlClient:
    """Keeps one sidecar in sync with the control plane."""

    def __init__(
        self,
        opts: ControlOptions,
        apply: Callable[[MeshConfig], None],
        metrics: Metrics,
        applied: int = 0,
        saved: dict[str, Any] | None = None,
        identity: IdentityClient | None = None,
    ) -> None:
        self.opts = opts
        self.identity = identity
        """With a join token: certificates, and mTLS to the mesh listener for the rest."""
        if identity is not None:  # a new certificate is reported at once (ca rotate waits)
            identity.on_change = self._report_cert
        self.addrs = [parse_control_url(u.strip()) for u in opts.url.split(",")]
        """Control processes to use, in order (several over one etcd cluster: failover)."""
        self._current = 0
        self.sidecar_id = new_sidecar_id(opts.service)
        self._apply = apply
        self._metrics = metrics
        self.connected = False
        self.registered = False
        self.applied = applied
        """Mesh version of the config in force (0: none from the control plane yet)."""
        self.last_rejection: dict[str, Any] | None = None
        self.rejected = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._save_lock = asyncio.Lock()
        self._acks: set[asyncio.Task[None]] = set()
        self._ack_task: asyncio.Task[None] | None = None  # the reports' sender (``_ack``)
        self._ack_next: tuple[int, str | None] | None = None  # the report it sends next
        self._effective: dict[str, Any] | None = saved
        """The snapshot data the config in force was built from (carried endpoints included)."""
        self._latest: str | None = None
        """The newest good snapshot's text, as received."""
        self._grace_until = 0.0
        self._grace_timer: asyncio.TimerHandle | None = None
        self.carried: dict[str, list[str]] = {}
        self._from_control = False
        """True once a snapshot from the control plane (not the saved copy) is in force."""
        self.store_id = _store_of(saved) if saved is not None else None
        """Identity of the store the config in force comes from (None: unknown)."""
        metrics.control_connected.set(0)

    @property
    def addr(self) -> tuple[str, int]:
        """The control process in use."""
        return self.addrs[self._current]

    def _next_control(self) -> None:
        """After a failure, move on to the next control process (when there are several)."""
        if len(self.addrs) > 1:
            self._current = (self._current + 1) % len(self.addrs)
            log.info("switching to control process %s:%d", *self.addr)

    def view(self) -> dict[str, Any]:
        """What ``/config`` shows about the control plane."""
        return {
            "url": self.opts.url,
            "sidecar": self.sidecar_id,
            "advertise": "{}:{}".format(*self.opts.advertise),
            "connected": self.connected,
            "registered": self.registered,
            "applied": self.applied,
            "store": self.store_id,
            "rejected": self.rejected,
            "lastRejection": self.last_rejection,
            "carried": self.carried,
            "stateFile": str(self.opts.state_dir / STATE_FILE),
            "identity": self.identity.view() if self.identity is not None else None,
        }

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch_loop(), name="control-watch"),
            loop.create_task(self._lease_loop(), name="control-lease"),
        ]

    async def close(self) -> None:
        """Stop watching and deregister (graceful shutdown); never raises."""
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except BaseException:
                pass
        self._set_connected(False)
        if self.identity is not None:
            await self.identity.close()
        if self.registered:
            try:
                await self._call("DELETE", f"/v1/registry/{quote(self.sidecar_id)}", timeout=1.0)
                log.info("deregistered %s", self.sidecar_id)
            except ControlUnreachable as exc:
                log.info("could not deregister (lease will lapse): %s", exc)
            self.registered = False

    # -- transport ------------------------------------------------------------------

    def _target(self) -> tuple[tuple[str, int], TlsTarget | None]:
        """Where calls go: the mesh listener over mTLS with an identity, else the API.
        Raises ControlUnreachable (no valid certificate)."""
        if self.identity is None:
            return self.addr, None
        tls = self.identity.control_tls()
        assert self.identity.mesh is not None
        return self.identity.mesh, tls

    async def _call(
        self, method: str, path: str, body: object | None = None, timeout: float | None = None
    ) -> Response:
        addr, tls = self._target()
        return await request(
            addr, method, path, body, timeout=timeout or self.opts.request_timeout, tls=tls
        )

    # -- registration -------------------------------------------------------------

    async def _register(self) -> None:
        body = {
            "service": self.opts.service,
            "address": "{}:{}".format(*self.opts.advertise),
            "ttl": self.opts.ttl,
            "sidecar": self.sidecar_id,
        }
        resp = await self._call("POST", "/v1/registry", body)
        if resp.status != 200:
            self.registered = False
            log.error(
                "control plane refused registration (%d): %s", resp.status, _message(resp.body)
            )
            return
        if not self.registered:
            log.info(
                "registered %s as %s at %s (lease %gs)",
                self.opts.service,
                self.sidecar_id,
                body["address"],
                self.opts.ttl,
            )
        self.registered = True

    async def _lease_loop(self) -> None:
        path = f"/v1/registry/{quote(self.sidecar_id)}/renew"
        while True:
            await asyncio.sleep(self.opts.ttl / 3)
            if not self.registered:
                continue  # the watch loop registers on (re)connect
            try:
                resp = await self._call("POST", path)
                if resp.status == 404:
                    log.warning("lease of %s had lapsed; registering again", self.sidecar_id)
                    await self._register()
                elif resp.status != 200:
                    log.warning("lease renewal answered %d: %s", resp.status, _message(resp.body))
            except ControlUnreachable as exc:
                log.debug("lease renewal failed: %s", exc)
            except Exception:  # never let the data plane's process die of this
                log.exception("lease renewal failed")

    # -- the watch ------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        backoff = Backoff(self.opts.backoff_min, self.opts.backoff_max)
        path = f"/v1/watch?sidecar={quote(self.sidecar_id)}"
        while True:
            try:
                if self.identity is not None:
                    await self.identity.ensure(self.addr)
                await self._register()
                addr, tls = self._target()
                stream = await open_stream(addr, path, timeout=self.opts.request_timeout, tls=tls)
                try:
                    if stream.status != 200:
                        raise ControlUnreachable(f"watch answered {stream.status}")
                    self._set_connected(True)
                    self._grace_until = time.monotonic() + self.opts.reconnect_grace
                    log.info("connected to control plane %s:%d", *addr)
                    decoder = SSEDecoder()
                    async for piece in stream.pieces(self.opts.stream_timeout):
                        for ev in decoder.feed(piece):
                            if ev.event == "snapshot":
                                backoff.reset()
                                await self._on_snapshot(ev.data, ev.id)
                    raise ControlUnreachable("control plane ended the watch stream")
                finally:
                    stream.close()
            except (ControlUnreachable, SSEError) as exc:
                reason = str(exc)
            except Exception as exc:  # a bug here must not take the data plane down
                log.exception("control plane watch failed")
                reason = repr(exc)
            self._set_connected(False)
            delay = backoff.delay()
            log.warning(
                "control plane %s:%d unreachable: %s; retrying in %.2fs", *self.addr, reason, delay
            )
            self._next_control()
            await asyncio.sleep(delay)

    def _set_connected(self, up: bool) -> None:
        self.connected = up
        self._metrics.control_connected.set(1 if up else 0)

    async def _on_snapshot(self, text: str, event_id: str | None, final: bool = False) -> None:
        """Validate, apply, acknowledge and save one snapshot. ``final``: the grace
        is over; apply it as it is even if its version is the one in force."""
        try:
            data = json.loads(text)
            version = snapshot_version(data)
        except (ValueError, ConfigError) as exc:
            version = int(event_id) if event_id and event_id.isdigit() else 0
            self._reject(version, f"snapshot is not valid JSON: {exc}")
            return
        if self.identity is not None:  # the trust bundle applies even if the config fails
            self.identity.on_snapshot(data)
        store = _store_of(data)
        new_store = store is not None and self.store_id is not None and store != self.store_id
        if (
            version == self.applied
            and self._from_control
            and not new_store
            and self.last_rejection is None
            and not final
        ):
            # e.g. the first snapshot after a reconnect. Not for the saved copy (without
            # a store id): a recreated store may reach the same number with other content.
            self._ack(version, None)
            return
        if (
            version < self.applied
            and not new_store
            and (self._from_control or (store is not None and store == self.store_id))
        ):
            # The same store, behind us: a control process cut off from etcd, or
            # started on an old copy of the store. Never go back in time for it.
            log.warning(
                "ignoring snapshot version %d from store %s: older than version %d in force",
                version,
                store,
                self.applied,
            )
            self._ack(self.applied, None)
            return
        if new_store:
            log.warning(
                "NEW STORE: the control plane now serves store %s (was %s); following it "
                "from version %d to version %d",
                store,
                self.store_id,
                self.applied,
                version,
            )
        effective: dict[str, Any] = data
        carried: dict[str, list[str]] = {}
        if self._effective is not None and time.monotonic() < self._grace_until:
            effective, carried = carry_endpoints(self._effective, data)
        try:
            config = config_from_snapshot(effective, self.opts.url)
        except ConfigError as exc:
            self._reject(version, str(exc))
            return
        try:
            self._apply(config)
        except Exception as exc:
            log.exception("applying version %d failed", version)
            self._reject(version, f"sidecar could not apply it: {exc!r}")
            return
        self.applied = version
        self.store_id = store
        self._from_control = True
        self.last_rejection = None
        self._effective = effective
        self._latest = text
        self.carried = carried
        if carried:
            left = max(0.0, self._grace_until - time.monotonic())
            log.info(
                "applied config version %d (%d services), keeping endpoints not registered "
                "again yet for %.1fs more: %s",
                version,
                len(config.services),
                left,
                carried,
            )
            if self._grace_timer is None:
                loop = asyncio.get_running_loop()
                self._grace_timer = loop.call_later(left + 0.01, self._end_grace)
        else:
            log.info("applied config version %d (%d services)", version, len(config.services))
        self._ack(version, None)
        async with self._save_lock:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, save_snapshot, self.opts.state_dir, text
                )
            except OSError as exc:
                log.warning("cannot save config to %s: %s", self.opts.state_dir, exc)

    def _end_grace(self) -> None:
        self._grace_timer = None
        if self.carried and self._latest is not None:
            task = asyncio.get_running_loop().create_task(
                self._on_snapshot(self._latest, None, final=True)
            )
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    def _report_cert(self) -> None:
        if self.connected:
            self._ack(self.applied, None)

    def _reject(self, version: int, error: str) -> None:
        self.rejected += 1
        self._metrics.config_rejected.inc()
        self.last_rejection = {"version": version, "error": error, "at": time.time()}
        log.error(
            "rejected config version %d: %s (keeping version %d)", version, error, self.applied
        )
        self._ack(version, error)

    def _ack(self, version: int, error: str | None) -> None:
        """Report ``version`` (and a rejection's ``error``) to the control plane. One
        report is in flight at a time and the newest waiting one goes next: two reports
        sent at once (two versions applied milliseconds apart) could arrive in either
        order, and the control plane would keep the older one as this sidecar's version
        (seen once in ``make demo``: the gateway applied 10, the control plane showed 9)."""
        self._ack_next = (version, error)
        if self._ack_task is None or self._ack_task.done():  # _ack_task keeps it alive
            self._ack_task = asyncio.get_running_loop().create_task(self._send_acks())

    async def _send_acks(self) -> None:
        while self._ack_next is not None:
            version, error = self._ack_next
            self._ack_next = None
            await self._send_ack(version, error)

    async def _send_ack(self, version: int, error: str | None) -> None:
        path = f"/v1/status/{quote(self.sidecar_id)}"
        body: dict[str, Any] = {"version": version, "error": error}
        if self.identity is not None:
            body["cert"] = self.identity.status()
        try:
            resp = await self._call("POST", path, body)
            if resp.status >= 300:
                log.warning("status report answered %d: %s", resp.status, _message(resp.body))
        except ControlUnreachable as exc:
            log.debug("status report failed: %s", exc)


def _store_of(data: Any) -> str | None:
    """The ``store`` id of a snapshot (or saved copy); None when it names none."""
    store = data.get("store") if isinstance(data, dict) else None
    return store if isinstance(store, str) and store else None


def _message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or data)
    return str(data)
