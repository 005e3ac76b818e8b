"""Carry a request's priority class into RabbitMQ, and back out of it.

Theory of operation: where a service hands work to a queue instead of calling
another service, the sidecars no longer see it; the class has to travel with
the message and the broker has to honour it. Three helpers do that over a
pika channel (``pika.BlockingConnection(...).channel()``; the callback-style
channel of pika's other adapters takes the same calls):

- :func:`declare_queue` declares the queue with ``x-max-priority`` (10 by
  default). Only such a *priority queue* orders messages by priority: RabbitMQ
  keeps one sub-queue per priority level and always delivers from the highest
  non-empty one. The argument is fixed when the queue is first declared; a
  re-declaration with another value fails with PRECONDITION_FAILED.
- :func:`publish` resolves the message's class (the ``priority_class``
  argument, else the class of the request being served, which
  :mod:`meshlayer.propagation`'s middleware put in its context variable, else
  ``default``), sets the AMQP ``priority`` property from it and carries the
  class itself in the ``x-meshlayer-priority`` message header, so the consumer
  gets the name and not just a number.
- :func:`consume` subscribes with manual acks and ``basic_qos(prefetch)``.
  That limit is what makes priority take effect: a consumer that takes
  everything (auto-ack, or no prefetch limit) drains the queue into its own
  buffer at once, and the broker has nothing left to order. With a prefetch
  of N, at most N messages are out (delivered, not yet acked); the rest wait
  in the broker, where a critical message published later overtakes the
  batch backlog. While the handler runs, the message's class is the current
  class of :mod:`meshlayer.propagation`, so the HTTP calls it makes through
  the propagation hooks (and messages it publishes) carry the class onward.

Class → AMQP priority: by rank among the known classes, highest rank highest
priority. :data:`DEFAULT_PRIORITIES` maps the shipped classes (critical 9,
default 5, batch 1); :func:`priorities_by_rank` spreads any set of classes
over 1..9 the same way; every helper takes a ``priorities`` dict to override.
A class missing from the map gets the priority of ``default`` (never more), so
an unknown name cannot promote a message. A consumer that receives a message
without the header (from a publisher that does not use these helpers) takes
the class whose priority is the highest not above the message's.

Acks and failures: the handler's return acks the message. An exception is
logged and consuming goes on; what happens to the message is the requeue
policy. ``"once"`` (the default) counts the handler's failures in the message
header ``x-meshlayer-failures``: on the first failure the message is published
again to the same queue (default exchange, routing key = queue, same
properties and priority, the header set to 1) and the delivery acked; on a
failure of a message whose header is already 1 it is nacked without requeue,
so the broker drops it, or dead-letters it when the queue has
``x-dead-letter-exchange``. The count is not the broker's ``redelivered``
flag, which is also set when a consumer died or lost its connection before
acking: such a message still gets its retry. The retried copy goes to the
back of its priority level: on a blocking channel it is confirmed (on a side
channel of the connection) before the delivery is acked, so it is queued
before the freed prefetch slot lets a message of a lower class out.
``"always"`` nacks with requeue every time (a poison message then loops),
``"never"`` nacks without requeue at once.

Threads and heartbeats: handlers run on the thread that drives the
connection's I/O (``start_consuming`` / ``process_data_events``), so while
one runs, a ``BlockingConnection`` neither sends nor reads heartbeats. A
handler that runs longer than the heartbeat timeout (RabbitMQ proposes 60 s)
gets its connection closed by the broker, and the unacked message is handed
out again. Give such workers ``pika.ConnectionParameters(heartbeat=N)`` with N
above the longest handler (pika's integer overrides the broker's proposal;
0 turns heartbeats off, so a dead peer goes unnoticed).

pika is an optional dependency (``pip install meshlayer[amqp]``); it is
imported only when a message is published (or a failed one retried), so this
module imports without it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from meshlayer.propagation import (
    HEADER,
    current_priority,
    reset_priority,
    set_priority,
    valid_class,
)

log = logging.getLogger("meshlayer.amqp")

DEFAULT_CLASS = "default"
"""The class of a message published outside any request."""
DEFAULT_PRIORITIES: Mapping[str, int] = {"critical": 9, "default": 5, "batch": 1}
"""AMQP priority of the shipped classes (rank order critical > default > batch)."""
MAX_PRIORITY = 10
"""The ``x-max-priority`` that :func:`declare_queue` declares unless told."""
FAILURES_HEADER = "x-meshlayer-failures"
"""Message header: how many times a :func:`consume` handler failed on the message."""
_RESERVED = {
    "priority": "set from the message's class (pass priority_class= or priorities=)",
    "delivery_mode": "set by persistent= (persistent=False gives mode 1)",
}

Requeue = Literal["once", "always", "never"]


class SupportsRank(Protocol):
    """Anything with a ``rank`` (e.g. ``meshlayer.config.model.PriorityClass``)."""

    @property
    def rank(self) -> int: ...


@dataclass(frozen=True)
class Delivery:
    """One message handed to a :func:`consume` handler."""

    body: bytes
    """The message body."""
    priority_class: str | None
    """The message's class (header, else derived from ``priority``); current while handled."""
    priority: int | None
    """The AMQP priority property as received."""
    headers: Mapping[str, Any] = field(default_factory=dict)
    """The message headers (``x-meshlayer-priority`` among them)."""
    redelivered: bool = False
    """True when the broker delivered this message before (requeued, or its consumer died)."""
    failures: int = 0
    """How many times a handler failed on this message before (``x-meshlayer-failures``)."""
    routing_key: str = ""
    """The routing key it was published with (the queue name via the default exchange)."""
    properties: Any = None
    """pika's ``BasicProperties`` of the message (correlation id, reply-to, ...)."""


