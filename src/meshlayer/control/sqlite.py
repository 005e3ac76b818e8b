"""The embedded store: one SQLite file in WAL mode.

Theory of operation
-------------------
All SQL runs on one connection owned by a single worker thread (a
one-thread executor), so calls are serialised and the event loop never
blocks on the database. Every write is one ``BEGIN IMMEDIATE`` transaction;
the mesh version is a row of the ``meta`` table raised inside the same
transaction as the change it counts. SQLite's journal makes each
transaction atomic on disk, so a process killed in the middle of an apply
leaves the old or the new state, never a mix.

``synchronous=NORMAL`` in WAL mode: a committed transaction survives the
process being killed (the WAL is in the OS cache); a power cut may lose the
last few commits but never leaves a half-written one.

The store's identity (:meth:`identity`) is the ``store`` row of ``meta``,
a random hex id inserted (if absent) when the file is opened; a copy of the
file is the same store, a new file is another.

Leases are wall-clock expiry times (``time.time()``), so several control
processes sharing the file agree on them. A sweeper task deletes lapsed
entries in a transaction that raises the version. ``changes()`` is woken by
this process's own writes and, to notice writes by other processes on the
same file, by polling the version row every ``poll_interval`` seconds.

Health of *static* endpoints (``spec.endpoints`` of a ``Service``) is kept
as a set of failing keys (:func:`static_key`) in the ``down`` table.

Failpoint (tests only): ``MESHLAYER_FAILPOINT=sqlite-apply-after-first-write:SECONDS``,
read once when the store opens, makes every apply that writes sleep SECONDS
after writing its first document, inside the transaction, after logging
``failpoint sqlite-apply-after-first-write: ...``. A test waits for that line
and kills the process to show that a half-done apply leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from meshlayer.control.store import (
    ApplyResult,
    Conflict,
    NotFound,
    Registration,
    Resource,
    SidecarStatus,
    Snapshot,
    Unavailable,
    Write,
    is_static_key,
)

log = logging.getLogger("meshlayer.control.store")

T = TypeVar("T")

FAILPOINT_ENV = "MESHLAYER_FAILPOINT"
APPLY_FAILPOINT = "sqlite-apply-after-first-write"


def apply_failpoint(value: str | None) -> float:
    """Seconds to sleep inside an apply after its first write (0: no failpoint)."""
    if not value:
        return 0.0
    name, _, seconds = value.partition(":")
    if name != APPLY_FAILPOINT:
        return 0.0
    try:
        return max(0.0, float(seconds or "0"))
    except ValueError:
        log.warning("%s=%r: SECONDS is not a number; ignored", FAILPOINT_ENV, value)
        return 0.0


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 0), ('schema', 1);
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL, rv INTEGER NOT NULL,
    PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS registry (
    sidecar TEXT PRIMARY KEY, service TEXT NOT NULL, address TEXT NOT NULL,
    healthy INTEGER NOT NULL, ttl REAL NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS status (
    sidecar TEXT PRIMARY KEY, applied INTEGER NOT NULL, error TEXT, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS down (key TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS streams (
    sidecar TEXT PRIMARY KEY, holder TEXT NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, data BLOB NOT NULL);
"""


