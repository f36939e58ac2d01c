"""resilience.

Pure decision objects (clock and RNG passed in, no I/O): retry backoff, retry
budget, rate limits, concurrency limits (bulkhead), fault injection, circuit
breakers and outlier detection.
"""

from meshlib.resilience.backoff import Backoff
from meshlib.resilience.breaker import Breaker, BreakerBoard
from meshlib.resilience.budget import RetryBudget
from meshlib.resilience.faults import Fault, FaultPolicy, decide_fault
from meshlib.resilience.limits import Bulkhead
from meshlib.resilience.outlier import OutlierConfig, OutlierDetector, effective_avoid
from meshlib.resilience.ratelimit import KeyedLimiter, TokenBucket

__all__ = [
    "Backoff",
    "Breaker",
    "BreakerBoard",
    "Bulkhead",
    "Fault",
    "FaultPolicy",
    "KeyedLimiter",
    "OutlierConfig",
    "OutlierDetector",
    "RetryBudget",
    "TokenBucket",
    "decide_fault",
    "effective_avoid",
]
