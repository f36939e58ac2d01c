"""Builds the balancer for a policy name from the config."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meshlib.balancing.base import Balancer
from meshlib.balancing.least_request import LeastRequest
from meshlib.balancing.priority import PriorityFailover
from meshlib.balancing.random_lb import WeightedRandom
from meshlib.balancing.ring_hash import RingHash
from meshlib.balancing.round_robin import RoundRobin
from meshlib.endpoint import Endpoint

POLICIES = ("round_robin", "random", "least_request", "ring_hash")
"""Policy names ``make_balancer`` accepts."""


def make_balancer(
    policy: str,
    endpoints: Sequence[Endpoint],
    *,
    choice_count: int = 2,
    min_ring_size: int = 1024,
    start: int = 0,
) -> PriorityFailover:
    """A ``policy`` balancer per priority level, wrapped in ``PriorityFailover``.

    ``start`` is round robin's first schedule slot (callers pass a random one).
    Raises ValueError for an unknown policy or a bad parameter, even when there are no
    endpoints yet, so config errors show up at load time.
    """
    make_level: Callable[[tuple[Endpoint, ...]], Balancer]
    if policy == "round_robin":

        def make_level(eps: tuple[Endpoint, ...]) -> Balancer:
            return RoundRobin(eps, start)

    elif policy == "random":
        make_level = WeightedRandom
    elif policy == "least_request":
        if choice_count < 1:
            raise ValueError(f"choice_count must be >= 1, not {choice_count}")

        def make_level(eps: tuple[Endpoint, ...]) -> Balancer:
            return LeastRequest(eps, choice_count)

    elif policy == "ring_hash":
        if min_ring_size < 1:
            raise ValueError(f"min_ring_size must be >= 1, not {min_ring_size}")

        def make_level(eps: tuple[Endpoint, ...]) -> Balancer:
            return RingHash(eps, min_ring_size, max(min_ring_size, 8_388_608))

    else:
        raise ValueError(f"unknown load balancing policy {policy!r}; expected one of {POLICIES}")
    return PriorityFailover(endpoints, make_level)
