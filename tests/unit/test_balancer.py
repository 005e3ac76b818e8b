"""Balancer policies, outlier detection and the retry budget (no I/O)."""

from __future__ import annotations

import random
import time
from collections import Counter

from meshlayer.config.model import Endpoint, OutlierDetection
from meshlayer.proxy.balancer import Balancer
from meshlayer.proxy.resilience import RetryBudget

EPS = [Endpoint("127.0.0.1", 8000 + i) for i in range(4)]


def test_round_robin_is_exact() -> None:
    b = Balancer(EPS[:3], "round-robin", OutlierDetection())
    picks = Counter(b.pick().endpoint.port for _ in range(300))  # type: ignore[union-attr]
    assert sorted(picks.values()) == [100, 100, 100]


def test_least_request_prefers_the_idle_endpoint() -> None:
    b = Balancer(EPS[:2], "least-request", OutlierDetection(), random.Random(1))
    b.states[0].in_flight = 5
    assert all(b.pick() is b.states[1] for _ in range(50))


def test_p2c_ewma_prefers_the_fast_endpoint() -> None:
    b = Balancer(EPS[:2], "p2c-ewma", OutlierDetection(), random.Random(1))
    slow, fast = b.states
    for _ in range(5):
        b.report(slow, True, 0.200)
        b.report(fast, True, 0.002)
    assert Counter(b.pick() is fast for _ in range(100))[True] == 100


def test_outlier_ejection_backoff_and_cap() -> None:
    od = OutlierDetection(consecutive_failures=3, base_ejection=10, max_ejected_percent=50)
    b = Balancer(EPS, "round-robin", od)
    a, c, d, _e = b.states
    for _ in range(3):
        b.report(a, False, 0.01)
    assert a.ejected and b.ejected_count == 1
    assert all(b.pick() is not a for _ in range(30))
    for s in (c, d):
        for _ in range(3):
            b.report(s, False, 0.01)
    # at most half of 4 endpoints ejected
    assert b.ejected_count == 2 and not d.ejected
    first = a.ejected_until
    a.ejected_until = 1.0  # expired long ago
    b.pick()
    assert not a.ejected and b.ejected_count == 1
    for _ in range(3):
        b.report(a, False, 0.01)
    # a second ejection lasts longer (doubling backoff); the cap was not reached
    assert a.ejections == 2 and a.ejected_until - first > 5


def test_p2c_ewma_failure_penalty_moves_away_at_once_and_expires_in_seconds() -> None:
    """One fast failure: no traffic for a few seconds, back within ~10 s (not a minute)."""
    b = Balancer(EPS[:2], "p2c-ewma", OutlierDetection(consecutive_failures=99), random.Random(1))
    failed, healthy = b.states
    now = time.monotonic()
    for s in b.states:  # both measured at 1 ms, just now
        s.ewma, s.last_sample = 0.001, now
    b.report(failed, False, 0.0001, now)  # a refused connect: fast
    assert failed.ewma == 0.001  # a fast failure does not make it look fast
    assert all(b.pick() is healthy for _ in range(100))

    def later(seconds: float) -> None:  # time passes for the unused replica only
        failed.failed_at = now - seconds
        failed.last_sample = now - seconds
        healthy.last_sample = time.monotonic()

    later(3.0)
    assert all(b.pick() is healthy for _ in range(100))
    later(8.0)
    assert all(b.pick() is failed for _ in range(100))


def test_exclude_avoids_tried_endpoints() -> None:
    b = Balancer(EPS[:2], "p2c-ewma", OutlierDetection())
    first = b.states[0]
    assert all(b.pick([first]) is b.states[1] for _ in range(20))


def test_retry_budget_floor_and_ratio() -> None:
    budget = RetryBudget(percent=20, min_per_second=0)
    for _ in range(100):
        budget.deposit()
    allowed = sum(budget.withdraw() for _ in range(100))
    assert allowed == 20
    floor_only = RetryBudget(percent=0, min_per_second=1)
    assert sum(floor_only.withdraw() for _ in range(100)) == 10
