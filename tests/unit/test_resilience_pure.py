"""Pure resilience objects: backoff, retry budget, rate limits, bulkhead, faults.

Time is a fake clock everywhere; no assertion depends on how long anything takes.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.resilience import (
    Backoff,
    Bulkhead,
    Fault,
    FaultPolicy,
    KeyedLimiter,
    RetryBudget,
    TokenBucket,
    decide_fault,
)
from meshlib.resilience.limits import _TaskWaiter


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Synchronise with another thread: poll, failing only after a generous 10 s."""
    deadline = time.monotonic() + 10.0
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds (bounded)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


# Backoff


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(1e-3, 10.0),
    maximum=st.floats(0.0, 120.0),
    retry=st.integers(1, 60),
    seed=st.integers(0, 2**32),
)
def test_backoff_cap_is_base_doubling_clipped_and_delay_within(
    base: float, maximum: float, retry: int, seed: int
) -> None:
    backoff = Backoff(base, maximum)
    expected = min(base * 2.0 ** (retry - 1), maximum)
    assert backoff.cap(retry) == pytest.approx(expected, rel=1e-12)
    delay = backoff.delay(retry, random.Random(seed))
    assert 0.0 <= delay <= backoff.cap(retry)


def test_backoff_full_jitter_spreads_over_the_whole_range() -> None:
    backoff = Backoff(0.1, 10.0)
    rng = random.Random(7)
    draws = [backoff.delay(4, rng) for _ in range(20_000)]  # cap 0.8
    assert min(draws) < 0.01
    assert max(draws) > 0.79
    assert sum(draws) / len(draws) == pytest.approx(0.4, rel=0.02)


def test_backoff_beyond_precomputed_and_huge_retry_numbers_hit_max() -> None:
    backoff = Backoff(0.05, 2.0)
    assert backoff.cap(1) == 0.05
    assert backoff.cap(11) == 2.0
    assert backoff.cap(100_000) == 2.0
    assert 0 <= backoff.delay(100_000, random.Random(1)) <= 2.0


@pytest.mark.parametrize(
    ("base", "maximum"), [(0.0, 1.0), (-1.0, 1.0), (0.1, -1.0), (0.1, math.inf)]
)
def test_backoff_rejects_bad_parameters(base: float, maximum: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(base, maximum)


def test_backoff_retry_numbers_start_at_one() -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        Backoff(0.1, 1.0).delay(0, random.Random(0))


# Retry budget


def test_budget_reserve_allows_min_per_second_times_window_without_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, window=10.0, clock=FakeClock())
    assert [budget.try_acquire_retry() for _ in range(11)] == [True] * 10 + [False]
    assert budget.exhausted == 1


def test_budget_ratio_is_exact_in_integer_units() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=10.0, clock=FakeClock())
    for _ in range(4):
        budget.record_request()
    assert not budget.try_acquire_retry()  # 0.8 of a retry
    budget.record_request()
    assert budget.try_acquire_retry()  # 5 x 0.2 is exactly one
    assert not budget.try_acquire_retry()
    for _ in range(100):
        budget.record_request()
    assert sum(budget.try_acquire_retry() for _ in range(30)) == 20


def test_budget_deposits_and_withdrawals_expire_after_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=0.5, window=10.0, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert sum(budget.try_acquire_retry() for _ in range(20)) == 5 + 5
    assert budget.snapshot() | {"exhausted": 0} == {
        "ratio": 0.5,
        "min_per_second": 0.5,
        "window": 10.0,
        "requests": 10,
        "retries": 10,
        "available": 0,
        "exhausted": 0,
    }
    clock.advance(5.0)
    assert not budget.try_acquire_retry()
    clock.advance(5.0)  # everything from the first bucket is forgotten
    snap = budget.snapshot()
    assert (snap["requests"], snap["retries"], snap["available"]) == (0, 0, 5)
    assert sum(budget.try_acquire_retry() for _ in range(10)) == 5


def test_budget_survives_long_idle_gaps_and_a_clock_stepping_back() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=1.0, clock=clock)
    budget.record_request()
    clock.advance(1e6)
    assert not budget.try_acquire_retry()
    budget.record_request()
    clock.advance(-5.0)  # a late reading lands in the current bucket
    assert budget.try_acquire_retry()
    assert not budget.try_acquire_retry()


