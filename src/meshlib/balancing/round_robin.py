"""Smooth weighted round robin, as nginx does it, with the schedule precomputed."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Container, Sequence

from meshlib.balancing.base import effective_weights
from meshlib.endpoint import Endpoint

MAX_PERIOD = 4096
"""Longest schedule kept; longer ones have their weights scaled down to fit."""


def normalized_weights(weights: Sequence[int], max_period: int = MAX_PERIOD) -> list[int]:
    """Divide by the gcd and, if the sum still exceeds ``max_period``, scale down.

    Scaling keeps every weight >= 1, so with ``max_period`` endpoints or more they all
    get weight 1 and the period is the number of endpoints.
    """
    if not weights:
        return []
    g = math.gcd(*weights)
    ws = [w // g for w in weights]
    total = sum(ws)
    if total <= max_period:
        return ws
    if len(ws) >= max_period:
        return [1] * len(ws)
    # Raising tiny weights to 1 overshoots the cap; shrink the budget by the overshoot
    # until it fits (a few rounds at most, since only the bumped weights overshoot).
    budget = max_period
    while True:
        scaled = [max(1, w * budget // total) for w in ws]
        excess = sum(scaled) - max_period
        if excess <= 0:
            break
        budget -= excess
    g = math.gcd(*scaled)
    return [w // g for w in scaled]


def smooth_schedule(weights: Sequence[int]) -> list[int]:
    """One period (``sum(weights)`` picks) of nginx's smooth WRR, as endpoint indexes.

    nginx adds each weight to its endpoint's ``current``, picks the first endpoint with
    the largest ``current`` and subtracts the total from it. After ``k`` steps an
    endpoint picked ``c`` times has ``current = k*w - c*total``, so endpoints of equal
    weight differ only by ``c`` and nginx takes them in index order. That lets each
    step compare one candidate per distinct weight instead of every endpoint, which
    keeps large endpoint sets cheap to build: O(period x distinct weights).
    """
    total = sum(weights)
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(w, []).append(i)
    group_weights = list(groups)
    members = [groups[w] for w in group_weights]
    sizes = [len(m) for m in members]
    picked = [0] * len(group_weights)
    schedule: list[int] = []
    for step in range(1, total + 1):
        best_group = 0
        best_current = 0
        best_index = -1
        for g, w in enumerate(group_weights):
            count, pos = divmod(picked[g], sizes[g])
            current = step * w - count * total
            index = members[g][pos]
            if (
                best_index < 0
                or current > best_current
                or (current == best_current and index < best_index)
            ):
                best_group, best_current, best_index = g, current, index
        picked[best_group] += 1
        schedule.append(best_index)
    return schedule


class RoundRobin:
    """Smooth weighted round robin (nginx): heavy endpoints are spread out, not bunched.

    The whole schedule is computed at construction; ``pick`` reads the next slot via
    ``itertools.count``, whose ``next`` is atomic under the GIL, so concurrent picks need
    no lock and still never skip or repeat a slot.
    """

    __slots__ = ("_addresses", "_counter", "_schedule", "endpoints", "period")

    endpoints: tuple[Endpoint, ...]
    period: int

    def __init__(self, endpoints: Sequence[Endpoint], start: int = 0) -> None:
        # ``start`` staggers processes that load the same policy at the same time,
        # so they don't all send their first requests to the same endpoint
        self.endpoints = tuple(endpoints)
        weights = normalized_weights(effective_weights(self.endpoints))
        self._schedule = tuple(smooth_schedule(weights))
        self.period = len(self._schedule)
        self._addresses = tuple(e.address for e in self.endpoints)
        self._counter = itertools.count(start % self.period if self.period else 0)

    def pick(
        self, rng: random.Random, key: bytes | None = None, avoid: Container[str] = ()
    ) -> Endpoint | None:
        """Next endpoint of the schedule; with ``avoid``, the next non-avoided one."""
        if not self.period:
            return None
        i = self._schedule[next(self._counter) % self.period]
        if avoid and self._addresses[i] in avoid:
            return self._next_not_avoided(i, avoid)
        return self.endpoints[i]

    def _next_not_avoided(self, start: int, avoid: Container[str]) -> Endpoint:
        # Walk endpoints rather than schedule slots: a slot walk can take up to a whole
        # period when only a light endpoint is left.
        n = len(self.endpoints)
        for step in range(1, n):
            j = (start + step) % n
            if self._addresses[j] not in avoid:
                return self.endpoints[j]
        return self.endpoints[start]

    def __repr__(self) -> str:
        return f"RoundRobin({len(self.endpoints)} endpoints, period={self.period})"
