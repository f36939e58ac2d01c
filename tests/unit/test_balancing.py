"""Deterministic tests of the load balancers in meshlib.balancing."""

from __future__ import annotations

import itertools
import math
import random
import threading
from collections import Counter
from collections.abc import Callable

import pytest

from meshlib.balancing import (
    POLICIES,
    Balancer,
    LeastRequest,
    PriorityFailover,
    RingHash,
    RoundRobin,
    WeightedRandom,
    hash_key_from,
    make_balancer,
)
from meshlib.balancing.round_robin import MAX_PERIOD, normalized_weights, smooth_schedule
from meshlib.endpoint import Endpoint


def make_eps(
    *weights: int, priority: int = 0, healthy: bool = True, base: int = 0
) -> tuple[Endpoint, ...]:
    return tuple(
        Endpoint(f"10.0.{priority}.{base + i}", 8080, weight=w, priority=priority, healthy=healthy)
        for i, w in enumerate(weights)
    )


def picks(balancer: Balancer, n: int, seed: int = 1, key: bytes | None = None) -> Counter[str]:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    for _ in range(n):
        ep = balancer.pick(rng, key)
        assert ep is not None
        counts[ep.address] += 1
    return counts


def assert_proportions(counts: Counter[str], eps: tuple[Endpoint, ...], sigmas: float = 5) -> None:
    """Each endpoint's count is within ``sigmas`` binomial standard deviations of weight share."""
    n = sum(counts.values())
    total = sum(e.weight for e in eps)
    for e in eps:
        p = e.weight / total
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[e.address] - n * p) <= sigmas * sd, (e.address, counts[e.address], n * p)


ALL_BALANCERS: list[Callable[[tuple[Endpoint, ...]], Balancer]] = [
    RoundRobin,
    WeightedRandom,
    LeastRequest,
    RingHash,
]


# --- common behaviour ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_BALANCERS)
def test_no_endpoints_gives_none(cls: Callable[[tuple[Endpoint, ...]], Balancer]) -> None:
    b = cls(())
    assert b.pick(random.Random(0)) is None
    assert b.pick(random.Random(0), b"k", {"10.0.0.1:80"}) is None


@pytest.mark.parametrize("cls", ALL_BALANCERS)
def test_single_endpoint_always_returned(cls: Callable[[tuple[Endpoint, ...]], Balancer]) -> None:
    eps = make_eps(3)
    b = cls(eps)
    rng = random.Random(0)
    assert all(b.pick(rng, b"k") is eps[0] for _ in range(20))
    # Avoided, but it is all there is.
    assert b.pick(rng, b"k", {eps[0].address}) is eps[0]


@pytest.mark.parametrize("cls", ALL_BALANCERS)
@pytest.mark.parametrize("key", [None, b"some-key"])
def test_avoid_returns_non_avoided_whenever_one_exists(
    cls: Callable[[tuple[Endpoint, ...]], Balancer], key: bytes | None
) -> None:
    eps = make_eps(1, 2, 3, 4, 5)
    b = cls(eps)
    rng = random.Random(3)
    addresses = [e.address for e in eps]
    for size in range(1, len(eps)):
        for avoided in itertools.combinations(addresses, size):
            avoid = frozenset(avoided)
            for _ in range(10):
                ep = b.pick(rng, key, avoid)
                assert ep is not None and ep.address not in avoid
    # Everything avoided: still an endpoint rather than None.
    for _ in range(10):
        assert b.pick(rng, key, frozenset(addresses)) in eps


@pytest.mark.parametrize("cls", ALL_BALANCERS)
def test_zero_weight_counts_as_one(cls: Callable[[tuple[Endpoint, ...]], Balancer]) -> None:
    eps = make_eps(0, 1)
    counts = picks(cls(eps), 4000)
    assert counts[eps[0].address] > 1000
    assert counts[eps[1].address] > 1000


# --- round robin --------------------------------------------------------------------------


def test_round_robin_equal_weights_cycles_in_order() -> None:
    eps = make_eps(1, 1, 1, 1)
    b = RoundRobin(eps)
    rng = random.Random(0)
    assert b.period == 4
    assert [b.pick(rng) for _ in range(8)] == [*eps, *eps]


