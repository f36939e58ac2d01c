"""Priority levels with failover, and Envoy's panic mode."""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Sequence

from meshlib.balancing.base import Balancer
from meshlib.endpoint import Endpoint

_Pick = Callable[[random.Random, bytes | None], Endpoint | None]


def _pick_nothing(rng: random.Random, key: bytes | None = None) -> Endpoint | None:
    return None


class PriorityFailover:
    """Sends traffic to the most preferred priority level that has healthy endpoints.

    Endpoints are grouped by ``priority`` (0 is most preferred) and only healthy ones
    are kept; each level gets its own balancer from ``make_level``. When no endpoint at
    all is healthy the balancer is in ``panic`` mode and balances over every endpoint
    (health checks can be wrong; refusing all traffic is worse), like Envoy.
    """

    __slots__ = ("_first", "endpoints", "levels", "panic")

    endpoints: tuple[Endpoint, ...]
    levels: tuple[tuple[int, Balancer], ...]
    panic: bool

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        make_level: Callable[[tuple[Endpoint, ...]], Balancer],
    ) -> None:
        self.endpoints = tuple(endpoints)
        healthy = [e for e in self.endpoints if e.healthy]
        self.panic = bool(self.endpoints) and not healthy
        by_priority: dict[int, list[Endpoint]] = {}
        for e in self.endpoints if self.panic else healthy:
            by_priority.setdefault(e.priority, []).append(e)
        self.levels = tuple(
            (priority, make_level(tuple(by_priority[priority]))) for priority in sorted(by_priority)
        )
        self._first: _Pick = self.levels[0][1].pick if self.levels else _pick_nothing

    def pick(
        self, rng: random.Random, key: bytes | None = None, avoid: Container[str] = ()
    ) -> Endpoint | None:
        """Pick from the first level; with ``avoid``, from the first level not all avoided."""
        if not avoid:
            return self._first(rng, key)
        fallback: Endpoint | None = None
        for _, level in self.levels:
            endpoint = level.pick(rng, key, avoid)
            if endpoint is None:
                continue
            if endpoint.address not in avoid:
                return endpoint
            if fallback is None:
                fallback = endpoint
        return fallback

    def __repr__(self) -> str:
        levels = ", ".join(f"p{p}: {len(b.endpoints)}" for p, b in self.levels)
        return f"PriorityFailover({levels}{', panic' if self.panic else ''})"
