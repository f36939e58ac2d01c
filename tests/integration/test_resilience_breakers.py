"""Circuit breakers and outlier detection against real servers: failing endpoints
stop receiving traffic, explain shows why, everything open fails fast, a recovered
endpoint is probed back in, and panic mode spreads load when most are ejected."""

from __future__ import annotations

import random
import time

import pytest

from integration.resilience_support import (
    call_once,
    protection,
    run_load,
    seen_total,
    statuses_of,
    users_policy,
)
from integration.support import Driver, StartEcho
from meshlib import Mesh
from meshlib.errors import CircuitOpenError

pytestmark = pytest.mark.integration

URL = "http://users/x"


def test_failing_endpoint_breaker_opens_and_traffic_moves_off(
    echo: StartEcho, driver: Driver
) -> None:
    a, b, bad = echo("a", "b", "bad")
    bad.app.status = 500
    # breakers only: no timeout, no retries (the guard alone puts calls in the attempt loop)
    breaker = {"consecutive_failures": 3, "open_for": "30s", "per_cluster": False}
    with Mesh(users_policy(a, b, bad, circuit_breaker=breaker), rng=random.Random(1)) as mesh:
        outcomes = run_load(mesh, driver.kind, URL, 30, concurrency=1)
        state = protection(mesh)
        candidates = {c["address"]: c for c in mesh.explain("GET", URL)["candidates"]}
        dump = mesh.config_dump()["clusters"]["users"]["protection"]
        more = run_load(mesh, driver.kind, URL, 30, concurrency=3)
    # the bad endpoint got its three first attempts and nothing after its breaker opened
    assert statuses_of(outcomes) == {200: 27, 500: 3}
    assert len(bad.seen) == 3
    assert statuses_of(more) == {200: 30}
    assert state["endpoint_breakers"] == {
        a.address: "closed",
        b.address: "closed",
        bad.address: "open",
    }
    assert state["unavailable"] == [bad.address]
    assert candidates[bad.address]["eligible"] is False
    assert candidates[a.address]["eligible"] is True
    assert dump["endpoint_breakers"][bad.address] == "open"


def test_every_breaker_open_fails_fast_with_circuit_open_error(
    echo: StartEcho, driver: Driver
) -> None:
    ups = echo("a", "b", status=500)
    breaker = {"consecutive_failures": 2, "open_for": "30s", "per_cluster": False}
    with Mesh(users_policy(*ups, circuit_breaker=breaker), rng=random.Random(1)) as mesh:
        outcomes = run_load(mesh, driver.kind, URL, 10, concurrency=1)
        state = protection(mesh)
    assert [o.status for o in outcomes[:4]] == [500] * 4
    errors = [o.error for o in outcomes[4:]]
    assert all(isinstance(error, CircuitOpenError) for error in errors), errors
    assert "every endpoint of 'users' has an open circuit breaker" in str(errors[0])
    assert seen_total(*ups) == 4  # nothing was sent once every breaker was open
    assert set(state["endpoint_breakers"].values()) == {"open"}


def test_service_breaker_opens_on_consecutive_failures_across_endpoints(
    echo: StartEcho, driver: Driver
) -> None:
    ups = echo("a", "b", "c", status=503)
    breaker = {"consecutive_failures": 3, "open_for": "30s", "per_endpoint": False}
    with Mesh(users_policy(*ups, circuit_breaker=breaker), rng=random.Random(1)) as mesh:
        outcomes = run_load(mesh, driver.kind, URL, 8, concurrency=1)
        state = protection(mesh)
    assert [o.status for o in outcomes[:3]] == [503] * 3
    errors = [o.error for o in outcomes[3:]]
    assert all(isinstance(error, CircuitOpenError) for error in errors), errors
    assert "circuit breaker of service 'users' is open" in str(errors[0])
    assert seen_total(*ups) == 3
    assert state["service_breaker"] == "open"


