"""The interface every load-balancing policy implements."""

from __future__ import annotations

import random
from collections.abc import Container, Iterable
from typing import Protocol

from meshlib.endpoint import Endpoint


class Balancer(Protocol):
    """Picks one endpoint of a fixed set for each request.

    A balancer is built once per endpoint set (a config or discovery change builds a
    new one) and ``pick`` is then called on every request, possibly from several
    threads at once.
    """

    endpoints: tuple[Endpoint, ...]

    def pick(
        self, rng: random.Random, key: bytes | None = None, avoid: Container[str] = ()
    ) -> Endpoint | None:
        """Return an endpoint, or None only when there are no endpoints.

        ``avoid`` holds addresses (``Endpoint.address``) the caller would rather not
        get, such as the endpoints a retry already tried; one of them is returned only
        when every endpoint is avoided. ``key`` is the request's hash key, used only
        by consistent-hash balancers.
        """
        ...


def effective_weights(endpoints: Iterable[Endpoint]) -> list[int]:
    """Weights as the balancers use them: a weight below 1 counts as 1.

    Discovery sources may report 0 or omit the weight; rather than silently draining
    such an endpoint, every policy treats it as the smallest real weight.
    """
    return [w if w > 0 else 1 for w in (e.weight for e in endpoints)]
