"""SqliteStore on a real file: versions, leases, health, changes across processes' handles.

Each test runs its coroutine with ``asyncio.run`` under a time limit (no
pytest-asyncio). Two ``SqliteStore`` objects on one file stand in for two
control processes sharing it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from meshlayer.control.sqlite import SqliteStore
from meshlayer.control.store import (
    Conflict,
    NotFound,
    Registration,
    Resource,
    SidecarStatus,
    Snapshot,
    Write,
    static_key,
)

T = TypeVar("T")


def run(body: Callable[[SqliteStore], Awaitable[T]], path: Path, limit: float = 10.0) -> T:
    async def main() -> T:
        store = SqliteStore(path / "s.db", sweep_interval=0.05, poll_interval=0.05)
        await store.open()
        try:
            return await asyncio.wait_for(body(store), limit)
        finally:
            await store.close()

    return asyncio.run(main())


async def next_above(changes: AsyncIterator[int], above: int, timeout: float = 3.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        v = await asyncio.wait_for(anext(changes), max(0.01, deadline - time.monotonic()))
        if v > above:
            return v


def svc(name: str, **spec: Any) -> Write:
    return Write(Resource("Service", name, spec))


def test_apply_versions_and_conflicts(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        assert await store.version() == 0
        r1 = await store.apply([svc("a"), svc("b", loadBalancer="round-robin")])
        assert r1.version == 1
        assert [x[3] for x in r1.actions] == ["created", "created"]
        same = await store.apply([svc("b", loadBalancer="round-robin")])
        assert (same.version, same.actions[0][3]) == (1, "unchanged")
        with pytest.raises(Conflict):
            await store.apply([svc("c"), Write(Resource("Service", "a", {"x": 1}), 7)])
        assert await store.get("Service", "c") is None  # nothing of the failed apply
        assert await store.version() == 1
        r2 = await store.apply([Write(Resource("Service", "a", {"x": 1}), 1)])
        assert r2.actions == (("Service", "a", 2, "configured"),)
        assert [r.name for r in await store.items("Service")] == ["a", "b"]
        with pytest.raises(Conflict):
            await store.delete("Service", "a", 1)
        assert await store.delete("Service", "a", 2) == 3
        with pytest.raises(NotFound):
            await store.delete("Service", "a")

    run(body, tmp_path)


def test_lease_lapses_by_sweeper_and_raises_version(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        changes = store.changes()
        v = await store.register(Registration("sc", "web", "127.0.0.1:1"), ttl=0.3)
        assert v == 1
        # the same entry again: lease extended, no new version
        assert await store.register(Registration("sc", "web", "127.0.0.1:1"), ttl=0.3) == 1
        await store.report(SidecarStatus("sc", 1))
        assert [s.sidecar for s in await store.statuses()] == ["sc"]
        assert await store.renew("sc") == 0.3
        gone = await next_above(changes, v)
        assert gone == 2
        assert await store.registrations() == []
        assert await store.statuses() == []
        with pytest.raises(NotFound):
            await store.renew("sc")

    run(body, tmp_path)


def test_health_transitions_raise_version_once(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        await store.apply(
            [svc("web", endpoints=[{"address": "10.0.0.1:80"}, {"address": "10.0.0.2:80"}])]
        )
        await store.register(Registration("sc", "web", "127.0.0.1:1"), ttl=30)
        v = await store.version()
        key = static_key("web", "10.0.0.1:80")
        await store.set_health(key, False)
        await store.set_health(key, False)
        await store.set_health("sc", False)
        await store.set_health("sc", False)
        await store.set_health("nobody", False)
        assert await store.version() == v + 2
        snap = await store.snapshot()
        assert snap.down == frozenset({key})
        assert [r.healthy for r in snap.endpoints["web"]] == [False]
        data = snap.to_json()
        assert data["resources"][0]["spec"]["endpoints"] == [{"address": "10.0.0.2:80"}]
        assert data["endpoints"] == {"web": [{"address": "127.0.0.1:1", "healthy": False}]}
        assert len((await store.get("Service", "web")).spec["endpoints"]) == 2  # type: ignore[union-attr]
        await store.set_health(key, True)
        assert (await store.snapshot()).down == frozenset()
        assert await store.version() == v + 3

    run(body, tmp_path)


def test_changes_notice_another_handle_on_the_same_file(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        other = SqliteStore(tmp_path / "s.db", poll_interval=0.05)
        await other.open()
        try:
            changes = store.changes()
            v = (await other.apply([svc("a")])).version
            assert await next_above(changes, 0, timeout=2) == v
            snap: Snapshot = await store.snapshot()
            assert [r.name for r in snap.resources] == ["a"]
        finally:
            await other.close()

    run(body, tmp_path)
