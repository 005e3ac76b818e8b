"""Admission: a concurrency limit per destination, one queue per priority class, shedding.

Theory of operation. Each destination a sidecar sends to (the local app on
the inbound side; each service on the outbound side, when its
``spec.outbound.concurrency`` is not ``unlimited``) has one
``AdmissionControl``. It is sans-I/O: it never reads a clock or touches a
socket; callers pass ``now`` (``time.monotonic``) and get decisions back, and
a queued request is a ``Waiter`` that is told ``admitted(now)`` or
``shed(err)``.

*Fast path* (``enter``): ``in_use < limit and not queued``: take a slot
(count the slot-seconds, ``in_use += 1``, stamp ``last_done``) and go on (no
callback); a top-class request also goes straight into a free reserved slot
when none of its class waits. Everything else here runs only when requests
have to wait.

*Limit.* Fixed, or adaptive (``AdaptiveLimit``). Each request reports its
latency from admission to response head (``sample``; a 5xx or a peer's shed
is a drop, not a sample; a request that ends without a head reports a lower
bound). Per window of ``sampleWindow`` seconds (at least ``MIN_SAMPLES``
samples; sooner, once ``MIN_SAMPLES`` average ``CONGESTED`` x ``tolerance``
times the no-load latency: a sudden overload is met in milliseconds) the
window's mean latency ``rtt`` and mean slots in use ``load``
give, by Little's law, the concurrency the destination really serves:
``served = load * min_rtt / rtt`` (``min_rtt``: the no-load latency; the rest
of ``load`` waited inside the destination). The limit becomes ``floor(served
* tolerance)`` (at most halving per window, clamped to ``[minLimit,
maxLimit]``): latency settles at about ``tolerance`` times the no-load
minimum, and a limit far off is corrected in a window or a few, not smoothed
over seconds. While the rule holds the limit and requests wait, every few
windows an *upward trial* adds ``TRIAL_STEP`` of the limit (at least a slot)
for one window (at least ``TRIAL_RTTS`` latencies long; closed early only
once ``TRIAL_RTTS`` x the limit samples average more than the latency at
which it cannot pay, ``fail_rtt``: a failed trial makes every class wait,
the top class too, so it ends in a few latencies, not a window):
if throughput (``load / rtt``, Little's law: not a count of completions,
which windows cut mid-burst) grew by at least half as much (relatively) as
the load did, the destination had room; and if its latency is
nevertheless above ``tolerance`` x ``min_rtt`` after ``REBASE_TRIALS``
trials in a row that paid, that latency is not queueing
(a slower backend, a sleep) and becomes the no-load baseline, so the rule
keeps the limit. Otherwise the limit returns and the next trial waits twice
as long (up to ``MAX_TRIAL_WAIT`` windows). Small limits need trials:
``floor(1 * 1.5)`` is 1 whatever the destination could take.
The rule applies only while the limit binds (mean load at least half the
limit, or something queued): otherwise demand sets the concurrency and
latency says nothing about the limit, which then only follows the load down
to ``IDLE_HEADROOM`` x load + 1 (an unused limit is untested: a sudden
overload would put all of it into the destination before one sample came
back, as an unused TCP window would, RFC 2861). A window with more drops than samples never lowers
``min_rtt``. Every ``probeInterval`` (jittered), if nothing queued in the
window, the limit is pinned at ``minLimit`` until a window of samples taken
at that concurrency re-measures ``min_rtt``, then restored: latency that
rose for good becomes the new baseline instead of throttling forever. Under
a queue the probe waits (pinning then is a latency spike).

*Reserve* (trunk reservation, as telephone exchanges keep trunks for
priority calls): above an adaptive limit, ``reserve_for(limit)`` more slots
(a quarter of it, at least two) are open to the top-ranked class only (and,
while top-class requests wait, to a class owed its weight beside them, so
that a top-class flood cannot starve it). The limit keeps lower classes at about what the
destination serves at once, so when a top-class request comes, a slot is
free: it waits for no lower-class request queued inside the app, only for
the work in service. A fixed limit has no reserve: it is the number given.

*Queues and order.* Above the limit a request waits in its class's queue
(``ClassQueue``). When a slot frees, the highest-ranked backlogged class goes
first, unless a lower class is owed its weight: on every dispatch each
backlogged class earns ``weight / Σ weight(backlogged)`` credit and the
dispatched class pays 1; a class whose credit reaches ``BURST`` goes next
(the most owed first), or already at a credit of 1 once its head waited past
its class's target (else a class whose target is short next to ``BURST /
share`` dispatches would lose every head to the 2 x target shedding before
its turn). So over a backlog each class gets its weight's share of
dispatches, while short bursts are served in strict rank order (a lower
class falls at most ``BURST / share`` dispatches behind before its turn).
An emptied queue forgets its credit.

*Shedding*, lowest classes first, at arrival, before waiting:

- the class's queue is at its ``maxQueueLength``; or
- the class's predicted wait exceeds its ``queueDelayTarget``. The wait is
  predicted from the requests ahead of it — queued requests of equal or
  higher rank, or fewer when its weight share serves it sooner — times the
  mean time between dispatches (``service_time / limit``, Little's law),
  where the service time is at least the time since a slot last changed
  hands while all are taken (a stalled app predicts long waits).

And in the queue (``check_heads``): a head that waited ``HEAD_SHED`` x its
class's target is shed, in any class (CoDel-like: it missed anyway); when a
class's head-of-queue wait passes its target, the classes below it are
trimmed newest first, the lowest first and then upward, each down to what
its share can serve within its own target, until the late class's predicted
wait fits (DAGOR/QALM style: the low classes give way before the high ones
miss). ``make_room`` sheds the newest waiter of the lowest class below a
newcomer when the circuit breaker's ``maxRequests`` is reached. A shed is
``MeshError(503, "shed")`` with ``Retry-After``.

A waiter that leaves (``leave``) stays in its deque as a tombstone (O(1));
``count`` is a queue's live length. ``reconfigure`` applies new settings
after a reload to the same control (slots, queues and measurements stay).
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from typing import Final, Protocol

from meshlayer.config.model import Admission
from meshlayer.proxy.errors import MeshError

log = logging.getLogger("meshlayer.admission")

MIN_SAMPLES: Final = 5  # latency samples a window needs before the limit moves
MIN_KEEP: Final = 0.5  # a window keeps at least this share of the limit (at most halves it)
TRIAL_STEP: Final = 0.25  # an upward trial adds this share of the limit (at least one slot)
TRIAL_GAIN: Final = 0.5  # ... and pays when throughput grew by half as much as the load did
TRIAL_RTTS: Final = 3  # a trial window lasts at least this many latencies (and sampleWindow)
REBASE_TRIALS: Final = 2  # paid trials in a row before a high latency becomes the baseline
TRIAL_WAIT: Final = 2  # binding windows before the next trial after one that did not pay
MAX_TRIAL_WAIT: Final = 64  # ... doubling after each further one, up to this many
IDLE_HEADROOM: Final = 2.0  # while it does not bind, the limit follows this x the load (+1) down
CONGESTED: Final = 2.0  # a window whose mean latency is this x tolerance x no-load closes early
RESERVE_SHARE: Final = 0.25  # adaptive: the top class may exceed the limit by this share of it
MIN_RESERVE: Final = 2  # ... and by at least this many slots
BURST: Final = 4.0  # credit a lower class may be owed before it gets a turn
MAX_CREDIT: Final = 64.0
SHED_QUIET: Final = 1.0  # seconds without a shed after which a class's shedding has stopped
PROBE_TRIES: Final = 5  # windows a probe waits for the load to fall to minLimit
HEAD_SHED: Final = 2.0  # a head that waited this many times its class's target is shed (CoDel-like)
CLEAN_SHARE: Final = 1  # a window lowers the no-load baseline only if drops * this <= samples
LOG_CHANGE: Final = 0.5  # log the limit when it moved this much (relative) since last logged
RETRY_AFTER_MAX: Final = 60
DELAY_BUCKETS: Final[tuple[float, ...]] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                           0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip


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
    @property
    def top(self) -> bool:
        """Whether it is the top-ranked class (it may take the reserved slots)."""
        ...


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
    """The waiting requests of one priority class, and its counters.

    A waiter that leaves (``AdmissionControl.leave``) stays in ``waiters`` as a
    tombstone until it reaches an end of the deque; ``count`` is the number of
    live waiters.
    """

    __slots__ = (
        "buckets",
        "count",
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
        "top",
        "waiters",
        "weight",
    )

    def __init__(self, cls: PriorityLike) -> None:
        self.name = cls.name
        self.rank = cls.rank
        self.top = cls.top
        self.weight = max(1, cls.weight)
        self.target = cls.target
        self.max_queue = cls.max_queue
        self.waiters: deque[Waiter] = deque()
        self.count = 0
        """Live waiters (``waiters`` may also hold tombstones of waiters that left)."""
        self.credit = 0.0
        self.shed_total = 0
        self.shed_run = 0  # sheds since shedding last started
        self.shedding = False
        self.last_shed = 0.0
        self.buckets = [0] * (len(DELAY_BUCKETS) + 1)  # queueing delay of admitted waiters
        self.delay_sum = 0.0

    def matches(self, cls: PriorityLike) -> bool:
        """Whether the queue runs on ``cls``'s current settings."""
        return (
            self.rank == cls.rank
            and self.top == cls.top
            and self.target == cls.target
            and self.weight == max(1, cls.weight)
            and self.max_queue == cls.max_queue
        )

    def update(self, cls: PriorityLike) -> None:
        """The class's settings may change with a config reload."""
        self.rank = cls.rank
        self.top = cls.top
        self.weight = max(1, cls.weight)
        self.target = cls.target
        self.max_queue = cls.max_queue

    def __repr__(self) -> str:
        return f"<ClassQueue {self.name} rank={self.rank} queued={self.count}>"


