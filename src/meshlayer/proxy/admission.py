"""Admission: a concurrency limit per destination, one queue per priority class, shedding.

Theory of operation. Each destination a sidecar sends to (the local app on
the inbound side; each service on the outbound side, when its
``spec.outbound.concurrency`` is not ``unlimited``) has one
``AdmissionControl``. It is sans-I/O: it never reads a clock or touches a
socket; callers pass ``now`` (``time.monotonic``) and get decisions back, and
a queued request is a ``Waiter`` that is told ``admitted(now)`` or
``shed(err)``.

*Fast path.* ``in_use < limit and not queued``: the caller takes a slot
itself (``in_use += 1``) — two attribute reads and one write. Everything else
here runs only when requests have to wait.

*Limit.* Fixed, or adaptive (``GradientLimit``, the gradient idea of
Netflix's concurrency-limits and Envoy's adaptive_concurrency): each request
reports its latency from admission to response head (``sample``); per window
of ``sampleWindow`` seconds (at least ``MIN_SAMPLES`` samples) the window's
mean ``rtt`` is compared with the no-load minimum ``min_rtt``:
``gradient = clamp(min_rtt * tolerance / rtt, 0.5, 1)``, ``new = limit *
gradient + sqrt(limit)`` (headroom), smoothed ``limit += 0.2 * (new -
limit)`` and clamped to ``[minLimit, maxLimit]``. The limit does not grow
while the destination is app-limited (mean load under half the limit and
nothing queued). Every ``probeInterval`` (jittered) the limit is pinned at
``minLimit`` until a window of samples taken at that concurrency re-measures
``min_rtt``, then restored: latency that rose for good becomes the new
baseline instead of throttling forever.

*Queues and order.* Above the limit a request waits in its class's queue
(``ClassQueue``). When a slot frees, the highest-ranked backlogged class goes
first, unless a lower class is owed its weight: on every dispatch each
backlogged class earns ``weight / Σ weight(backlogged)`` credit and the
dispatched class pays 1; a class whose credit reaches ``BURST`` goes next
(the most owed first). So over a backlog each class gets its weight's share
of dispatches, while short bursts are served in strict rank order (a lower
class falls at most ``BURST / share`` dispatches behind before its turn).
An emptied queue forgets its credit.

*Shedding*, lowest classes first, at arrival, before waiting:

- the class's queue is at its ``maxQueueLength``; or
- the class's predicted wait exceeds its ``queueDelayTarget``. The wait is
  predicted from the requests ahead of it — queued requests of equal or
  higher rank, or fewer when its weight share serves it sooner — times the
  mean time between dispatches (``service_time / limit``, Little's law).

And in the queue: when a class's head-of-queue wait passes its target, the
lowest backlogged class below it is trimmed newest first, down to what its
share can serve within its own target (DAGOR/QALM style: the low classes
give way before the high ones miss). A shed is ``MeshError(503, "shed")``
with ``Retry-After``.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Protocol

from meshlayer.config.model import Admission
from meshlayer.proxy.errors import MeshError

log = logging.getLogger("meshlayer.admission")

MIN_SAMPLES = 5  # latency samples a window needs before the limit moves
SMOOTHING = 0.2  # share of the computed limit taken per window
MIN_GRADIENT = 0.5  # the limit at most halves (before smoothing) per window
BURST = 4.0  # credit a lower class may be owed before it gets a turn
MAX_CREDIT = 64.0
SHED_QUIET = 1.0  # seconds without a shed after which a class's shedding has stopped
PROBE_TRIES = 5  # windows a probe waits for the load to fall to minLimit
LOG_CHANGE = 0.5  # log the limit when it moved this much (relative) since last logged
RETRY_AFTER_MAX = 60
DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PriorityLike(Protocol):
    """What admission reads of a request's class (``meshlayer.proxy.classes.ClassState``)."""

    @property
    def name(self) -> str: ...
    @property
    def rank(self) -> int: ...
    @property
    def weight(self) -> int: ...
    @property
    def target(self) -> float: ...
    @property
    def max_queue(self) -> int: ...


class Waiter(Protocol):
    """A queued request (an ``Exchange``)."""

    @property
    def t0(self) -> float:
        """When it arrived (time.monotonic): its queueing delay runs from here."""
        ...

    def admitted(self, now: float) -> None:
        """It holds a slot now (``in_use`` already counts it): go."""

    def shed(self, err: MeshError) -> None:
        """It left the queue without a slot: answer ``err``."""


