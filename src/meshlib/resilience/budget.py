"""Retry budget: retries as a fraction of recent requests, plus a small reserve."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

BUCKETS = 10
"""Time buckets per window: deposits expire between 0.9 and 1.0 window after they were made."""

_SCALE = 1_000_000
"""Token units per retry. Integer units keep 5 x 0.2 exactly 1 whatever the history."""


class RetryBudget:
    """Finagle/Linkerd retry budget.

    Every request deposits ``ratio`` tokens and every retry withdraws one; on top of
    that, ``min_per_second * window`` retries per window are always allowed so that a
    service with little traffic can still retry. Deposits and withdrawals are kept in
    ``BUCKETS`` time buckets and forgotten after ``window`` seconds, so at any time
    the retries of roughly the last window are at most ``ratio`` times its requests plus
    the reserve. Precisely: a retry at time t is allowed only if, counting it, the
    retries in ``[t - 0.9 * window, t]`` are at most ``ratio`` times the requests in
    ``(t - window, t]`` plus the reserve.

    O(1) per call: the request path touches only the current bucket and a running sum
    of the older ones, recomputed when a bucket rotates (every ``window / BUCKETS``).
    No lock on the request path. Under the GIL two threads can race on one bucket's
    ``+= 1`` (one count lost) or both pass the balance check (one retry too many), and
    a thread preempted across a bucket boundary can put its count in the next bucket;
    each race is off by one per concurrent caller and never accumulates. The rare
    rotation takes a lock so that a late thread cannot rotate the window backwards.
    """

    __slots__ = (
        "_clock",
        "_deposit",
        "_inv_width",
        "_requests",
        "_reserve",
        "_retries",
        "_rotate_lock",
        "_view",
        "exhausted",
        "min_per_second",
        "ratio",
        "window",
    )

    ratio: float
    min_per_second: float
    window: float
    exhausted: int
    """Retries refused because the budget was empty, since construction."""

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(ratio) and ratio >= 0):
            raise ValueError(f"retry budget ratio must be a number >= 0, not {ratio}")
        if not (math.isfinite(min_per_second) and min_per_second >= 0):
            raise ValueError(
                f"retry budget min_per_second must be a number >= 0, not {min_per_second}"
            )
        if not (math.isfinite(window) and window > 0):
            raise ValueError(f"retry budget window must be a positive number, not {window}")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self.exhausted = 0
        # Rounded down to a millionth of a retry per request: stingier, never looser.
        self._deposit = math.floor(ratio * _SCALE)
        self._reserve = math.floor(min_per_second * window * _SCALE)
        self._inv_width = BUCKETS / window
        self._requests = [0] * BUCKETS
        self._retries = [0] * BUCKETS
        self._clock = clock
        self._view = (int(clock() * self._inv_width), self._reserve)
        self._rotate_lock = threading.Lock()

    def _now(self) -> tuple[int, int]:
        """The current ``(tick, base)`` view, rotating the buckets if time moved on."""
        view = self._view
        tick = int(self._clock() * self._inv_width)
        # A late or backward reading uses the newer view: its count lands in the
        # current bucket, which only makes it live a little longer.
        return view if tick <= view[0] else self._rotate(tick)

    def _rotate(self, tick: int) -> tuple[int, int]:
        with self._rotate_lock:
            view = self._view
            last = view[0]
            if tick <= last:  # another thread rotated first
                return view
            requests = self._requests
            retries = self._retries
            for t in range(last + 1, min(tick, last + BUCKETS) + 1):
                requests[t % BUCKETS] = 0
                retries[t % BUCKETS] = 0
            slot = tick % BUCKETS
            # The older buckets no longer change: sum them once per bucket, not per call.
            base = (
                (sum(requests) - requests[slot]) * self._deposit
                - (sum(retries) - retries[slot]) * _SCALE
                + self._reserve
            )
            # One tuple, swapped atomically: readers never pair a tick with another base.
            self._view = view = (tick, base)
            return view

    def record_request(self) -> None:
        """Count one request (first attempts only, not retries): deposits ``ratio``."""
        # _now() inlined: this runs on every request, the rotation only once per bucket
        tick = int(self._clock() * self._inv_width)
        last = self._view[0]
        tick = self._rotate(tick)[0] if tick > last else last
        self._requests[tick % BUCKETS] += 1

    def try_acquire_retry(self) -> bool:
        """Withdraw one retry if the budget allows it; False means don't retry."""
        tick, base = self._now()
        slot = tick % BUCKETS
        if base + self._requests[slot] * self._deposit - self._retries[slot] * _SCALE >= _SCALE:
            self._retries[slot] += 1
            return True
        self.exhausted += 1
        return False

    def snapshot(self) -> dict[str, object]:
        """JSON-serialisable state for explain and metrics."""
        tick, base = self._now()
        slot = tick % BUCKETS
        balance = base + self._requests[slot] * self._deposit - self._retries[slot] * _SCALE
        return {
            "ratio": self.ratio,
            "min_per_second": self.min_per_second,
            "window": self.window,
            "requests": sum(self._requests),
            "retries": sum(self._retries),
            "available": max(0, balance // _SCALE),
            "exhausted": self.exhausted,
        }

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"window={self.window})"
        )
