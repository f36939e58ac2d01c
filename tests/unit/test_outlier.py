"""Outlier detection in meshlib.resilience.outlier, checked against Envoy's semantics."""

from __future__ import annotations

import dataclasses
import random
import statistics
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from meshlib.resilience.outlier import (
    CONSECUTIVE_5XX,
    CONSECUTIVE_GATEWAY_FAILURE,
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE,
    FAILURE_PERCENTAGE,
    SUCCESS_RATE,
    OutlierConfig,
    OutlierDetector,
    effective_avoid,
    success_rate_threshold,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def hosts(n: int) -> list[str]:
    return [f"10.0.0.{i}:8080" for i in range(n)]


# Only the consecutive-5xx detector, ejecting any share of the hosts.
ONLY_5XX = OutlierConfig(
    max_ejection_percent=100,
    consecutive_gateway_failure=0,
    consecutive_local_origin_failure=0,
    success_rate_minimum_hosts=1000,
    failure_percentage_minimum_hosts=1000,
)
# Only the interval statistics: no consecutive detector.
ONLY_STATS = OutlierConfig(
    max_ejection_percent=100,
    consecutive_5xx=0,
    consecutive_gateway_failure=0,
    consecutive_local_origin_failure=0,
)


def detector(
    config: OutlierConfig, n: int = 5, seed: int = 0
) -> tuple[OutlierDetector, FakeClock, list[str]]:
    clock = FakeClock()
    addresses = hosts(n)
    return OutlierDetector(config, clock, random.Random(seed), addresses), clock, addresses


def fail(d: OutlierDetector, address: str, times: int, status: int | None = 500) -> None:
    for _ in range(times):
        d.record(address, status=status)


def test_defaults_are_envoys_except_gateway_enforcement() -> None:
    c = OutlierConfig()
    assert (c.interval, c.base_ejection_time, c.effective_max_ejection_time) == (10, 30, 300)
    assert (c.max_ejection_percent, c.always_eject_one_host) == (10, False)
    assert (c.consecutive_5xx, c.enforcing_consecutive_5xx) == (5, 100)
    assert c.consecutive_gateway_failure == 5
    assert c.enforcing_consecutive_gateway_failure == 100  # Envoy: 0; meshlib's choice
    assert (c.consecutive_local_origin_failure, c.enforcing_consecutive_local_origin_failure) == (
        5,
        100,
    )
    assert c.split_external_local_origin_errors is False
    assert (c.success_rate_minimum_hosts, c.success_rate_request_volume) == (5, 100)
    assert (c.success_rate_stdev_factor, c.enforcing_success_rate) == (1900, 100)
    assert (c.failure_percentage_threshold, c.enforcing_failure_percentage) == (85, 0)
    assert (c.failure_percentage_minimum_hosts, c.failure_percentage_request_volume) == (5, 50)
    # Envoy: an unset max_ejection_time follows a longer base_ejection_time
    assert OutlierConfig(base_ejection_time=600).effective_max_ejection_time == 600


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval": 0}, "interval"),
        ({"base_ejection_time": -1}, "base_ejection_time"),
        ({"base_ejection_time": 60, "max_ejection_time": 30}, "max_ejection_time"),
        ({"max_ejection_percent": 101}, "max_ejection_percent"),
        ({"enforcing_success_rate": -5}, "enforcing_success_rate"),
        ({"consecutive_5xx": -1}, "consecutive_5xx"),
        ({"max_ejection_time_jitter": -1}, "jitter"),
    ],
)
def test_bad_config_is_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OutlierConfig(**kwargs)


# -- consecutive detectors ----------------------------------------------------------


def test_consecutive_5xx_ejects_and_a_success_resets_the_count() -> None:
    d, _, (a, *_) = detector(ONLY_5XX)
    fail(d, a, 4)
    d.record(a, status=200)
    fail(d, a, 4)
    assert d.ejected() == frozenset()
    d.record(a, status=404)  # 4xx is the caller's fault, not the host's
    fail(d, a, 4)
    assert d.ejected() == frozenset()
    fail(d, a, 1)
    assert d.ejected() == {a}
    assert d.describe()[a]["last_ejection_reason"] == CONSECUTIVE_5XX
    assert d.stats["enforced_consecutive_5xx"] == 1