class ClassQueue:
    """The waiting requests of one priority class, and its counters."""

    __slots__ = (
        "buckets",
        "credit",
        "delay_sum",
        "last_shed",
        "max_queue",
        "name",
        "rank",
        "shed_run",
        "shed_total",
        "shedding",
        "target",
        "waiters",
        "weight",
    )

    def __init__(self, cls: PriorityLike) -> None:
        self.name = cls.name
        self.rank = cls.rank
        self.weight = max(1, cls.weight)
        self.target = cls.target
        self.max_queue = cls.max_queue
        self.waiters: deque[Waiter] = deque()
        self.credit = 0.0
        self.shed_total = 0
        self.shed_run = 0  # sheds since shedding last started
        self.shedding = False
        self.last_shed = 0.0
        self.buckets = [0] * (len(DELAY_BUCKETS) + 1)  # queueing delay of admitted waiters
        self.delay_sum = 0.0

    def update(self, cls: PriorityLike) -> None:
        """The class's settings may change with a config reload."""
        self.rank = cls.rank
        self.weight = max(1, cls.weight)
        self.target = cls.target
        self.max_queue = cls.max_queue

    def __repr__(self) -> str:
        return f"<ClassQueue {self.name} rank={self.rank} queued={len(self.waiters)}>"


class GradientLimit:
    """The adaptive limit: see the module docstring."""

    __slots__ = (
        "attempts",
        "limit",
        "max_limit",
        "min_limit",
        "min_rtt",
        "next_probe",
        "probe_interval",
        "probing",
        "rng",
        "saved",
        "tolerance",
    )

    def __init__(self, spec: Admission, rng: random.Random | None = None) -> None:
        self.limit = float(spec.initial_limit)
        self.min_limit = spec.min_limit
        self.max_limit = spec.max_limit
        self.tolerance = spec.tolerance
        self.probe_interval = spec.probe_interval
        self.rng = rng or random.Random()
        self.min_rtt = 0.0  # not measured yet
        self.next_probe = 0.0
        self.probing = False
        self.saved = 0.0  # the limit before a probe
        self.attempts = 0

    def _jittered(self) -> float:
        return self.probe_interval * self.rng.uniform(0.75, 1.25)

    def update(self, rtt: float, load: float, queued: bool, now: float) -> float:
        """One window: mean latency ``rtt``, mean requests in use ``load``; the new limit."""
        if self.probing:
            self.attempts += 1
            if load <= self.min_limit or self.attempts >= PROBE_TRIES:
                if load <= self.min_limit:
                    self.min_rtt = rtt
                self.probing = False
                self.limit = self.saved
                self.next_probe = now + self._jittered()
            return self.limit
        if not self.min_rtt:
            self.min_rtt = rtt
            self.next_probe = now + self._jittered()
        elif now >= self.next_probe:
            if load <= self.min_limit:  # light load: this window already is a no-load sample
                self.min_rtt = rtt
                self.next_probe = now + self._jittered()
            else:
                self.probing = True
                self.attempts = 0
                self.saved = self.limit
                self.limit = float(self.min_limit)
                return self.limit
        else:
            self.min_rtt = min(self.min_rtt, rtt)
        limit = self.limit
        gradient = max(MIN_GRADIENT, min(1.0, self.min_rtt * self.tolerance / rtt))
        if gradient >= 1.0 and load < limit / 2 and not queued:
            return limit  # app-limited: nothing says more would be fine
        new = limit * gradient + math.sqrt(limit)
        limit += SMOOTHING * (new - limit)
        self.limit = min(float(self.max_limit), max(float(self.min_limit), limit))
        return self.limit


