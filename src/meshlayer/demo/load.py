"""The demo's traffic: interactive shoppers and batch workloads, mixed, through the gateway.

Three workloads, each a few threads of keep-alive ``http.client`` connections
to the gateway's entry port (``Host: frontend``):

- **shoppers** (closed loop): ``--users`` people who look at the home page and
  products and sometimes check out, with a think time between clicks. A
  browser's user agent; the gateway's rule ``shoppers`` makes them ``critical``.
- **crawler** (open loop, Poisson arrivals at ``--crawl-rate`` per second):
  fetches product pages as fast as it is told, user agent ``shopbot``; the
  gateway's rule ``crawlers`` makes it ``batch``. Each page costs the
  recommendations service an answer, so it pushes it past its capacity.
- **reorders** (open loop, ``--reorder-rate`` per second): a back-office job
  placing bulk reorders through checkout (user agent ``reorder-job``, rule
  ``batch-jobs``: ``batch``); each order queues an email, like a shopper's.

The batch workloads come and go (:class:`Schedule`): calm at first, then on
and off in cycles, so the view shows the mesh before, during and after
overload. An open loop sends on its schedule whatever the answers (that is
what overload is); when all its threads are busy, an arrival is dropped and
counted, so the generator itself stays bounded.

Every answer is recorded under the class the load generator *expects* the
gateway to assign (:data:`WORKLOADS`), with the class the frontend says it
served the request in (``x-shop-priority``): the two agree when
classification and propagation work.
"""

from __future__ import annotations

import http.client
import json
import math
import queue
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from meshlayer.demo.services import ITEMS, PRIORITY_ECHO

HOST = "127.0.0.1"
WINDOW = 5.0
"""Seconds of recent answers the live view's percentiles are computed over."""

WORKLOADS = {"shoppers": "critical", "crawler": "batch", "reorders": "batch"}
"""Workload → the class the gateway's rules give it."""
CLASSES = ("critical", "batch")
"""The classes the demo's load uses, most important first."""
USER_AGENTS = {
    "shoppers": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "crawler": "shopbot/2.1 (+crawler; price comparison)",
    "reorders": "reorder-job/1.0",
}


@dataclass(frozen=True)
class Schedule:
    """When the batch workloads run: off for ``calm`` seconds, then ``on``/``off`` cycles."""

    calm: float = 5.0
    on: float = 20.0
    off: float = 10.0

    def batch_on(self, t: float) -> bool:
        if t < self.calm:
            return False
        if self.off <= 0:
            return True
        return (t - self.calm) % (self.on + self.off) < self.on

    @classmethod
    def for_duration(cls, duration: float) -> Schedule:
        """A short run (the test's): a brief calm, then batch on to the end."""
        if duration <= 0 or duration >= 60:
            return cls()
        return cls(calm=min(5.0, duration * 0.2), on=duration, off=0.0)


@dataclass
class Sample:
    at: float
    latency: float
    status: int
    """HTTP status; 0 for a connection error."""
    shed: bool
    """503 with ``Retry-After``: shed by the mesh somewhere on the way."""


@dataclass
class ClassStats:
    """Answers of one class: totals since the start and the recent samples."""

    total: int = 0
    ok: int = 0
    shed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    seen: Counter[str] = field(default_factory=Counter)
    """The class the frontend says it served these requests in."""
    latencies: list[float] = field(default_factory=list)
    """Latencies of the successful answers, since the start."""
    recent: deque[Sample] = field(default_factory=deque)

    def add(self, s: Sample, seen: str | None, error: str | None) -> None:
        self.total += 1
        if error is not None:
            self.errors[error] += 1
        else:
            self.statuses[s.status] += 1
        if 0 < s.status < 500:
            self.ok += 1
            self.latencies.append(s.latency)
        if s.shed:
            self.shed += 1
        if seen is not None:
            self.seen[seen] += 1
        self.recent.append(s)

    def trim(self, now: float) -> None:
        while self.recent and self.recent[0].at < now - WINDOW:
            self.recent.popleft()


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class Window:
    """One class over the last seconds, as the live view shows it."""

    rate: float
    success: float | None
    p50: float | None
    p99: float | None
    shed_rate: float


