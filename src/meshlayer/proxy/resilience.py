"""Retry budget (Linkerd's model): retries may add a percentage of the recent
requests, plus a floor per second, over a sliding window."""

from __future__ import annotations

import time
from typing import Final

WINDOW: Final = 10  # seconds, in one-second buckets


class RetryBudget:
    """Sliding-window budget: ``withdraw`` says whether one more retry is allowed."""

    __slots__ = ("_deposits", "_epoch", "_floor", "_ratio", "_withdrawals")

    def __init__(self, percent: float, min_per_second: float) -> None:
        self._ratio = percent / 100.0
        self._floor = min_per_second * WINDOW
        self._deposits = [0] * WINDOW
        self._withdrawals = [0] * WINDOW
        self._epoch = int(time.monotonic())

    def _advance(self, t: float = 0.0) -> int:
        now = int(t or time.monotonic())
        if now != self._epoch:
            steps = min(now - self._epoch, WINDOW)
            for k in range(1, steps + 1):
                slot = (self._epoch + k) % WINDOW
                self._deposits[slot] = 0
                self._withdrawals[slot] = 0
            self._epoch = now
        return now % WINDOW

    def deposit(self, now: float = 0.0) -> None:
        """Count one original request (``now``: time.monotonic, when the caller has it)."""
        self._deposits[self._advance(now)] += 1

    def withdraw(self) -> bool:
        """Take one retry if the budget allows it."""
        slot = self._advance()
        allowed = self._floor + self._ratio * sum(self._deposits)
        if sum(self._withdrawals) + 1 > allowed:
            return False
        self._withdrawals[slot] += 1
        return True

    def __repr__(self) -> str:
        self._advance()
        return f"<RetryBudget requests={sum(self._deposits)} retries={sum(self._withdrawals)}>"
