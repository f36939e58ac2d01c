"""The sans-I/O state of one resilient call: which attempt runs next, where,
with which time limit, and whether a failure may be retried.

Both drivers (sync and async) feed it outcomes and obey its answers; neither
makes a decision of its own, so they cannot drift apart.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from meshlib.endpoint import Endpoint
from meshlib.errors import CircuitOpenError, DeadlineExceeded, RateLimitedError
from meshlib.resilience.deadline import INBOUND_DEADLINE
from meshlib.resilience.fastlane import Entry
from meshlib.resilience.guard import ServiceGuard
from meshlib.resilience.outcome import CONNECT_FAILURE, TIMEOUT, deadline_exceeded, error_kind
from meshlib.resilience.policy import IDEMPOTENT_METHODS, RoutePolicy

Pick = Callable[[frozenset[str]], Endpoint]


class Attempt:
    """One try: the endpoint, its number (1-based), its time limit and the wait before it."""

    __slots__ = ("delay", "endpoint", "limit", "number", "started", "timeout")

    def __init__(
        self, endpoint: Endpoint, number: int, timeout: float | None, limit: str, delay: float
    ) -> None:
        self.endpoint = endpoint
        self.number = number
        self.timeout = timeout
        self.limit = limit
        self.delay = delay
        self.started = 0.0


class CallControl:
    """Decides the attempts of one call; ``clock`` is monotonic seconds."""

    __slots__ = (
        "_clock",
        "_holds_retry_slot",
        "_pick",
        "_rng",
        "_tried",
        "deadline",
        "deadline_source",
        "ejected",
        "guard",
        "hedged",
        "hedges",
        "holds_slot",
        "method",
        "policy",
        "replayable",
        "retries",
        "service",
        "timed",
    )

    def __init__(
        self,
        service: str,
        policy: RoutePolicy,
        guard: ServiceGuard | None,
        pick: Pick,
        *,
        method: str,
        replayable: bool,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.service = service
        self.policy = policy
        self.guard = guard
        self._pick = pick
        self.method = method
        self.replayable = replayable
        self._clock = clock
        self._rng = rng
        self._tried: set[str] = set()
        self._holds_retry_slot = False
        self.hedged = False
        self.ejected = False  # an outcome of this call made outlier detection eject
        """Whether a backup attempt was sent."""
        self.retries = 0
        self.hedges = 0
        """Retries and backups this call sent (the driver reports them as metrics)."""
        hedge = policy.hedge
        self.timed = hedge is not None and hedge.latencies is not None
        """Whether attempts must be timed (``started``) for the hedging percentile."""
        self.holds_slot = False
        """Whether the call holds a request slot of the bulkhead (released by ``finish``)."""
        timeout = policy.timeout
        self.deadline = clock() + timeout if timeout else None
        self.deadline_source = "route timeout"
        inherited = INBOUND_DEADLINE.get()
        if inherited is not None and (self.deadline is None or inherited < self.deadline):
            # the request being served must be answered sooner than this call's own timeout
            self.deadline = inherited
            self.deadline_source = "inbound deadline"

    # -- first attempt ----------------------------------------------------------

    def admit(self) -> bool:
        """Checks before anything is sent: rate limit, budget deposit, service breaker,
        then a free request slot of the bulkhead.

        False when every slot is taken: the driver then waits in the bulkhead's line
        (``enter_sync`` / ``enter_async``) and sets ``holds_slot`` once it gets one.
        """
        policy = self.policy
        limiter = policy.rate_limit
        if limiter is not None and not limiter.try_acquire():
            wait = limiter.retry_after()
            raise RateLimitedError(
                f"client-side rate limit of {self.service!r} route {policy.name!r} exceeded; "
                f"retry in {wait:.3f}s or raise `rate_limit.requests_per_second`",
                retry_after=wait,
            )
        if policy.budget is not None:
            policy.budget.record_request()
        if policy.hedge is not None:
            policy.hedge.budget.record_request()
        guard = self.guard
        if guard is None:
            return True
        breaker = guard.cluster_breaker
        if breaker is not None and not breaker.allow():
            raise guard.cluster_open_error()
        bulkhead = guard.bulkhead
        if bulkhead is None:
            return True
        self.holds_slot = bulkhead.enter_if_free()
        return self.holds_slot

    def resume(self, entry: Entry, endpoint: Endpoint) -> Attempt:
        """Take over a call that the fast lane admitted (`fastlane.enter`): its slot,
        its deadline, and its first attempt, whose outcome is fed next."""
        self.deadline = entry.deadline
        self.deadline_source = entry.deadline_source
        self.holds_slot = self.guard is not None and self.guard.bulkhead is not None
        return Attempt(endpoint, 1, entry.timeout, entry.limit, 0.0)

    def first(self, endpoint: Endpoint) -> Attempt:
        """The first attempt, moved off an endpoint whose breaker refuses it.

        Raises DeadlineExceeded when a fault delay or a wait for the bulkhead
        already used up the route's time.
        """
        now = 0.0
        if self.deadline is not None:
            now = self._clock()
            if now >= self.deadline:
                raise DeadlineExceeded(
                    f"{self.deadline_source} expired calling {self.service!r} before the first "
                    "attempt (waiting for a concurrency slot or an injected delay)",
                    limit=self.deadline_source,
                    seconds=self.policy.timeout or 0.0,
                )
        breakers = self.guard.breakers if self.guard is not None else None
        if breakers is not None and not breakers.allow(endpoint.address):
            endpoint = self._instead_of(endpoint)
        return self._attempt(endpoint, 1, 0.0, now)

    # -- outcomes -----------------------------------------------------------------

    def hedge_delay(self) -> float | None:
        """How long to wait for the first attempt before sending a backup (None: never)."""
        hedge = self.policy.hedge
        if hedge is None or (self.deadline is not None and self.deadline <= self._clock()):
            return None
        return hedge.delay()

    def hedge(self, attempt: Attempt) -> Attempt | None:
        """A backup attempt to another endpoint, if the hedging budget allows one."""
        hedge = self.policy.hedge
        if hedge is None or not self.replayable or self.method not in IDEMPOTENT_METHODS:
            return None
        if not hedge.budget.try_acquire_retry():
            return None
        avoid = frozenset(self._tried | {attempt.endpoint.address})
        if self.guard is not None:
            avoid |= self.guard.unavailable()
        try:
            endpoint = self._usable(self._pick(avoid))
        except CircuitOpenError:
            return None
        if endpoint.address in avoid:
            return None  # a backup to the same endpoint only doubles its load
        self.hedged = True
        self.hedges += 1
        return self._attempt(endpoint, attempt.number + 1, 0.0)

    def settle(self, attempt: Attempt, status: int | None, exc: BaseException | None) -> None:
        """Record a racer's outcome that will not be handed back (the hedging loser)."""
        self._record(attempt, status, error_kind(exc) if exc is not None else None)

    def on_status(self, attempt: Attempt, status: int) -> Attempt | None:
        """The next attempt after a response, or None to hand this response back."""
        address = attempt.endpoint.address
        self._tried.add(address)
        if self.guard is not None and self.guard.record(address, status, None):
            self.ejected = True
        policy = self.policy
        hedge = policy.hedge
        if hedge is not None and hedge.latencies is not None and status < 500 and attempt.started:
            hedge.latencies.add(self._clock() - attempt.started)
        retry = policy.retry
        if retry is None or status not in retry.retry_statuses:
            return None
        return self._next(attempt)

    def on_error(self, attempt: Attempt, exc: BaseException) -> Attempt:
        """The next attempt after a transport error, or raise the error to give up."""
        kind = error_kind(exc)
        self._record(attempt, None, kind)
        retry = self.policy.retry
        if retry is not None and retry.retries_error(kind, exc):
            # a connect failure never reached the server: safe to retry for any method
            following = self._next(attempt, any_method=kind == CONNECT_FAILURE)
            if following is not None:
                return following
        if kind == TIMEOUT and attempt.timeout is not None:
            raise deadline_exceeded(
                attempt.limit,
                attempt.timeout,
                self.policy.timeout,
                f"calling {self.service!r} (attempt {attempt.number}, "
                f"endpoint {attempt.endpoint.address})",
            ) from exc
        raise exc

    def report(self, attempt: Attempt) -> dict[str, object]:
        """How the call went, for ``response.extensions["mesh"]``: the attempts sent
        (backups included), the endpoint that answered, and flags."""
        flags = []
        if attempt.number > 1:
            flags.append("hedged" if self.hedged else "retried")
        if self.ejected:
            flags.append("ejected")
        return {"attempts": attempt.number, "endpoint": attempt.endpoint.address, "flags": flags}

    def finish(self) -> None:
        """Release what the call held: its request slot and retry slot of the bulkhead."""
        if self.holds_slot or self._holds_retry_slot:
            bulkhead = self.guard.bulkhead if self.guard is not None else None
            assert bulkhead is not None
            if self.holds_slot:
                self.holds_slot = False
                bulkhead.exit()
            if self._holds_retry_slot:
                self._holds_retry_slot = False
                bulkhead.exit_retry()

    # -- internals ----------------------------------------------------------------

    def _record(self, attempt: Attempt, status: int | None, error: str | None) -> None:
        address = attempt.endpoint.address  # a computed property: read it once
        self._tried.add(address)
        if self.guard is not None and self.guard.record(address, status, error):
            self.ejected = True

    def _next(self, attempt: Attempt, any_method: bool = False) -> Attempt | None:
        retry = self.policy.retry
        assert retry is not None
        if attempt.number >= retry.attempts or not self.replayable:
            return None
        if not any_method and not retry.allows_method(self.method):
            return None
        delay = retry.backoff.delay(attempt.number, self._rng)
        if self.deadline is not None and self._clock() + delay >= self.deadline:
            return None
        guard = self.guard
        avoid = frozenset(self._tried)
        if guard is not None:
            avoid |= guard.unavailable()
        try:
            endpoint = self._usable(self._pick(avoid))
        except CircuitOpenError:
            return None
        if guard is not None and guard.bulkhead is not None and not self._holds_retry_slot:
            if not guard.bulkhead.try_enter_retry():
                return None
            self._holds_retry_slot = True
        # the budget is spent last, only on a retry that will really be sent
        budget = self.policy.budget
        if budget is not None and not budget.try_acquire_retry():
            return None
        self.retries += 1
        return self._attempt(endpoint, attempt.number + 1, delay)

    def _usable(self, endpoint: Endpoint) -> Endpoint:
        guard = self.guard
        if guard is None or guard.allow_endpoint(endpoint.address):
            return endpoint
        return self._instead_of(endpoint)

    def _instead_of(self, endpoint: Endpoint) -> Endpoint:
        """Another endpoint whose breaker admits the attempt, or CircuitOpenError."""
        guard = self.guard
        assert guard is not None
        avoid = {endpoint.address} | guard.unavailable() | self._tried
        for _ in range(3):
            candidate = self._pick(frozenset(avoid))
            if candidate.address not in avoid and guard.allow_endpoint(candidate.address):
                return candidate
            avoid.add(candidate.address)
        raise CircuitOpenError(
            f"every endpoint of {self.service!r} has an open circuit breaker; failing fast "
            "until one half-opens (see `explain` for breaker states)"
        )

    def started(self, attempt: Attempt) -> None:
        """An attempt goes on the wire now (only ``timed`` calls need to say so)."""
        if self.timed:
            attempt.started = self._clock()

    def _attempt(
        self, endpoint: Endpoint, number: int, delay: float, now: float | None = None
    ) -> Attempt:
        retry = self.policy.retry
        per_try = retry.per_try_timeout if retry is not None else None
        timeout, limit = per_try, "per-try timeout"
        if self.deadline is not None:
            remaining = self.deadline - (self._clock() if now is None else now) - delay
            if per_try is None or remaining < per_try:
                timeout, limit = max(remaining, 0.001), self.deadline_source
        return Attempt(endpoint, number, timeout, limit, delay)