@pytest.mark.parametrize(
    ("ratio", "per_second", "window"),
    [(-0.1, 1.0, 1.0), (math.nan, 1.0, 1.0), (0.1, -1.0, 1.0), (0.1, 1.0, 0.0)],
)
def test_budget_rejects_bad_parameters(ratio: float, per_second: float, window: float) -> None:
    with pytest.raises(ValueError, match="retry budget"):
        RetryBudget(ratio, per_second, window)


budget_events = st.lists(
    st.tuples(st.floats(0.0, 4.0), st.sampled_from(["request", "retry"])),
    min_size=1,
    max_size=150,
)


@settings(max_examples=150, deadline=None)
@given(
    events=budget_events,
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.25, 1.0 / 3.0, 1.0, 2.5]),
    per_second=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    window=st.sampled_from([1.0, 7.3, 10.0]),
)
def test_budget_never_exceeds_ratio_of_requests_plus_reserve(
    events: list[tuple[float, str]], ratio: float, per_second: float, window: float
) -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio, per_second, window, clock=clock)
    reserve = per_second * window
    requests: list[float] = []
    retries: list[float] = []
    eps = 1e-6  # bucket edges computed in floating point
    for dt, kind in events:
        clock.advance(dt * window / 4.0)
        t = clock.now
        if kind == "request":
            budget.record_request()
            requests.append(t)
            continue

        def count(times: list[float], span: float, t: float = t) -> int:
            return sum(1 for s in times if s >= t - span)

        if budget.try_acquire_retry():
            retries.append(t)
            # Counting this retry, the retries of the last 0.9 window are within the
            # ratio of the requests of the last window plus the reserve.
            recent = count(retries, 0.9 * window - eps)
            assert recent <= ratio * count(requests, window + eps) + reserve + 1e-6
        else:
            # And it is not stingier than the same bound the other way round.
            older = count(retries, window + eps)
            assert older + 1 > ratio * count(requests, 0.9 * window - eps) + reserve - 1e-3


# Token bucket


def test_token_bucket_burst_then_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == pytest.approx(0.5)
    clock.advance(0.25)
    assert not bucket.try_acquire()
    assert bucket.retry_after() == pytest.approx(0.25)
    clock.advance(0.25)
    assert bucket.retry_after() == 0.0
    assert bucket.try_acquire()
    clock.advance(100.0)
    assert bucket.tokens == 3.0  # capped at burst


def test_token_bucket_multi_token_requests() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=5, clock=clock)
    assert bucket.try_acquire(5)
    assert not bucket.try_acquire(2)
    assert bucket.retry_after(2) == pytest.approx(2.0)
    assert not bucket.try_acquire(6)
    assert bucket.retry_after(6) == math.inf


def test_token_bucket_ignores_a_clock_stepping_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    assert bucket.try_acquire()
    clock.advance(-10.0)
    assert not bucket.try_acquire()
    clock.advance(0.5)  # still before the last reading: nothing accrues
    assert not bucket.try_acquire()
    clock.advance(10.5)
    assert bucket.try_acquire()


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (math.inf, 1), (1.0, 0)])
def test_token_bucket_rejects_bad_parameters(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


@settings(max_examples=150, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 1000.0 / 7.0]),
    burst=st.integers(1, 8),
    calls=st.lists(st.tuples(st.floats(0.0, 2.0), st.integers(1, 3)), max_size=120),
)
def test_token_bucket_never_grants_more_than_rate_times_t_plus_burst(
    rate: float, burst: int, calls: list[tuple[float, int]]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock=clock)
    grants: list[tuple[float, int]] = []
    for dt, n in calls:
        clock.advance(dt / rate)
        if bucket.try_acquire(n):
            grants.append((clock.now, n))
    for i, (start, _) in enumerate(grants):
        taken = 0
        for t, n in grants[i:]:
            taken += n
            assert taken <= rate * (t - start) + burst + 1e-6


# Keyed limiter


def test_keyed_limiter_keys_are_independent() -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(rate=1.0, burst=2, clock=clock)
    assert [limiter.try_acquire("a") for _ in range(3)] == [True, True, False]
    assert limiter.try_acquire("b")
    assert limiter.retry_after("a") == pytest.approx(1.0)
    assert limiter.retry_after("never-seen") == 0.0