def test_round_robin_matches_nginx_sequence() -> None:
    # nginx documents 5,1,1 as "a a b a c a a" instead of plain WRR's "a a a a a b c".
    eps = make_eps(5, 1, 1)
    b = RoundRobin(eps)
    rng = random.Random(0)
    names = {e.address: name for e, name in zip(eps, "abc", strict=True)}
    seq = ""
    for _ in range(14):
        ep = b.pick(rng)
        assert ep is not None
        seq += names[ep.address]
    assert seq == "aabacaa" * 2
    assert "aaaaa" not in seq


@pytest.mark.parametrize(
    "weights", [(5, 1, 1), (3, 2), (10, 20, 30), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10), (7, 7, 1)]
)
def test_round_robin_full_period_is_exactly_proportional(weights: tuple[int, ...]) -> None:
    eps = make_eps(*weights)
    b = RoundRobin(eps)
    g = math.gcd(*weights)
    assert b.period == sum(weights) // g
    counts = picks(b, b.period)
    assert {e.address: e.weight // g for e in eps} == dict(counts)
    # ...and again for the next period: the counter carries on.
    counts2 = picks(b, b.period)
    assert counts2 == counts


def test_round_robin_no_repeat_when_another_has_equal_or_more_weight() -> None:
    weights = (4, 4, 2, 9, 1)
    b = RoundRobin(make_eps(*weights))
    rng = random.Random(0)
    seq = [b.pick(rng) for _ in range(b.period * 2)]
    repeats = {prev.address for prev, cur in itertools.pairwise(seq) if prev is cur and prev}
    # Only the single heaviest endpoint may come twice in a row.
    assert repeats == {"10.0.0.3:8080"}


def test_round_robin_long_schedule_is_scaled_down() -> None:
    eps = make_eps(100_000, 3, 1, 1)
    b = RoundRobin(eps)
    assert b.period <= MAX_PERIOD
    counts = picks(b, b.period)
    assert [counts[e.address] for e in eps[1:]] == [1, 1, 1]
    assert counts[eps[0].address] >= MAX_PERIOD - 10
    # Proportions survive scaling when no weight is tiny.
    eps = make_eps(6001, 3000, 1000)
    b = RoundRobin(eps)
    assert MAX_PERIOD - 10 <= b.period <= MAX_PERIOD
    counts = picks(b, b.period)
    for e in eps:
        assert abs(counts[e.address] - b.period * e.weight / 10_001) <= 1


def test_normalized_weights_caps_the_period() -> None:
    assert normalized_weights([4, 8, 12]) == [1, 2, 3]
    assert normalized_weights([]) == []
    assert sum(normalized_weights([10**6] + [1] * 100)) <= MAX_PERIOD
    assert normalized_weights([5, 7] * 3000) == [1] * 6000


def test_round_robin_many_endpoints_builds_fast_enough() -> None:
    # One candidate per distinct weight per step: 2000 endpoints in well under a second.
    eps = tuple(Endpoint(f"h{i}", 80, weight=1 + i % 7) for i in range(2000))
    b = RoundRobin(eps)
    assert len(set(picks(b, b.period))) == 2000


def test_round_robin_is_exact_under_threads() -> None:
    eps = make_eps(5, 1, 1)
    b = RoundRobin(eps)
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def worker() -> None:
        local = picks(b, 7 * 500)
        with lock:
            counts.update(local)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 14000 picks = 2000 whole periods, however the threads interleaved.
    assert counts == {eps[0].address: 10000, eps[1].address: 2000, eps[2].address: 2000}


def test_smooth_schedule_empty() -> None:
    assert smooth_schedule([]) == []


# --- weighted random ----------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (1, 2, 3, 4), (1, 50), (10, 1, 1, 1, 1, 1)])
def test_weighted_random_proportions(weights: tuple[int, ...]) -> None:
    eps = make_eps(*weights)
    assert_proportions(picks(WeightedRandom(eps), 20_000, seed=11), eps)


def test_weighted_random_is_reproducible_with_seed() -> None:
    b = WeightedRandom(make_eps(1, 2, 3))
    assert picks(b, 500, seed=5) == picks(b, 500, seed=5)


def test_weighted_random_avoid_keeps_weights_among_the_rest() -> None:
    eps = make_eps(1, 3, 100)
    b = WeightedRandom(eps)
    rng = random.Random(2)
    counts: Counter[str] = Counter()
    for _ in range(8000):
        ep = b.pick(rng, None, {eps[2].address})
        assert ep is not None
        counts[ep.address] += 1
    assert counts[eps[2].address] == 0
    assert_proportions(counts, eps[:2])


# --- least request ------------------------------------------------------------------------


def test_least_request_two_endpoints_always_the_less_loaded() -> None:
    eps = make_eps(1, 1)
    eps[0].load.inflight = 5
    counts = picks(LeastRequest(eps), 1000)
    assert counts == {eps[1].address: 1000}


def test_least_request_never_picks_the_most_loaded() -> None:
    eps = make_eps(*[1] * 10)
    for i, e in enumerate(eps):
        e.load.inflight = i
    counts = picks(LeastRequest(eps), 20_000)
    assert counts[eps[9].address] == 0
    # Endpoint i wins when it is sampled together with a more loaded one:
    # P = (9 - i) / C(10, 2).
    for i, e in enumerate(eps):
        p = (9 - i) / 45
        sd = math.sqrt(20_000 * p * (1 - p))
        assert abs(counts[e.address] - 20_000 * p) <= 5 * sd + 1


def test_least_request_heavily_loaded_endpoint_gets_no_picks() -> None:
    eps = make_eps(*[1] * 5)
    eps[2].load.inflight = 100
    counts = picks(LeastRequest(eps), 5000)
    assert counts[eps[2].address] == 0
    assert len(counts) == 4


def test_least_request_without_load_follows_weights() -> None:
    eps = make_eps(1, 2, 3, 4)
    assert_proportions(picks(LeastRequest(eps), 20_000, seed=4), eps)


def test_least_request_divides_load_by_weight() -> None:
    light, heavy = make_eps(1, 4)
    light.load.inflight = 2  # 2 per weight unit
    heavy.load.inflight = 4  # 1 per weight unit: less loaded despite more requests
    counts = picks(LeastRequest((light, heavy)), 1000)
    assert counts == {heavy.address: 1000}


def test_least_request_ties_go_to_first_sampled() -> None:
    eps = make_eps(1, 1, 1)
    for e in eps:
        e.load.inflight = 3
    # Equal scores: a uniform spread rather than always the lowest index.
    counts = picks(LeastRequest(eps), 9000)
    assert_proportions(counts, eps)


@pytest.mark.parametrize("choice_count", [1, 3, 4, 10])
def test_least_request_other_choice_counts(choice_count: int) -> None:
    eps = make_eps(1, 2, 1, 3)
    for i, e in enumerate(eps):
        e.load.inflight = 10 - i
    b = LeastRequest(eps, choice_count=choice_count)
    counts = picks(b, 4000)
    if choice_count >= len(eps):
        assert counts == {eps[3].address: 4000}
    elif choice_count > 1:
        assert counts[eps[0].address] == 0
    else:
        assert len(counts) == 4


def test_least_request_rejects_bad_choice_count() -> None:
    with pytest.raises(ValueError, match="choice_count"):
        LeastRequest(make_eps(1), choice_count=0)


def test_least_request_sees_load_changes_after_construction() -> None:
    eps = make_eps(1, 1)
    b = LeastRequest(eps)
    rng = random.Random(0)
    eps[1].load.inflight = 1
    assert b.pick(rng) is eps[0]
    eps[0].load.inflight = 2
    assert b.pick(rng) is eps[1]


# --- ring hash ----------------------------------------------------------------------------

KEYS = [f"user-{i}".encode() for i in range(5000)]


def owners(b: RingHash, keys: list[bytes] = KEYS) -> list[str]:
    rng = random.Random(0)
    result = []
    for k in keys:
        ep = b.pick(rng, k)
        assert ep is not None
        result.append(ep.address)
    return result


def test_ring_hash_same_key_same_endpoint() -> None:
    eps = make_eps(*[1] * 10)
    b = RingHash(eps)
    first = owners(b)
    assert owners(b) == first
    # The ring depends on the addresses, not on their order or on the instance.
    assert owners(RingHash(tuple(reversed(eps)))) == first
    assert len(set(first)) == 10


def test_ring_hash_ring_size_and_vnodes_follow_weights() -> None:
    b = RingHash(make_eps(1, 2, 3, 4), min_ring_size=1000)
    assert 1000 <= b.ring_size < 2000
    assert RingHash(make_eps(1, 1), min_ring_size=16).ring_size == 16
    assert RingHash(make_eps(1, 1), min_ring_size=8, max_ring_size=8).ring_size == 8
    with pytest.raises(ValueError):
        RingHash(make_eps(1), min_ring_size=10, max_ring_size=5)


def test_ring_hash_removing_an_endpoint_moves_only_its_keys() -> None:
    eps = make_eps(*[1] * 10)
    before = owners(RingHash(eps))
    removed = eps[3]
    after = owners(RingHash(eps[:3] + eps[4:]))
    for old, new in zip(before, after, strict=True):
        if old == removed.address:
            assert new != removed.address
        else:
            assert new == old
    assert before.count(removed.address) > 0


def test_ring_hash_adding_an_endpoint_moves_about_its_share() -> None:
    eps = make_eps(*[1] * 11)
    before = owners(RingHash(eps[:10]))
    after = owners(RingHash(eps))
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert all(new == eps[10].address for _, new in moved)
    assert 0.5 / 11 < len(moved) / len(KEYS) < 1.5 / 11


def test_ring_hash_weights_share_keys() -> None:
    eps = make_eps(1, 2, 3, 4)
    counts = Counter(owners(RingHash(eps), [f"k{i}".encode() for i in range(20_000)]))
    for e in eps:
        share = counts[e.address] / 20_000
        assert share == pytest.approx(e.weight / 10, rel=0.25)


def test_ring_hash_without_key_is_random_by_weight() -> None:
    eps = make_eps(1, 3)
    b = RingHash(eps)
    counts = picks(b, 20_000, seed=9)
    # Uniform over virtual nodes, whose counts are exactly proportional to weight.
    assert_proportions(counts, eps)


def test_ring_hash_avoid_walks_to_next_endpoint_deterministically() -> None:
    eps = make_eps(*[1] * 5)
    b = RingHash(eps)
    rng = random.Random(0)
    for key in KEYS[:200]:
        home = b.pick(rng, key)
        assert home is not None
        fallback = b.pick(rng, key, {home.address})
        assert fallback is not None and fallback is not home
        assert b.pick(rng, key, {home.address}) is fallback
        # The fallback is where the key goes when its home endpoint is gone.
        rest = tuple(e for e in eps if e is not home)
        assert RingHash(rest).pick(rng, key) == fallback


def test_hash_key_from_header() -> None:
    headers = {"x-user": "alice", "cookie": "ignored=1"}
    assert hash_key_from(headers, None, ("header", "X-User")) == b"alice"
    assert hash_key_from(headers, None, ("header", "x-missing")) is None
    assert hash_key_from({"x-user": ""}, None, ("header", "x-user")) == b""
    assert hash_key_from({"x-user": "caf\u00e9"}, None, ("header", "x-user")) == "café".encode()


def test_hash_key_from_cookie() -> None:
    cookies = 'theme=dark; session=abc123;  other = 2 ; quoted="q v"; session=second'
    assert hash_key_from({}, cookies, ("cookie", "session")) == b"abc123"
    assert hash_key_from({}, cookies, ("cookie", "other")) == b"2"
    assert hash_key_from({}, cookies, ("cookie", "quoted")) == b"q v"
    assert hash_key_from({}, cookies, ("cookie", "Session")) is None
    assert hash_key_from({}, cookies, ("cookie", "absent")) is None
    assert hash_key_from({}, None, ("cookie", "session")) is None
    assert hash_key_from({}, "flag; a=1", ("cookie", "flag")) is None


def test_hash_key_from_rejects_unknown_source() -> None:
    with pytest.raises(ValueError, match="hash_on"):
        hash_key_from({}, None, ("query", "user"))


# --- priority failover --------------------------------------------------------------------


def test_priority_uses_lowest_level_with_healthy_endpoints() -> None:
    p0 = make_eps(1, 1, priority=0)
    p1 = make_eps(1, 1, priority=1)
    b = PriorityFailover(p1 + p0, RoundRobin)
    assert [p for p, _ in b.levels] == [0, 1]
    assert b.levels[0][1].endpoints == p0
    assert not b.panic
    assert set(picks(b, 100)) == {e.address for e in p0}


def test_priority_skips_unhealthy_endpoints_within_a_level() -> None:
    p0 = (*make_eps(1, priority=0), *make_eps(1, priority=0, healthy=False, base=5))
    b = PriorityFailover(p0, WeightedRandom)
    assert picks(b, 200) == {p0[0].address: 200}


def test_priority_fails_over_when_a_level_is_all_unhealthy() -> None:
    p0 = make_eps(1, 1, priority=0, healthy=False)
    p2 = make_eps(1, priority=2)
    p5 = make_eps(1, priority=5)
    b = PriorityFailover(p0 + p5 + p2, LeastRequest)
    assert [p for p, _ in b.levels] == [2, 5]
    assert picks(b, 100) == {p2[0].address: 100}


def test_priority_panic_mode_when_nothing_is_healthy() -> None:
    p0 = make_eps(1, 1, priority=0, healthy=False)
    p1 = make_eps(1, priority=1, healthy=False)
    b = PriorityFailover(p0 + p1, RoundRobin)
    assert b.panic
    assert [p for p, _ in b.levels] == [0, 1]
    assert set(picks(b, 100)) == {e.address for e in p0}
    assert "panic" in repr(b)


def test_priority_no_endpoints() -> None:
    b = PriorityFailover((), RoundRobin)
    assert not b.panic
    assert b.levels == ()
    assert b.pick(random.Random(0)) is None
    assert b.pick(random.Random(0), None, {"x:1"}) is None


def test_priority_avoid_moves_to_next_level_before_reusing() -> None:
    p0 = make_eps(1, 1, priority=0)
    p1 = make_eps(1, priority=1)
    p2 = make_eps(1, priority=2)
    b = PriorityFailover(p0 + p1 + p2, RoundRobin)
    rng = random.Random(0)
    # One p0 endpoint avoided: the other p0 one.
    assert b.pick(rng, None, {p0[0].address}) is p0[1]
    # All of p0 avoided: p1.
    assert b.pick(rng, None, {e.address for e in p0}) is p1[0]
    # p0 and p1 avoided: p2.
    assert b.pick(rng, None, {e.address for e in p0 + p1}) is p2[0]
    # Everything avoided: back to the preferred level rather than None.
    assert b.pick(rng, None, {e.address for e in p0 + p1 + p2}) in p0
    # Unknown addresses in avoid change nothing.
    assert b.pick(rng, None, {"192.0.2.1:1"}) in p0


def test_priority_avoid_does_not_pick_unhealthy() -> None:
    healthy = make_eps(1, priority=0)
    sick = make_eps(1, priority=0, healthy=False, base=5)
    b = PriorityFailover(healthy + sick, RoundRobin)
    assert b.pick(random.Random(0), None, {healthy[0].address}) is healthy[0]


# --- factory ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "cls"),
    [
        ("round_robin", RoundRobin),
        ("random", WeightedRandom),
        ("least_request", LeastRequest),
        ("ring_hash", RingHash),
    ],
)
def test_make_balancer_builds_policy_per_level(policy: str, cls: type) -> None:
    eps = make_eps(1, 2, priority=0) + make_eps(1, priority=1)
    b = make_balancer(policy, eps)
    assert policy in POLICIES
    assert isinstance(b, PriorityFailover)
    assert [p for p, _ in b.levels] == [0, 1]
    assert all(isinstance(level, cls) for _, level in b.levels)
    assert b.pick(random.Random(0), b"key") in eps[:2]


