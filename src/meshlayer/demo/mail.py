"""The demo's emails: checkout publishes them to RabbitMQ, the email worker sends them.

Theory of operation: checkout hands each order confirmation to the queue
:data:`QUEUE` instead of calling a mailer, so no sidecar sees that hop; the
class travels with the message instead (:mod:`meshlayer.amqp`). The queue is
a priority queue (``x-max-priority``), :class:`Outbox` publishes at the
priority of the request being served (a shopper's order ``critical``, a
back-office reorder ``batch``), and :class:`Mailer` consumes with manual acks
and a prefetch of one, so when the worker falls behind the broker holds the
backlog and hands out the highest priority first: a shopper's confirmation
overtakes a thousand reorder emails.

Each message carries the time it was published; the worker measures how long
it waited in the queue, by class, and serves its counts on ``GET /stats``.

pika's blocking connection is not thread-safe: the outbox (called from many
request threads) publishes under a lock on one connection and reconnects
after an error; the mailer's connection lives in its own thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

from meshlayer import amqp

QUEUE = "emails"
"""The queue checkout publishes to and the email worker consumes."""
KEEP = 4096
"""Queue waits kept per class for the percentiles."""

log = logging.getLogger("meshlayer.demo.mail")


def _connect(url: str) -> Any:
    import pika

    params = pika.URLParameters(url)
    params.heartbeat = 0  # a blocking connection's heartbeats need its loop; none here
    params.connection_attempts = 3
    params.retry_delay = 0.5
    return pika.BlockingConnection(params)


class Outbox:
    """Publishes emails to :data:`QUEUE` at the current request's priority."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._conn: Any = None
        self._channel: Any = None

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self.close()
            self._conn = _connect(self.url)
            self._channel = self._conn.channel()
            amqp.declare_queue(self._channel, QUEUE, durable=False)
        return self._channel

    def send(self, message: dict[str, Any], priority_class: str) -> bool:
        """Queue ``message`` (JSON) as ``priority_class``; False when the broker is away."""
        body = json.dumps(message, separators=(",", ":"))
        with self._lock:
            for attempt in (1, 2):
                try:
                    amqp.publish(self._open(), QUEUE, body, priority_class, persistent=False)
                    return True
                except Exception as e:  # pika's errors have no common root worth naming
                    log.warning("publish failed (attempt %d): %r", attempt, e)
                    self.close()
        return False

    def close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


class Mailer:
    """The email worker: consumes :data:`QUEUE`, "sends" each email in ``work`` seconds."""

    def __init__(self, url: str, work: float, prefetch: int = 1) -> None:
        self.url = url
        self.work = work
        self.prefetch = prefetch
        self._lock = threading.Lock()
        self.sent: dict[str, int] = {}
        self.waits: dict[str, deque[float]] = {}
        self.depth: int | None = None
        self.connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mailer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _handle(self, d: amqp.Delivery) -> None:
        try:
            sent_at = float(json.loads(d.body)["sent_at"])
        except (ValueError, KeyError, TypeError):
            sent_at = time.time()
        waited = max(0.0, time.time() - sent_at)
        time.sleep(self.work)  # talking to the mail server
        cls = d.priority_class or "-"
        with self._lock:
            self.sent[cls] = self.sent.get(cls, 0) + 1
            self.waits.setdefault(cls, deque(maxlen=KEEP)).append(waited)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = _connect(self.url)
            except Exception as e:
                log.warning("cannot reach the broker: %r", e)
                self._stop.wait(1.0)
                continue
            try:
                channel = conn.channel()
                amqp.declare_queue(channel, QUEUE, durable=False)
                amqp.consume(channel, QUEUE, self._handle, self.prefetch)
                self.connected = True
                last = 0.0
                while not self._stop.is_set():
                    conn.process_data_events(time_limit=0.2)
                    if time.monotonic() - last > 0.5:
                        last = time.monotonic()
                        q = amqp.declare_queue(channel, QUEUE, durable=False)
                        self.depth = int(q.method.message_count)
            except Exception as e:
                log.warning("consuming failed, reconnecting: %r", e)
                self._stop.wait(0.5)
            finally:
                self.connected = False
                try:
                    conn.close()
                except Exception:
                    pass

    def stats(self) -> dict[str, Any]:
        """Emails sent and their wait in the queue (ms), by class; the queue's depth."""
        with self._lock:
            waits = {c: sorted(w) for c, w in self.waits.items()}
            sent = dict(self.sent)
        return {
            "broker": self.connected,
            "queue": QUEUE,
            "depth": self.depth,
            "sent": sent,
            "wait_ms": {
                c: {
                    "p50": round(w[len(w) // 2] * 1000.0, 1),
                    "p99": round(w[min(len(w) - 1, int(len(w) * 0.99))] * 1000.0, 1),
                }
                for c, w in waits.items()
                if w
            },
        }