def test_gateway_failures_count_502_503_504_only() -> None:
    config = dataclasses.replace(ONLY_5XX, consecutive_5xx=0, consecutive_gateway_failure=3)
    d, _, (a, *_) = detector(config)
    fail(d, a, 2, 503)
    d.record(a, status=500)  # a 5xx but not a gateway error: resets the run
    fail(d, a, 1, 502)
    fail(d, a, 1, 504)
    assert d.ejected() == frozenset()
    fail(d, a, 1, 503)
    assert d.ejected() == {a}
    assert d.describe()[a]["last_ejection_reason"] == CONSECUTIVE_GATEWAY_FAILURE


def test_without_split_a_connect_failure_is_a_503() -> None:
    config = dataclasses.replace(ONLY_5XX, consecutive_5xx=0, consecutive_gateway_failure=3)
    d, _, (a, b, *_) = detector(config)
    for _ in range(3):
        d.record(a, status=None, connect_failure=True)
        d.record(b, status=None)  # reset / timeout: a 504
    assert d.ejected() == {a, b}


def test_with_split_local_origin_failures_have_their_own_detector() -> None:
    config = dataclasses.replace(
        ONLY_5XX,
        split_external_local_origin_errors=True,
        consecutive_5xx=3,
        consecutive_local_origin_failure=3,
    )
    d, _, (a, b, *_) = detector(config)
    for _ in range(2):
        d.record(a, status=None, connect_failure=True)
    d.record(a, status=500)  # the connection worked: local-origin run reset
    d.record(a, status=None, connect_failure=True)
    d.record(a, status=None, connect_failure=True)
    assert d.ejected() == frozenset()
    assert d.describe()[a]["consecutive_5xx"] == 1  # connect failures are not 5xx here
    d.record(a, status=None, connect_failure=True)
    assert d.ejected() == {a}
    assert d.describe()[a]["last_ejection_reason"] == CONSECUTIVE_LOCAL_ORIGIN_FAILURE
    fail(d, b, 3)
    assert d.describe()[b]["last_ejection_reason"] == CONSECUTIVE_5XX


def test_max_ejection_percent_is_envoys_rule() -> None:
    # Envoy ejects only if (ejected + 1) / hosts <= max_ejection_percent: with the
    # default 10% a 5-host cluster ejects nobody, unless always_eject_one_host.
    config = dataclasses.replace(ONLY_5XX, max_ejection_percent=10)
    d, _, (a, b, *_) = detector(config, n=5)
    fail(d, a, 5)
    assert d.ejected() == frozenset()
    assert d.stats["overflow"] == 1
    d, _, (a, b, *_) = detector(dataclasses.replace(config, always_eject_one_host=True), n=5)
    fail(d, a, 5)
    fail(d, b, 5)
    assert d.ejected() == {a}
    d, _, (a, b, c, *_) = detector(dataclasses.replace(config, max_ejection_percent=20), n=10)
    fail(d, a, 5)
    fail(d, b, 5)
    fail(d, c, 5)
    assert d.ejected() == {a, b}


def test_a_detection_over_the_limit_is_detected_again_after_another_run() -> None:
    config = dataclasses.replace(ONLY_5XX, max_ejection_percent=50)
    d, clock, (a, b, *_) = detector(config, n=2)
    fail(d, a, 5)
    fail(d, b, 5)  # over the limit: not ejected, but its count starts over
    assert d.ejected() == {a}
    assert d.describe()[b]["consecutive_5xx"] == 0
    clock.advance(30)
    d.tick()
    fail(d, b, 5)
    assert d.ejected() == {b}


