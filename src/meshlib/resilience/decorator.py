"""``@mesh.resilient("svc")``: a service's timeout, retries, budget and breaker
around any callable, sync or async.

The decision of each step is made by `_Run` (shared); the two wrappers only
call, sleep and time out.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, cast

import httpx

from meshlib.errors import CircuitOpenError, DeadlineExceeded, UnknownServiceError
from meshlib.resilience.outcome import deadline_exceeded, error_kind
from meshlib.resilience.policy import RoutePolicy
from meshlib.snapshot import Snapshot

P = ParamSpec("P")
R = TypeVar("R")


class _Run:
    """The policy state of one decorated call."""

    __slots__ = ("_rng", "attempt", "breaker", "deadline", "limit", "policy", "service")

    def __init__(self, snapshot: Snapshot, service: str, rng: random.Random) -> None:
        policy = snapshot.service_policies.get(service)
        if service not in snapshot.services:
            raise UnknownServiceError(
                f"@resilient({service!r}): no such service in the policy "
                f"(known: {', '.join(sorted(snapshot.services)) or 'none'})"
            )
        self.service = service
        self.policy: RoutePolicy | None = policy
        cluster = snapshot.clusters.get(service)
        self.breaker = cluster.guard.cluster_breaker if cluster and cluster.guard else None
        self._rng = rng
        self.attempt = 0
        self.limit = "per-try timeout"
        timeout = policy.timeout if policy is not None else None
        self.deadline = time.monotonic() + timeout if timeout else None

    def start(self) -> None:
        if self.policy is not None and self.policy.budget is not None:
            self.policy.budget.record_request()
        if self.breaker is not None and not self.breaker.allow():
            raise CircuitOpenError(
                f"circuit breaker of {self.service!r} is open: failing fast until it half-opens"
            )

    def attempt_timeout(self) -> float | None:
        """Time allowed for the next attempt: per-try timeout bounded by the deadline."""
        self.attempt += 1
        retry = self.policy.retry if self.policy is not None else None
        per_try = retry.per_try_timeout if retry is not None else None
        if self.deadline is None:
            self.limit = "per-try timeout"
            return per_try
        remaining = max(self.deadline - time.monotonic(), 0.0)
        if per_try is not None and per_try <= remaining:
            self.limit = "per-try timeout"
            return per_try
        self.limit = "route timeout"
        return remaining

    def succeeded(self) -> None:
        if self.breaker is not None:
            self.breaker.record(True)

    def failed(self, exc: BaseException) -> float:
        """Seconds to wait before the next attempt; re-raises when giving up."""
        if self.breaker is not None:
            self.breaker.record(False)
        policy = self.policy
        retry = policy.retry if policy is not None else None
        if retry is None or self.attempt >= retry.attempts:
            raise exc
        if isinstance(exc, httpx.HTTPStatusError):
            retriable = retry.retries_status(exc.response.status_code)
        else:
            retriable = retry.retries_error(error_kind(exc), exc)
        budget = policy.budget if policy is not None else None
        if not retriable or (budget is not None and not budget.try_acquire_retry()):
            raise exc
        delay = retry.backoff.delay(self.attempt, self._rng)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            raise exc
        return delay

    def timed_out(self, seconds: float) -> DeadlineExceeded:
        route_timeout = self.policy.timeout if self.policy is not None else None
        return deadline_exceeded(
            self.limit,
            seconds,
            route_timeout,
            f"in @resilient({self.service!r}) (attempt {self.attempt})",
        )


def resilient(
    current: Callable[[], Snapshot], service: str, rng: random.Random
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator factory; the policy in force at each call applies (hot reload)."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(fn):
            async_fn = cast(Callable[P, Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                run = _Run(current(), service, rng)
                run.start()
                while True:
                    limit = run.attempt_timeout()
                    try:
                        async with asyncio.timeout(limit):
                            result = await async_fn(*args, **kwargs)
                    except TimeoutError:
                        await asyncio.sleep(run.failed(run.timed_out(limit or 0.0)))
                        continue
                    except Exception as exc:
                        await asyncio.sleep(run.failed(exc))
                        continue
                    run.succeeded()
                    return result

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            # A running sync call cannot be interrupted: the deadline only stops
            # further attempts, and a late success is still a success.
            run = _Run(current(), service, rng)
            run.start()
            while True:
                run.attempt_timeout()
                try:
                    result = fn(*args, **kwargs)
                except Exception as exc:
                    time.sleep(run.failed(exc))
                    continue
                run.succeeded()
                return result

        return sync_wrapper

    return decorate
