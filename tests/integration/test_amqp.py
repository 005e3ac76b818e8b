"""meshlayer.amqp against a real RabbitMQ broker (tests/support/rabbitmq.py).

One broker serves the session; each test uses its own queues. The boot is
paid once, 3 s on an idle 2-core machine (up to ~9 s under load) with ~4 s of
tests after it, so the module is marked slow. Publishers use confirm mode,
so a publish returns only once the broker has queued the message, and
ordering assertions do not race the broker. Every consume loop is bounded by
a deadline. Queue depths are read on one probe channel per test (a passive
``queue_declare``), not on a new connection per look.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from meshlayer import amqp
from meshlayer import propagation as p
from tests.support.procs import Cluster
from tests.support.rabbitmq import Broker, unique_queue

pytestmark = pytest.mark.slow


@pytest.fixture
def conn(rabbitmq: Broker) -> Iterator[Any]:
    c = rabbitmq.connect()
    try:
        yield c
    finally:
        if c.is_open:
            c.close()


@pytest.fixture
def probe(rabbitmq: Broker) -> Iterator[Any]:
    """A channel on a connection of its own, to look at queues while ``conn`` consumes."""
    c = rabbitmq.connect()
    try:
        yield c.channel()
    finally:
        if c.is_open:
            c.close()


def _channel(conn: Any, name: str | None = None, **declare: Any) -> tuple[Any, str]:
    """A confirm-mode channel and a fresh (non-durable) priority queue."""
    ch = conn.channel()
    ch.confirm_delivery()
    q = name or unique_queue()
    declare.setdefault("durable", False)
    amqp.declare_queue(ch, q, **declare)
    return ch, q


def _run(conn: Any, done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Drive ``conn``'s I/O (and so the consumers' handlers) until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumer not done after {timeout}s")
        conn.process_data_events(time_limit=0.05)


def _ready(probe: Any, q: str) -> int:
    """Messages ready in ``q`` (not delivered), asked on the probe channel."""
    return int(probe.queue_declare(q, passive=True).method.message_count)


def test_critical_backlog_goes_first(conn: Any) -> None:
    ch, q = _channel(conn)
    for i in range(40):
        amqp.publish(ch, q, f"batch-{i}", priority_class="batch")
    for i in range(10):
        amqp.publish(ch, q, f"default-{i}", priority_class="default")
    for i in range(5):
        amqp.publish(ch, q, f"critical-{i}", priority_class="critical")

    got: list[str] = []
    amqp.consume(conn.channel(), q, lambda d: got.append(d.body.decode()), prefetch=1)
    _run(conn, lambda: len(got) == 55)

    want = (
        [f"critical-{i}" for i in range(5)]
        + [f"default-{i}" for i in range(10)]
        + [f"batch-{i}" for i in range(40)]
    )
    assert got == want  # by class, and FIFO within a class


def test_critical_published_mid_backlog_overtakes_it(rabbitmq: Broker, conn: Any) -> None:
    """With prefetch 1 a critical message published mid-backlog is the next one handled."""
    ch, q = _channel(conn)
    for i in range(20):
        amqp.publish(ch, q, f"batch-{i}", priority_class="batch")
    late = rabbitmq.connect()
    late_ch = late.channel()
    late_ch.confirm_delivery()
    got: list[str] = []

    def handle(d: amqp.Delivery) -> None:
        got.append(d.body.decode())
        if len(got) == 3:  # the batch worker is busy: two critical jobs arrive
            for i in range(2):
                amqp.publish(late_ch, q, f"critical-{i}", priority_class="critical")

    try:
        amqp.consume(conn.channel(), q, handle, prefetch=1)
        _run(conn, lambda: len(got) == 22)
    finally:
        late.close()
    # Prefetch 1: the only message out is the one being handled, so the next ones
    # delivered are the critical ones; with a larger prefetch batch-3.. would be out already.
    assert got[:5] == ["batch-0", "batch-1", "batch-2", "critical-0", "critical-1"]
    assert got[5:] == [f"batch-{i}" for i in range(3, 20)]


def test_class_travels_in_headers_and_is_restored_for_the_handler(
    conn: Any, cluster: Cluster
) -> None:
    up = cluster.upstream()
    ch, q = _channel(conn)
    token = p.set_priority("critical")  # as PriorityMiddleware does while serving a request
    try:
        assert amqp.publish(ch, q, b"from-request") == "critical"
    finally:
        p.reset_priority(token)
    assert amqp.publish(ch, q, b"explicit", priority_class="batch") == "batch"
    # A message from a publisher that sets only the AMQP priority (no header).
    ch.basic_publish("", q, b"bare", pika.BasicProperties(priority=9))

    session = p.requests_session()
    session.trust_env = False
    seen: dict[str, tuple[str | None, str | None, str | None, int | None]] = {}

    def handle(d: amqp.Delivery) -> None:
        # The call the handler makes carries the message's class to the next service.
        r = session.get(f"http://127.0.0.1:{up.port}/headers", timeout=5)
        sent = {k: v for k, v in r.json()["headers"]}
        seen[d.body.decode()] = (
            p.current_priority(),
            sent.get(p.HEADER),
            d.headers.get(p.HEADER),
            d.priority,
        )

    amqp.consume(conn.channel(), q, handle)
    _run(conn, lambda: len(seen) == 3)
    assert seen["from-request"] == ("critical", "critical", "critical", 9)
    assert seen["explicit"] == ("batch", "batch", "batch", 1)
    assert seen["bare"] == ("critical", "critical", None, 9)
    assert p.current_priority() is None  # the class does not leak out of the handler


def test_publisher_outside_a_request_uses_default_class(conn: Any) -> None:
    ch, q = _channel(conn)
    assert p.current_priority() is None
    assert amqp.publish(ch, q, b"cron", headers={"x-meshlayer-priority": "critical"}) == "default"
    # Our headers passed in are replaced (class) or dropped (a new message has not failed).
    assert amqp.publish(ch, q, b"fresh", headers={amqp.FAILURES_HEADER: 1, "app": "x"}) == (
        "default"
    )
    custom = {"gold": 8, "default": 3, "batch": 0}
    assert amqp.publish(ch, q, b"custom", priority_class="gold", priorities=custom) == "gold"
    assert amqp.publish(ch, q, b"unknown", priority_class="silver", priorities=custom) == "silver"

    got = {}
    headers = {}
    for _ in range(4):
        _, props, body = ch.basic_get(q, auto_ack=True)
        got[body.decode()] = (props.priority, props.headers[p.HEADER], props.delivery_mode)
        headers[body.decode()] = props.headers
    # Highest priority first: gold 8, then default 5 (FIFO), then the unknown class at 3.
    assert list(got) == ["custom", "cron", "fresh", "unknown"]
    assert headers["fresh"] == {p.HEADER: "default", "app": "x"}
    assert got["cron"] == (5, "default", 2)  # a header passed in cannot promote the message
    assert got["custom"] == (8, "gold", 2)
    assert got["unknown"] == (3, "silver", 2)


def test_queue_is_declared_with_max_priority(rabbitmq: Broker, conn: Any) -> None:
    ttl = {"x-message-ttl": 60000}
    ch, q = _channel(conn, max_priority=7, arguments=ttl)
    listing = rabbitmq.ctl("list_queues", "name", "arguments")
    args = dict(line.split("\t", 1) for line in listing.splitlines() if "\t" in line)
    assert '{"x-max-priority",7}' in args[q]
    assert '{"x-message-ttl",60000}' in args[q]
    amqp.declare_queue(ch, q, max_priority=7, durable=False, arguments=ttl)  # same: fine
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        amqp.declare_queue(ch, q, max_priority=10, durable=False, arguments=ttl)
    assert err.value.reply_code == 406  # PRECONDITION_FAILED: inequivalent x-max-priority


@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetch_bounds_unacked_messages(conn: Any, probe: Any, prefetch: int) -> None:
    ch, q = _channel(conn)
    total = 12
    for i in range(total):
        amqp.publish(ch, q, str(i), priority_class="batch")
    handled: list[int] = []
    low_water: list[int] = []

    def handle(d: amqp.Delivery) -> None:
        # The broker has sent what prefetch allows; wait until it settles, then hold a while.
        want = max(0, total - len(handled) - prefetch)
        ready = _ready(probe, q)
        deadline = time.monotonic() + 5
        while ready > want and time.monotonic() < deadline:
            time.sleep(0.02)
            ready = _ready(probe, q)
        if len(handled) in (0, total // 2):
            time.sleep(0.2)
            ready = min(ready, _ready(probe, q))
        low_water.append(ready)
        handled.append(int(d.body))

    amqp.consume(conn.channel(), q, handle, prefetch=prefetch)
    _run(conn, lambda: len(handled) == total, timeout=30)
    assert handled == list(range(total))
    # Out (delivered, unacked) = total - handled - ready <= prefetch at every delivery.
    assert low_water == [max(0, total - i - prefetch) for i in range(total)]


def test_failing_handler_is_retried_once_then_dead_lettered(
    rabbitmq: Broker, conn: Any, probe: Any
) -> None:
    _, dead = _channel(conn)
    dlx = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead}
    ch, q = _channel(conn, arguments=dlx)
    amqp.publish(ch, q, b"poison", priority_class="critical")
    amqp.publish(ch, q, b"fine", priority_class="batch")
    calls: list[tuple[str, int, str | None]] = []

    def handle(d: amqp.Delivery) -> None:
        calls.append((d.body.decode(), d.failures, p.current_priority()))
        if d.body == b"poison":
            raise RuntimeError("cannot process")

    amqp.consume(conn.channel(), q, handle)
    _run(conn, lambda: len(calls) == 3)
    conn.process_data_events(time_limit=0.3)  # a wrongly retried poison would come back
    assert calls == [
        ("poison", 0, "critical"),
        ("poison", 1, "critical"),  # retried at its priority: ahead of the batch message
        ("fine", 0, "batch"),
    ]
    assert _ready(probe, q) == 0
    rows = rabbitmq.ctl("list_queues", "name", "messages_unacknowledged").splitlines()
    assert f"{q}\t0" in rows
    # The second failure nacked it without requeue: the broker dead-lettered it.
    _, props, body = probe.basic_get(dead, auto_ack=True)
    assert body == b"poison"
    assert props.headers[amqp.FAILURES_HEADER] == 1
    assert props.priority == 9


def test_redelivery_after_a_lost_consumer_still_gets_its_retry(
    rabbitmq: Broker, conn: Any, probe: Any
) -> None:
    """``redelivered`` is no failure count: a message whose first consumer went away
    unacked, and whose first real handling then fails, is tried again."""
    ch, q = _channel(conn)
    amqp.publish(ch, q, b"job", priority_class="default")
    lost = rabbitmq.connect()
    assert lost.channel().basic_get(q, auto_ack=False)[2] == b"job"
    lost.close()  # unacked: the broker takes the message back, flagged redelivered

    calls: list[tuple[bool, int]] = []

    def flaky(d: amqp.Delivery) -> None:
        calls.append((d.redelivered, d.failures))
        if len(calls) == 1:
            raise ConnectionError("the mail server hung up")

    amqp.consume(conn.channel(), q, flaky)
    _run(conn, lambda: len(calls) == 2, timeout=5)
    assert calls == [(True, 0), (False, 1)]
    conn.process_data_events(time_limit=0.2)
    assert len(calls) == 2
    assert _ready(probe, q) == 0