def test_make_balancer_passes_parameters() -> None:
    eps = make_eps(1, 1, 1)
    lr = make_balancer("least_request", eps, choice_count=3).levels[0][1]
    assert isinstance(lr, LeastRequest) and lr.choice_count == 3
    rh = make_balancer("ring_hash", eps, min_ring_size=64).levels[0][1]
    assert isinstance(rh, RingHash) and 64 <= rh.ring_size < 128


def test_make_balancer_rejects_bad_config_even_without_endpoints() -> None:
    with pytest.raises(ValueError, match="unknown load balancing policy"):
        make_balancer("maglev", ())
    with pytest.raises(ValueError, match="choice_count"):
        make_balancer("least_request", (), choice_count=0)
    with pytest.raises(ValueError, match="min_ring_size"):
        make_balancer("ring_hash", (), min_ring_size=0)


def test_round_robin_start_offset_staggers_but_keeps_shares() -> None:
    from collections import Counter

    from meshlib.balancing import RoundRobin
    from meshlib.endpoint import Endpoint

    endpoints = [Endpoint("127.0.0.1", 9000 + i, weight=i + 1) for i in range(3)]
    rng = random.Random(0)
    first = {RoundRobin(endpoints, start).pick(rng).address for start in range(6)}
    assert len(first) > 1  # different processes begin at different endpoints
    balancer = RoundRobin(endpoints, 4)
    counts = Counter(balancer.pick(rng).port for _ in range(balancer.period * 5))
    assert counts == {9000: 5, 9001: 10, 9002: 15}
