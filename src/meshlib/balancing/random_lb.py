"""Weighted random choice."""

from __future__ import annotations

import itertools
import random
from bisect import bisect_right
from collections.abc import Container, Sequence

from meshlib.balancing.base import effective_weights
from meshlib.endpoint import Endpoint


class WeightedRandom:
    """Picks each endpoint with probability weight / total weight."""

    __slots__ = ("_addresses", "_bounds", "_total", "_weights", "endpoints")

    endpoints: tuple[Endpoint, ...]

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self._weights = effective_weights(self.endpoints)
        # Upper bounds of every interval but the last: bisect then can never return n,
        # whatever float rounding does to random() * total.
        self._bounds = list(itertools.accumulate(self._weights))[:-1]
        self._total = sum(self._weights)
        self._addresses = tuple(e.address for e in self.endpoints)

    def pick(
        self, rng: random.Random, key: bytes | None = None, avoid: Container[str] = ()
    ) -> Endpoint | None:
        """A weighted random endpoint; with ``avoid``, drawn among the non-avoided ones."""
        if not self._total:
            return None
        i = bisect_right(self._bounds, rng.random() * self._total)
        if avoid and self._addresses[i] in avoid:
            return self._pick_avoiding(rng, i, avoid)
        return self.endpoints[i]

    def _pick_avoiding(self, rng: random.Random, first: int, avoid: Container[str]) -> Endpoint:
        eligible = [i for i, a in enumerate(self._addresses) if a not in avoid]
        if not eligible:
            return self.endpoints[first]
        cumulative = list(itertools.accumulate(self._weights[i] for i in eligible))
        j = bisect_right(cumulative[:-1], rng.random() * cumulative[-1])
        return self.endpoints[eligible[j]]

    def __repr__(self) -> str:
        return f"WeightedRandom({len(self.endpoints)} endpoints)"
