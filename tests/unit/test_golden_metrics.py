"""Golden metrics windows: rates, success rates and latency quantiles, checked
against values computed from the same requests."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.telemetry.stats import TrafficStats, to_dot
from meshlib.telemetry.window import BOUNDS, Window, summarize


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def exact(latencies: list[float], q: float) -> float:
    ordered = sorted(latencies)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_counts_rate_and_success_rate() -> None:
    clock = FakeClock()
    window = Window(60.0, slices=12, clock=clock)
    for i in range(120):  # 2 requests per second for a minute, every tenth fails
        window.record(i % 10 != 0, 0.010)
        clock.now += 0.5
    clock.now -= 0.1  # read just before the first slice leaves the window
    summary = window.summary()
    assert summary["requests"] == 120
    assert summary["success_rate"] == 0.9
    assert 1.9 <= summary["rps"] <= 2.1
    assert 9.5 <= summary["p50_ms"] <= 10.5


def test_old_slices_leave_the_window() -> None:
    clock = FakeClock()
    window = Window(60.0, slices=12, clock=clock)
    for _ in range(50):
        window.record(False, 1.0)
    clock.now += 61.0
    for _ in range(10):
        window.record(True, 0.001)
    summary = window.summary()
    assert summary["requests"] == 10 and summary["success_rate"] == 1.0
    assert summary["p99_ms"] < 2.0
    assert window.total == 60  # the lifetime counter keeps everything
    clock.now += 120.0
    assert window.summary() == {
        "requests": 0,
        "rps": 0.0,
        "success_rate": None,
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
    }


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=60e-6, max_value=200.0, allow_nan=False), min_size=1, max_size=300)
)
def test_quantiles_are_within_the_bucket_resolution(latencies: list[float]) -> None:
    window = Window(60.0, clock=FakeClock())
    for seconds in latencies:
        window.record(True, seconds)
    summary = window.summary()
    for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
        truth = exact(latencies, q) * 1000
        assert truth / 1.1 <= summary[key] <= truth * 1.1, (q, truth, summary[key])


def test_buckets_cover_50us_to_5min() -> None:
    assert BOUNDS[0] <= 50e-6 * 1.0001 and BOUNDS[-1] >= 300.0
    assert all(b / a < 1.1 for a, b in itertools.pairwise(BOUNDS))


def test_routes_merge_into_a_destination_total() -> None:
    clock = FakeClock()
    stats = TrafficStats(clock=clock)
    fast = [0.001 * (i + 1) for i in range(90)]
    for seconds in fast:
        stats.outbound("users", "default").record(True, seconds)
    for _ in range(10):
        stats.outbound("users", "admin").record(False, 0.5)
    stats.inbound("checkout", "service").record(True, 0.002)
    snapshot = stats.snapshot()
    users = snapshot["outbound"]["users"]
    assert users["routes"]["default"]["requests"] == 90
    assert users["routes"]["admin"]["success_rate"] == 0.0
    assert users["total"]["requests"] == 100 and users["total"]["success_rate"] == 0.9
    truth = exact([*fast, *[0.5] * 10], 0.99) * 1000
    assert truth / 1.1 <= users["total"]["p99_ms"] <= truth * 1.1
    assert snapshot["inbound"]["checkout"]["routes"]["service"]["requests"] == 1
    assert summarize([])["requests"] == 0


def test_graph_and_dot() -> None:
    stats = TrafficStats(clock=FakeClock())
    for _ in range(20):
        stats.outbound("users", "default").record(True, 0.004)
    stats.outbound("billing", "default").record(False, 0.1)
    graph = stats.graph("checkout")
    assert graph["nodes"] == ["billing", "checkout", "users"]
    edges = {edge["destination"]: edge for edge in graph["edges"]}
    assert edges["users"]["requests"] == 20 and edges["users"]["success_rate"] == 1.0
    assert edges["billing"]["success_rate"] == 0.0
    dot = to_dot(graph)
    assert dot.startswith("digraph mesh {")
    assert '"checkout" -> "users"' in dot and "100.0% ok" in dot
    assert '"checkout" -> "billing"' in dot and "color=red" in dot


def test_a_young_window_divides_by_its_age() -> None:
    clock = FakeClock()
    window = Window(60.0, clock=clock)
    for _ in range(10):
        window.record(True, 0.001)
        clock.now += 0.2
    assert window.summary()["rps"] == pytest.approx(5.0)  # 10 requests in its first 2 s


def test_graph_as_svg() -> None:
    import xml.etree.ElementTree as ElementTree

    from meshlib.telemetry.svg import to_svg

    stats = TrafficStats(clock=FakeClock())
    for _ in range(20):
        stats.outbound("users", "default").record(True, 0.004)
    stats.outbound("bill<ing>", "default").record(False, 0.1)
    svg = to_svg(stats.graph("checkout"))
    root = ElementTree.fromstring(svg)  # well-formed, names escaped
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert {"checkout", "users", "bill<ing>"} <= set(texts)
    assert any("100.0% ok" in t for t in texts) and any("0.0% ok" in t for t in texts)
    assert len(list(root.iter("{http://www.w3.org/2000/svg}line"))) == 2
    assert "#c62828" in svg  # the failing edge is red


def test_queued_latencies_stay_in_the_slice_they_were_recorded_in() -> None:
    clock = FakeClock()
    window = Window(60.0, slices=12, clock=clock)
    for _ in range(3):  # fewer than a batch: queued, not yet in a bucket
        window.record(True, 0.001)
    clock.now += 5.0  # the next slice
    window.record(True, 1.0)
    newest, older = window.live_slices()[:2]
    fast = BOUNDS.index(next(b for b in BOUNDS if b >= 0.001))
    slow = BOUNDS.index(next(b for b in BOUNDS if b >= 1.0))
    assert (older.requests, older.buckets[fast], sum(older.buckets)) == (3, 3, 3)
    assert (newest.requests, newest.buckets[slow], sum(newest.buckets)) == (1, 1, 1)


def test_no_latency_is_lost_under_threads() -> None:
    import threading

    window = Window(3600.0, slices=12)
    threads = [
        threading.Thread(target=lambda: [window.record(True, 0.002) for _ in range(1000)])
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    buckets = sum(sum(one.buckets) for one in window.live_slices())
    requests = sum(one.requests for one in window.live_slices())
    assert buckets == 4000  # queued with an atomic append, counted under the lock
    assert requests <= 4000  # an unlocked increment may rarely be lost