def test_keyed_limiter_evicts_least_recently_used() -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(rate=1.0, burst=1, max_keys=2, clock=clock)
    assert limiter.try_acquire("a")
    assert limiter.try_acquire("b")
    assert not limiter.try_acquire("a")  # a is now the most recently used
    assert limiter.try_acquire("c")  # evicts b (drained: an active eviction)
    assert len(limiter) == 2
    assert not limiter.try_acquire("a")  # a kept its empty bucket
    assert (limiter.evicted, limiter.evicted_active) == (1, 1)
    clock.advance(5.0)  # a and c refill
    assert limiter.try_acquire("d")  # evicts c, which was full again
    assert (limiter.evicted, limiter.evicted_active) == (2, 1)
    assert limiter.snapshot()["keys"] == 2


@settings(max_examples=50, deadline=None)
@given(
    keys=st.lists(st.integers(0, 40), max_size=300),
    max_keys=st.integers(1, 10),
)
def test_keyed_limiter_memory_is_bounded(keys: list[int], max_keys: int) -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(rate=10.0, burst=2, max_keys=max_keys, clock=clock)
    for key in keys:
        limiter.try_acquire(key)
        clock.advance(0.01)
        assert len(limiter) <= max_keys


# Bulkhead


def test_bulkhead_try_enter_and_retries() -> None:
    b = Bulkhead(max_requests=2, max_pending=0, max_retries=1)
    assert b.try_enter() and b.try_enter()
    assert not b.try_enter()
    assert b.enter_sync(timeout=5.0) is False  # no room to wait: refused at once
    b.exit()
    assert b.try_enter()
    assert b.try_enter_retry()
    assert not b.try_enter_retry()
    b.exit_retry()
    assert b.try_enter_retry()
    assert (b.inflight, b.pending, b.retries_inflight) == (2, 0, 1)
    assert (b.overflows, b.retry_overflows, b.timeouts) == (2, 1, 0)
    b.exit()
    b.exit()
    b.exit_retry()
    with pytest.raises(RuntimeError):
        b.exit()
    with pytest.raises(RuntimeError):
        b.exit_retry()
    assert b.snapshot()["inflight"] == 0


def test_bulkhead_zero_timeout_does_not_wait() -> None:
    b = Bulkhead(1, 5, 0)
    assert b.enter_sync(0.0)
    assert not b.enter_sync(0.0)
    assert not b.enter_sync(-1.0)
    assert not b.enter_sync(math.nan)
    assert asyncio.run(b.enter_async(0.0)) is False
    assert (b.pending, b.overflows) == (0, 4)


def test_bulkhead_sync_wait_times_out_and_leaves_the_line() -> None:
    b = Bulkhead(1, 1, 0)
    assert b.try_enter()
    assert not b.enter_sync(0.01)
    assert (b.inflight, b.pending, b.timeouts, b.overflows) == (1, 0, 1, 0)


def test_bulkhead_sync_waiters_are_served_in_order_and_newcomers_cannot_jump() -> None:
    b = Bulkhead(1, 3, 0)
    assert b.try_enter()
    order: list[int] = []

    def wait(i: int) -> None:
        assert b.enter_sync(10.0)
        order.append(i)

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(3)]
    for i, thread in enumerate(threads):
        thread.start()
        wait_until(lambda i=i: b.pending == i + 1, "waiter in line")
    assert not b.enter_sync(10.0)  # line full: overflow at once
    for i in range(3):
        b.exit()  # hands the slot to the oldest waiter
        assert not b.try_enter()  # never to a newcomer
        wait_until(lambda i=i: len(order) == i + 1, "waiter admitted")
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2]
    assert (b.inflight, b.pending) == (1, 0)


