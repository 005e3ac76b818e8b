"""EtcdStore against a real 3-member etcd cluster, method by method.

Each test gets its own key prefix on the session's cluster, so tests do not
see each other's data. No pytest-asyncio: each test runs its coroutine with
``asyncio.run`` under a time limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from meshlayer.control.etcd import EtcdStore
from meshlayer.control.store import (
    Conflict,
    NotFound,
    Registration,
    Resource,
    SidecarStatus,
    Unavailable,
    Write,
    static_key,
)
from tests.support.etcd import EtcdCluster, unique_prefix
from tests.support.procs import free_port

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], limit: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, limit))


def svc(name: str, **spec: Any) -> Write:
    return Write(Resource("Service", name, {"loadBalancer": "round-robin", **spec}))


async def with_store(
    cluster: EtcdCluster, body: Callable[[EtcdStore], Awaitable[T]], prefix: str | None = None
) -> T:
    store = EtcdStore(cluster.endpoints, prefix or unique_prefix())
    await store.open()
    try:
        return await body(store)
    finally:
        await store.close()


async def next_version(changes: AsyncIterator[int], above: int, timeout: float = 5.0) -> int:
    """The first version yielded that is above ``above``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no version above {above} within {timeout}s")
        v = await asyncio.wait_for(anext(changes), left)
        if v > above:
            return v


def test_apply_get_items_and_versions(etcd_cluster: EtcdCluster) -> None:
    async def body(store: EtcdStore) -> None:
        assert await store.version() == 0
        first = await store.apply([svc("catalog"), svc("reviews")])
        assert first.version > 0
        assert [a[3] for a in first.actions] == ["created", "created"]
        assert {a[2] for a in first.actions} == {first.version}
        assert await store.version() == first.version

        again = await store.apply([svc("catalog"), svc("reviews")])
        assert again.version == first.version
        assert [a[3] for a in again.actions] == ["unchanged", "unchanged"]

        changed = await store.apply([svc("catalog", loadBalancer="p2c-ewma"), svc("reviews")])
        assert changed.version > first.version
        assert [(a[1], a[2], a[3]) for a in changed.actions] == [
            ("catalog", changed.version, "configured"),
            ("reviews", first.version, "unchanged"),
        ]
        got = await store.get("Service", "catalog")
        assert got is not None
        assert got.spec == {"loadBalancer": "p2c-ewma"}
        assert got.resource_version == changed.version
        assert await store.get("Service", "nope") is None
        await store.apply([Write(Resource("HTTPRoute", "r1", {"parentRefs": [{"name": "x"}]}))])
        assert [(r.kind, r.name) for r in await store.items()] == [
            ("HTTPRoute", "r1"),
            ("Service", "catalog"),
            ("Service", "reviews"),
        ]
        assert [r.name for r in await store.items("Service")] == ["catalog", "reviews"]

    run(with_store(etcd_cluster, body))


def test_stale_resource_version_conflicts_and_writes_nothing(etcd_cluster: EtcdCluster) -> None:
    async def body(store: EtcdStore) -> None:
        v1 = (await store.apply([svc("catalog")])).version
        with pytest.raises(Conflict, match="Service/catalog: resourceVersion 1 is stale"):
            await store.apply(
                [svc("fresh"), Write(svc("catalog", loadBalancer="p2c-ewma").resource, 1)]
            )
        assert await store.get("Service", "fresh") is None
        assert await store.version() == v1
        ok = await store.apply([Write(svc("catalog", loadBalancer="p2c-ewma").resource, v1)])
        assert ok.version > v1
        with pytest.raises(Conflict, match="does not exist"):
            await store.apply([Write(svc("ghost").resource, 7)])

    run(with_store(etcd_cluster, body))


def test_delete(etcd_cluster: EtcdCluster) -> None:
    async def body(store: EtcdStore) -> None:
        with pytest.raises(NotFound):
            await store.delete("Service", "catalog")
        v1 = (await store.apply([svc("catalog")])).version
        with pytest.raises(Conflict):
            await store.delete("Service", "catalog", expect_version=v1 + 100)
        v2 = await store.delete("Service", "catalog", expect_version=v1)
        assert v2 > v1
        assert await store.version() == v2  # a delete raises the version, never lowers it
        assert await store.items() == []

    run(with_store(etcd_cluster, body))