def test_enforcement_percentage_draws_from_the_injected_rng() -> None:
    config = dataclasses.replace(ONLY_5XX, enforcing_consecutive_5xx=30)
    d, _, addresses = detector(config, n=200, seed=7)
    reference = random.Random(7)
    expected = set()
    for address in addresses:
        fail(d, address, 5)
        if reference.random() * 100 < 30:
            expected.add(address)
    assert d.ejected() == expected
    assert 30 < len(expected) < 90
    assert d.stats["detected_consecutive_5xx"] == 200


def test_enforcing_zero_detects_without_ejecting() -> None:
    config = dataclasses.replace(ONLY_5XX, enforcing_consecutive_5xx=0)
    d, _, (a, *_) = detector(config)
    fail(d, a, 10)
    assert d.ejected() == frozenset()
    assert d.stats["detected_consecutive_5xx"] == 2
    assert d.stats["enforced_consecutive_5xx"] == 0


# -- ejection time -------------------------------------------------------------------


def test_unejected_when_the_time_is_up_with_counters_reset() -> None:
    d, clock, (a, *_) = detector(ONLY_5XX)
    fail(d, a, 5)
    until = d.describe()[a]["ejected_until"]
    assert until == clock.now + 30
    assert d.describe()[a]["ejected_for"] == 30
    clock.advance(29.999)
    d.tick()
    assert d.ejected() == {a}
    fail(d, a, 3)  # an ejected host's failures keep counting ...
    clock.advance(0.001)
    d.tick()
    assert d.ejected() == frozenset()
    view = d.describe()[a]
    assert view["consecutive_5xx"] == 0  # ... and are forgotten on the way back
    assert view["times_ejected"] == 1
    assert view["ejected_until"] is None


def test_multiplier_shrinks_per_healthy_interval() -> None:
    config = dataclasses.replace(ONLY_5XX, interval=10, base_ejection_time=30)
    d, clock, (a, *_) = detector(config)
    for expected in (30, 60, 90):
        fail(d, a, 5)
        assert d.describe()[a]["ejected_until"] == clock.now + expected
        clock.advance(expected)
        d.tick()
        assert d.ejected() == frozenset()
    assert d.describe()[a]["ejection_multiplier"] == 3
    # Healthy for two analyses at least an interval after coming back: 3 -> 1.
    clock.advance(10)
    d.tick()
    clock.advance(10)
    d.tick()
    assert d.describe()[a]["ejection_multiplier"] == 1
    fail(d, a, 5)
    assert d.describe()[a]["ejected_until"] == clock.now + 60


def test_jitter_is_added_from_the_rng() -> None:
    config = dataclasses.replace(ONLY_5XX, max_ejection_time_jitter=5)
    d, clock, addresses = detector(config, n=20, seed=3)
    extra = []
    for address in addresses:
        fail(d, address, 5)
        until = d.describe()[address]["ejected_until"]
        assert isinstance(until, float)
        extra.append(until - clock.now - 30)
    assert all(0 <= e <= 5 for e in extra)
    assert len(set(extra)) > 1