def test_bulkhead_async_waiters_fifo_cancel_and_timeout() -> None:
    async def main() -> None:
        b = Bulkhead(1, 4, 0)
        assert await b.enter_async(1.0)
        order: list[int] = []

        async def wait(i: int) -> None:
            assert await b.enter_async(10.0)
            order.append(i)

        tasks = []
        for i in range(3):
            tasks.append(asyncio.create_task(wait(i)))
            await until(lambda i=i: b.pending == i + 1)
        tasks[1].cancel()  # cancelled while waiting: leaves the line
        await until(lambda: b.pending == 2)
        assert not await b.enter_async(0.01)  # times out at the back of the line
        assert b.timeouts == 1
        b.exit()
        await until(lambda: order == [0])
        b.exit()
        await until(lambda: order == [0, 2])
        b.exit()
        assert (b.inflight, b.pending) == (0, 0)
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def test_bulkhead_cancelled_after_grant_passes_the_slot_on() -> None:
    async def main() -> None:
        b = Bulkhead(1, 2, 0)
        assert b.try_enter()
        first = asyncio.create_task(b.enter_async(10.0))
        second = asyncio.create_task(b.enter_async(10.0))
        await until(lambda: b.pending == 2)
        b.exit()  # granted to first, whose wake-up is still queued
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second  # the slot went on instead of leaking
        assert (b.inflight, b.pending) == (1, 0)
        third = asyncio.create_task(b.enter_async(10.0))
        await until(lambda: b.pending == 1)
        b.exit()
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
        assert (b.inflight, b.pending) == (0, 0)

    asyncio.run(main())


def test_bulkhead_async_waiter_woken_from_another_thread_and_vice_versa() -> None:
    b = Bulkhead(1, 1, 0)

    async def main() -> None:
        assert b.try_enter()
        task = asyncio.create_task(b.enter_async(math.inf))
        await until(lambda: b.pending == 1)
        threading.Thread(target=b.exit).start()
        assert await task

    asyncio.run(main())
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(b.enter_sync(math.inf)))
    thread.start()
    wait_until(lambda: b.pending == 1, "thread waiting")

    async def release() -> None:
        b.exit()

    asyncio.run(release())
    thread.join()
    assert got == [True]
    b.exit()
    assert (b.inflight, b.pending) == (0, 0)


def test_bulkhead_waiter_of_a_closed_loop_does_not_keep_the_slot() -> None:
    b = Bulkhead(1, 2, 0)
    assert b.try_enter()
    loop = asyncio.new_event_loop()

    async def make() -> _TaskWaiter:
        return _TaskWaiter(b._lock)

    dead = loop.run_until_complete(make())
    loop.close()
    b._waiters.append(dead)  # as if its loop was closed while it waited
    b.exit()
    assert dead.granted and (b.inflight, b.pending) == (0, 0)


@settings(max_examples=8, deadline=None)
@given(
    max_requests=st.integers(1, 3),
    max_pending=st.integers(0, 3),
    threads=st.integers(2, 8),
)
def test_bulkhead_threads_never_exceed_limits(
    max_requests: int, max_pending: int, threads: int
) -> None:
    b = Bulkhead(max_requests, max_pending, 0)
    lock = threading.Lock()
    state = {"inside": 0, "peak": 0, "peak_pending": 0, "admitted": 0, "refused": 0}
    rounds = 15

    def work() -> None:
        for _ in range(rounds):
            ok = b.enter_sync(5.0)
            with lock:
                state["peak_pending"] = max(state["peak_pending"], b.pending)
                if not ok:
                    state["refused"] += 1
                    continue
                state["admitted"] += 1
                state["inside"] += 1
                state["peak"] = max(state["peak"], state["inside"])
            time.sleep(0.0002)  # hold the slot so that others queue
            with lock:
                state["inside"] -= 1
            b.exit()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert state["peak"] <= max_requests
    assert state["peak_pending"] <= max_pending
    assert state["admitted"] + state["refused"] == threads * rounds
    assert state["refused"] == b.overflows + b.timeouts
    assert (b.inflight, b.pending) == (0, 0)


@settings(max_examples=60, deadline=None)
@given(
    max_requests=st.integers(1, 3),
    max_pending=st.integers(0, 4),
    holds=st.lists(st.integers(0, 5), min_size=1, max_size=12),
    cancel=st.sets(st.integers(0, 11)),
    cancel_after=st.integers(0, 6),
)
def test_bulkhead_tasks_never_exceed_limits_and_cancellation_leaks_nothing(
    max_requests: int, max_pending: int, holds: list[int], cancel: set[int], cancel_after: int
) -> None:
    b = Bulkhead(max_requests, max_pending, 0)
    inside = peak = peak_pending = 0

    async def work(hold: int) -> bool:
        nonlocal inside, peak, peak_pending
        ok = await b.enter_async(10.0)
        peak_pending = max(peak_pending, b.pending)
        if not ok:
            return False
        try:
            inside += 1
            peak = max(peak, inside)
            for _ in range(hold):
                await asyncio.sleep(0)
        finally:
            inside -= 1
            b.exit()
        return True

    async def main() -> None:
        nonlocal peak_pending
        tasks = [asyncio.create_task(work(hold)) for hold in holds]
        for _ in range(cancel_after):
            await asyncio.sleep(0)
            peak_pending = max(peak_pending, b.pending)
        for i in cancel & set(range(len(tasks))):
            tasks[i].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert peak <= max_requests
    assert peak_pending <= max_pending
    assert (b.inflight, b.pending) == (0, 0)


