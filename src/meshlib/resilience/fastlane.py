"""The fast lane: the first attempt of a call, admitted and settled in two calls.

Most calls succeed on their first attempt while every breaker is closed and the
bulkhead has room. For them, building a `CallControl` and walking its protocol
costs more than the decisions themselves: once a request's I/O has pushed the
resilience code out of the CPU caches, every Python function on the path costs
about half a microsecond (docs/benchmarks.md). So the drivers try this lane
first:

The policy of a route and the guard of the service it sends to are joined once, at
compile time, into a flat `Lane` (a `RouteAction` holds one per cluster), so the
request path reads one object instead of walking policy and guard.

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

from meshlib.resilience.breaker import Breaker, BreakerBoard
from meshlib.resilience.budget import BUCKETS, RetryBudget
from meshlib.resilience.deadline import INBOUND_DEADLINE
from meshlib.resilience.guard import ServiceGuard
from meshlib.resilience.limits import Bulkhead
from meshlib.resilience.outcome import FAILURE_STATUS
from meshlib.resilience.outlier import OutlierDetector
from meshlib.resilience.policy import RoutePolicy
from meshlib.resilience.ratelimit import TokenBucket

PER_TRY = "per-try timeout"
ROUTE = "route timeout"
INBOUND = "inbound deadline"

_NO_STATUSES: frozenset[int] = frozenset()


class Lane:
    """A route's policy and a cluster's guard, flattened for `enter` and `settle`."""

    __slots__ = (
        "board",
        "budget",
        "bulkhead",
        "first",
        "guard",
        "limiter",
        "outlier",
        "per_try",
        "retry_statuses",
        "service_breaker",
        "timeout",
    )

    def __init__(self, policy: RoutePolicy, guard: ServiceGuard | None) -> None:
        self.guard = guard
        self.timeout = policy.timeout or None
        retry = policy.retry
        self.per_try = retry.per_try_timeout if retry is not None else None
        self.retry_statuses = retry.retry_statuses if retry is not None else _NO_STATUSES
        self.limiter: TokenBucket | None = policy.rate_limit
        self.budget: RetryBudget | None = policy.budget
        self.service_breaker: Breaker | None = None
        self.board: BreakerBoard | None = None
        self.bulkhead: Bulkhead | None = None
        self.outlier: OutlierDetector | None = None
        if guard is not None:
            self.service_breaker = guard.cluster_breaker
            self.board = guard.breakers
            self.bulkhead = guard.bulkhead
            self.outlier = guard.outlier
        # Without an inbound deadline the first attempt's limit is always the same: the
        # per-try timeout, or the whole route timeout if that is shorter.
        limits = [t for t in (self.per_try, self.timeout) if t is not None]
        self.first: First = _first(min(limits) if limits else None)


class First(NamedTuple):
    """What the first attempt sends: its time limit and the header that says it."""

    timeout: float | None
    header: tuple[bytes, bytes] | None


TIMEOUT_HEADER = b"x-mesh-timeout-ms"


def _first(timeout: float | None) -> First:
    if timeout is None:
        return First(None, None)
    return First(timeout, (TIMEOUT_HEADER, b"%d" % max(1, int(timeout * 1000))))


def lane_for(policy: RoutePolicy, guard: ServiceGuard | None) -> Lane | None:
    """The lane of a route's calls to a cluster, or None if they always take the loop
    (hedging races attempts, faults inject before the first one)."""
    if policy.hedge is not None or policy.faults is not None:
        return None
    return Lane(policy, guard)


class Entry(NamedTuple):
    """An admitted first attempt: its time limit and the call's deadline."""

    timeout: float | None
    limit: str
    """Which limit ``timeout`` is: per-try timeout, route timeout or inbound deadline."""
    deadline: float | None
    deadline_source: str