@settings(max_examples=100, deadline=None)
@given(
    base=st.integers(1, 20),
    cap_factor=st.integers(1, 8),
    ejections=st.integers(1, 12),
)
def test_ejection_time_grows_with_each_ejection_and_is_capped(
    base: int, cap_factor: int, ejections: int
) -> None:
    cap = base * cap_factor + (base // 2)
    # an interval so long that the multiplier never shrinks
    config = dataclasses.replace(
        ONLY_5XX, base_ejection_time=base, max_ejection_time=cap, interval=1e9
    )
    d, clock, (a, *_) = detector(config)
    for k in range(1, ejections + 1):
        fail(d, a, 5)
        until = d.describe()[a]["ejected_until"]
        assert until == clock.now + min(k * base, cap)
        clock.advance(min(k * base, cap) - 0.5)
        d.tick()
        assert d.ejected() == {a}
        clock.advance(0.5)
        d.tick()
        assert d.ejected() == frozenset()
    assert d.describe()[a]["times_ejected"] == ejections
    # Envoy stops growing the multiplier once base * multiplier reaches cap + base, so
    # a host that recovers is not kept out for ever-longer times while it decays.
    ceiling = -(-(cap + base) // base)
    assert d.describe()[a]["ejection_multiplier"] == min(ejections, ceiling)


# -- interval statistics ---------------------------------------------------------------


def feed(d: OutlierDetector, address: str, successes: int, total: int) -> None:
    for _ in range(successes):
        d.record(address, status=200)
    for _ in range(total - successes):
        d.record(address, status=500)


def test_success_rate_envoys_worked_example() -> None:
    # Envoy's comment: rates {50, 100, 100, 100, 100} -> mean 90, stdev 20, threshold 52.
    assert success_rate_threshold([50, 100, 100, 100, 100], 1900) == (90, 52)
    d, clock, addresses = detector(ONLY_STATS)
    for address, ok in zip(addresses, (50, 100, 100, 100, 100), strict=True):
        feed(d, address, ok, 100)
    clock.advance(9)
    d.tick()
    assert d.ejected() == frozenset()  # no analysis before the interval is over
    assert d.describe()[addresses[0]]["interval_requests"] == 100
    clock.advance(1)
    d.tick()
    assert d.ejected() == {addresses[0]}
    view = d.describe()[addresses[0]]
    assert view["last_ejection_reason"] == SUCCESS_RATE
    assert view["interval_requests"] == 0  # a new interval has started
    assert d.describe()[addresses[1]]["success_rate"] == 100


def test_success_rate_needs_enough_hosts_with_enough_requests() -> None:
    # Five hosts are needed; with one of them a request short of the volume, nobody goes.
    for volume_of_last, ejected in ((100, True), (99, False)):
        d, clock, addresses = detector(ONLY_STATS)
        for address, ok in zip(addresses[:4], (50, 100, 100, 100), strict=True):
            feed(d, address, ok, 100)
        feed(d, addresses[4], volume_of_last, volume_of_last)
        clock.advance(10)
        d.tick()
        assert d.ejected() == ({addresses[0]} if ejected else frozenset())


def test_ejected_hosts_take_no_part_in_the_statistics() -> None:
    config = dataclasses.replace(ONLY_STATS, consecutive_5xx=5, success_rate_minimum_hosts=3)
    d, clock, addresses = detector(config, n=4)
    fail(d, addresses[0], 5)
    assert d.ejected() == {addresses[0]}
    for address in addresses:
        feed(d, address, 100 if address != addresses[0] else 0, 100)
    clock.advance(10)
    d.tick()
    assert d.describe()[addresses[0]]["success_rate"] is None


def test_failure_percentage_is_off_by_default_like_envoy() -> None:
    d, clock, addresses = detector(ONLY_STATS)
    for address in addresses:
        feed(d, address, 10, 100)  # everyone at 90% failures: no success-rate outlier
    clock.advance(10)
    d.tick()
    assert d.ejected() == frozenset()
    config = dataclasses.replace(ONLY_STATS, enforcing_failure_percentage=100)
    d, clock, addresses = detector(config)
    for address, ok in zip(addresses, (10, 15, 16, 100, 100), strict=True):
        feed(d, address, ok, 100)
    clock.advance(10)
    d.tick()
    assert d.ejected() == {addresses[0], addresses[1]}  # >= 85% failures
    assert d.describe()[addresses[1]]["last_ejection_reason"] == FAILURE_PERCENTAGE


def test_identical_rates_are_never_outliers() -> None:
    # Float noise: the mean of 5 x (300/23) rounds above it, and with a stdev factor
    # below 1 the plain formula would put all five under the threshold.
    rates = [300 / 23] * 5
    _, threshold = success_rate_threshold(rates, 500)
    assert not any(r < threshold for r in rates)


# -- membership, tick, describe ----------------------------------------------------------


def test_set_hosts_keeps_state_of_staying_hosts_and_drops_the_rest() -> None:
    d, clock, (a, b, c, *_) = detector(ONLY_5XX)
    fail(d, a, 5)
    fail(d, b, 5)
    fail(d, c, 2)
    d.set_hosts([b, c, "10.9.9.9:80"])
    assert d.ejected() == {b}
    assert d.describe()[c]["consecutive_5xx"] == 2
    assert set(d.describe()) == {b, c, "10.9.9.9:80"}
    d.record(a, status=500)  # not a host any more: ignored
    assert a not in d.describe()
    clock.advance(30)
    d.tick()
    assert d.ejected() == frozenset()


def test_tick_is_a_no_op_until_something_is_due() -> None:
    d, clock, (a, *_) = detector(ONLY_STATS)
    d.record(a, status=200)
    for _ in range(5):
        clock.advance(1)
        d.tick()
    assert d.describe()[a]["interval_requests"] == 1
    clock.advance(5)
    d.tick()
    assert d.describe()[a]["interval_requests"] == 0


def test_an_unejection_does_not_start_a_new_interval() -> None:
    config = dataclasses.replace(ONLY_5XX, base_ejection_time=3, interval=10)
    d, clock, (a, b, *_) = detector(config)
    fail(d, a, 5)
    d.record(b, status=200)
    clock.advance(3)
    d.tick()
    assert d.ejected() == frozenset()
    assert d.describe()[b]["interval_requests"] == 1
    clock.advance(7)
    d.tick()
    assert d.describe()[b]["interval_requests"] == 0


def test_ejected_is_a_cached_frozenset() -> None:
    d, _, (a, *_) = detector(ONLY_5XX)
    first = d.ejected()
    assert d.ejected() is first
    fail(d, a, 5)
    assert isinstance(d.ejected(), frozenset)
    assert d.ejected() is d.ejected()


# -- panic ---------------------------------------------------------------------------------


def test_effective_avoid_panics_below_the_threshold() -> None:
    ejected = frozenset({"a", "b"})
    assert effective_avoid(ejected, 4, 50) is ejected  # 50% healthy: not below
    assert effective_avoid(ejected, 3, 50) == frozenset()  # 33% healthy: panic
    assert effective_avoid(ejected, 3, 0) is ejected  # 0 disables panic
    assert effective_avoid(frozenset(), 3, 50) == frozenset()
    assert effective_avoid(ejected, 0, 50) == frozenset()


@given(
    n_ejected=st.integers(0, 20),
    extra=st.integers(0, 20),
    threshold=st.floats(0, 100),
)
def test_effective_avoid_is_all_or_nothing(n_ejected: int, extra: int, threshold: float) -> None:
    total = n_ejected + extra
    ejected = frozenset(f"h{i}" for i in range(n_ejected))
    result = effective_avoid(ejected, total, threshold)
    assert result in (ejected, frozenset())
    if ejected and total:
        panic = (total - n_ejected) / total * 100 < threshold
        assert (result == frozenset()) == panic


# -- properties ----------------------------------------------------------------------------

op_st = st.one_of(
    st.tuples(st.just("record"), st.integers(0, 11), st.sampled_from([200, 404, 500, 503, None])),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 1, 3, 10, 30, 61])),
    st.tuples(st.just("tick")),
)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 12),
    max_percent=st.integers(0, 100),
    always_one=st.booleans(),
    split=st.booleans(),
    threshold=st.integers(1, 3),
    volume=st.integers(1, 4),
    ops=st.lists(op_st, min_size=10, max_size=150),
)
def test_never_more_than_max_ejection_percent(
    n: int,
    max_percent: int,
    always_one: bool,
    split: bool,
    threshold: int,
    volume: int,
    ops: list[tuple[Any, ...]],
) -> None:
    config = OutlierConfig(
        interval=10,
        base_ejection_time=5,
        max_ejection_time=60,
        max_ejection_percent=max_percent,
        always_eject_one_host=always_one,
        split_external_local_origin_errors=split,
        consecutive_5xx=threshold,
        consecutive_gateway_failure=threshold,
        consecutive_local_origin_failure=threshold,
        success_rate_minimum_hosts=2,
        success_rate_request_volume=volume,
        failure_percentage_minimum_hosts=2,
        failure_percentage_request_volume=volume,
        failure_percentage_threshold=50,
        enforcing_failure_percentage=100,
        enforcing_failure_percentage_local_origin=100,
    )
    d, clock, addresses = detector(config, n=n)
    limit = max(max_percent * n // 100, 1 if always_one else 0)
    for op in ops:
        if op[0] == "record":
            d.record(addresses[op[1] % n], status=op[2], connect_failure=op[1] % 2 == 0)
        elif op[0] == "advance":
            clock.advance(op[1])
        else:
            d.tick()
            for view in d.describe().values():
                until = view["ejected_until"]
                assert until is None or (isinstance(until, float) and until > clock.now)
        ejected = d.ejected()
        assert len(ejected) <= limit
        assert ejected <= set(addresses)
        assert ejected == {a for a, v in d.describe().items() if v["ejected"]}


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(0, 20), st.integers(0, 20)),  # (extra volume, failures)
        min_size=3,
        max_size=12,
    ),
    factor=st.sampled_from([500, 1000, 1900, 3000]),
)
def test_success_rate_ejects_exactly_the_statistical_outliers(
    data: list[tuple[int, int]], factor: int
) -> None:
    volume = 20
    config = dataclasses.replace(
        ONLY_STATS,
        success_rate_minimum_hosts=3,
        success_rate_request_volume=volume,
        success_rate_stdev_factor=factor,
    )
    d, clock, addresses = detector(config, n=len(data))
    rates = []
    for address, (extra, failures) in zip(addresses, data, strict=True):
        total = volume + extra
        feed(d, address, total - failures, total)
        rates.append((total - failures) * 100 / total)
    mean = statistics.fmean(rates)
    threshold = mean - factor / 1000 * statistics.pstdev(rates)
    # Identical rates are never outliers (the reference's own float noise can say
    # otherwise); elsewhere keep clear of float ties at the threshold.
    identical = len(set(rates)) == 1
    assume(identical or all(abs(r - threshold) > 1e-6 for r in rates))
    outliers = {a for a, r in zip(addresses, rates, strict=True) if r < threshold}
    expected = set() if identical else outliers
    clock.advance(10)
    d.tick()
    assert d.ejected() == expected
    for address in expected:
        assert d.describe()[address]["last_ejection_reason"] == SUCCESS_RATE