Handler = Callable[[Delivery], object]


def priorities_by_rank(
    classes: Mapping[str, int] | Mapping[str, SupportsRank], low: int = 1, high: int = 9
) -> dict[str, int]:
    """AMQP priorities for ``classes`` (name → rank, or → an object with ``.rank``).

    Distinct ranks are spread evenly from ``high`` (highest rank) down to
    ``low``; equal ranks share a priority. The shipped classes give
    :data:`DEFAULT_PRIORITIES`. ``{n: c.rank for n, c in mesh.priority_classes.items()}``
    or the dict of ``PriorityClass`` itself both work.
    """
    if not 0 <= low <= high <= 255:
        raise ValueError(f"priorities: need 0 <= low <= high <= 255, got {low}..{high}")
    ranks = {name: v if isinstance(v, int) else v.rank for name, v in classes.items()}
    levels = sorted(set(ranks.values()), reverse=True)
    if len(levels) <= 1:
        return dict.fromkeys(ranks, high)
    span = high - low
    at = {r: high - round(span * i / (len(levels) - 1)) for i, r in enumerate(levels)}
    return {name: at[r] for name, r in ranks.items()}


def priority_for(cls: str, priorities: Mapping[str, int] | None = None) -> int:
    """The AMQP priority of class ``cls``; an unknown class gets ``default``'s (or the lowest)."""
    table = DEFAULT_PRIORITIES if priorities is None else priorities
    if not table:
        raise ValueError("priorities: empty class → priority map")
    if cls in table:
        return table[cls]
    if DEFAULT_CLASS in table:
        return table[DEFAULT_CLASS]
    return min(table.values())


def class_for_priority(
    priority: int | None, priorities: Mapping[str, int] | None = None
) -> str | None:
    """The class of a message that carries only an AMQP priority, or None without one.

    The class with the highest priority not above ``priority``; below them all,
    the lowest class.
    """
    table = DEFAULT_PRIORITIES if priorities is None else priorities
    if priority is None or not table:
        return None
    ordered = sorted(table.items(), key=lambda kv: kv[1], reverse=True)
    for name, p in ordered:
        if p <= priority:
            return name
    return ordered[-1][0]


