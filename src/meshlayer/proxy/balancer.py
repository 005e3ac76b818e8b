"""Endpoint choice: round-robin, least-request and P2C over peak-EWMA latency,
with passive outlier detection.

Theory of operation: each service keeps one ``EndpointState`` per endpoint
with its in-flight count, a peak-EWMA of response latency (Linkerd's
estimator: a slower sample is taken at once, faster ones decay in) and its
ejection state. ``pick`` is synchronous and does no I/O. Ejected endpoints are
skipped while any endpoint is in rotation; an ejection ends lazily, when a
pick or a report finds its time has passed.

P2C's cost is (latency estimate + failure penalty) x (in-flight + 1). The
latency estimate follows Finagle's and Linkerd's peak-EWMA: time-weighted
over ``DECAY`` (10 s), and an endpoint left unused decays toward zero, so it
is tried again. A failed attempt says little about latency (a refused
connect is fast, and must not make a dead endpoint look fast), so it does
not feed the EWMA unless it was slower than the estimate; instead it sets a
separate penalty of ``PENALTY`` that decays on its own, faster time constant
``FAILURE_DECAY``. P2C moves away at once (1 s against millisecond
latencies), and a replica that failed once is back in rotation after about
``FAILURE_DECAY * ln(PENALTY / latency)``: 7 s for 1 ms latencies, sooner
under concurrent load, where in-flight requests weigh on its peers. (Folding
the penalty into the EWMA instead kept such a replica out for
``DECAY * ln(1 s / 1 ms)``, about a minute.) Each new failure re-arms the
penalty, so a replica that keeps failing gets one probe every few seconds,
and outlier detection ejects it after its consecutive-failure limit.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Final

from meshlayer.config.model import Endpoint, OutlierDetection

DECAY: Final = 10.0  # seconds: the EWMA's time constant (Linkerd's default)
DEFAULT_RTT: Final = 0.030  # seconds: assumed latency of an endpoint never measured
PENALTY: Final = 1.0  # seconds: cost added by a failure, so P2C moves away at once
FAILURE_DECAY: Final = 1.0  # seconds: the penalty's time constant (recovery in ~7 s at 1 ms)


class EndpointState:
    """What the balancer knows of one endpoint."""

    __slots__ = (
        "consecutive_failures",
        "ejected_until",
        "ejections",
        "endpoint",
        "ewma",
        "failed_at",
        "in_flight",
        "last_ejection_end",
        "last_sample",
        "requests",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.in_flight = 0
        self.ewma = DEFAULT_RTT
        self.last_sample = time.monotonic()
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.last_ejection_end = 0.0
        self.requests = 0
        self.failed_at = -math.inf  # when the failure penalty was last charged

    @property
    def ejected(self) -> bool:
        return self.ejected_until > 0.0

    def cost(self, now: float) -> float:
        """(Peak-EWMA latency + failure penalty), decayed to ``now``, weighted by load.

        An unused endpoint's estimate decays toward zero, and a failure penalty
        decays faster still, so a replica that failed is tried again in seconds
        rather than starved.
        """
        w = math.exp(-max(now - self.last_sample, 0.0) / DECAY)
        cost = self.ewma * w
        since = now - self.failed_at
        if since < 30 * FAILURE_DECAY:  # beyond, the penalty is below 1e-13 s
            cost += PENALTY * math.exp(-max(since, 0.0) / FAILURE_DECAY)
        return cost * (self.in_flight + 1)

    def observe(self, seconds: float, now: float) -> None:
        """Fold one latency sample into the peak-EWMA."""
        if seconds > self.ewma:
            self.ewma = seconds
        else:
            w = math.exp(-max(now - self.last_sample, 0.0) / DECAY)
            self.ewma = self.ewma * w + seconds * (1.0 - w)
        self.last_sample = now

    def __repr__(self) -> str:
        state = "ejected" if self.ejected else "active"
        return (
            f"<Endpoint {self.endpoint.address} {state} in_flight={self.in_flight} "
            f"ewma={self.ewma * 1000:.1f}ms>"
        )


class Balancer:
    """Chooses an endpoint of one service and tracks outliers."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        policy: str,
        outlier: OutlierDetection,
        rng: random.Random | None = None,
    ) -> None:
        self.states = [EndpointState(e) for e in endpoints]
        self.policy = policy
        self.outlier = outlier
        self._rr = 0
        self._rng = rng or random.Random()
        self.ejected_count = 0
        self._ewma = policy == "p2c-ewma"  # only P2C reads latencies: others skip the EWMA

    def _unexpire(self, now: float) -> None:
        for s in self.states:
            if s.ejected and s.ejected_until <= now:
                s.ejected_until = 0.0
                s.last_ejection_end = now
                s.consecutive_failures = 0
                self.ejected_count -= 1

    def pick(self, exclude: Sequence[EndpointState] = ()) -> EndpointState | None:
        """The endpoint for the next request, or None when there are none.

        ``exclude`` holds endpoints already tried by this request; they are
        avoided while any other endpoint is available.
        """
        states = self.states
        if not states:
            return None
        if self.ejected_count or exclude:
            if self.ejected_count:
                self._unexpire(time.monotonic())
            candidates = [s for s in states if not s.ejected and s not in exclude]
            if not candidates:
                candidates = [s for s in states if not s.ejected] or list(states)
        else:
            candidates = states
        n = len(candidates)
        if n == 1:
            return candidates[0]
        policy = self.policy
        if policy == "round-robin":
            self._rr += 1
            return candidates[self._rr % n]
        i = int(self._rng.random() * n)
        j = int(self._rng.random() * (n - 1))
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        if policy == "least-request":
            return a if a.in_flight <= b.in_flight else b
        now = time.monotonic()
        return a if a.cost(now) <= b.cost(now) else b

    def report(self, state: EndpointState, ok: bool, seconds: float, now: float = 0.0) -> None:
        """Record a finished attempt: ``ok`` False for connect failures and 5xx.

        ``now`` is time.monotonic() when the caller has just read it.
        """
        now = now or time.monotonic()
        if ok:
            state.consecutive_failures = 0
            # A healthy stretch as long as one base ejection forgives past ejections.
            if (
                state.ejections
                and not state.ejected
                and now - state.last_ejection_end > self.outlier.base_ejection
            ):
                state.ejections = 0
            if self._ewma:
                state.observe(seconds, now)
            return
        if self._ewma:
            state.failed_at = now
            if seconds > state.ewma:  # a slow failure is a latency peak; a fast one no news
                state.observe(seconds, now)
        state.consecutive_failures += 1
        if state.ejected or state.consecutive_failures < self.outlier.consecutive_failures:
            return
        self._unexpire(now)
        allowed = int(len(self.states) * self.outlier.max_ejected_percent / 100.0)
        if self.ejected_count >= allowed:
            return
        state.ejections += 1
        duration = min(
            self.outlier.base_ejection * (2 ** (state.ejections - 1)), self.outlier.max_ejection
        )
        state.ejected_until = now + duration
        self.ejected_count += 1