@settings(max_examples=100, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(10, 30), st.integers(0, 30)), min_size=2, max_size=10),
    percent=st.integers(0, 100),
)
def test_failure_percentage_ejects_exactly_those_at_or_over_the_threshold(
    data: list[tuple[int, int]], percent: int
) -> None:
    config = dataclasses.replace(
        ONLY_STATS,
        success_rate_minimum_hosts=1000,
        failure_percentage_minimum_hosts=2,
        failure_percentage_request_volume=10,
        failure_percentage_threshold=percent,
        enforcing_failure_percentage=100,
    )
    d, clock, addresses = detector(config, n=len(data))
    expected = set()
    for address, (total, failures) in zip(addresses, data, strict=True):
        failures = min(failures, total)
        feed(d, address, total - failures, total)
        if failures * 100 >= percent * total:
            expected.add(address)
    clock.advance(10)
    d.tick()
    assert d.ejected() == expected


@settings(max_examples=100, deadline=None)
@given(
    base=st.integers(1, 60),
    probes=st.lists(st.floats(0, 200, allow_nan=False), max_size=20),
)
def test_ejected_exactly_until_the_time_is_up(base: int, probes: list[float]) -> None:
    config = dataclasses.replace(ONLY_5XX, base_ejection_time=base, interval=1e9)
    d, clock, (a, *_) = detector(config)
    start = clock.now
    fail(d, a, 5)
    for t in sorted(probes):
        clock.now = start + t
        d.tick()
        assert (a in d.ejected()) == (clock.now < start + base)
