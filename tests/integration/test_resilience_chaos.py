"""Chaos scenarios, each with three uvicorn endpoints and a bounded load loop (a few
threads or tasks, a few hundred calls):

- one endpoint killed mid-load: no idempotent call fails;
- one endpoint answering 503 half the time: it is ejected and callers see no failure;
- one endpoint slowed mid-load: hedging cuts the p99 (paired with an unhedged run);
- every endpoint failing: calls fail fast with a clear error, attempts within budget;
- an endpoint killed, then restarted on the same port: its breaker half-opens and
  lets it back in.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from integration.resilience_support import (
    attempts_seen,
    call_once,
    errors_of,
    percentile,
    protection,
    run_load,
    seen_total,
    statuses_of,
    users_policy,
)
from integration.support import Driver, StartEcho, Upstream
from meshlib import Mesh
from meshlib.demo.services import EchoApp, ServerThread
from meshlib.errors import CircuitOpenError

pytestmark = pytest.mark.integration

URL = "http://users/x"
RETRIES: dict[str, Any] = {
    "attempts": 3,
    "on": ["connect-failure", "reset", "gateway-error"],
    "backoff": {"base": "1ms", "max": "5ms"},
    "budget": {"ratio": 0.5, "min_per_second": 10, "window": "10s"},
}


def chaos_policy(*ups: Upstream, **blocks: Any) -> dict[str, Any]:
    """Deadline and retries for idempotent calls; outlier detection for small fleets."""
    defaults: dict[str, Any] = {
        "timeout": "5s",
        "retries": RETRIES,
        "outlier_detection": {
            "consecutive_gateway_failure": 3,
            "consecutive_connect_failure": 2,
            "interval": "500ms",
            "base_ejection_time": "30s",
            "max_ejection_percent": 34,
        },
    }
    defaults.update(blocks)
    return users_policy(*ups, **defaults)


def test_endpoint_killed_mid_load_fails_no_idempotent_call(echo: StartEcho, driver: Driver) -> None:
    a, b, victim = echo("a", "b", "victim")
    victim_address = victim.address  # the server is stopped midway
    requests = 300
    with Mesh(chaos_policy(a, b, victim), rng=random.Random(3)) as mesh:
        outcomes = run_load(
            mesh, driver.kind, URL, requests, concurrency=4, after=(100, victim.server.stop)
        )
        state = protection(mesh)["outlier_detection"][victim_address]
    assert errors_of(outcomes) == []
    assert statuses_of(outcomes) == {200: requests}
    assert 0 < len(victim.seen) < requests / 2
    assert state["ejected"] is True  # no response twice in a row: ejected
    # the calls that met the dead endpoint before its ejection were retried elsewhere
    assert "2" in attempts_seen(a) + attempts_seen(b)


def test_endpoint_failing_half_the_time_is_ejected_without_caller_failures(
    echo: StartEcho, driver: Driver
) -> None:
    a, b, flaky = echo("a", "b", "flaky")
    draw = random.Random(1)
    statuses = tuple(draw.choice((200, 503)) for _ in range(101))
    assert 40 <= statuses.count(503) <= 60
    # the seeded sequence holds three 503s in a row early on
    assert "503, 503, 503" in repr(statuses[:10])
    flaky.app.statuses = statuses
    requests = 300
    outlier = {
        "consecutive_gateway_failure": 3,
        "failure_percentage": {"threshold": 30, "minimum_hosts": 3, "request_volume": 10},
        "interval": "300ms",
        "base_ejection_time": "30s",
        "max_ejection_percent": 34,
    }
    policy = chaos_policy(a, b, flaky, outlier_detection=outlier)
    with Mesh(policy, rng=random.Random(3)) as mesh:
        outcomes = run_load(mesh, driver.kind, URL, requests, concurrency=4)
        state = protection(mesh)
        served_while_flaky = len(flaky.seen)
        after = run_load(mesh, driver.kind, URL, 30, concurrency=3)
    assert statuses_of(outcomes) == {200: requests}
    assert state["outlier_detection"][flaky.address]["ejected"] is True
    assert state["unavailable"] == [flaky.address]
    # ejected early (after its first run of failures, as a rule): without ejection it
    # would have taken a third of the calls
    assert served_while_flaky < requests / 5
    assert statuses_of(after) == {200: 30}
    assert len(flaky.seen) == served_while_flaky


def test_endpoint_slowed_mid_load_hedging_cuts_p99(echo: StartEcho, driver: Driver) -> None:
    a, b, slow = echo("a", "b", "slow")
    requests, delay, max_extra = 90, 0.3, 50

    def slow_down() -> None:
        slow.app.delay = delay

    def run(policy: dict[str, Any]) -> tuple[list[float], int]:
        slow.app.delay = 0.0
        before = seen_total(a, b, slow)
        with Mesh(policy, rng=random.Random(3)) as mesh:
            outcomes = run_load(
                mesh, driver.kind, URL, requests, concurrency=6, after=(30, slow_down)
            )
        assert statuses_of(outcomes) == {200: requests}
        return [o.elapsed for o in outcomes[30:]], seen_total(a, b, slow) - before - requests

    unhedged, _ = run(chaos_policy(a, b, slow))
    hedging = {"hedge_after": "20ms", "max_extra_percent": max_extra}
    hedged, extra = run(chaos_policy(a, b, slow, hedging=hedging))
    p99_unhedged, p99_hedged = percentile(unhedged, 99), percentile(hedged, 99)
    assert p99_unhedged >= delay
    assert p99_hedged < p99_unhedged / 2, (p99_hedged, p99_unhedged)
    assert extra <= requests * max_extra / 100 + 10 + 2


def test_total_failure_fails_fast_with_a_clear_error_within_budget(
    echo: StartEcho, driver: Driver
) -> None:
    ups = echo("a", "b", "c", status=503)
    ratio, reserve, requests = 0.2, 10, 200
    retries = {**RETRIES, "budget": {"ratio": ratio, "min_per_second": 1, "window": "10s"}}
    breaker = {"consecutive_failures": 5, "open_for": "30s"}
    policy = chaos_policy(*ups, retries=retries, circuit_breaker=breaker)
    with Mesh(policy, rng=random.Random(3)) as mesh:
        outcomes = run_load(mesh, driver.kind, URL, requests, concurrency=4)
        state = protection(mesh)
    errors = errors_of(outcomes)
    assert all(isinstance(error, CircuitOpenError) for error in errors), errors[:3]
    assert "circuit breaker of service 'users' is open" in str(errors[0])
    assert statuses_of(o for o in outcomes if o.error is None).keys() <= {503}
    # the breaker opened after a handful of failed attempts; from then on calls failed
    # before anything was sent (only calls already retrying could still answer 503)
    assert len(errors) >= requests - 20
    total = seen_total(*ups)
    assert total <= requests * (1 + ratio) + reserve
    assert total <= 30
    assert state["service_breaker"] == "open"


def test_killed_endpoint_restarted_on_the_same_port_is_probed_back_in(
    echo: StartEcho, driver: Driver
) -> None:
    a, b, victim = echo("a", "b", "victim")
    address, port = victim.address, victim.port  # the server is stopped midway
    breaker = {"consecutive_failures": 2, "open_for": "300ms", "per_cluster": False}
    policy = chaos_policy(a, b, victim, circuit_breaker=breaker)
    del policy["services"]["users"]["outlier_detection"]  # the breaker alone decides here
    with Mesh(policy, rng=random.Random(3)) as mesh:
        outcomes = run_load(
            mesh, driver.kind, URL, 90, concurrency=3, after=(20, victim.server.stop)
        )
        assert statuses_of(outcomes) == {200: 90}
        assert protection(mesh)["endpoint_breakers"][address] != "closed"

        revived = Upstream(EchoApp("revived"), victim.server)
        revived.server = ServerThread(revived.app, port=port).start()
        try:
            # bounded polling: the breaker half-opens after 300 ms and a probe closes it
            for _ in range(150):
                assert call_once(mesh, driver.kind, URL).ok
                if protection(mesh)["endpoint_breakers"][address] == "closed":
                    break
                time.sleep(0.02)
            else:
                raise AssertionError("the restarted endpoint's breaker never closed")
            final = run_load(mesh, driver.kind, URL, 60, concurrency=3)
        finally:
            revived.server.stop()
    assert statuses_of(final) == {200: 60}
    assert len(revived.seen) >= 10  # back in rotation