def test_half_open_breaker_lets_a_recovered_endpoint_back_in(
    echo: StartEcho, driver: Driver
) -> None:
    good, bad = echo("good", "bad")
    bad.app.status = 500
    breaker = {"consecutive_failures": 2, "open_for": "200ms", "per_cluster": False}
    with Mesh(users_policy(good, bad, circuit_breaker=breaker), rng=random.Random(1)) as mesh:
        run_load(mesh, driver.kind, URL, 6, concurrency=1)
        assert protection(mesh)["endpoint_breakers"][bad.address] == "open"
        bad.app.status = 200  # it recovers
        # bounded polling: the breaker half-opens after 200 ms and one probe closes it
        for _ in range(100):
            outcome = call_once(mesh, driver.kind, URL)
            assert outcome.ok, outcome
            if protection(mesh)["endpoint_breakers"][bad.address] == "closed":
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the recovered endpoint's breaker never closed")
        before = len(bad.seen)
        after = run_load(mesh, driver.kind, URL, 20, concurrency=1)
    assert statuses_of(after) == {200: 20}
    assert len(bad.seen) - before == 10  # back in the round robin


# -- outlier detection -----------------------------------------------------------------------


def test_endpoint_failing_half_the_time_is_ejected_and_callers_see_no_failure(
    echo: StartEcho, driver: Driver
) -> None:
    a, b, flaky = echo("a", "b", "flaky")
    flaky.app.statuses = (503, 200)  # fails every other request: never twice in a row
    outlier = {
        # only the statistical detector: the client may record the answers of
        # concurrent calls out of the server's order, so 503s can look consecutive
        "consecutive_5xx": None,
        "consecutive_gateway_failure": None,
        "interval": "300ms",
        "base_ejection_time": "30s",
        "failure_percentage": {"threshold": 40, "minimum_hosts": 3, "request_volume": 5},
    }
    retries = {
        "attempts": 3,
        "on": ["gateway-error"],
        "backoff": {"base": "1ms", "max": "2ms"},
        "budget": {"ratio": 1.0},
    }
    policy = users_policy(a, b, flaky, outlier_detection=outlier, retries=retries)
    with Mesh(policy, rng=random.Random(1)) as mesh:
        # bounded: load in batches until the interval analysis has ejected it
        for _ in range(40):
            outcomes = run_load(mesh, driver.kind, URL, 30, concurrency=3)
            assert statuses_of(outcomes) == {200: 30}  # retries hide every 503
            state = protection(mesh)["outlier_detection"][flaky.address]
            if state["ejected"]:
                break
        else:
            raise AssertionError("the flaky endpoint was never ejected")
        assert state["last_ejection_reason"] == "failure_percentage", state
        assert protection(mesh)["unavailable"] == [flaky.address]
        before = len(flaky.seen)
        outcomes = run_load(mesh, driver.kind, URL, 30, concurrency=3)
    assert statuses_of(outcomes) == {200: 30}
    assert len(flaky.seen) == before  # ejected: no first attempts, no retries


@pytest.mark.parametrize("panic_threshold", [50, 0])
def test_panic_threshold_spreads_traffic_when_most_endpoints_are_ejected(
    echo: StartEcho, driver: Driver, panic_threshold: int
) -> None:
    good, bad1, bad2 = echo("good", "bad1", "bad2")
    bad1.app.status = bad2.app.status = 503
    outlier = {
        "consecutive_gateway_failure": 2,
        "base_ejection_time": "30s",
        "max_ejection_percent": 100,
        "panic_threshold": panic_threshold,
    }
    with Mesh(
        users_policy(good, bad1, bad2, outlier_detection=outlier), rng=random.Random(1)
    ) as mesh:
        run_load(mesh, driver.kind, URL, 12, concurrency=1)
        state = protection(mesh)
        before = seen_total(bad1, bad2)
        outcomes = run_load(mesh, driver.kind, URL, 30, concurrency=1)
    ejected = {address for address, host in state["outlier_detection"].items() if host["ejected"]}
    assert ejected == {bad1.address, bad2.address}
    if panic_threshold:
        # one host of three left is under 50%: ejections are ignored, all take traffic
        assert state["unavailable"] == []
        assert seen_total(bad1, bad2) - before == 20
        assert statuses_of(outcomes) == {200: 10, 503: 20}
    else:
        assert sorted(state["unavailable"]) == sorted(ejected)
        assert seen_total(bad1, bad2) == before
        assert statuses_of(outcomes) == {200: 30}
