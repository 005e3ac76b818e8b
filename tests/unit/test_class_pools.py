"""Per-class pools: layout by class, per-class limits, reload (no I/O: a fake transport)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from meshlayer.config import load_documents
from meshlayer.config.model import DEFAULT_PRIORITY_CLASSES, CircuitBreaker, Endpoint, PriorityClass
from meshlayer.config.priority import by_rank
from meshlayer.proxy.balancer import EndpointState
from meshlayer.proxy.classes import ClassTable
from meshlayer.proxy.netmarks import SocketMarks
from meshlayer.proxy.pool import (
    CONNECT,
    FIFO,
    IDLE,
    OVERFLOW,
    WAIT,
    ClassPools,
    ServicePool,
    layout_view,
    pool_layout,
)
from meshlayer.proxy.runtime import Router
from meshlayer.proxy.upstream import UpstreamConnection

DEFAULTS = {c.name: c for c in DEFAULT_PRIORITY_CLASSES}
EP = EndpointState(Endpoint("127.0.0.1", 9, meshed=False))


class _Transport:
    """Stands in for the kernel's side: closing it reports the loss like asyncio does."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.conn.connection_lost(None)

    abort = close

    def write(self, data: bytes) -> None:
        raise AssertionError("these tests send nothing")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _connect(pool: ServicePool) -> UpstreamConnection:
    plan, conn = pool.checkout(EP)
    assert plan == CONNECT and conn is None
    conn = UpstreamConnection(pool, EP)
    conn.connection_made(_Transport(conn))
    return conn


@pytest.fixture
def ordered() -> Iterator[list[PriorityClass]]:
    yield by_rank(DEFAULTS.values())


def test_layout_follows_the_class_table(ordered: list[PriorityClass]) -> None:
    table = ClassTable(DEFAULTS)
    layout = pool_layout(ordered)
    assert [name for name, _ in layout] == [c.name for c in table.ordered]
    assert layout[table.by_name["critical"].index] == ("critical", SocketMarks(46, 6, None))
    assert layout[table.by_name["default"].index] == ("default", None)  # kernel defaults
    assert layout[table.by_name["batch"].index] == ("batch", SocketMarks(8, 1, None))
    fifo = pool_layout(ordered, fifo=True)
    assert fifo == [(FIFO, None)] * 3  # one pool, the default class's (no) marks
    marked = {**DEFAULTS, "default": PriorityClass("default", 50, dscp=18, so_priority=2)}
    assert set(pool_layout(by_rank(marked.values()), fifo=True)) == {
        (FIFO, SocketMarks(18, 2, None))
    }
    view = layout_view(ordered)
    assert view["mode"] == "on"
    assert view["classes"][0]["marks"] == {  # type: ignore[index]
        "dscp": 46,
        "tos": "0xb8",
        "soPriority": 6,
        "congestionControl": None,
    }


def test_limits_bound_each_class_pool(ordered: list[PriorityClass]) -> None:
    group = ClassPools(CircuitBreaker(max_connections=1, max_pending=1))
    group.set_classes(ordered)
    critical, _default, batch = group.pools
    busy = _connect(batch)
    assert batch.checkout(EP) == (WAIT, None)
    batch.pending.append(lambda conn: None)
    assert batch.checkout(EP) == (OVERFLOW, None)
    # batch's pool is full and has a waiter: critical still gets a connection of its own
    mine = _connect(critical)
    assert group.connections == 2
    critical.release(mine)
    assert critical.checkout(EP) == (IDLE, mine)
    got: list[UpstreamConnection | None] = []
    batch.pending.clear()
    batch.pending.append(got.append)
    batch.release(busy)  # a waiter of its own class gets it
    assert got == [busy]


def test_priority_off_is_one_pool(ordered: list[PriorityClass]) -> None:
    group = ClassPools(CircuitBreaker(max_connections=1, max_pending=0))
    group.set_classes(ordered, fifo=True)
    assert len(group.distinct) == 1 and all(p is group.pools[0] for p in group.pools)
    _connect(group.pools[2])
    assert group.pools[0].checkout(EP) == (OVERFLOW, None)  # critical waits behind batch


def test_reload_keeps_unchanged_classes_and_retires_the_rest(
    ordered: list[PriorityClass],
) -> None:
    group = ClassPools(CircuitBreaker())
    group.set_classes(ordered)
    critical, default, batch = group.pools
    busy = _connect(batch)
    idle = _connect(batch)
    batch.release(idle)
    changed = {
        **DEFAULTS,
        "batch": PriorityClass("batch", 10, dscp=1, so_priority=1),  # new marks
        "gold": PriorityClass("gold", 75, dscp=34),
    }
    group.set_classes(by_rank(changed.values()))
    assert [p.name for p in group.pools] == ["critical", "gold", "default", "batch"]
    assert group.pools[0] is critical and group.pools[2] is default
    assert group.pools[3] is not batch and group.pools[3].marks == SocketMarks(1, 1, None)
    assert batch.retired and group.retired == [batch]
    assert idle.closed and not busy.closed  # idle closed now, busy when its exchange ends
    batch.release(busy)
    assert busy.closed and batch.connections == 0
    group.sweep(0.0)
    assert group.retired == [] and group.connections == 0


def test_router_lays_out_kept_runtimes_again() -> None:
    text = (
        "apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: web}\n"
        "spec: {endpoints: [{address: '127.0.0.1:9'}]}\n"
    )
    first = Router(load_documents(text, "a"))
    rt = first.services["web"]
    assert [p.name for p in rt.pools] == ["critical", "default", "batch"]
    pools = rt.pools
    gold = "---\napiVersion: meshlayer/v1\nkind: PriorityClass\nmetadata: {name: gold}\n"
    second = Router(load_documents(text + gold + "spec: {rank: 75}\n", "b"), first)
    assert second.services["web"] is rt and rt.pools is pools  # same list, laid out again
    assert [p.name for p in rt.pools] == ["critical", "gold", "default", "batch"]
    fifo = Router(load_documents(text, "c"), fifo=True)
    assert [p.name for p in fifo.services["web"].pools] == [FIFO] * 3
    assert Router(load_documents(text, "d"), fifo).fifo


def test_literal_addresses_skip_the_resolver() -> None:
    from meshlayer.proxy.pool import _literal_family

    assert _literal_family("127.0.0.1") == socket.AF_INET
    assert _literal_family("::1") == socket.AF_INET6
    assert _literal_family("catalog.internal") is None


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_remark_changes_an_established_socket_and_back(family: int) -> None:
    """The response direction: an accepted socket is re-marked per class, and None
    (the kernel's defaults) restores the default congestion control by name."""
    from dataclasses import replace

    from meshlayer.proxy.netmarks import default_congestion_control, read_marks, remark

    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    try:
        listener = socket.create_server((host, 0), family=family)
    except OSError:
        pytest.skip(f"no {host}")
    with listener, socket.create_connection(listener.getsockname()[:2]) as client:
        sock, _ = listener.accept()
        with sock:
            kernel = read_marks(sock)
            assert kernel.dscp == 0 and kernel.so_priority == 0
            assert kernel.congestion_control == default_congestion_control()
            batch = replace(DEFAULTS["batch"], congestion_control="reno")
            remark(sock, None, batch)
            assert read_marks(sock) == SocketMarks(8, 1, "reno")
            remark(sock, batch, DEFAULTS["critical"])
            assert read_marks(sock) == SocketMarks(46, 6, kernel.congestion_control)
            remark(sock, DEFAULTS["critical"], None)
            assert read_marks(sock) == kernel
            sock.sendall(b"still a working socket")
            assert client.recv(100) == b"still a working socket"
