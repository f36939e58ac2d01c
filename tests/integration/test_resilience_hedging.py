"""Hedging against real servers: with one slow endpoint out of three a backup request
cuts the tail latency (compared with an unhedged run in the same test), the extra
load stays within the hedge budget, and percentile hedging starts after warm-up."""

from __future__ import annotations

import random

import pytest

from integration.resilience_support import percentile, run_load, seen_total, users_policy
from integration.support import Driver, StartEcho
from meshlib import Mesh

pytestmark = pytest.mark.integration

SLOW = 0.3
HEDGE_RESERVE = 10  # the hedge budget's reserve: 1 hedge per second over 10 s


def test_hedging_cuts_p99_within_its_budget(echo: StartEcho, driver: Driver) -> None:
    slow, a, b = echo("slow", "a", "b")
    slow.app.delay = SLOW
    requests, max_extra = 60, 50
    url = "http://users/x"
    with Mesh(users_policy(slow, a, b, timeout="5s"), rng=random.Random(1)) as plain:
        unhedged = run_load(plain, driver.kind, url, requests, concurrency=6)
    before = seen_total(slow, a, b)
    hedging = {"hedge_after": "20ms", "max_extra_percent": max_extra}
    policy = users_policy(slow, a, b, timeout="5s", hedging=hedging)
    with Mesh(policy, rng=random.Random(1)) as mesh:
        hedged = run_load(mesh, driver.kind, url, requests, concurrency=6)
    extra = seen_total(slow, a, b) - before - requests

    assert all(o.ok for o in unhedged + hedged)
    p99_unhedged = percentile([o.elapsed for o in unhedged], 99)
    p99_hedged = percentile([o.elapsed for o in hedged], 99)
    assert p99_unhedged >= SLOW  # a third of the unhedged calls waited for the slow one
    assert p99_hedged < p99_unhedged / 2, (p99_hedged, p99_unhedged)
    # the backups won: the slow endpoint answered (almost) none of the hedged calls
    assert [o.server for o in hedged].count("slow") <= 2
    assert 0 < extra <= requests * max_extra / 100 + HEDGE_RESERVE + 2


def test_hedge_budget_caps_the_extra_load(echo: StartEcho, driver: Driver) -> None:
    slow, a, b = echo("slow", "a", "b")
    slow.app.delay = 0.1
    requests, max_extra = 90, 10
    hedging = {"hedge_after": "10ms", "max_extra_percent": max_extra}
    with Mesh(users_policy(slow, a, b, hedging=hedging), rng=random.Random(1)) as mesh:
        outcomes = run_load(mesh, driver.kind, "http://users/x", requests, concurrency=6)
    assert all(o.ok for o in outcomes)
    extra = seen_total(slow, a, b) - requests
    # 30 calls went to the slow endpoint first and all wanted a backup; the budget
    # allows 10% of the calls plus the reserve (and one per concurrent caller racing it)
    assert HEDGE_RESERVE <= extra <= requests * max_extra / 100 + HEDGE_RESERVE + 6


def test_percentile_hedging_starts_after_min_samples(echo: StartEcho, driver: Driver) -> None:
    slow, a, b = echo("slow", "a", "b")
    hedging = {"hedge_after": "p90", "min_samples": 20, "max_extra_percent": 100}
    url = "http://users/x"
    with Mesh(users_policy(slow, a, b, hedging=hedging), rng=random.Random(1)) as mesh:
        assert mesh.explain("GET", url)["resilience"]["hedging"]["delay"] is None
        # warm-up: fewer than min_samples latencies, so no hedge can be sent
        warm = run_load(mesh, driver.kind, url, 19, concurrency=1)
        assert all(o.ok for o in warm)
        assert seen_total(slow, a, b) == 19
        assert mesh.explain("GET", url)["resilience"]["hedging"]["delay"] is None
        run_load(mesh, driver.kind, url, 11, concurrency=1)
        delay = mesh.explain("GET", url)["resilience"]["hedging"]["delay"]
        assert delay is not None and delay < SLOW

        # now one endpoint turns slow: its first attempts are hedged at the p90
        # of the fast answers, and a backup answers first
        slow.app.delay = SLOW
        slow_before = len(slow.seen)
        outcomes = run_load(mesh, driver.kind, url, 45, concurrency=5)
    assert all(o.ok for o in outcomes)
    assert len(slow.seen) > slow_before  # it still got first attempts
    assert [o.server for o in outcomes].count("slow") == 0