def test_bulkhead_rejects_negative_limits() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        Bulkhead(1, -1, 0)


# Faults


def test_no_fault_policy_never_faults() -> None:
    rng = random.Random(0)
    assert all(decide_fault(FaultPolicy(), {}, rng) is None for _ in range(100))


def test_faults_at_100_percent() -> None:
    rng = random.Random(0)
    assert decide_fault(FaultPolicy(delay=0.5), {}, rng) == Fault(0.5, None)
    assert decide_fault(FaultPolicy(abort_status=503), {}, rng) == Fault(None, 503)
    both = FaultPolicy(delay=0.1, abort_status=500)
    assert decide_fault(both, {}, rng) == Fault(0.1, 500)
    zero = FaultPolicy(delay=0.1, delay_percent=0.0, abort_status=500, abort_percent=0.0)
    assert all(decide_fault(zero, {}, rng) is None for _ in range(100))


def binomial_ok(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


@settings(max_examples=30, deadline=None)
@given(
    delay_percent=st.floats(0.0, 100.0),
    abort_percent=st.floats(0.0, 100.0),
    seed=st.integers(0, 2**32),
)
def test_fault_proportions_are_independent_percentages(
    delay_percent: float, abort_percent: float, seed: int
) -> None:
    policy = FaultPolicy(
        delay=0.01, delay_percent=delay_percent, abort_status=503, abort_percent=abort_percent
    )
    rng = random.Random(seed)
    n = 4000
    faults = [decide_fault(policy, {}, rng) for _ in range(n)]
    delays = sum(1 for f in faults if f is not None and f.delay is not None)
    aborts = sum(1 for f in faults if f is not None and f.abort_status is not None)
    both = sum(1 for f in faults if f is not None and f.delay and f.abort_status)
    pd, pa = delay_percent / 100, abort_percent / 100
    assert binomial_ok(delays, n, pd)
    assert binomial_ok(aborts, n, pa)
    assert binomial_ok(both, n, pd * pa)


@settings(max_examples=60, deadline=None)
@given(
    name=st.from_regex(r"x-[a-z0-9-]{1,12}", fullmatch=True),
    value=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8),
    other=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=8),
)
def test_header_gated_faults_fire_only_with_the_exact_header(
    name: str, value: str, other: str
) -> None:
    policy = FaultPolicy(abort_status=503, header=(name.upper(), value))
    assert policy.header == (name, value)
    rng = random.Random(0)
    assert decide_fault(policy, httpx.Headers({}), rng) is None
    assert decide_fault(policy, httpx.Headers({"x-unrelated": value}), rng) is None
    if other != value:
        assert decide_fault(policy, httpx.Headers({name: other}), rng) is None
    assert decide_fault(policy, httpx.Headers({name.upper(): value}), rng) == Fault(None, 503)
    assert decide_fault(policy, {name: value}, rng) == Fault(None, 503)


def test_faults_are_reproducible_with_a_seed() -> None:
    policy = FaultPolicy(delay=0.2, delay_percent=30, abort_status=500, abort_percent=30)
    rng_a, rng_b = random.Random(5), random.Random(5)
    runs = [[decide_fault(policy, {}, rng) for _ in range(200)] for rng in (rng_a, rng_b)]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 4  # none, delay, abort, both


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay": -1.0},
        {"delay": math.nan},
        {"abort_status": 99},
        {"abort_status": 600},
        {"delay_percent": 101.0},
        {"abort_percent": -0.5},
        {"abort_percent": math.nan},
    ],
)
def test_fault_policy_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="fault"):
        FaultPolicy(**kwargs)  # type: ignore[arg-type]
