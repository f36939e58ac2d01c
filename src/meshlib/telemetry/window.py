"""Golden-metric windows: request rate, success rate and latency quantiles over the
last minute, in process and in constant memory.

A window is a ring of time slices. Recording a request touches only the current
slice: a counter, a failure counter and one latency bucket. Latency buckets grow
geometrically (about 9 % apart, from 50 µs to 5 min), so a quantile read back is
within ~5 % of the true value; reads merge the slices that are still in the window.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

_MIN_SECONDS = 50e-6
_GROWTH = 1.09
BOUNDS: tuple[float, ...] = tuple(
    _MIN_SECONDS * _GROWTH**i for i in range(int(math.log(300 / _MIN_SECONDS, _GROWTH)) + 2)
)
"""Upper bounds (seconds) of the latency buckets; one more bucket holds the rest."""

QUANTILES = (0.5, 0.95, 0.99)
_BATCH = 128
"""Latencies queued before a window puts them in their buckets."""


class _Slice:
    __slots__ = ("buckets", "failures", "requests", "tick")

    def __init__(self, tick: int) -> None:
        self.tick = tick
        self.requests = 0
        self.failures = 0
        self.buckets = [0] * (len(BOUNDS) + 1)


class Window:
    """Requests, failures and latencies of one stream over the last ``seconds``.

    ``record`` takes no lock but once a batch: under threads an increment may rarely
    be lost, which skews a statistic by one request. Putting a batch of latencies in
    their buckets and rotating to a new slice take a lock.
    """

    __slots__ = (
        "_born",
        "_clock",
        "_current",
        "_lock",
        "_pending",
        "_slices",
        "_width",
        "seconds",
        "total",
    )

    def __init__(
        self, seconds: float = 60.0, slices: int = 12, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.seconds = seconds
        self._width = seconds / slices
        self._clock = clock
        self._lock = threading.Lock()
        self._born = clock()
        tick = int(clock() / self._width)
        self._slices = [_Slice(tick - i) for i in range(slices)]
        self._current = self._slices[0]
        self._pending: deque[float] = deque()
        self.total = 0
        """Requests since the window was made (a counter that never rolls over)."""

    def record(self, ok: bool, seconds: float) -> None:
        """One request: whether it succeeded, and how long it took.

        The latency is queued and put in its bucket with the next ones (in a batch,
        while the bucket lists are in the CPU's caches), at the latest when the
        window moves to a new slice or is read."""
        current = self._current
        tick = int(self._clock() / self._width)
        if tick != current.tick:
            current = self._rotate(tick)
        current.requests += 1
        if not ok:
            current.failures += 1
        pending = self._pending
        pending.append(seconds)
        if len(pending) >= _BATCH:
            self._settle(current)
        self.total += 1

    def _settle(self, into: _Slice) -> None:
        """Put the queued latencies in ``into``'s buckets."""
        with self._lock:
            self._settle_locked(into)

    def _settle_locked(self, into: _Slice) -> None:
        pending = self._pending
        buckets = into.buckets
        while pending:  # a latency queued meanwhile is put in too
            buckets[bisect.bisect_left(BOUNDS, pending.popleft())] += 1

    def _rotate(self, tick: int) -> _Slice:
        with self._lock:
            current = self._current
            if current.tick >= tick:
                return current
            self._settle_locked(current)  # the queued latencies belong to the ending slice
            fresh = _Slice(tick)
            # the oldest slice makes room; slices older than the window are dropped
            self._slices = [fresh, *self._slices[:-1]]
            self._current = fresh
            return fresh

    def summary(self) -> dict[str, Any]:
        """Rate (requests/s), success rate and p50/p95/p99 (ms) over the window."""
        return summarize([self])

    def live_slices(self) -> list[_Slice]:
        """The slices still inside the window, newest first."""
        self._settle(self._current)
        now_tick = int(self._clock() / self._width)
        return [s for s in self._slices if now_tick - s.tick < len(self._slices)]

    def covered(self) -> float:
        """Seconds of traffic the live slices span (the newest is only partly over),
        or the window's age while it is younger than that (at least one second)."""
        now = self._clock()
        partial = now - int(now / self._width) * self._width
        span = (len(self._slices) - 1) * self._width + partial
        return max(1.0, min(span, now - self._born))


def summarize(windows: Sequence[Window]) -> dict[str, Any]:
    """The golden metrics of several windows together (a destination's routes)."""
    requests = failures = 0
    merged = [0] * (len(BOUNDS) + 1)
    covered = 0.0
    for window in windows:
        covered = max(covered, window.covered())
        for one in window.live_slices():
            requests += one.requests
            failures += one.failures
            for index, count in enumerate(one.buckets):
                if count:
                    merged[index] += count
    out: dict[str, Any] = {
        "requests": requests,
        "rps": requests / covered if requests else 0.0,
        "success_rate": (requests - failures) / requests if requests else None,
    }
    for q in QUANTILES:
        out[f"p{round(q * 100)}_ms"] = _quantile(merged, requests, q)
    return out


def _quantile(buckets: Sequence[int], total: int, q: float) -> float | None:
    """The quantile in ms: the geometric middle of the bucket holding it."""
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            upper = BOUNDS[index] if index < len(BOUNDS) else BOUNDS[-1] * _GROWTH
            lower = BOUNDS[index - 1] if index > 0 else 0.0
            middle = math.sqrt(lower * upper) if lower else upper / 2
            return middle * 1000.0
    return BOUNDS[-1] * 1000.0
