"""Load balancing: pick one endpoint per request.

Pure code: no I/O and no global state; randomness comes from the ``random.Random``
passed to ``pick``. Build balancers with ``make_balancer``.
"""

from meshlib.balancing.base import Balancer, effective_weights
from meshlib.balancing.factory import POLICIES, make_balancer
from meshlib.balancing.least_request import LeastRequest
from meshlib.balancing.priority import PriorityFailover
from meshlib.balancing.random_lb import WeightedRandom
from meshlib.balancing.ring_hash import RingHash, hash_key_from
from meshlib.balancing.round_robin import RoundRobin

__all__ = [
    "POLICIES",
    "Balancer",
    "LeastRequest",
    "PriorityFailover",
    "RingHash",
    "RoundRobin",
    "WeightedRandom",
    "effective_weights",
    "hash_key_from",
    "make_balancer",
]