class AdaptiveLimit:
    """The adaptive limit: see the module docstring."""

    __slots__ = (
        "attempts",
        "backoff",
        "limit",
        "max_limit",
        "min_limit",
        "min_rtt",
        "next_probe",
        "paid",
        "probe_interval",
        "probing",
        "rng",
        "saved",
        "tolerance",
        "trial_base",
        "trial_load",
        "trial_rate",
        "wait",
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
        self.trial_base = 0.0  # the limit before an upward trial (0: none running)
        self.trial_rate = 0.0  # the throughput (load / rtt) measured before it
        self.trial_load = 0.0  # ... and the load
        self.wait = 0  # binding windows before the next upward trial
        self.backoff = TRIAL_WAIT
        self.paid = 0  # upward trials in a row that paid

    def reconfigure(self, spec: Admission) -> None:
        """New tuning from a reload; the measured baseline and the limit stay (clamped)."""
        self.min_limit = spec.min_limit
        self.max_limit = spec.max_limit
        self.tolerance = spec.tolerance
        self.probe_interval = spec.probe_interval
        self.limit = self._clamp(self.limit)

    def _clamp(self, limit: float) -> float:
        return min(float(self.max_limit), max(float(self.min_limit), limit))

    def _jittered(self) -> float:
        return self.probe_interval * self.rng.uniform(0.75, 1.25)

    def fail_rtt(self) -> float:
        """During an upward trial, the window's mean latency above which it cannot pay:
        ``update``'s rule solved for the latency with every slot taken (a load below
        the limit, or a latency above twice the one before, pays even less). Else inf."""
        if not self.trial_base or self.trial_rate <= 0.0 or self.trial_load <= 0.0:
            return math.inf
        grew = self.limit / self.trial_load - 1
        if grew <= 0.05:
            return math.inf
        return self.limit / (self.trial_rate * (1 + TRIAL_GAIN * grew))

    def update(
        self,
        rtt: float,
        load: float,
        queued: bool,
        now: float,
        clean: bool = True,
    ) -> float:
        """One window: mean latency ``rtt``, mean requests in use ``load``, whether any
        request queued, whether the window was mostly successes (``clean``: only then may
        it lower the no-load baseline); the new limit."""
        if self.probing:
            self.attempts += 1
            if load <= self.min_limit or self.attempts >= PROBE_TRIES:
                if load <= self.min_limit and clean:
                    self.min_rtt = rtt
                self.probing = False
                self.limit = self.saved
                self.next_probe = now + self._jittered()
            return self.limit
        if not self.min_rtt:
            if not clean:
                return self.limit
            self.min_rtt = rtt
            self.next_probe = now + self._jittered()
        elif now >= self.next_probe:
            if load <= self.min_limit and clean:  # light load: already a no-load sample
                self.min_rtt = rtt
                self.next_probe = now + self._jittered()
            elif not queued:  # never pin the limit while requests wait: that is a spike
                self.probing = True
                self.attempts = 0
                self.saved = self.limit
                self.trial_base = 0.0
                self.paid = 0
                self.limit = float(self.min_limit)
                return self.limit
        elif clean:
            self.min_rtt = min(self.min_rtt, rtt)
        limit = self.limit
        if load < limit / 2 and not queued:
            # Not binding: demand, not the limit, sets the concurrency. Latency that rises
            # now does not come from crowding the destination (a slower backend, a
            # sleep): shrinking would only cut throughput. Nor does low latency say
            # that more would be fine. But a limit far above the load is untested (as TCP
            # lets an unused window decay, RFC 2861): a sudden overload would put all of
            # it into the destination before one sample came back. It follows the load
            # down, staying loose enough not to bind.
            self.trial_base = 0.0
            self.paid = 0
            floor = max(math.ceil(IDLE_HEADROOM * load) + 1, math.floor(limit * MIN_KEEP))
            self.limit = self._clamp(min(limit, floor))  # at most halving per window
            return self.limit
        throughput = load / rtt
        trial = self.trial_base
        if trial:  # the last window ran with more slots: did throughput grow with them?
            self.trial_base = 0.0
            grew = load / self.trial_load - 1  # the load the added slots took (relative)
            paid = grew > 0.05 and throughput / self.trial_rate - 1 >= TRIAL_GAIN * grew
            if paid:
                self.backoff = TRIAL_WAIT
                self.wait = 0  # climb on while it pays
            else:
                self.wait = self.backoff
                self.backoff = min(MAX_TRIAL_WAIT, self.backoff * 2)
            self.paid = self.paid + 1 if paid else 0
            if self.paid >= REBASE_TRIALS and rtt > self.min_rtt * self.tolerance:
                # Throughput rose with the load (trial after trial: one can be noise),
                # so the latency is not queueing (a slower backend, a sleep): it is the
                # no-load latency now.
                self.min_rtt = rtt
        # Little's law: at the no-load latency this throughput needs ``served`` requests
        # at once; the rest of the load waited inside the destination.
        served = min(load, throughput * self.min_rtt)
        target = self._clamp(math.floor(served * self.tolerance + 1e-9))
        target = max(target, math.floor(limit * MIN_KEEP))  # at most halve per window
        if trial and self.paid:
            target = max(target, limit)  # a trial that paid keeps its slots
        elif target == limit and queued and limit < self.max_limit:
            if self.wait > 0:
                self.wait -= 1
            else:  # demand waits and the rule does not grow: try more slots for a window
                self.trial_base = limit
                self.trial_rate = throughput
                self.trial_load = load
                target = self._clamp(limit + max(1, math.floor(limit * TRIAL_STEP)))
        self.limit = target
        return target


def reserve_for(limit: int) -> int:
    """Slots above an adaptive ``limit`` that only the top class may take."""
    return max(MIN_RESERVE, math.ceil(limit * RESERVE_SHARE))


class AdmissionControl:
    """Concurrency limit and class queues of one destination (see the module docstring)."""

    __slots__ = (
        "_dispatching",
        "_left",
        "_logged_limit",
        "_where",
        "adaptive",
        "area",
        "congested",
        "direction",
        "drops",
        "early_n",
        "in_use",
        "last_done",
        "limit",
        "order",
        "queued",
        "queued_seen",
        "queues",
        "reserve",
        "rtt_n",
        "rtt_sum",
        "service",
        "service_time",
        "t_area",
        "window",
        "window_end",
        "window_start",
    )

    def __init__(
        self, spec: Admission, direction: str, service: str, rng: random.Random | None = None
    ) -> None:
        self.direction = direction
        self.service = service
        self.adaptive: AdaptiveLimit | None = None
        self.limit = 1
        self.reserve = 0
        """Slots above ``limit`` that only the top class may take (adaptive limits only)."""
        self._mode(spec, rng)
        self._logged_limit = self.limit
        self.in_use = 0
        """Requests holding a slot: admitted and not yet finished."""
        self.queued = 0
        """Requests waiting in all class queues."""
        self.queues: dict[str, ClassQueue] = {}
        self.order: list[ClassQueue] = []  # rank descending
        self._where: dict[Waiter, ClassQueue] = {}  # queued waiter -> its queue
        self._left: set[Waiter] = set()  # tombstones: waiters that left their queue
        self.window = spec.sample_window
        self.window_end = 0.0
        self.window_start = 0.0  # when the current window began (0: before the first)
        self.area = 0.0
        """Slot-seconds in use since ``window_start``: the window's mean load."""
        self.t_area = 0.0  # ``area`` counts up to here
        self.rtt_sum = 0.0
        self.rtt_n = 0
        self.drops = 0
        self.queued_seen = False
        self.service_time = 0.0
        """Mean latency from admission to response head (seconds; 0: not measured yet)."""
        self.congested = math.inf
        """Adaptive: a window whose mean latency passes this closes at once (with at
        least ``early_n`` samples): ``CONGESTED`` x tolerance x the no-load latency, or
        in an upward trial the latency at which it cannot pay (``fail_rtt``)."""
        self.early_n = MIN_SAMPLES
        self.last_done = 0.0
        """When a slot last changed hands (0: never): while all are taken, how long the
        destination has made no progress."""
        self._dispatching = False

    def _mode(self, spec: Admission, rng: random.Random | None = None) -> None:
        if spec.concurrency == "adaptive":
            if self.adaptive is None:
                self.adaptive = AdaptiveLimit(spec, rng)
            else:
                self.adaptive.reconfigure(spec)
            self.limit = max(1, round(self.adaptive.limit))
            self.reserve = reserve_for(self.limit)
        elif isinstance(spec.concurrency, int):
            self.adaptive = None
            self.limit = spec.concurrency
            self.reserve = 0
        else:
            raise ValueError(f"no admission control for concurrency {spec.concurrency!r}")

    def reconfigure(self, spec: Admission, now: float) -> None:
        """A reload changed the destination's settings: keep the slots in use, the
        queues and the measurements; take the new limit (``unlimited``: admit everyone
        queued, and from then on the caller stops using this control)."""
        if spec.concurrency == "unlimited":
            self.adaptive = None
            self.limit = 1 << 30
            self.reserve = 0
        else:
            self._mode(spec)
            self.window = spec.sample_window
        if self.queued:
            self.dispatch(now)

    def __repr__(self) -> str:
        queues = " ".join(f"{q.name}={q.count}" for q in self.order)
        return (
            f"<AdmissionControl {self.direction} {self.service} limit={self.limit} "
            f"in_use={self.in_use} queued={self.queued} {queues}>"
        )

    # -- latency -------------------------------------------------------------

    def sample(self, rtt: float, now: float, ok: bool = True) -> None:
        """A request's latency from admission to its response head (or a lower bound
        of it). ``ok`` False (a 5xx, a peer's shed): no service time, only counted;
        a fast error says nothing about how long the work takes."""
        if not ok:
            self.drops += 1
            return
        self.rtt_sum += rtt
        self.rtt_n += 1
        self.area += self.in_use * (now - self.t_area)
        self.t_area = now
        if now >= self.window_end:
            if self.rtt_n >= MIN_SAMPLES or not self.service_time:
                self._close_window(now)
        elif self.rtt_sum > self.congested * self.rtt_n and self.rtt_n >= self.early_n:
            self._close_window(now)  # heavy congestion, or a trial that failed: act now

    def _close_window(self, now: float) -> None:
        n = self.rtt_n
        rtt = max(1e-6, self.rtt_sum / n)
        span = now - self.window_start
        # Little's law needs the time average of the slots in use; the mean at the
        # samples is biased when responses come in bursts (it sees the burst drain).
        # (The first window, from 0, has one sample and moves no limit.)
        load = self.area / span if span > 0 else float(self.in_use)
        self.area = 0.0
        self.window_start = now
        queued = self.queued_seen or self.queued > 0
        clean = self.drops * CLEAN_SHARE <= n  # mostly successes
        self.rtt_sum = 0.0
        self.rtt_n = 0
        self.drops = 0
        self.queued_seen = False
        self.window_end = now + self.window
        st = self.service_time
        self.service_time = rtt if not st else st + 0.3 * (rtt - st)
        a = self.adaptive
        if a is None or n < MIN_SAMPLES:
            return
        limit = max(1, round(a.update(rtt, load, queued, now, clean)))
        self.early_n = MIN_SAMPLES
        if a.trial_base:  # a trial: long enough for the added slots to show in completions
            self.window_end = now + max(self.window, TRIAL_RTTS * rtt)
            # ... but called off once its latency shows it cannot pay: every request
            # of every class waits longer while a destination holds more than it serves
            self.congested = a.fail_rtt()
            self.early_n = max(MIN_SAMPLES, TRIAL_RTTS * limit)
        elif a.min_rtt and not a.probing:
            self.congested = CONGESTED * a.tolerance * a.min_rtt
        else:
            self.congested = math.inf
        reserve = 0 if a.probing else reserve_for(limit)  # a probe measures at minLimit
        if limit == self.limit and reserve == self.reserve:
            return
        self.limit = limit
        self.reserve = reserve
        if abs(limit - self._logged_limit) >= LOG_CHANGE * self._logged_limit:
            log.info(
                "%s %s: concurrency limit %d -> %d (latency %.1fms, no-load %.1fms%s)",
                self.direction,
                self.service,
                self._logged_limit,
                limit,
                rtt * 1000,
                a.min_rtt * 1000,
                ", probing" if a.probing else "",
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

    def _service_time(self, now: float) -> float:
        """The mean service time, or longer while every slot is taken and none has freed
        for longer than that (the destination stalls)."""
        st = self.service_time
        if self.last_done and self.in_use >= self.limit:
            st = max(st, now - self.last_done)
        return st

    # -- arrivals --------------------------------------------------------------

    def enter(self, waiter: Waiter, cls: PriorityLike, now: float) -> MeshError | bool:
        """A request for this destination. True: it holds a slot now, go on (the fast
        path: a slot is free and nobody waits). False: it waits (``waiter.admitted``
        comes later, or ``shed``). Or the shed error: answer it."""
        if self.in_use < self.limit and not self.queued:  # the fast path
            self.area += self.in_use * (now - self.t_area)
            self.t_area = self.last_done = now
            self.in_use += 1
            return True
        if cls.top and self.in_use < self.limit + self.reserve:  # a reserved slot
            q = self.queues.get(cls.name)
            if q is None or not q.count:
                self.area += self.in_use * (now - self.t_area)
                self.t_area = self.last_done = now
                self.in_use += 1
                return True
        return self.arrive(waiter, cls, now) or False

    def would_wait(self, cls: PriorityLike) -> bool:
        """Whether a ``cls`` request arriving now would queue (``enter``'s conditions)."""
        if self.in_use < self.limit and not self.queued:
            return False
        if cls.top and self.in_use < self.limit + self.reserve:
            q = self.queues.get(cls.name)
            return q is not None and q.count > 0
        return True

    def arrive(self, waiter: Waiter, cls: PriorityLike, now: float) -> MeshError | None:
        """A request that found no free slot (or others waiting): queue it, or the shed error.

        Admits it at once (``waiter.admitted``) when a slot is free after all.
        """
        q = self.queues.get(cls.name)
        if q is None:
            q = self._add_queue(cls)
        elif not q.matches(cls):
            q.update(cls)
            self.order.sort(key=lambda c: -c.rank)
        if q.count >= q.max_queue:
            return self._refuse(q, now, f"queue of class {q.name} is full ({q.max_queue})")
        wait = self.predict(q, now)
        if wait > q.target:
            return self._refuse(
                q,
                now,
                f"class {q.name} would wait ~{wait * 1000:.0f}ms (target {q.target * 1000:.0f}ms)",
                wait,
            )
        q.waiters.append(waiter)
        q.count += 1
        self._where[waiter] = q
        self.queued += 1
        self.queued_seen = True
        if self.in_use < self.limit + self.reserve:
            self.dispatch(now)
        else:
            self.check_heads(now)
        return None

    def _add_queue(self, cls: PriorityLike) -> ClassQueue:
        q = self.queues[cls.name] = ClassQueue(cls)
        self.order.append(q)
        self.order.sort(key=lambda c: -c.rank)
        return q

    def predict(self, q: ClassQueue, now: float = 0.0) -> float:
        """Seconds a request of ``q``'s class arriving now would wait (0: unknown)."""
        st = self._service_time(now) if now else self.service_time
        if not st:
            return 0.0
        ahead = 0
        wsum = q.weight
        for o in self.order:
            if o.rank >= q.rank:
                ahead += o.count
            if o.count and o is not q:
                wsum += o.weight
        share = q.weight / wsum
        by_share = (max(0.0, BURST - q.credit) + q.count) / share
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

    def make_room(self, cls: PriorityLike, now: float) -> bool:
        """The destination's ``maxRequests`` is reached: shed the newest waiter of the
        lowest backlogged class ranked below ``cls`` so that a ``cls`` request can come
        in. False when there is none (everything waiting ranks as high or higher)."""
        for q in reversed(self.order):
            if q.rank >= cls.rank:
                return False
            if q.count:
                victim = self._pop(q, newest=True)
                self._count_shed(q, now, 1)
                victim.shed(
                    MeshError(
                        503,
                        "shed",
                        f"{self.direction} {self.service}: shed: max requests reached, "
                        f"class {cls.name} comes first",
                        retry_after=1,
                    )
                )
                return True
        return False

    # -- dispatch ----------------------------------------------------------------

    def release(self, now: float) -> None:
        """A slot is free again (the caller's ``in_use -= 1`` plus the queue's turn)."""
        self.area += self.in_use * (now - self.t_area)
        self.t_area = self.last_done = now
        self.in_use -= 1
        if self.queued:
            self.dispatch(now)

    def _pop(self, q: ClassQueue, newest: bool = False) -> Waiter:
        """Take the oldest (or newest) live waiter out of ``q`` (which has one)."""
        left = self._left
        while True:
            waiter = q.waiters.pop() if newest else q.waiters.popleft()
            if left and waiter in left:
                left.discard(waiter)
                continue
            break
        del self._where[waiter]
        q.count -= 1
        self.queued -= 1
        if not q.count:
            q.credit = 0.0
            self._purge(q)
        return waiter

    def _purge(self, q: ClassQueue) -> None:
        """``q`` has no live waiter: drop its tombstones."""
        if q.waiters:
            self._left.difference_update(q.waiters)
            q.waiters.clear()

    def _head(self, q: ClassQueue) -> Waiter:
        """The oldest live waiter of ``q`` (which has one)."""
        left = self._left
        while left and q.waiters[0] in left:
            left.discard(q.waiters.popleft())
        return q.waiters[0]

    def dispatch(self, now: float) -> None:
        """Give free slots to waiters, in class order. Safe to re-enter from callbacks."""
        if self._dispatching:
            return  # the outer loop goes on with the free slots
        self._dispatching = True
        try:
            while True:
                admitted = 0
                while self.queued:
                    q = self._pick(now)
                    if q is None:
                        break  # no slot, or only reserved ones and no class may take them
                    admitted += 1
                    waiter = self._pop(q)
                    self.area += self.in_use * (now - self.t_area)
                    self.t_area = self.last_done = now
                    self.in_use += 1
                    delay = now - waiter.t0
                    q.delay_sum += delay
                    q.buckets[_bucket(delay)] += 1
                    try:
                        waiter.admitted(now)
                    except Exception:  # a broken waiter must not keep the slot
                        log.exception("%s %s: admitted waiter failed", self.direction, self.service)
                        self.in_use -= 1
                if self.queued:
                    self.check_heads(now)
                if not admitted or not self.queued:
                    break  # (callbacks above may have freed slots: go round again)
        finally:
            self._dispatching = False

    def _pick(self, now: float) -> ClassQueue | None:
        """The queue whose head takes the next slot, or None: no slot is free (or only
        reserved ones: the top class takes them, or, while it waits, a class owed its
        weight)."""
        reserved = self.in_use >= self.limit
        if reserved and self.in_use >= self.limit + self.reserve:
            return None
        top: ClassQueue | None = None
        owed: ClassQueue | None = None
        wsum = 0
        for q in self.order:
            if q.count:
                wsum += q.weight
                if top is None:
                    top = q
                elif (
                    q.credit >= BURST or (q.credit >= 1.0 and now - self._head(q).t0 > q.target)
                ) and (owed is None or q.credit > owed.credit):
                    owed = q  # (a late head goes as soon as its class earned one dispatch)
        if top is None:
            return None
        chosen = owed or top
        if reserved and not top.top:
            return None  # the reserve is for the top class (and those owed beside it)
        for q in self.order:
            if q.count:
                q.credit = min(MAX_CREDIT, q.credit + q.weight / wsum)
        chosen.credit = max(-MAX_CREDIT, chosen.credit - 1.0)
        return chosen

    def check_heads(self, now: float) -> None:
        """Shed what waits too long: heads past ``HEAD_SHED`` x their class's target (in
        every class, the top one too), then, when a class's head waits past its target,
        lower classes from the lowest up, newest first, until its predicted wait fits."""
        backlogged = [q for q in self.order if q.count]
        hopeless: list[tuple[ClassQueue, Waiter]] = []
        for q in backlogged:
            while q.count and now - self._head(q).t0 > HEAD_SHED * q.target:
                hopeless.append((q, self._pop(q)))
        if hopeless:
            for q, waiter in hopeless:
                self._count_shed(q, now, 1)
                waiter.shed(
                    MeshError(
                        503,
                        "shed",
                        f"{self.direction} {self.service}: shed: class {q.name} waited past "
                        f"{HEAD_SHED:g}x its target ({q.target * 1000:.0f}ms)",
                        retry_after=max(1, math.ceil(q.target * HEAD_SHED)),
                    )
                )
            backlogged = [q for q in self.order if q.count]
        if len(backlogged) < 2:
            return
        late = None
        for q in backlogged[:-1]:
            if now - self._head(q).t0 > q.target:
                late = q
                break
        if late is None:
            return
        wsum = sum(q.weight for q in backlogged)
        st = self._service_time(now)
        rate = self.capacity / st if st else 0.0
        err = MeshError(
            503,
            "shed",
            f"{self.direction} {self.service}: shed: class {late.name} waits past its target",
            retry_after=1,
        )
        for low in reversed(backlogged):
            if low.rank >= late.rank:
                break
            keep = int(low.target * rate * low.weight / wsum)
            victims: list[Waiter] = []
            while low.count > keep:
                victims.append(self._pop(low, newest=True))
            if victims:
                self._count_shed(low, now, len(victims))
                for waiter in victims:
                    waiter.shed(err)
            if self.predict(late, now) <= late.target:
                break

    def leave(self, waiter: Waiter) -> bool:
        """A queued request gave up (client gone, timeout, bad body): take it out. O(1):
        it stays behind as a tombstone that ``_pop`` and ``_head`` skip."""
        q = self._where.pop(waiter, None)
        if q is None:
            return False
        q.count -= 1
        self.queued -= 1
        if q.count:
            self._left.add(waiter)
        else:
            q.credit = 0.0
            self._purge(q)
        return True

    def keep_classes(self, classes: Collection[PriorityLike], keep: Collection[str] = ()) -> None:
        """The class table changed to ``classes``: their queues take the new settings
        now, not at their class's next arrival (until then a queue would keep its old
        rank in the dispatch order, and a class no longer the top its reserved slots);
        the queues of classes no longer defined (nor named in ``keep``) are forgotten
        once empty (a queue with waiters stays until they are gone)."""
        by_name = {c.name: c for c in classes}
        for q in list(self.order):
            cls = by_name.get(q.name)
            if cls is not None:
                if not q.matches(cls):
                    q.update(cls)
            elif q.name not in keep and not q.count:
                self.order.remove(q)
                del self.queues[q.name]
        self.order.sort(key=lambda c: -c.rank)

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
