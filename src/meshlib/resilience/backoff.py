"""Exponential backoff with full jitter between retries."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from tenacity import wait_exponential

if TYPE_CHECKING:
    from tenacity import RetryCallState

PRECOMPUTED = 10
"""Retries whose cap is precomputed; later ones ask tenacity each time."""


@dataclass(frozen=True, slots=True)
class _Attempt:
    """The one field of tenacity's ``RetryCallState`` its wait strategies read."""

    attempt_number: int


@dataclass(frozen=True, slots=True)
class Backoff:
    """Full-jitter exponential backoff: retry n sleeps ``uniform(0, cap(n))``.

    ``cap(n) = min(base * 2**(n-1), max)`` is tenacity's ``wait_exponential`` with
    ``multiplier=base``, so it reads like the rest of the Python ecosystem. Full jitter
    (rather than tenacity's fixed steps) spreads out clients that failed together, which
    is what stops a retry storm from arriving in waves.
    """

    base: float
    max: float
    _strategy: wait_exponential = field(init=False, repr=False, compare=False)
    _caps: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and self.base > 0):
            raise ValueError(f"backoff base must be a positive number of seconds, not {self.base}")
        if not (math.isfinite(self.max) and self.max >= 0):
            raise ValueError(f"backoff max must be a number of seconds >= 0, not {self.max}")
        strategy = wait_exponential(multiplier=self.base, max=self.max)
        object.__setattr__(self, "_strategy", strategy)
        # The hot path is then a tuple lookup, not tenacity's log/pow arithmetic.
        caps = tuple(self._ask(strategy, n) for n in range(1, PRECOMPUTED + 1))
        object.__setattr__(self, "_caps", caps)

    @staticmethod
    def _ask(strategy: wait_exponential, retry_number: int) -> float:
        return float(strategy(cast("RetryCallState", _Attempt(retry_number))))

    def cap(self, retry_number: int) -> float:
        """The longest sleep before retry ``retry_number`` (1 is the first retry)."""
        if retry_number < 1:
            raise ValueError(f"retry_number starts at 1, not {retry_number}")
        if retry_number <= PRECOMPUTED:
            return self._caps[retry_number - 1]
        return self._ask(self._strategy, retry_number)

    def delay(self, retry_number: int, rng: random.Random) -> float:
        """Seconds to sleep before retry ``retry_number``: uniform in ``[0, cap]``."""
        caps = self._caps
        if 0 < retry_number <= PRECOMPUTED:
            return rng.uniform(0.0, caps[retry_number - 1])
        return rng.uniform(0.0, self.cap(retry_number))
