"""Per-service protection shared by all its clusters: endpoint and cluster
breakers, outlier detection and the concurrency bulkhead.

The request path asks two cheap questions: which endpoints to avoid now
(``unavailable``) and whether the call may start (``admit``); adapters report
each attempt's outcome with ``record``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from meshlib.errors import CircuitOpenError
from meshlib.resilience.breaker import BreakerBoard
from meshlib.resilience.limits import Bulkhead
from meshlib.resilience.outcome import CONNECT_FAILURE, FAILURE_STATUS
from meshlib.resilience.outlier import OutlierDetector, effective_avoid

_EMPTY: frozenset[str] = frozenset()


class ServiceGuard:
    """Breakers, outlier detector and bulkhead of one service."""

    __slots__ = (
        "_avoid",
        "_avoid_until",
        "_clock",
        "_hosts",
        "breakers",
        "bulkhead",
        "cluster_breaker",
        "name",
        "outlier",
        "panic_threshold",
        "pending_timeout",
    )

    def __init__(
        self,
        name: str,
        *,
        clock: Callable[[], float],
        breakers: BreakerBoard | None = None,
        cluster_breaker: Any = None,
        outlier: OutlierDetector | None = None,
        panic_threshold: float = 50.0,
        bulkhead: Bulkhead | None = None,
        pending_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self._clock = clock
        self.breakers = breakers
        self.cluster_breaker = cluster_breaker
        self.outlier = outlier
        self.panic_threshold = panic_threshold
        self.bulkhead = bulkhead
        self.pending_timeout = pending_timeout
        self._hosts: tuple[str, ...] = ()
        self._avoid: frozenset[str] = _EMPTY
        self._avoid_until = 0.0

    def set_hosts(self, addresses: Iterable[str]) -> None:
        self._hosts = tuple(dict.fromkeys(addresses))
        if self.outlier is not None:
            self.outlier.set_hosts(self._hosts)
        self._avoid_until = 0.0

    def unavailable(self) -> frozenset[str]:
        """Endpoints to skip now: ejected ones (unless in panic) and open breakers.

        Cached briefly: recomputing on every request would cost more than the
        staleness of a few milliseconds is worth.
        """
        now = self._clock()
        if now < self._avoid_until:
            return self._avoid
        avoid: set[str] = set()
        if self.outlier is not None:
            self.outlier.tick()
            avoid.update(
                effective_avoid(self.outlier.ejected(), len(self._hosts), self.panic_threshold)
            )
        if self.breakers is not None:
            avoid.update(
                address for address in self._hosts if self.breakers.for_key(address).state == "open"
            )
        self._avoid = frozenset(avoid) if avoid else _EMPTY
        self._avoid_until = now + 0.005
        return self._avoid

    def invalidate(self) -> None:
        self._avoid_until = 0.0

    def cluster_open_error(self) -> CircuitOpenError:
        return CircuitOpenError(
            f"circuit breaker of service {self.name!r} is open after repeated failures; "
            "calls fail fast until it half-opens (see `explain` for its state)"
        )

    def allow_endpoint(self, address: str) -> bool:
        """Half-open endpoint breakers admit a limited number of probes."""
        return self.breakers is None or self.breakers.allow(address)

    def record(self, address: str, status: int | None, error: str | None) -> bool:
        """Feed one attempt's outcome to breakers and outlier detection; True if it
        made outlier detection eject an endpoint."""
        breakers = self.breakers
        outlier = self.outlier
        if error is None and (status is None or status < FAILURE_STATUS):
            # a success can neither open a breaker nor eject: the avoid set stays valid
            if breakers is not None:
                breakers.record_success(address)
            if self.cluster_breaker is not None:
                self.cluster_breaker.record(True)
            if outlier is not None:
                outlier.record(address, status=status)
            return False
        if breakers is not None:
            breaker = breakers.for_key(address)
            before = breaker.state
            breaker.record(False)
            if breaker.state != before:
                self._avoid_until = 0.0
        if self.cluster_breaker is not None:
            self.cluster_breaker.record(False)
        if outlier is not None:
            ejected = outlier.ejected()
            outlier.record(address, status=status, connect_failure=error == CONNECT_FAILURE)
            if outlier.ejected() is not ejected:  # an ejection: the next pick must see it
                self._avoid_until = 0.0
                return True
        return False

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"unavailable": sorted(self.unavailable())}
        if self.breakers is not None:
            out["endpoint_breakers"] = {
                address: self.breakers.for_key(address).state for address in self._hosts
            }
        if self.cluster_breaker is not None:
            out["service_breaker"] = self.cluster_breaker.state
        if self.outlier is not None:
            out["outlier_detection"] = self.outlier.describe()
        if self.bulkhead is not None:
            out["limits"] = {
                "inflight": self.bulkhead.inflight,
                "pending": self.bulkhead.pending,
                "retries_inflight": self.bulkhead.retries_inflight,
                "overflows": self.bulkhead.overflows,
            }
        return out