def declare_queue(
    channel: Any,
    name: str,
    max_priority: int = MAX_PRIORITY,
    *,
    arguments: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Declare priority queue ``name`` (``x-max-priority: max_priority``) on ``channel``.

    ``arguments`` adds queue arguments (e.g. ``x-dead-letter-exchange``);
    ``kwargs`` go to ``channel.queue_declare`` (``durable`` defaults to True;
    ``exclusive``, ``auto_delete``, and ``callback`` on pika's callback-style
    channels). Returns what ``queue_declare`` returns.

    Raises:
        ValueError: ``max_priority`` outside 1..255 (RabbitMQ's range; it
            advises at most 10, each level costs the broker a sub-queue).
    """
    if not 1 <= max_priority <= 255:
        raise ValueError(f"max_priority: must be 1..255, got {max_priority}")
    args = dict(arguments or {})
    args["x-max-priority"] = max_priority
    kwargs.setdefault("durable", True)
    return channel.queue_declare(queue=name, arguments=args, **kwargs)


def publish(
    channel: Any,
    queue: str,
    body: bytes | str,
    priority_class: str | None = None,
    headers: Mapping[str, Any] | None = None,
    *,
    exchange: str = "",
    priorities: Mapping[str, int] | None = None,
    persistent: bool = True,
    **properties: Any,
) -> str:
    """Publish ``body`` to ``queue`` at the priority of its class; returns the class.

    The class is ``priority_class``, else the current request's
    (:func:`meshlayer.propagation.current_priority`), else ``default``. The
    message gets ``priority`` from ``priorities`` (default
    :data:`DEFAULT_PRIORITIES`) and the header ``x-meshlayer-priority: <class>``
    (replacing one in ``headers``). ``exchange`` defaults to the default
    exchange, where ``queue`` is the routing key. ``persistent`` sets delivery
    mode 2 (kept across a broker restart on a durable queue). Other keyword
    arguments are ``pika.BasicProperties`` fields (``correlation_id``,
    ``reply_to``, ``content_type``, ...). A ``x-meshlayer-failures`` header in
    ``headers`` is dropped: a new message has not failed yet.

    Raises:
        ValueError: ``priority_class`` is not a valid class name, or
            ``properties`` names ``priority`` or ``delivery_mode`` (set here).
    """
    if priority_class is not None:
        cls = valid_class(priority_class)
        if cls is None:
            raise ValueError(f"priority_class: not a class name: {priority_class!r}")
    else:
        cls = current_priority() or DEFAULT_CLASS
    for name, why in _RESERVED.items():
        if name in properties:
            raise ValueError(f"{name}: {why}, not a property argument")
    priority = priority_for(cls, priorities)

    import pika  # optional dependency: only once the arguments are known to be good

    ours = (HEADER, FAILURES_HEADER)
    hdrs = {k: v for k, v in (headers or {}).items() if k.lower() not in ours}
    hdrs[HEADER] = cls
    props = pika.BasicProperties(
        headers=hdrs,
        priority=priority,
        delivery_mode=2 if persistent else 1,
        **properties,
    )
    data = body.encode() if isinstance(body, str) else body
    channel.basic_publish(exchange=exchange, routing_key=queue, body=data, properties=props)
    return cls


def consume(
    channel: Any,
    queue: str,
    handler: Handler,
    prefetch: int = 1,
    *,
    requeue: Requeue = "once",
    priorities: Mapping[str, int] | None = None,
    consumer_tag: str | None = None,
) -> str:
    """Subscribe ``handler`` to ``queue`` with manual acks and at most ``prefetch`` unacked.

    Each message becomes a :class:`Delivery`; its class is the current class
    (:func:`meshlayer.propagation.current_priority`) while ``handler`` runs. A
    return acks the message; an exception is logged and the message retried
    or dropped per ``requeue`` (see the module doc). Returns the consumer tag; the
    caller runs the channel's loop (``channel.start_consuming()`` on a
    blocking channel, or ``connection.process_data_events(...)``).

    ``prefetch`` is per consumer (``basic_qos`` on the channel): 1 gives the
    strictest priority order, larger values more throughput per round trip.

    Raises:
        ValueError: ``prefetch`` < 1 (0 would mean unlimited, which defeats priority).
    """
    if prefetch < 1:
        raise ValueError(f"prefetch: must be >= 1, got {prefetch}")
    if requeue not in ("once", "always", "never"):
        raise ValueError(f"requeue: must be 'once', 'always' or 'never', got {requeue!r}")
    channel.basic_qos(prefetch_count=prefetch)
    side: list[Any] = []  # the confirm-mode channel for retry copies, opened when first needed

    def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
        delivery = _delivery(method, props, body, priorities)
        token = set_priority(delivery.priority_class)
        try:
            handler(delivery)
        except Exception:
            failures = delivery.failures + 1
            retry = requeue == "always" or (requeue == "once" and failures == 1)
            log.exception(
                "amqp handler failed on %s (class %s, failure %d); %s",
                queue,
                delivery.priority_class,
                failures,
                "retry" if retry else "drop (or dead-letter)",
            )
            if requeue == "once" and retry:
                _retry(ch, side, queue, method, props, body, failures)
            else:
                ch.basic_nack(delivery_tag=method.delivery_tag, requeue=retry)
            return
        finally:
            reset_priority(token)
        ch.basic_ack(delivery_tag=method.delivery_tag)

    tag: str = channel.basic_consume(
        queue=queue, on_message_callback=on_message, auto_ack=False, consumer_tag=consumer_tag
    )
    return tag


def _retry(
    ch: Any, side: list[Any], queue: str, method: Any, props: Any, body: bytes, failures: int
) -> None:
    """Publish a copy that counts ``failures`` to ``queue``, then ack the delivery.

    The copy goes out before the ack, so a crash in between duplicates the
    message rather than losing it. The broker's queue handles an ack ahead of
    a publish still in its mailbox, so an ack right behind the publish could
    free the consumer's prefetch slot for a message of a lower class first: on
    a blocking channel the copy is published with a confirm (on a side channel
    of the same connection), and so is queued before the ack is sent. If the
    copy cannot be published (or routed: the queue is gone), the delivery is
    requeued as it is.
    """
    again = copy.copy(props)
    again.headers = {**(props.headers or {}), FAILURES_HEADER: failures}
    try:
        _confirming(ch, side).basic_publish(
            exchange="", routing_key=queue, body=body, properties=again, mandatory=True
        )
    except Exception:
        log.exception("amqp: cannot publish the retry of a message on %s; requeue it", queue)
        ch.basic_nack(delivery_tag=method.delivery_tag, requeue=True)
        return
    ch.basic_ack(delivery_tag=method.delivery_tag)


def _confirming(ch: Any, side: list[Any]) -> Any:
    """A confirm-mode channel beside blocking channel ``ch``; ``ch`` itself for others."""
    from pika.adapters.blocking_connection import BlockingChannel

    if not isinstance(ch, BlockingChannel):
        return ch  # callback-style: no blocking wait for a confirm here
    if not side or not side[0].is_open:
        c = ch.connection.channel()
        c.confirm_delivery()
        side[:] = [c]
    return side[0]


def _failures(raw: object) -> int:
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    try:
        return max(0, int(raw)) if isinstance(raw, int | str) else 0
    except ValueError:
        return 0


def _delivery(
    method: Any, props: Any, body: bytes, priorities: Mapping[str, int] | None
) -> Delivery:
    headers: dict[str, Any] = dict(props.headers or {})
    raw = headers.get(HEADER)
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    cls = valid_class(raw) if isinstance(raw, str) else None
    if cls is None:
        cls = class_for_priority(props.priority, priorities)
    return Delivery(
        body=body,
        priority_class=cls,
        priority=props.priority,
        headers=headers,
        redelivered=bool(method.redelivered),
        failures=_failures(headers.get(FAILURES_HEADER)),
        routing_key=str(method.routing_key),
        properties=props,
    )
