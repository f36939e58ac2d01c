"""An explicit-bucket histogram cell with OpenTelemetry's semantics, cheap to record.

Bucket ``i`` counts the values ``v`` with ``bounds[i - 1] < v <= bounds[i]``; the last
bucket (index ``len(bounds)``) counts the values above the last bound. A cell keeps
count, sum, min and max since it was made, and optionally *windows*: the same figures
since a window was opened or last taken, which a delta reader needs (min, max and a
float sum cannot be recovered by subtracting two cumulative snapshots).

No OpenTelemetry import: the SDK bridge (`meshlib.telemetry.sdk_metrics`) turns
snapshots into data points.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from itertools import pairwise
from time import time_ns

_INF = math.inf
_BATCH = 128
"""Values queued before a cell counts them (at most this many floats per cell)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A consistent reading of a cell or of one of its windows."""

    count: int
    sum: float
    bucket_counts: tuple[int, ...]
    min: float
    max: float


class _Window:
    """The figures since the window was opened or last taken."""

    __slots__ = ("counts", "max", "min", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum = 0.0
        self.min = _INF
        self.max = -_INF

    def add(self, index: int, value: float) -> None:
        self.counts[index] += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def snapshot(self) -> Snapshot:
        return Snapshot(sum(self.counts), self.sum, tuple(self.counts), self.min, self.max)


class HistogramCell:
    """The values recorded for one label set.

    `record` is safe from any thread and loses nothing: it queues the value with a
    deque's atomic append, and the queue is counted under the cell's lock (``+=`` on a
    list element or a float is not atomic across threads), by whichever thread fills
    a batch or reads the cell.
    """

    __slots__ = (
        "_bounds",
        "_counts",
        "_lock",
        "_max",
        "_min",
        "_pending",
        "_sum",
        "_windows",
        "created_ns",
    )

    def __init__(self, bounds: tuple[float, ...], created_ns: int | None = None) -> None:
        if not all(math.isfinite(b) for b in bounds) or any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"bounds must be finite and strictly increasing: {bounds!r}")
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._min = _INF
        self._max = -_INF
        self._lock = threading.Lock()
        self._pending: deque[float] = deque()
        self._windows: dict[Hashable, _Window] = {}
        self.created_ns = time_ns() if created_ns is None else created_ns

    @property
    def bounds(self) -> tuple[float, ...]:
        return self._bounds

    def record(self, value: float) -> None:
        """Count ``value``; like the SDK's Histogram, ignore NaN, infinities and
        negative values.

        The value is queued (an atomic append) and counted with the next
        `_BATCH` - 1 others, or when the cell is read: counting a batch in one tight
        loop costs less than counting each value between two requests, whose work
        has pushed the cell's data out of the CPU's caches."""
        pending = self._pending
        pending.append(value)
        if len(pending) >= _BATCH:
            self._count_pending()

    def _count_pending(self) -> None:
        with self._lock:
            pending = self._pending
            bounds = self._bounds
            counts = self._counts
            windows = list(self._windows.values())
            total, low, high = self._sum, self._min, self._max
            while pending:
                value = pending.popleft()  # a value queued meanwhile is counted too
                if not 0.0 <= value < _INF:
                    continue
                index = bisect_left(bounds, value)
                counts[index] += 1
                total += value
                if value < low:
                    low = value
                if value > high:
                    high = value
                for window in windows:
                    window.add(index, value)
            self._sum, self._min, self._max = total, low, high

    def snapshot(self) -> Snapshot:
        """Everything recorded since the cell was made."""
        self._count_pending()
        with self._lock:
            counts = tuple(self._counts)
            return Snapshot(sum(counts), self._sum, counts, self._min, self._max)

    def open_window(self, token: Hashable) -> None:
        """Start counting for ``token`` from now (no-op if already open)."""
        self._count_pending()  # what came before belongs to no window of token's
        with self._lock:
            if token not in self._windows:
                self._windows[token] = _Window(len(self._counts))

    def close_window(self, token: Hashable) -> None:
        with self._lock:
            self._windows.pop(token, None)

    def take_window(self, token: Hashable) -> Snapshot | None:
        """What ``token``'s window counted since it was opened or last taken, and
        restart it; None if no such window is open."""
        self._count_pending()
        with self._lock:
            window = self._windows.get(token)
            if window is None:
                return None
            self._windows[token] = _Window(len(self._counts))
        return window.snapshot()  # detached: nothing writes to it any more