def test_lease_lapse_raises_the_version_once(etcd_cluster: EtcdCluster) -> None:
    prefix = unique_prefix()

    async def body(store: EtcdStore) -> None:
        changes = store.changes()
        watcher = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(0.2)
        v1 = await store.register(Registration("sc-1", "catalog", "127.0.0.1:20001"), ttl=1)
        assert await asyncio.wait_for(watcher, 5) == v1
        assert [r.sidecar for r in await store.registrations()] == ["sc-1"]
        # Nobody renews: etcd deletes the key, the watch sees it, the version goes up.
        v2 = await next_version(changes, v1, timeout=8)
        assert await store.registrations() == []
        assert await store.version() == v2
        with pytest.raises(NotFound):
            await store.renew("sc-1")
        snap = await store.snapshot()
        assert snap.version == v2
        assert snap.endpoints == {}

    run(with_store(etcd_cluster, body, prefix))

    # A second store on the same prefix agrees and does not bump again on start.
    async def again(store: EtcdStore) -> None:
        v = await store.version()
        changes = store.changes()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(changes), 1.0)
        assert await store.version() == v

    run(with_store(etcd_cluster, again, prefix))


def test_renew_keeps_a_registration(etcd_cluster: EtcdCluster) -> None:
    async def body(store: EtcdStore) -> None:
        await store.register(Registration("sc-1", "catalog", "127.0.0.1:20001"), ttl=1)
        for _ in range(8):
            await asyncio.sleep(0.3)
            assert await store.renew("sc-1") == 1.0
        regs = await store.registrations()
        assert [(r.sidecar, r.service, r.address, r.healthy) for r in regs] == [
            ("sc-1", "catalog", "127.0.0.1:20001", True)
        ]
        assert 0 <= regs[0].expires_in <= 1  # etcd counts whole seconds
        # Re-registering the same endpoint refreshes it without a new version.
        v = await store.version()
        assert await store.register(Registration("sc-1", "catalog", "127.0.0.1:20001"), 1) == v
        moved = await store.register(Registration("sc-1", "catalog", "127.0.0.1:20002"), 1)
        assert moved > v
        assert [r.address for r in await store.registrations()] == ["127.0.0.1:20002"]
        await store.deregister("sc-1")
        assert await store.version() > moved
        assert await store.registrations() == []
        await store.deregister("sc-1")  # already gone: no error

    run(with_store(etcd_cluster, body))


def test_health_and_static_endpoints_in_snapshot(etcd_cluster: EtcdCluster) -> None:
    async def body(store: EtcdStore) -> None:
        await store.apply(
            [svc("catalog", endpoints=[{"address": "127.0.0.1:9"}, {"address": "127.0.0.1:10"}])]
        )
        await store.register(Registration("sc-1", "catalog", "127.0.0.1:20001"), ttl=5)
        v = await store.version()
        await store.set_health("sc-1", True)  # no transition: no new version
        assert await store.version() == v
        await store.set_health("sc-1", False)
        v2 = await store.version()
        assert v2 > v
        await store.set_health(static_key("catalog", "127.0.0.1:9"), False)
        await store.set_health(static_key("catalog", "127.0.0.1:9"), False)
        v3 = await store.version()
        assert v3 == v2 + 1
        snap = await store.snapshot()
        assert snap.version == v3
        assert snap.down == frozenset({static_key("catalog", "127.0.0.1:9")})
        data = snap.to_json()
        assert data["endpoints"] == {"catalog": [{"address": "127.0.0.1:20001", "healthy": False}]}
        assert data["resources"][0]["spec"]["endpoints"] == [{"address": "127.0.0.1:10"}]
        await store.set_health(static_key("catalog", "127.0.0.1:9"), True)
        assert (await store.snapshot()).down == frozenset()
        with pytest.raises(NotFound):
            await store.set_health("nobody", False)
        # The lease survives a health write.
        await store.renew("sc-1")

    run(with_store(etcd_cluster, body))


