"""Property tests of the load balancers in meshlib.balancing."""

from __future__ import annotations

import itertools
import random
from collections import Counter

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from meshlib.balancing import (
    LeastRequest,
    RingHash,
    RoundRobin,
    hash_key_from,
    make_balancer,
)
from meshlib.balancing.ring_hash import vnode_counts
from meshlib.balancing.round_robin import MAX_PERIOD, normalized_weights, smooth_schedule
from meshlib.endpoint import Endpoint

weights_st = st.lists(st.integers(1, 20), min_size=1, max_size=8)


def make_eps(weights: list[int]) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"10.1.0.{i}", 9000, weight=w) for i, w in enumerate(weights))


def nginx_reference(weights: list[int]) -> list[int]:
    """nginx's smooth WRR, step by step over every endpoint, for one period."""
    current = [0] * len(weights)
    total = sum(weights)
    out = []
    for _ in range(total):
        best = -1
        for i, w in enumerate(weights):
            current[i] += w
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        out.append(best)
    return out


@settings(max_examples=200, deadline=None)
@given(weights_st)
def test_smooth_schedule_is_nginx(weights: list[int]) -> None:
    assert smooth_schedule(weights) == nginx_reference(weights)


@settings(max_examples=100, deadline=None)
@given(weights_st, st.integers(0, 3))
def test_round_robin_period_is_exactly_proportional(weights: list[int], periods: int) -> None:
    eps = make_eps(weights)
    b = RoundRobin(eps)
    norm = normalized_weights(weights)
    rng = random.Random(0)
    for _ in range(periods):
        counts: Counter[int] = Counter()
        for _ in range(b.period):
            ep = b.pick(rng)
            assert ep is not None
            counts[eps.index(ep)] += 1
        assert [counts[i] for i in range(len(eps))] == norm


@settings(max_examples=200, deadline=None)
@given(weights_st)
def test_round_robin_is_smooth(weights: list[int]) -> None:
    schedule = smooth_schedule(weights)
    # Cyclic: the schedule repeats, so the last slot is followed by the first.
    for a, b in itertools.pairwise([*schedule, schedule[0]]):
        if a == b:
            others = [w for j, w in enumerate(weights) if j != a]
            assert all(w < weights[a] for w in others), (weights, schedule)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10**7), min_size=1, max_size=300))
def test_normalized_weights_fit_the_cap(weights: list[int]) -> None:
    norm = normalized_weights(weights)
    assert len(norm) == len(weights)
    assert all(w >= 1 for w in norm)
    assert sum(norm) <= MAX_PERIOD
    if sum(weights) <= MAX_PERIOD:
        # Unscaled: exact ratios.
        assert all(n * weights[0] == w * norm[0] for n, w in zip(norm, weights, strict=True))
    # Scaling never reverses the order of two weights.
    for (w1, n1), (w2, n2) in itertools.combinations(zip(weights, norm, strict=True), 2):
        assert (w1 - w2) * (n1 - n2) >= 0


endpoint_st = st.builds(
    lambda i, w, p, h: Endpoint(f"10.2.{p}.{i}", 80, weight=w, priority=p, healthy=h),
    st.integers(0, 250),
    st.integers(0, 5),
    st.integers(0, 2),
    st.booleans(),
)


@st.composite
def endpoints_and_avoid(draw: st.DrawFn) -> tuple[tuple[Endpoint, ...], frozenset[str]]:
    eps = draw(st.lists(endpoint_st, min_size=1, max_size=8, unique_by=lambda e: e.address))
    avoid = draw(st.sets(st.sampled_from([e.address for e in eps])))
    return tuple(eps), frozenset(avoid)