def canonical(spec: dict[str, Any]) -> str:
    """The stored form of a spec: compact JSON with sorted keys (equal specs, equal text)."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


class SqliteStore:
    """:class:`~meshlayer.control.store.Store` over one SQLite file."""

    def __init__(
        self, path: str | Path, sweep_interval: float = 0.25, poll_interval: float = 0.2
    ) -> None:
        self.path = Path(path)
        self.description = f"sqlite:{path}"
        self.sweep_interval = sweep_interval
        self.poll_interval = poll_interval
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._seen = 0  # newest version this process knows of
        self._bump = asyncio.Event()
        self._apply_pause = 0.0  # the test-only failpoint, read at open

    # -- plumbing ---------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None or self._db is None:
            raise Unavailable(f"{self.description}: store is not open")
        db = self._db
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, db)
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"{self.description}: {exc}") from None

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` inside one write transaction (all or nothing)."""

        def tx(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return out

        return await self._run(tx)

    def _notify(self, version: int) -> None:
        if version > self._seen:
            self._seen = version
            event, self._bump = self._bump, asyncio.Event()
            event.set()

    @staticmethod
    def _version(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        return int(row[0])

    @staticmethod
    def _identity(db: sqlite3.Connection) -> str:
        row = db.execute("SELECT value FROM meta WHERE key = 'store'").fetchone()
        return str(row[0]) if row else ""

    @staticmethod
    def _next_version(db: sqlite3.Connection) -> int:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'version'")
        return SqliteStore._version(db)

    # -- lifecycle --------------------------------------------------------

    async def open(self) -> None:
        if self._db is not None:
            return
        self._apply_pause = apply_failpoint(os.environ.get(FAILPOINT_ENV))
        if self._apply_pause:
            log.warning(
                "failpoint %s armed: applies sleep %gs after their first write (tests only)",
                APPLY_FAILPOINT,
                self._apply_pause,
            )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite-store")

        def connect() -> sqlite3.Connection:
            if self.path.parent != Path():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(SCHEMA)
            # 's' + hex: never looks like a number, so the INTEGER column keeps it as text
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('store', ?)",
                ("s" + uuid.uuid4().hex,),
            )
            return db

        loop = asyncio.get_running_loop()
        try:
            self._db = await loop.run_in_executor(self._executor, connect)
        except (sqlite3.Error, OSError) as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise Unavailable(f"{self.description}: cannot open: {exc}") from None
        self._seen = await self.version()
        self._tasks = [
            asyncio.create_task(self._poll(), name="sqlite-poll"),
            asyncio.create_task(self._sweep(), name="sqlite-sweep"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        db, executor = self._db, self._executor
        self._db = self._executor = None
        if db is not None and executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, db.close)
        if executor is not None:
            executor.shutdown(wait=True)

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def version(self) -> int:
        return await self._run(self._version)

    async def identity(self) -> str:
        return await self._run(self._identity)

    # -- resources --------------------------------------------------------

    async def apply(self, writes: Sequence[Write]) -> ApplyResult:
        def tx(db: sqlite3.Connection) -> ApplyResult:
            current = self._version(db)
            new = current + 1
            planned: list[tuple[Write, str, int, str]] = []  # write, text, rv, action
            for w in writes:
                r = w.resource
                row = db.execute(
                    "SELECT spec, rv FROM resources WHERE kind = ? AND name = ?", (r.kind, r.name)
                ).fetchone()
                if w.expect_version is not None:
                    have = int(row[1]) if row else 0
                    if have != w.expect_version:
                        state = f"is at {have}" if row else "does not exist"
                        raise Conflict(
                            f"{r.kind}/{r.name}: resourceVersion {w.expect_version} is stale "
                            f"(the stored resource {state}); get it again and retry"
                        )
                text = canonical(r.spec)
                if row is None:
                    planned.append((w, text, new, "created"))
                elif row[0] == text:
                    planned.append((w, text, int(row[1]), "unchanged"))
                else:
                    planned.append((w, text, new, "configured"))
            if all(action == "unchanged" for *_, action in planned):
                return ApplyResult(current, tuple(_action(p) for p in planned))
            self._next_version(db)
            written = 0
            for w, text, rv, action in planned:
                if action != "unchanged":
                    db.execute(
                        "INSERT OR REPLACE INTO resources (kind, name, spec, rv) "
                        "VALUES (?, ?, ?, ?)",
                        (w.resource.kind, w.resource.name, text, rv),
                    )
                    written += 1
                    if written == 1 and self._apply_pause:
                        log.warning(
                            "failpoint %s: wrote %s/%s of version %d, sleeping %gs "
                            "inside the transaction",
                            APPLY_FAILPOINT,
                            w.resource.kind,
                            w.resource.name,
                            new,
                            self._apply_pause,
                        )
                        time.sleep(self._apply_pause)  # the store's own thread: test only
            return ApplyResult(new, tuple(_action(p) for p in planned))

        result = await self._write(tx)
        self._notify(result.version)
        return result

    async def delete(self, kind: str, name: str, expect_version: int | None = None) -> int:
        def tx(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT rv FROM resources WHERE kind = ? AND name = ?", (kind, name)
            ).fetchone()
            if row is None:
                raise NotFound(f"{kind}/{name} not found")
            if expect_version is not None and int(row[0]) != expect_version:
                raise Conflict(
                    f"{kind}/{name}: resourceVersion {expect_version} is stale "
                    f"(the stored resource is at {row[0]}); get it again and retry"
                )
            db.execute("DELETE FROM resources WHERE kind = ? AND name = ?", (kind, name))
            return self._next_version(db)

        version = await self._write(tx)
        self._notify(version)
        return version

    async def get(self, kind: str, name: str) -> Resource | None:
        def q(db: sqlite3.Connection) -> Resource | None:
            row = db.execute(
                "SELECT spec, rv FROM resources WHERE kind = ? AND name = ?", (kind, name)
            ).fetchone()
            return Resource(kind, name, json.loads(row[0]), int(row[1])) if row else None

        return await self._run(q)

    async def items(self, kind: str | None = None) -> list[Resource]:
        return await self._run(lambda db: _items(db, kind))

    # -- registry ---------------------------------------------------------

    async def register(self, reg: Registration, ttl: float) -> int:
        def tx(db: sqlite3.Connection) -> int:
            expires = time.time() + ttl
            row = db.execute(
                "SELECT service, address, healthy FROM registry WHERE sidecar = ?", (reg.sidecar,)
            ).fetchone()
            if row is not None and (row[0], row[1]) == (reg.service, reg.address):
                db.execute(
                    "UPDATE registry SET ttl = ?, expires = ? WHERE sidecar = ?",
                    (ttl, expires, reg.sidecar),
                )
                return self._version(db)
            db.execute(
                "INSERT OR REPLACE INTO registry (sidecar, service, address, healthy, ttl, expires)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (reg.sidecar, reg.service, reg.address, int(reg.healthy), ttl, expires),
            )
            return self._next_version(db)

        version = await self._write(tx)
        self._notify(version)
        return version

    async def renew(self, sidecar: str) -> float:
        def tx(db: sqlite3.Connection) -> float:
            row = db.execute(
                "SELECT ttl, expires FROM registry WHERE sidecar = ?", (sidecar,)
            ).fetchone()
            now = time.time()
            if row is None or float(row[1]) <= now:
                raise NotFound(f"sidecar {sidecar!r} is not registered (lease lapsed?)")
            ttl = float(row[0])
            db.execute("UPDATE registry SET expires = ? WHERE sidecar = ?", (now + ttl, sidecar))
            return ttl

        return await self._write(tx)

    async def deregister(self, sidecar: str) -> None:
        def tx(db: sqlite3.Connection) -> int | None:
            gone = db.execute("DELETE FROM registry WHERE sidecar = ?", (sidecar,)).rowcount
            db.execute("DELETE FROM status WHERE sidecar = ?", (sidecar,))
            db.execute("DELETE FROM streams WHERE sidecar = ?", (sidecar,))
            return self._next_version(db) if gone else None

        version = await self._write(tx)
        if version is not None:
            self._notify(version)

    async def set_health(self, sidecar: str, healthy: bool) -> None:
        def tx(db: sqlite3.Connection) -> int | None:
            if is_static_key(sidecar):
                if healthy:
                    n = db.execute("DELETE FROM down WHERE key = ?", (sidecar,)).rowcount
                else:
                    n = db.execute(
                        "INSERT OR IGNORE INTO down (key) VALUES (?)", (sidecar,)
                    ).rowcount
            else:
                n = db.execute(
                    "UPDATE registry SET healthy = ? WHERE sidecar = ? AND healthy != ?",
                    (int(healthy), sidecar, int(healthy)),
                ).rowcount
            return self._next_version(db) if n else None

        version = await self._write(tx)
        if version is not None:
            self._notify(version)

    async def registrations(self) -> list[Registration]:
        return await self._run(lambda db: _registrations(db, time.time()))

    async def report(self, status: SidecarStatus) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO status (sidecar, applied, error, updated) "
                "VALUES (?, ?, ?, ?)",
                (status.sidecar, status.applied, status.error, status.updated or time.time()),
            )

        await self._write(tx)

    async def statuses(self) -> list[SidecarStatus]:
        def q(db: sqlite3.Connection) -> list[SidecarStatus]:
            rows = db.execute(
                "SELECT s.sidecar, s.applied, s.error, s.updated FROM status s "
                "JOIN registry r ON r.sidecar = s.sidecar ORDER BY s.sidecar"
            ).fetchall()
            return [SidecarStatus(r[0], int(r[1]), r[2], float(r[3])) for r in rows]

        return await self._run(q)

    async def set_stream(self, sidecar: str, holder: str) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO streams (sidecar, holder, since) VALUES (?, ?, ?)",
                (sidecar, holder, time.time()),
            )

        await self._write(tx)

    async def clear_stream(self, sidecar: str, holder: str) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM streams WHERE sidecar = ? AND holder = ?", (sidecar, holder))

        await self._write(tx)

    async def streams(self) -> dict[str, str]:
        def q(db: sqlite3.Connection) -> dict[str, str]:
            rows = db.execute(
                "SELECT w.sidecar, w.holder FROM streams w JOIN registry r ON r.sidecar = w.sidecar"
            ).fetchall()
            return {str(r[0]): str(r[1]) for r in rows}

        return await self._run(q)

    # -- snapshots and changes ---------------------------------------------

    async def snapshot(self) -> Snapshot:
        def q(db: sqlite3.Connection) -> Snapshot:
            db.execute("BEGIN")  # one read transaction: a consistent view in WAL mode
            try:
                version = self._version(db)
                resources = _items(db, None)
                endpoints: dict[str, list[Registration]] = {}
                for reg in _registrations(db, time.time()):
                    endpoints.setdefault(reg.service, []).append(reg)
                down = frozenset(r[0] for r in db.execute("SELECT key FROM down"))
                ident = self._identity(db)
            finally:
                db.execute("COMMIT")
            return Snapshot(
                version,
                tuple(resources),
                {svc: tuple(regs) for svc, regs in endpoints.items()},
                down,
                ident,
            )

        return await self._run(q)

    async def get_blob(self, name: str) -> bytes | None:
        def q(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT data FROM blobs WHERE name = ?", (name,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(q)

    async def put_blob(
        self, name: str, data: bytes, expect: bytes | None, bump: bool = False
    ) -> bool:
        def tx(db: sqlite3.Connection) -> int | None:
            row = db.execute("SELECT data FROM blobs WHERE name = ?", (name,)).fetchone()
            have = None if row is None else bytes(row[0])
            if have != expect:
                return None
            db.execute("INSERT OR REPLACE INTO blobs (name, data) VALUES (?, ?)", (name, data))
            return self._next_version(db) if bump else 0

        version = await self._write(tx)
        if version:
            self._notify(version)
        return version is not None

    def changes(self) -> AsyncIterator[int]:
        return _Changes(self, self._seen)

    async def _poll(self) -> None:
        """Notice versions written by other processes sharing the file."""
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self._notify(await self.version())
            except Unavailable as exc:
                log.warning("version poll failed: %s", exc)

    async def _sweep(self) -> None:
        """Delete lapsed leases, raising the version when any went."""

        def tx(db: sqlite3.Connection) -> tuple[int | None, list[str]]:
            rows = db.execute(
                "SELECT sidecar, service, address FROM registry WHERE expires <= ?",
                (time.time(),),
            ).fetchall()
            if not rows:
                return None, []
            ids = [r[0] for r in rows]
            for sid in ids:
                db.execute("DELETE FROM registry WHERE sidecar = ?", (sid,))
                db.execute("DELETE FROM status WHERE sidecar = ?", (sid,))
                db.execute("DELETE FROM streams WHERE sidecar = ?", (sid,))
            return self._next_version(db), [f"{r[0]} ({r[1]} at {r[2]})" for r in rows]

        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                version, gone = await self._write(tx)
            except Unavailable as exc:
                log.warning("lease sweep failed: %s", exc)
                continue
            if version is not None:
                for what in gone:
                    log.info("sidecar %s expired: lease lapsed (version %d)", what, version)
                self._notify(version)


class _Changes:
    """Versions above the one known when ``changes()`` was called (not at first
    ``anext``, as a generator would), newest only."""

    def __init__(self, store: SqliteStore, last: int) -> None:
        self.store = store
        self.last = last

    def __aiter__(self) -> _Changes:
        return self

    async def __anext__(self) -> int:
        while self.store._seen <= self.last:
            await self.store._bump.wait()
        self.last = self.store._seen
        return self.last


def _action(p: tuple[Write, str, int, str]) -> tuple[str, str, int, str]:
    w, _, rv, action = p
    return (w.resource.kind, w.resource.name, rv, action)


def _items(db: sqlite3.Connection, kind: str | None) -> list[Resource]:
    if kind is None:
        rows = db.execute("SELECT kind, name, spec, rv FROM resources ORDER BY kind, name")
    else:
        rows = db.execute(
            "SELECT kind, name, spec, rv FROM resources WHERE kind = ? ORDER BY name", (kind,)
        )
    return [Resource(r[0], r[1], json.loads(r[2]), int(r[3])) for r in rows.fetchall()]


def _registrations(db: sqlite3.Connection, now: float) -> list[Registration]:
    rows = db.execute(
        "SELECT sidecar, service, address, healthy, expires FROM registry "
        "ORDER BY service, address, sidecar"
    ).fetchall()
    return [Registration(r[0], r[1], r[2], bool(r[3]), max(0.0, float(r[4]) - now)) for r in rows]
