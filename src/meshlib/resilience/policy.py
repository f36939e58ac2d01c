"""Compiled, frozen resilience policies of one route and one service.

The stateful parts (budget, buckets, breakers, detector) are objects owned by
`StateTable`, so a snapshot swap that leaves a policy unchanged keeps its state.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshlib.resilience.backoff import Backoff
from meshlib.resilience.budget import RetryBudget
from meshlib.resilience.faults import FaultPolicy
from meshlib.resilience.outcome import CONNECT_FAILURE, GATEWAY_STATUSES, RESET, TIMEOUT
from meshlib.resilience.ratelimit import TokenBucket

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """When and how a failed attempt is tried again."""

    attempts: int
    per_try_timeout: float | None
    on: frozenset[str]
    statuses: frozenset[int]
    exceptions: tuple[type[BaseException], ...]
    backoff: Backoff
    non_idempotent: bool
    max_body_bytes: int
    retry_statuses: frozenset[int] = field(init=False, repr=False, compare=False)
    """Every status that is retried: ``status in retry_statuses`` on the request path."""

    def __post_init__(self) -> None:
        statuses = set(self.statuses)
        if "5xx" in self.on:
            statuses.update(range(500, 600))
        if "gateway-error" in self.on:
            statuses.update(GATEWAY_STATUSES)
        object.__setattr__(self, "retry_statuses", frozenset(statuses))

    def retries_status(self, status: int) -> bool:
        return status in self.retry_statuses

    def retries_error(self, kind: str, exc: BaseException) -> bool:
        if kind in (CONNECT_FAILURE, RESET, TIMEOUT) and kind in self.on:
            return True
        return bool(self.exceptions) and isinstance(exc, self.exceptions)

    def allows_method(self, method: str) -> bool:
        return self.non_idempotent or method in IDEMPOTENT_METHODS


class LatencyWindow:
    """Recent successful latencies, for percentile-based hedging.

    Keeps the last ``size`` samples; the percentile is recomputed every
    ``refresh`` samples rather than on every request.
    """

    __slots__ = ("_cached", "_count", "_quantile", "_refresh", "_samples", "_size", "min_samples")

    def __init__(
        self, quantile: float, size: int = 512, refresh: int = 32, min_samples: int = 20
    ) -> None:
        self._quantile = quantile
        self._size = size
        self._refresh = refresh
        self._samples: list[float] = []
        self._count = 0
        self._cached: float | None = None
        self.min_samples = min_samples

    def add(self, seconds: float) -> None:
        if len(self._samples) < self._size:
            self._samples.append(seconds)
        else:
            self._samples[self._count % self._size] = seconds
        self._count += 1
        if self._count % self._refresh == 0:
            self._cached = None

    def value(self) -> float | None:
        """The quantile, or None until ``min_samples`` were seen."""
        if len(self._samples) < self.min_samples:
            return None
        if self._cached is None:
            ordered = sorted(self._samples)
            self._cached = ordered[min(len(ordered) - 1, int(self._quantile * len(ordered)))]
        return self._cached


@dataclass(frozen=True, slots=True)
class HedgePlan:
    """Backup requests: fixed delay, or the route's recent latency percentile."""

    fixed_delay: float | None
    latencies: LatencyWindow | None
    budget: RetryBudget

    def delay(self) -> float | None:
        if self.fixed_delay is not None:
            return self.fixed_delay
        assert self.latencies is not None
        return self.latencies.value()


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """Everything resilience needs to know about one route of one service."""

    name: str
    timeout: float | None
    retry: RetryPlan | None
    budget: RetryBudget | None
    hedge: HedgePlan | None
    faults: FaultPolicy | None
    rate_limit: TokenBucket | None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"timeout": self.timeout}
        if self.retry is not None:
            out["retries"] = {
                "attempts": self.retry.attempts,
                "per_try_timeout": self.retry.per_try_timeout,
                "on": sorted(self.retry.on),
                "retriable_status_codes": sorted(self.retry.statuses),
                "non_idempotent": self.retry.non_idempotent,
            }
        if self.budget is not None:
            out["retry_budget"] = self.budget.snapshot()
        if self.hedge is not None:
            out["hedging"] = {"delay": self.hedge.delay()}
        if self.faults is not None:
            out["faults"] = {
                "delay": self.faults.delay,
                "delay_percent": self.faults.delay_percent,
                "abort_status": self.faults.abort_status,
                "abort_percent": self.faults.abort_percent,
                "header": self.faults.header,
            }
        if self.rate_limit is not None:
            out["rate_limit"] = {"retry_after": self.rate_limit.retry_after()}
        return out


NO_POLICY = RoutePolicy("", None, None, None, None, None, None)
"""For calls that only the service's guard (breakers, outliers, limits) protects."""


def import_exception(name: str) -> type[BaseException]:
    """Resolve ``module.Class`` to an exception class; ValueError says why not."""
    module_name, _, attribute = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import exception class {name!r}: {exc}") from None
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise ValueError(f"{name!r} is not an exception class")
    return found


Clock = Callable[[], float]