def enter(lane: Lane, address: str, now: float) -> First | None:
    """Admit the first attempt to ``address``, or None (nothing taken) for the slow path.

    ``now`` is monotonic seconds. Once admitted, the call holds a bulkhead slot, if
    the service has one, until `settle` returns True or `leave` is called; a call
    handed to the loop gets its deadline from `entry` with the same ``now``.
    """
    first = lane.first
    inherited = INBOUND_DEADLINE.get()
    if inherited is not None:
        admitted = entry(lane, now)
        if admitted.deadline is not None and admitted.deadline <= now:
            return None  # the slow path raises DeadlineExceeded with the whole story
        first = _first(admitted.timeout)
    breaker = lane.service_breaker
    if breaker is not None and not breaker.healthy:
        return None
    board = lane.board
    if board is not None:
        endpoint_breaker = board._breakers.get(address)
        if endpoint_breaker is not None and not endpoint_breaker.healthy:
            return None
    bulkhead = lane.bulkhead
    if bulkhead is not None:
        with bulkhead._lock:
            # while anyone waits every slot is taken, so this never jumps the line
            if bulkhead.inflight >= bulkhead.max_requests:
                return None
            bulkhead.inflight += 1
    limiter = lane.limiter
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
    budget = lane.budget
    if budget is not None:
        # RetryBudget.record_request, inlined
        tick = int(now * budget._inv_width)
        last = budget._view[0]
        budget._requests[(budget._rotate(tick)[0] if tick > last else last) % BUCKETS] += 1
    return first


def entry(lane: Lane, now: float) -> Entry:
    """The first attempt's limits in full, for a call the lane admitted at ``now``."""
    deadline = source = None
    if lane.timeout is not None:
        deadline, source = now + lane.timeout, ROUTE
    inherited = INBOUND_DEADLINE.get()
    if inherited is not None and (deadline is None or inherited < deadline):
        deadline, source = inherited, INBOUND
    timeout = lane.per_try
    if deadline is not None:
        remaining = deadline - now
        if timeout is None or remaining < timeout:
            assert source is not None
            return Entry(max(remaining, 0.001), source, deadline, source)
    return Entry(timeout, PER_TRY, deadline, source or ROUTE)


ENDED = 1
EJECTED = 2
"""`settle`'s answer when the call ends and its outcome made outlier detection eject
an endpoint (truthy, like `ENDED`)."""


def settle(lane: Lane, address: str, status: int) -> int:
    """The first attempt answered ``status``: `ENDED` (or `EJECTED`) if that ends the
    call (recorded, slot released); 0 if a retry is due, with nothing recorded or
    released."""
    if status in lane.retry_statuses:
        return 0
    guard = lane.guard
    if guard is None:
        return ENDED
    ended = ENDED
    board = lane.board
    endpoint_breaker = board._breakers.get(address) if board is not None else None
    breaker = lane.service_breaker
    if (
        status < FAILURE_STATUS
        and (board is None or (endpoint_breaker is not None and endpoint_breaker.healthy))
        and (breaker is None or breaker.healthy)
    ):
        # what ServiceGuard.record does for a success on healthy breakers, inlined
        if endpoint_breaker is not None:
            endpoint_breaker.successes += 1
        if breaker is not None:
            breaker.successes += 1
        outlier = lane.outlier
        if outlier is not None and (host := outlier._hosts.get(address)) is not None:
            # OutlierDetector.record for a status below 500
            if outlier._split:
                host.loc_total += 1
                host.loc_ok += 1
                host.clocal = 0
            host.ext_total += 1
            host.ext_ok += 1
            host.c5xx = 0
            host.cgw = 0
    elif guard.record(address, status, None):
        ended = EJECTED
    bulkhead = lane.bulkhead
    if bulkhead is not None:
        with bulkhead._lock:
            if bulkhead._waiters or bulkhead.inflight <= 0:
                bulkhead._release_locked()  # hand the slot to the oldest waiter
            else:
                bulkhead.inflight -= 1
    return ended


def leave(lane: Lane) -> None:
    """Release the slot `enter` took (after `settle` returned True, it already did)."""
    if lane.bulkhead is not None:
        lane.bulkhead.exit()
