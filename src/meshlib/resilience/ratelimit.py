"""Token-bucket rate limiting, for one stream of requests or one bucket per key."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full.

    Over any interval of t seconds at most ``rate * t + burst`` tokens are granted.
    Tokens are a float refilled lazily on each call (no timer), and a burst taken from a
    full bucket is exact integer arithmetic, so rounding never refuses the last token.

    No lock: two threads racing can both take the same token (one grant too many per
    concurrent caller) or one can lose the other's refill (a fraction of a token too
    few); neither accumulates.
    """

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    rate: float
    burst: int

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of tokens per second, not {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1 token, not {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def try_acquire(self, n: int = 1) -> bool:
        """Take ``n`` tokens if there are that many; never waits (n > burst always fails)."""
        # refill lazily with what accrued since the last call
        now = self._clock()
        elapsed = now - self._last
        tokens = self._tokens
        if elapsed > 0:  # a clock that stands still or steps back refills nothing
            self._last = now
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = self.burst
        if tokens >= n:
            self._tokens = tokens - n
            return True
        self._tokens = tokens
        return False

    def retry_after(self, n: int = 1) -> float:
        """Seconds until ``n`` tokens are available (0 if they are now); inf if n > burst."""
        self.try_acquire(0)  # refills, takes nothing
        tokens = self._tokens
        if tokens >= n:
            return 0.0
        if n > self.burst:
            return math.inf
        return (n - tokens) / self.rate

    @property
    def tokens(self) -> float:
        """Tokens available now."""
        self.try_acquire(0)  # refills, takes nothing
        return self._tokens

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate}, burst={self.burst}, tokens={self._tokens:.3g})"


class KeyedLimiter:
    """One ``TokenBucket`` per key (a caller identity, a client IP), in bounded memory.

    At most ``max_keys`` buckets are kept, in least-recently-used order; a new key over
    the limit evicts the least recently used one. A bucket unused for ``burst / rate``
    seconds is full, and forgetting a full bucket changes nothing (a new one starts
    full); ``evicted_active`` counts evictions of buckets that were not yet full, i.e.
    callers that got a fresh burst early because ``max_keys`` is too small for the
    number of active callers.

    Thread safety is that of ``TokenBucket``: no lock, and a race over one key is off by
    one; dictionary operations are atomic under the GIL.
    """

    __slots__ = (
        "_buckets",
        "_clock",
        "burst",
        "evicted",
        "evicted_active",
        "max_keys",
        "rate",
    )

    rate: float
    burst: int
    max_keys: int
    evicted: int
    evicted_active: int

    def __init__(
        self,
        rate: float,
        burst: int,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, not {max_keys}")
        TokenBucket(rate, burst, clock)  # validates rate and burst once, here
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.evicted = 0
        self.evicted_active = 0
        self._clock = clock
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def _bucket(self, key: Hashable) -> TokenBucket:
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is not None:
            # try/except, not contextlib.suppress: this is the per-request path.
            try:  # noqa: SIM105
                buckets.move_to_end(key)
            except KeyError:  # another thread evicted it just now; it was the LRU anyway
                pass
            return bucket
        bucket = buckets[key] = TokenBucket(self.rate, self.burst, self._clock)
        while len(buckets) > self.max_keys:
            try:
                _, old = buckets.popitem(last=False)
            except KeyError:  # another thread evicted concurrently
                break
            self.evicted += 1
            if old.tokens < old.burst:
                self.evicted_active += 1
        return bucket

    def try_acquire(self, key: Hashable, n: int = 1) -> bool:
        """Take ``n`` tokens from ``key``'s bucket (created full on first use)."""
        return self._bucket(key).try_acquire(n)

    def retry_after(self, key: Hashable, n: int = 1) -> float:
        """Seconds until ``key`` has ``n`` tokens; 0 for a key not seen (or forgotten)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0 if n <= self.burst else math.inf
        return bucket.retry_after(n)

    def __len__(self) -> int:
        return len(self._buckets)

    def snapshot(self) -> dict[str, object]:
        """JSON-serialisable state for explain and metrics."""
        return {
            "rate": self.rate,
            "burst": self.burst,
            "keys": len(self._buckets),
            "max_keys": self.max_keys,
            "evicted": self.evicted,
            "evicted_active": self.evicted_active,
        }

    def __repr__(self) -> str:
        return (
            f"KeyedLimiter(rate={self.rate}, burst={self.burst}, "
            f"keys={len(self._buckets)}/{self.max_keys})"
        )
