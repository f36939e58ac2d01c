"""The mesh's histogram cell: OpenTelemetry explicit-bucket semantics, exact under threads."""

from __future__ import annotations

import math
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.telemetry.histogram import HistogramCell, Snapshot
from meshlib.telemetry.metrics import DURATION_BUCKETS

bounds_st = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=0, max_size=12, unique=True
).map(lambda found: tuple(sorted(found)))
values_st = st.lists(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([*DURATION_BUCKETS, 0.0, -0.0]),  # right on a bound
    ),
    max_size=60,
)


def reference(bounds: tuple[float, ...], values: list[float]) -> Snapshot:
    """What the OTel data model says, computed the slow way (the SDK's Histogram
    instrument drops NaN, infinities and negative values)."""
    kept = [v for v in values if not math.isnan(v) and 0 <= v < math.inf]
    edges = [-math.inf, *bounds, math.inf]
    counts = tuple(
        sum(1 for v in kept if edges[i] < v <= edges[i + 1]) for i in range(len(bounds) + 1)
    )
    total = 0.0
    for v in kept:
        total += v
    return Snapshot(
        len(kept), total, counts, min(kept, default=math.inf), max(kept, default=-math.inf)
    )


@given(bounds_st, values_st)
def test_counts_sum_min_max_match_the_reference(
    bounds: tuple[float, ...], values: list[float]
) -> None:
    cell = HistogramCell(bounds)
    for value in values:
        cell.record(value)
    assert cell.snapshot() == reference(bounds, values)
    assert cell.bounds == bounds


@given(values_st, values_st)
def test_a_window_counts_from_its_opening_and_restarts_when_taken(
    before: list[float], after: list[float]
) -> None:
    cell = HistogramCell(DURATION_BUCKETS)
    for value in before:
        cell.record(value)
    assert cell.take_window("reader") is None  # not open
    cell.open_window("reader")
    for value in after:
        cell.record(value)
    assert cell.take_window("reader") == reference(DURATION_BUCKETS, after)
    assert cell.take_window("reader") == reference(DURATION_BUCKETS, [])
    assert cell.snapshot() == reference(DURATION_BUCKETS, before + after)
    cell.close_window("reader")
    assert cell.take_window("reader") is None


@pytest.mark.parametrize("bounds", [(1.0, float("inf")), (2.0, 1.0), (1.0, 1.0)])
def test_bounds_must_be_finite_and_increasing(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        HistogramCell(bounds)


@settings(max_examples=15, deadline=None)
@given(
    threads=st.integers(min_value=2, max_value=6),
    values=st.lists(st.floats(min_value=0, max_value=20), min_size=1, max_size=8),
)
def test_concurrent_recording_loses_nothing(threads: int, values: list[float]) -> None:
    rounds = 400
    cell = HistogramCell(DURATION_BUCKETS)
    cell.open_window("delta")
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        for _ in range(rounds):
            for value in values:
                cell.record(value)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads far more often: races show up if any
    try:
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    expected = reference(DURATION_BUCKETS, values)
    for got in (cell.snapshot(), cell.take_window("delta")):
        assert got is not None
        assert got.count == expected.count * threads * rounds
        assert got.bucket_counts == tuple(c * threads * rounds for c in expected.bucket_counts)
        assert got.sum == pytest.approx(expected.sum * threads * rounds)
        assert (got.min, got.max) == (expected.min, expected.max)


def test_values_queued_before_a_window_opens_are_not_in_it() -> None:
    cell = HistogramCell(DURATION_BUCKETS)
    for _ in range(3):  # fewer than a batch: queued
        cell.record(0.01)
    cell.open_window("reader")
    cell.record(0.2)
    taken = cell.take_window("reader")
    assert taken is not None and (taken.count, taken.sum) == (1, 0.2)
    assert cell.snapshot().count == 4
