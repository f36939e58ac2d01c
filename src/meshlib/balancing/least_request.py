"""Least request with power-of-k choices."""

from __future__ import annotations

import itertools
import random
from bisect import bisect_right, insort
from collections.abc import Container, Sequence

from meshlib.balancing.base import effective_weights
from meshlib.endpoint import Endpoint


class LeastRequest:
    """Power-of-two (or k) choices over requests in flight.

    Samples ``choice_count`` distinct endpoints (by weight when weights differ) and
    returns the one with the lowest ``load.inflight / weight``; ties go to the first
    sampled. Sampling by weight means that with no load at all the traffic split still
    follows the weights.
    """

    __slots__ = (
        "_addresses",
        "_bounds",
        "_loads",
        "_starts",
        "_total",
        "_uniform",
        "_weights",
        "choice_count",
        "endpoints",
    )

    endpoints: tuple[Endpoint, ...]
    choice_count: int

    def __init__(self, endpoints: Sequence[Endpoint], choice_count: int = 2) -> None:
        if choice_count < 1:
            raise ValueError(f"choice_count must be >= 1, not {choice_count}")
        self.endpoints = tuple(endpoints)
        self.choice_count = choice_count
        self._weights = effective_weights(self.endpoints)
        self._uniform = len(set(self._weights)) <= 1
        self._starts = [0, *itertools.accumulate(self._weights)][:-1]
        self._bounds = self._starts[1:]
        self._total = sum(self._weights)
        self._loads = tuple(e.load for e in self.endpoints)
        self._addresses = tuple(e.address for e in self.endpoints)

    def pick(
        self, rng: random.Random, key: bytes | None = None, avoid: Container[str] = ()
    ) -> Endpoint | None:
        """The less loaded of ``choice_count`` sampled endpoints, preferring non-avoided."""
        eps = self.endpoints
        n = len(eps)
        if n <= 1:
            return eps[0] if n else None
        if avoid:
            eligible = [i for i, a in enumerate(self._addresses) if a not in avoid]
            if 0 < len(eligible) < n:
                return eps[self._choose(eligible, rng)]
        if self.choice_count != 2:
            return eps[self._choose(range(n), rng)]
        draw = rng.random
        loads = self._loads
        if self._uniform:
            a = int(draw() * n)
            b = int(draw() * (n - 1))
            if b >= a:
                b += 1
            return eps[b] if loads[b].inflight < loads[a].inflight else eps[a]
        weights = self._weights
        bounds = self._bounds
        a = bisect_right(bounds, draw() * self._total)
        wa = weights[a]
        # Draw the second in the weight line with a's interval cut out, so it is
        # distinct without rejection loops (which crawl when a is very heavy).
        x = draw() * (self._total - wa)
        if x >= self._starts[a]:
            x += wa
        b = bisect_right(bounds, x)
        # Cross-multiplied inflight/weight: no float division on the hot path.
        return eps[b] if loads[b].inflight * wa < loads[a].inflight * weights[b] else eps[a]

    def _choose(self, indices: Sequence[int], rng: random.Random) -> int:
        """Index of the best of min(choice_count, len(indices)) distinct weighted draws."""
        weights = self._weights
        loads = self._loads
        pool = [weights[i] for i in indices]
        starts = [0, *itertools.accumulate(pool)]
        bounds = starts[1:-1]
        remaining = starts[-1]
        taken: list[tuple[int, int]] = []  # (start, weight) of drawn intervals, sorted
        best = -1
        best_load = 0
        best_weight = 1
        for _ in range(min(self.choice_count, len(pool))):
            x = rng.random() * remaining
            # Map x from the line with the taken intervals removed back onto the full line.
            for start, weight in taken:
                if x < start:
                    break
                x += weight
            p = bisect_right(bounds, x)
            insort(taken, (starts[p], pool[p]))
            remaining -= pool[p]
            i = indices[p]
            load = loads[i].inflight
            if best < 0 or load * best_weight < best_load * weights[i]:
                best, best_load, best_weight = i, load, weights[i]
            if remaining <= 0:
                break
        return best

    def __repr__(self) -> str:
        return f"LeastRequest({len(self.endpoints)} endpoints, choice_count={self.choice_count})"
