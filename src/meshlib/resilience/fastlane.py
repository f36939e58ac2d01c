"""The fast lane: the first attempt of a call, admitted and settled in two calls.

Most calls succeed on their first attempt while every breaker is closed and the
bulkhead has room. For them, building a `CallControl` and walking its protocol
costs more than the decisions themselves: once a request's I/O has pushed the
resilience code out of the CPU caches, every Python function on the path costs
about half a microsecond (docs/benchmarks.md). So the drivers try this lane
first:

- `enter` admits the call (bulkhead slot, rate limit, budget deposit) and gives
  the first attempt's time limit, or declines without having changed anything:
  hedging or faults configured, a breaker that is not closed-and-healthy, no free
  slot, a rate limit that refuses, a deadline already gone;
- `settle` takes the first response: if no retry is due it records the outcome,
  releases the slot and says the call is over; otherwise it records nothing and the
  driver hands the call to `CallControl.resume`, which records it and goes on.

Both read the same compiled policy and state objects as `CallControl` and touch
them exactly as its slow path would (the equivalence is tested); they inline the
trivial healthy-state steps of those objects instead of calling them, which is
the whole point of the lane.
"""

from __future__ import annotations

from typing import NamedTuple

from meshlib.resilience.breaker import Breaker
from meshlib.resilience.budget import BUCKETS
from meshlib.resilience.deadline import INBOUND_DEADLINE
from meshlib.resilience.guard import ServiceGuard
from meshlib.resilience.outcome import FAILURE_STATUS
from meshlib.resilience.policy import RoutePolicy

PER_TRY = "per-try timeout"
ROUTE = "route timeout"
INBOUND = "inbound deadline"


class Entry(NamedTuple):
    """An admitted first attempt: its time limit and the call's deadline."""

    timeout: float | None
    limit: str
    """Which limit ``timeout`` is: per-try timeout, route timeout or inbound deadline."""
    deadline: float | None
    deadline_source: str


def enter(
    policy: RoutePolicy, guard: ServiceGuard | None, address: str, now: float
) -> Entry | None:
    """Admit the first attempt to ``address``, or None (nothing taken) for the slow path.

    ``now`` is monotonic seconds. On an Entry the call holds a bulkhead slot, if the
    service has a bulkhead, until `settle` returns True or `leave` is called.
    """
    if policy.hedge is not None or policy.faults is not None:
        return None
    deadline = source = None
    if policy.timeout:
        deadline, source = now + policy.timeout, ROUTE
    inherited = INBOUND_DEADLINE.get()
    if inherited is not None and (deadline is None or inherited < deadline):
        deadline, source = inherited, INBOUND
    if deadline is not None and deadline <= now:
        return None  # the slow path raises DeadlineExceeded with the whole story
    bulkhead = None
    if guard is not None:
        breaker = guard.cluster_breaker
        if breaker is not None and not breaker.healthy:
            return None
        board = guard.breakers
        if board is not None:
            endpoint_breaker: Breaker | None = board._breakers.get(address)
            if endpoint_breaker is not None and not endpoint_breaker.healthy:
                return None
        bulkhead = guard.bulkhead
        if bulkhead is not None:
            with bulkhead._lock:
                # while anyone waits every slot is taken, so this never jumps the line
                if bulkhead.inflight >= bulkhead.max_requests:
                    return None
                bulkhead.inflight += 1
    limiter = policy.rate_limit
    if limiter is not None:
        # TokenBucket.try_acquire(1), inlined (the bucket's clock is the same monotonic)
        elapsed = now - limiter._last
        tokens = limiter._tokens
        if elapsed > 0:
            limiter._last = now
            tokens += elapsed * limiter.rate
            if tokens > limiter.burst:
                tokens = limiter.burst
        if tokens < 1:
            limiter._tokens = tokens
            if bulkhead is not None:
                bulkhead.exit()
            return None  # the slow path refuses it again, with the error
        limiter._tokens = tokens - 1
    budget = policy.budget
    if budget is not None:
        # RetryBudget.record_request, inlined
        tick = int(now * budget._inv_width)
        last = budget._view[0]
        tick = budget._rotate(tick)[0] if tick > last else last
        budget._requests[tick % BUCKETS] += 1
    retry = policy.retry
    timeout = retry.per_try_timeout if retry is not None else None
    if deadline is not None:
        remaining = deadline - now
        if timeout is None or remaining < timeout:
            assert source is not None
            return _entry(Entry, (max(remaining, 0.001), source, deadline, source))
    return _entry(Entry, (timeout, PER_TRY, deadline, source or ROUTE))


_entry = tuple.__new__  # builds an Entry without NamedTuple's Python-level __new__


def settle(policy: RoutePolicy, guard: ServiceGuard | None, address: str, status: int) -> bool:
    """The first attempt answered ``status``: True if that ends the call (recorded, slot
    released); False if a retry is due, with nothing recorded or released."""
    retry = policy.retry
    if retry is not None and status in retry.retry_statuses:
        return False
    if guard is None:
        return True
    if status < FAILURE_STATUS:
        board = guard.breakers
        endpoint_breaker = board._breakers.get(address) if board is not None else None
        breaker = guard.cluster_breaker
        if (board is None or (endpoint_breaker is not None and endpoint_breaker.healthy)) and (
            breaker is None or breaker.healthy
        ):
            # Breaker.record(True) on a healthy breaker only counts it
            if endpoint_breaker is not None:
                endpoint_breaker.successes += 1
            if breaker is not None:
                breaker.successes += 1
            outlier = guard.outlier
            if outlier is not None and (host := outlier._hosts.get(address)) is not None:
                # OutlierDetector.record for a status below 500, inlined
                if outlier._split:
                    host.loc_total += 1
                    host.loc_ok += 1
                    host.clocal = 0
                host.ext_total += 1
                host.ext_ok += 1
                host.c5xx = 0
                host.cgw = 0
        else:
            guard.record(address, status, None)
    else:
        guard.record(address, status, None)
    bulkhead = guard.bulkhead
    if bulkhead is not None:
        with bulkhead._lock:
            if bulkhead._waiters or bulkhead.inflight <= 0:
                bulkhead._release_locked()  # hand the slot to the oldest waiter
            else:
                bulkhead.inflight -= 1
    return True


def leave(guard: ServiceGuard | None) -> None:
    """Release the slot `enter` took (after `settle` returned True, it already did)."""
    bulkhead = guard.bulkhead if guard is not None else None
    if bulkhead is not None:
        bulkhead.exit()