class Recorder:
    """Thread-safe per-class statistics of everything the workloads saw."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self.classes = {c: ClassStats() for c in CLASSES}
        self.dropped: Counter[str] = Counter()
        """Arrivals an open loop could not send (all its threads busy), by workload."""
        self.sent: Counter[str] = Counter()

    def add(
        self,
        workload: str,
        latency: float,
        status: int,
        shed: bool,
        seen: str | None,
        error: str | None,
    ) -> None:
        now = time.monotonic()
        s = Sample(now, latency, status, shed)
        with self._lock:
            self.sent[workload] += 1
            st = self.classes[WORKLOADS[workload]]
            st.add(s, seen, error)
            st.trim(now)

    def drop(self, workload: str) -> None:
        with self._lock:
            self.dropped[workload] += 1

    def window(self, cls: str) -> Window:
        now = time.monotonic()
        with self._lock:
            st = self.classes[cls]
            st.trim(now)
            recent = list(st.recent)
        span = min(WINDOW, max(now - self.started, 1e-3))
        ok = [s.latency for s in recent if 0 < s.status < 500]
        return Window(
            rate=len(recent) / span,
            success=len(ok) / len(recent) if recent else None,
            p50=quantile(ok, 0.5),
            p99=quantile(ok, 0.99),
            shed_rate=sum(1 for s in recent if s.shed) / span,
        )

    def snapshot(self) -> dict[str, ClassStats]:
        """A copy of the totals (the recent samples left out)."""
        with self._lock:
            return {
                c: ClassStats(
                    st.total,
                    st.ok,
                    st.shed,
                    Counter(st.errors),
                    Counter(st.statuses),
                    Counter(st.seen),
                    list(st.latencies),
                )
                for c, st in self.classes.items()
            }


class Client:
    """One keep-alive connection to the gateway, reopened after an error or a close."""

    def __init__(self, port: int, workload: str, rec: Recorder) -> None:
        self.port = port
        self.workload = workload
        self.rec = rec
        self.user = f"{workload}-{random.getrandbits(24):06x}"
        self.headers = {
            "Host": "frontend",
            "User-Agent": USER_AGENTS[workload],
            "x-user": self.user,
        }
        self.conn: http.client.HTTPConnection | None = None

    def send(self, method: str, path: str, body: object = None) -> None:
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.conn is None:
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=15)
        started = time.perf_counter()
        try:
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            self.rec.add(
                self.workload, time.perf_counter() - started, 0, False, None, type(e).__name__
            )
            return
        latency = time.perf_counter() - started
        shed = resp.status == 503 and resp.getheader("retry-after") is not None
        seen = resp.getheader(PRIORITY_ECHO)
        self.rec.add(self.workload, latency, resp.status, shed, seen, None)
        if resp.will_close:
            self.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _product() -> str:
    return f"/product/{random.choice(ITEMS)['id']}"


def shopper_click(c: Client) -> None:
    r = random.random()
    if r < 0.55:
        c.send("GET", "/")
    elif r < 0.90:
        c.send("GET", _product())
    else:
        picks = random.sample([i["id"] for i in ITEMS], 2)
        c.send("POST", "/checkout", {"items": picks})


def crawler_fetch(c: Client) -> None:
    c.send("GET", _product() if random.random() < 0.8 else "/")


def reorder(c: Client) -> None:
    c.send("POST", "/checkout", {"items": random.sample([i["id"] for i in ITEMS], 3)})


@dataclass
class LoadPlan:
    """How much of each workload to send."""

    users: int = 12
    think: float = 0.25
    """Mean seconds a shopper waits between clicks (exponential)."""
    crawl_rate: float = 120.0
    reorder_rate: float = 15.0
    crawl_threads: int = 24
    reorder_threads: int = 6
    schedule: Schedule = field(default_factory=Schedule)


class LoadGenerator:
    """The three workloads, started together; :meth:`stop` ends them within a request."""

    def __init__(self, port: int, plan: LoadPlan, duration: float | None) -> None:
        self.port = port
        self.plan = plan
        self.duration = duration
        self.rec = Recorder()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.rec.started

    def batch_on(self) -> bool:
        return self.plan.schedule.batch_on(self.elapsed)

    def done(self) -> bool:
        return self._stop.is_set() or (self.duration is not None and self.elapsed >= self.duration)

    def start(self) -> None:
        self.rec.started = time.monotonic()
        for n in range(self.plan.users):
            self._spawn(f"shopper-{n}", self._shopper)
        self._open_loop("crawler", self.plan.crawl_rate, self.plan.crawl_threads, crawler_fetch)
        self._open_loop("reorders", self.plan.reorder_rate, self.plan.reorder_threads, reorder)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 20.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _shopper(self) -> None:
        c = Client(self.port, "shoppers", self.rec)
        try:
            while not self.done():
                shopper_click(c)
                self._stop.wait(random.expovariate(1.0 / self.plan.think))
        finally:
            c.close()

    def _open_loop(
        self, workload: str, rate: float, threads: int, act: Callable[[Client], None]
    ) -> None:
        if rate <= 0 or threads <= 0:
            return
        tickets: queue.Queue[bool] = queue.Queue(maxsize=threads)

        def pacer() -> None:
            next_at = time.monotonic()
            while not self.done():
                next_at += random.expovariate(rate)
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    next_at = time.monotonic()  # fell behind: no catch-up burst
                if not self.batch_on() or self.done():
                    continue
                try:
                    tickets.put_nowait(True)
                except queue.Full:
                    self.rec.drop(workload)
            for _ in range(threads):  # wake every worker so it sees the end
                try:
                    tickets.put(False, timeout=1.0)
                except queue.Full:
                    break

        def worker() -> None:
            c = Client(self.port, workload, self.rec)
            try:
                while not self.done():
                    try:
                        if not tickets.get(timeout=0.5):
                            break
                    except queue.Empty:
                        continue
                    act(c)
            finally:
                c.close()

        self._spawn(f"{workload}-pacer", pacer)
        for n in range(threads):
            self._spawn(f"{workload}-{n}", worker)