class AdmissionControl:
    """Concurrency limit and class queues of one destination (see the module docstring)."""

    __slots__ = (
        "_dispatching",
        "_logged_limit",
        "adaptive",
        "direction",
        "in_use",
        "limit",
        "load_sum",
        "order",
        "queued",
        "queued_seen",
        "queues",
        "rtt_n",
        "rtt_sum",
        "service",
        "service_time",
        "window",
        "window_end",
    )

    def __init__(
        self, spec: Admission, direction: str, service: str, rng: random.Random | None = None
    ) -> None:
        self.direction = direction
        self.service = service
        self.adaptive: GradientLimit | None = None
        if spec.concurrency == "adaptive":
            self.adaptive = GradientLimit(spec, rng)
            self.limit = spec.initial_limit
        elif isinstance(spec.concurrency, int):
            self.limit = spec.concurrency
        else:
            raise ValueError(f"no admission control for concurrency {spec.concurrency!r}")
        self._logged_limit = self.limit
        self.in_use = 0
        """Requests holding a slot: admitted and not yet finished."""
        self.queued = 0
        """Requests waiting in all class queues."""
        self.queues: dict[str, ClassQueue] = {}
        self.order: list[ClassQueue] = []  # rank descending
        self.window = spec.sample_window
        self.window_end = 0.0
        self.rtt_sum = 0.0
        self.rtt_n = 0
        self.load_sum = 0
        self.queued_seen = False
        self.service_time = 0.0
        """Mean latency from admission to response head (seconds; 0: not measured yet)."""
        self._dispatching = False

    def __repr__(self) -> str:
        queues = " ".join(f"{q.name}={len(q.waiters)}" for q in self.order)
        return (
            f"<AdmissionControl {self.direction} {self.service} limit={self.limit} "
            f"in_use={self.in_use} queued={self.queued} {queues}>"
        )

    # -- latency -------------------------------------------------------------

    def sample(self, rtt: float, now: float) -> None:
        """A request's latency from admission to its response head."""
        self.rtt_sum += rtt
        self.rtt_n += 1
        self.load_sum += self.in_use
        if now >= self.window_end and (self.rtt_n >= MIN_SAMPLES or not self.service_time):
            self._close_window(now)

    def _close_window(self, now: float) -> None:
        n = self.rtt_n
        rtt = max(1e-6, self.rtt_sum / n)
        load = self.load_sum / n
        queued = self.queued_seen or self.queued > 0
        self.rtt_sum = 0.0
        self.rtt_n = 0
        self.load_sum = 0
        self.queued_seen = False
        self.window_end = now + self.window
        st = self.service_time
        self.service_time = rtt if not st else st + 0.3 * (rtt - st)
        if self.adaptive is None or n < MIN_SAMPLES:
            return
        limit = max(1, round(self.adaptive.update(rtt, load, queued, now)))
        if limit == self.limit:
            return
        self.limit = limit
        if abs(limit - self._logged_limit) >= LOG_CHANGE * self._logged_limit:
            log.info(
                "%s %s: concurrency limit %d -> %d (latency %.1fms, no-load %.1fms%s)",
                self.direction,
                self.service,
                self._logged_limit,
                limit,
                rtt * 1000,
                self.adaptive.min_rtt * 1000,
                ", probing" if self.adaptive.probing else "",
            )
            self._logged_limit = limit
        if self.queued:
            self.dispatch(now)

    @property
    def capacity(self) -> int:
        """The limit that throughput follows (a probe pins ``limit`` low for a moment)."""
        a = self.adaptive
        if a is not None and a.probing:
            return max(self.limit, round(a.saved))
        return self.limit

    # -- arrivals --------------------------------------------------------------

    def arrive(self, waiter: Waiter, cls: PriorityLike, now: float) -> MeshError | None:
        """A request that found no free slot (or others waiting): queue it, or the shed error.

        Admits it at once (``waiter.admitted``) when a slot is free after all.
        """
        q = self.queues.get(cls.name)
        if q is None:
            q = self._add_queue(cls)
        elif (q.rank, q.target, q.weight, q.max_queue) != (
            cls.rank,
            cls.target,
            max(1, cls.weight),
            cls.max_queue,
        ):
            q.update(cls)
            self.order.sort(key=lambda c: -c.rank)
        if len(q.waiters) >= q.max_queue:
            return self._refuse(q, now, f"queue of class {q.name} is full ({q.max_queue})")
        wait = self.predict(q)
        if wait > q.target:
            return self._refuse(
                q,
                now,
                f"class {q.name} would wait ~{wait * 1000:.0f}ms (target {q.target * 1000:.0f}ms)",
                wait,
            )
        q.waiters.append(waiter)
        self.queued += 1
        self.queued_seen = True
        if self.in_use < self.limit:
            self.dispatch(now)
        else:
            self.check_heads(now)
        return None

    def _add_queue(self, cls: PriorityLike) -> ClassQueue:
        q = self.queues[cls.name] = ClassQueue(cls)
        self.order.append(q)
        self.order.sort(key=lambda c: -c.rank)
        return q

    def predict(self, q: ClassQueue) -> float:
        """Seconds a request of ``q``'s class arriving now would wait (0: unknown)."""
        st = self.service_time
        if not st:
            return 0.0
        ahead = 0
        wsum = q.weight
        for o in self.order:
            if o.rank >= q.rank:
                ahead += len(o.waiters)
            if o.waiters and o is not q:
                wsum += o.weight
        share = q.weight / wsum
        by_share = (max(0.0, BURST - q.credit) + len(q.waiters)) / share
        return (min(ahead, by_share) + 1) * st / self.capacity

    def _refuse(self, q: ClassQueue, now: float, why: str, wait: float = 0.0) -> MeshError:
        self._count_shed(q, now, 1)
        drain = max(wait, self.queued * self.service_time / self.capacity)
        retry = min(RETRY_AFTER_MAX, max(1, math.ceil(drain)))
        return MeshError(
            503, "shed", f"{self.direction} {self.service}: shed: {why}", retry_after=retry
        )

    def _count_shed(self, q: ClassQueue, now: float, n: int) -> None:
        q.shed_total += n
        q.last_shed = now
        if not q.shedding:
            q.shedding = True
            q.shed_run = 0
            log.info(
                "%s %s: shedding class %s (limit %d, in use %d, queued %d)",
                self.direction,
                self.service,
                q.name,
                self.limit,
                self.in_use,
                self.queued,
            )
        q.shed_run += n

    # -- dispatch ----------------------------------------------------------------

    def release(self, now: float) -> None:
        """A slot is free again (the caller's ``in_use -= 1`` plus the queue's turn)."""
        self.in_use -= 1
        if self.queued:
            self.dispatch(now)

    def dispatch(self, now: float) -> None:
        """Give free slots to waiters, in class order. Safe to re-enter from callbacks."""
        if self._dispatching:
            return  # the outer loop goes on with the free slots
        self._dispatching = True
        try:
            while True:
                while self.queued and self.in_use < self.limit:
                    q = self._pick()
                    waiter = q.waiters.popleft()
                    self.queued -= 1
                    if not q.waiters:
                        q.credit = 0.0
                    self.in_use += 1
                    delay = now - waiter.t0
                    q.delay_sum += delay
                    q.buckets[_bucket(delay)] += 1
                    waiter.admitted(now)
                if self.queued:
                    self.check_heads(now)
                if not self.queued or self.in_use >= self.limit:
                    break  # (callbacks above may have freed slots: go round again)
        finally:
            self._dispatching = False

    def _pick(self) -> ClassQueue:
        top: ClassQueue | None = None
        owed: ClassQueue | None = None
        wsum = 0
        for q in self.order:
            if q.waiters:
                wsum += q.weight
                if top is None:
                    top = q
                elif q.credit >= BURST and (owed is None or q.credit > owed.credit):
                    owed = q
        assert top is not None
        chosen = owed or top
        for q in self.order:
            if q.waiters:
                q.credit = min(MAX_CREDIT, q.credit + q.weight / wsum)
        chosen.credit = max(-MAX_CREDIT, chosen.credit - 1.0)
        return chosen

    def check_heads(self, now: float) -> None:
        """Trim the lowest backlogged class when a higher class's head waits past its target."""
        backlogged = [q for q in self.order if q.waiters]
        if len(backlogged) < 2:
            return
        late = None
        for q in backlogged[:-1]:
            if now - q.waiters[0].t0 > q.target:
                late = q
                break
        if late is None:
            return
        low = backlogged[-1]
        wsum = sum(q.weight for q in backlogged)
        rate = self.capacity / self.service_time if self.service_time else 0.0
        keep = int(low.target * rate * low.weight / wsum)
        victims: list[Waiter] = []
        while len(low.waiters) > keep:
            victims.append(low.waiters.pop())  # newest first
        if not victims:
            return
        self.queued -= len(victims)
        if not low.waiters:
            low.credit = 0.0
        self._count_shed(low, now, len(victims))
        err = MeshError(
            503,
            "shed",
            f"{self.direction} {self.service}: shed: class {late.name} waits past its target",
            retry_after=1,
        )
        for waiter in victims:
            waiter.shed(err)

    def leave(self, waiter: Waiter) -> bool:
        """A queued request gave up (client gone, timeout, bad body): take it out."""
        for q in self.order:
            try:
                q.waiters.remove(waiter)
            except ValueError:
                continue
            self.queued -= 1
            if not q.waiters:
                q.credit = 0.0
            return True
        return False

    def tick(self, now: float) -> None:
        """Periodic (the sidecar's sweeper): trims late queues, notices shedding stopped."""
        if self.queued:
            self.check_heads(now)
        for q in self.order:
            if q.shedding and now - q.last_shed > SHED_QUIET:
                q.shedding = False
                log.info(
                    "%s %s: shedding of class %s stopped (%d shed)",
                    self.direction,
                    self.service,
                    q.name,
                    q.shed_run,
                )

    def classes(self) -> Iterator[ClassQueue]:
        """The class queues seen so far (for metrics)."""
        return iter(list(self.order))


def admission_for(spec: Admission, direction: str, service: str) -> AdmissionControl | None:
    """The admission control a destination needs; None for ``unlimited``."""
    if spec.concurrency == "unlimited":
        return None
    return AdmissionControl(spec, direction, service)


def _bucket(seconds: float, bounds: Sequence[float] = DELAY_BUCKETS) -> int:
    for i, bound in enumerate(bounds):
        if seconds <= bound:
            return i
    return len(bounds)