def test_reports_do_not_raise_the_version(etcd_cluster: EtcdCluster) -> None:
    async def body(store: EtcdStore) -> None:
        await store.register(Registration("sc-1", "catalog", "127.0.0.1:20001"), ttl=5)
        v = await store.version()
        changes = store.changes()
        await store.report(SidecarStatus("sc-1", v, None, 123.0))
        await store.report(SidecarStatus("ghost", v, "bad config", 124.0))
        assert await store.version() == v
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(changes), 0.7)
        assert await store.statuses() == [SidecarStatus("sc-1", v, None, 123.0)]
        await store.deregister("sc-1")
        assert await store.statuses() == []

    run(with_store(etcd_cluster, body))


def test_two_stores_see_each_other(etcd_cluster: EtcdCluster) -> None:
    prefix = unique_prefix()

    async def body() -> None:
        a = EtcdStore(etcd_cluster.endpoints, prefix)
        b = EtcdStore(list(reversed(etcd_cluster.endpoints)), prefix)
        await a.open()
        await b.open()
        try:
            changes = b.changes()
            first = asyncio.ensure_future(anext(changes))
            await asyncio.sleep(0.2)
            v1 = (await a.apply([svc("catalog")])).version
            assert await asyncio.wait_for(first, 5) == v1
            got = await b.get("Service", "catalog")
            assert got is not None and got.resource_version == v1
            # Racing unconditional writers from both: each lands at its own version.
            results = await asyncio.gather(
                *(
                    s.apply([svc("catalog", loadBalancer=lb)])
                    for s, lb in ((a, "p2c-ewma"), (b, "least-request"))
                    for _ in range(3)
                )
            )
            versions = sorted(r.version for r in results if r.actions[0][3] != "unchanged")
            assert len(set(versions)) == len(versions)
            assert await a.version() == await b.version() == max(r.version for r in results)
            # Conditional writers: exactly one of two wins with the same resourceVersion.
            cur = await a.version()
            outcomes = await asyncio.gather(
                a.apply([Write(svc("catalog", loadBalancer="round-robin").resource, cur)]),
                b.apply([Write(svc("catalog", loadBalancer="p2c-ewma", x=1).resource, cur)]),
                return_exceptions=True,
            )
            assert sorted(type(o).__name__ for o in outcomes) == ["ApplyResult", "Conflict"]
        finally:
            await a.close()
            await b.close()

    run(body())


def test_fails_over_and_reports_unavailable(etcd_cluster: EtcdCluster) -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]

    async def body() -> None:
        store = EtcdStore([*dead, etcd_cluster.endpoints[1]], unique_prefix())
        await store.open()
        v = (await store.apply([svc("catalog")])).version
        assert await store.version() == v
        await store.close()
        nowhere = EtcdStore(dead, unique_prefix())
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="no endpoint answered"):
            await nowhere.open()
        assert time.monotonic() - t0 < 3
        await nowhere.close()

    run(body())


def test_lapse_while_no_control_runs_is_caught_up_and_bumped_once(
    etcd_cluster: EtcdCluster,
) -> None:
    prefix = unique_prefix()

    async def register(store: EtcdStore) -> int:
        return await store.register(Registration("sc-1", "catalog", "127.0.0.1:20001"), ttl=1)

    v1 = run(with_store(etcd_cluster, register, prefix))
    time.sleep(2.5)  # the lease lapses while no store is watching

    async def body() -> None:
        a = EtcdStore(etcd_cluster.endpoints, prefix)
        b = EtcdStore(etcd_cluster.endpoints[::-1], prefix)
        await a.open()
        await b.open()
        try:
            assert await a.version() == v1  # nobody has counted the lapse yet
            ca, cb = a.changes(), b.changes()
            va, vb = await next_version(ca, v1), await next_version(cb, v1)
            assert va == vb > v1
            await asyncio.sleep(0.5)
            assert await a.version() == va  # both saw the lapse; only one raised the version
            assert (await b.snapshot()).endpoints == {}
        finally:
            await a.close()
            await b.close()

    run(body())