@settings(max_examples=150, deadline=None)
@given(
    endpoints_and_avoid(),
    st.sampled_from(["round_robin", "random", "least_request", "ring_hash"]),
    st.one_of(st.none(), st.binary(max_size=16)),
    st.integers(0, 2**32),
)
def test_avoid_is_honoured_whenever_possible(
    case: tuple[tuple[Endpoint, ...], frozenset[str]],
    policy: str,
    key: bytes | None,
    seed: int,
) -> None:
    eps, avoid = case
    b = make_balancer(policy, eps, min_ring_size=64)
    rng = random.Random(seed)
    usable = [e for e in eps if e.healthy] or list(eps)
    assert b.panic == (not any(e.healthy for e in eps))
    best_priority = min(e.priority for e in usable)
    for _ in range(5):
        ep = b.pick(rng, key, avoid)
        assert ep is not None
        assert any(ep is e for e in usable)
        if any(e.address not in avoid for e in usable):
            assert ep.address not in avoid
            # The most preferred level that still has a non-avoided endpoint.
            level = min(e.priority for e in usable if e.address not in avoid)
            assert ep.priority == level
        else:
            assert ep.priority == best_priority
        unavoided = b.pick(rng, key)
        assert unavoided is not None and unavoided.priority == best_priority


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=2, max_size=9),
    st.data(),
)
def test_ring_hash_removal_moves_only_the_removed_keys(
    weights: list[int], data: st.DataObject
) -> None:
    eps = make_eps(weights)
    gone = data.draw(st.integers(0, len(eps) - 1))
    rest = eps[:gone] + eps[gone + 1 :]
    before_counts = vnode_counts(weights, 128, 8_388_608)
    after_counts = vnode_counts([e.weight for e in rest], 128, 8_388_608)
    # Exact only while the others keep their virtual nodes (see vnode_counts).
    assume(after_counts == before_counts[:gone] + before_counts[gone + 1 :])
    before, after = RingHash(eps, 128), RingHash(rest, 128)
    rng = random.Random(0)
    for i in range(300):
        key = f"key-{i}".encode()
        old, new = before.pick(rng, key), after.pick(rng, key)
        assert old is not None and new is not None
        if old is eps[gone]:
            assert new is not old
        else:
            assert new is old


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=20), st.integers(1, 5000))
def test_vnode_counts_are_proportional_and_big_enough(weights: list[int], min_size: int) -> None:
    counts = vnode_counts(weights, min_size, 8_388_608)
    assert sum(counts) >= min_size
    assert sum(counts) < 2 * min_size or counts == weights
    per_unit = counts[0] // weights[0]
    assert counts == [w * per_unit for w in weights]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 8), min_size=2, max_size=6),
    st.binary(min_size=1, max_size=12),
    st.permutations(range(6)),
)
def test_ring_hash_key_maps_to_one_endpoint_whatever_the_order(
    weights: list[int], key: bytes, order: list[int]
) -> None:
    eps = make_eps(weights)
    shuffled = tuple(eps[i] for i in order if i < len(eps))
    rng = random.Random(0)
    first = RingHash(eps, 64).pick(rng, key)
    assert RingHash(eps, 64).pick(rng, key) is first
    assert RingHash(shuffled, 64).pick(rng, key) is first


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 5), st.integers(0, 20)), min_size=2, max_size=8),
    st.integers(2, 4),
    st.integers(0, 2**32),
)
def test_least_request_never_picks_a_strictly_worst_endpoint(
    specs: list[tuple[int, int]], choice_count: int, seed: int
) -> None:
    eps = make_eps([w for w, _ in specs])
    for e, (_, inflight) in zip(eps, specs, strict=True):
        e.load.inflight = inflight
    scores = [e.load.inflight / e.weight for e in eps]
    b = LeastRequest(eps, choice_count)
    rng = random.Random(seed)
    for _ in range(20):
        ep = b.pick(rng)
        assert ep is not None
        score = ep.load.inflight / ep.weight
        # Among >= 2 distinct candidates the pick beats or ties at least one other.
        assert any(s >= score for i, s in enumerate(scores) if eps[i] is not ep)
        if len(eps) == 2:
            assert score == min(scores)


cookie_name = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABC_-0123456789"), min_size=1)
cookie_val = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789%/+:._-"), max_size=20)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(cookie_name, cookie_val, min_size=1, max_size=6), st.data())
def test_hash_key_from_finds_each_cookie(cookies: dict[str, str], data: st.DataObject) -> None:
    header = "; ".join(f"{k}={v}" for k, v in cookies.items())
    name = data.draw(st.sampled_from(sorted(cookies)))
    assert hash_key_from({}, header, ("cookie", name)) == cookies[name].encode()
    assert hash_key_from({}, header, ("cookie", name + "~")) is None
