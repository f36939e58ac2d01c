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
from collections.abc import Hashable
from dataclasses import dataclass
from itertools import pairwise
from time import time_ns

_INF = math.inf


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

    def snapshot(self) -> Snapshot:
        return Snapshot(sum(self.counts), self.sum, tuple(self.counts), self.min, self.max)


class HistogramCell:
    """The values recorded for one label set.

    `record` is safe from any thread and loses nothing: ``+=`` on a list element or a
    float is not atomic across threads, so one lock per cell guards a few additions
    (uncontended, about 0.1 µs).
    """

    __slots__ = ("_bounds", "_counts", "_lock", "_max", "_min", "_sum", "_windows", "created_ns")

    def __init__(self, bounds: tuple[float, ...], created_ns: int | None = None) -> None:
        if not all(math.isfinite(b) for b in bounds) or any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"bounds must be finite and strictly increasing: {bounds!r}")
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._min = _INF
        self._max = -_INF
        self._lock = threading.Lock()
        self._windows: dict[Hashable, _Window] = {}
        self.created_ns = time_ns() if created_ns is None else created_ns

    @property
    def bounds(self) -> tuple[float, ...]:
        return self._bounds

    def record(self, value: float) -> None:
        """Count ``value``; like the SDK's Histogram, ignore NaN, infinities and
        negative values."""
        if not 0.0 <= value < _INF:
            return
        index = bisect_left(self._bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._sum += value
            if value < self._min:
                self._min = value
            if value > self._max:
                self._max = value
            if self._windows:
                for window in self._windows.values():
                    window.counts[index] += 1
                    window.sum += value
                    if value < window.min:
                        window.min = value
                    if value > window.max:
                        window.max = value

    def snapshot(self) -> Snapshot:
        """Everything recorded since the cell was made."""
        with self._lock:
            counts = tuple(self._counts)
            return Snapshot(sum(counts), self._sum, counts, self._min, self._max)

    def open_window(self, token: Hashable) -> None:
        """Start counting for ``token`` from now (no-op if already open)."""
        with self._lock:
            if token not in self._windows:
                self._windows[token] = _Window(len(self._counts))

    def close_window(self, token: Hashable) -> None:
        with self._lock:
            self._windows.pop(token, None)

    def take_window(self, token: Hashable) -> Snapshot | None:
        """What ``token``'s window counted since it was opened or last taken, and
        restart it; None if no such window is open."""
        with self._lock:
            window = self._windows.get(token)
            if window is None:
                return None
            self._windows[token] = _Window(len(self._counts))
        return window.snapshot()  # detached: nothing writes to it any more
