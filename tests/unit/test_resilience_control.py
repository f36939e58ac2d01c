"""CallControl, the per-call decider, and how policies compile: pure, fake clock."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import pytest

from meshlib import Mesh
from meshlib.config.compile import compile_snapshot, static_endpoints
from meshlib.config.load import policy_from_mapping
from meshlib.endpoint import Endpoint
from meshlib.errors import CircuitOpenError, DeadlineExceeded, RateLimitedError
from meshlib.resilience.attempts import CallControl
from meshlib.resilience.state import StateTable
from meshlib.snapshot import Snapshot


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def snapshot_of(service: dict[str, Any], state: StateTable | None = None) -> Snapshot:
    base = {"endpoints": [{"address": f"127.0.0.1:{8000 + i}"} for i in range(3)]}
    config = policy_from_mapping({"services": {"users": {**base, **service}}})
    endpoints = {name: static_endpoints(svc) for name, svc in config.services.items()}
    return compile_snapshot(config, endpoints, version=1, source="test", state=state)


def control_for(
    snapshot: Snapshot, clock: FakeClock, *, method: str = "GET", replayable: bool = True
) -> tuple[CallControl, list[frozenset[str]]]:
    route = snapshot.services["users"].routes[0]
    cluster = route.action.split.clusters[0]
    asked: list[frozenset[str]] = []

    def pick(avoid: frozenset[str]) -> Endpoint:
        asked.append(avoid)
        for endpoint in cluster.endpoints:
            if endpoint.address not in avoid:
                return endpoint
        return cluster.endpoints[0]

    assert route.action.policy is not None
    control = CallControl(
        "users",
        route.action.policy,
        cluster.guard,
        pick,
        method=method,
        replayable=replayable,
        clock=clock,
        rng=random.Random(1),
    )
    return control, asked


RETRIES = {
    "retries": {
        "attempts": 3,
        "on": ["5xx", "connect-failure"],
        "backoff": {"base": "1ms", "max": "1ms"},
    }
}


def test_retry_goes_to_another_endpoint_until_attempts_run_out() -> None:
    clock = FakeClock()
    control, asked = control_for(snapshot_of(RETRIES), clock)
    control.admit()
    first = control.first(Endpoint("127.0.0.1", 8000))
    second = control.on_status(first, 503)
    assert second is not None and second.number == 2
    assert second.endpoint.address != first.endpoint.address
    assert "127.0.0.1:8000" in asked[-1]
    third = control.on_error(second, httpx.ConnectError("refused"))
    assert third.number == 3 and third.endpoint.address not in {"127.0.0.1:8000", "127.0.0.1:8001"}
    assert control.on_status(third, 503) is None  # attempts exhausted: hand back the 503


def test_no_retry_for_non_idempotent_or_unreplayable() -> None:
    clock = FakeClock()
    control, _ = control_for(snapshot_of(RETRIES), clock, method="POST")
    assert control.on_status(control.first(Endpoint("127.0.0.1", 8000)), 503) is None
    control, _ = control_for(snapshot_of(RETRIES), clock, replayable=False)
    assert control.on_status(control.first(Endpoint("127.0.0.1", 8000)), 503) is None
    allowed = {"retries": {**RETRIES["retries"], "non_idempotent": True}}
    control, _ = control_for(snapshot_of(allowed), clock, method="POST")
    assert control.on_status(control.first(Endpoint("127.0.0.1", 8000)), 503) is not None


def test_unlisted_errors_are_raised_as_is() -> None:
    control, _ = control_for(snapshot_of(RETRIES), FakeClock())
    first = control.first(Endpoint("127.0.0.1", 8000))
    with pytest.raises(httpx.ReadError):
        control.on_error(first, httpx.ReadError("reset"))  # "reset" is not in `on`


def test_per_try_timeout_bounded_by_route_deadline_and_named_on_expiry() -> None:
    clock = FakeClock()
    policy = {"timeout": "1s", "retries": {**RETRIES["retries"], "per_try_timeout": "400ms"}}
    control, _ = control_for(snapshot_of(policy), clock)
    first = control.first(Endpoint("127.0.0.1", 8000))
    assert first.timeout == pytest.approx(0.4) and first.limit == "per-try timeout"
    clock.now += 0.8
    second = control.on_status(first, 503)
    assert second is not None
    assert second.limit == "route timeout" and second.timeout < 0.21
    with pytest.raises(DeadlineExceeded, match="route timeout") as caught:
        control.on_error(second, httpx.ReadTimeout("slow"))
    assert isinstance(caught.value, httpx.TimeoutException)


def test_budget_stops_retries_but_never_first_attempts() -> None:
    clock = FakeClock()
    policy = {
        "retries": {
            **RETRIES["retries"],
            "budget": {"ratio": 0.1, "min_per_second": 0, "window": "10s"},
        }
    }
    state = StateTable()
    snapshot = snapshot_of(policy, state)
    retries = 0
    for _ in range(200):
        control, _ = control_for(snapshot, clock)
        control.admit()
        attempt = control.first(Endpoint("127.0.0.1", 8000))
        while attempt is not None:
            attempt = control.on_status(attempt, 503)
            retries += attempt is not None
    assert retries <= 20


def test_open_breakers_everywhere_fail_fast() -> None:
    clock = FakeClock()
    policy = {**RETRIES, "circuit_breaker": {"consecutive_failures": 1, "per_cluster": False}}
    snapshot = snapshot_of(policy)
    guard = snapshot.clusters["users"].guard
    assert guard is not None
    for port in (8000, 8001, 8002):
        guard.record(f"127.0.0.1:{port}", 503, None)
    control, _ = control_for(snapshot, clock)
    with pytest.raises(CircuitOpenError, match="every endpoint"):
        control.first(Endpoint("127.0.0.1", 8000))


def test_client_rate_limit() -> None:
    policy = {"rate_limit": {"requests_per_second": 1, "burst": 2}}
    snapshot = snapshot_of(policy)
    clock = FakeClock()
    for _ in range(2):
        control_for(snapshot, clock)[0].admit()
    with pytest.raises(RateLimitedError) as caught:
        control_for(snapshot, clock)[0].admit()
    assert caught.value.retry_after > 0


def test_state_survives_an_unchanged_policy_and_resets_on_change() -> None:
    state = StateTable()
    policy = {**RETRIES, "circuit_breaker": {"consecutive_failures": 2}}
    first = snapshot_of(policy, state)
    second = snapshot_of(policy, state)
    assert first.clusters["users"].guard is second.clusters["users"].guard
    assert first.services["users"].routes[0].action.policy.budget is (  # type: ignore[union-attr]
        second.services["users"].routes[0].action.policy.budget  # type: ignore[union-attr]
    )
    changed = snapshot_of({**RETRIES, "circuit_breaker": {"consecutive_failures": 3}}, state)
    assert changed.clusters["users"].guard is not first.clusters["users"].guard


def test_precedence_route_over_service_over_defaults_and_faults_off() -> None:
    config = policy_from_mapping(
        {
            "defaults": {"timeout": "5s", "faults": {"abort": {"status": 503}}},
            "services": {
                "users": {
                    "endpoints": [{"address": "127.0.0.1:1"}],
                    "timeout": "2s",
                    "routes": [
                        {"name": "a", "timeout": "1s", "match": {"path": {"prefix": "/a"}}},
                        {"name": "b"},
                    ],
                },
                "orders": {"endpoints": [{"address": "127.0.0.1:2"}], "faults": "off"},
            },
        }
    )
    endpoints = {name: static_endpoints(svc) for name, svc in config.services.items()}
    snapshot = compile_snapshot(config, endpoints, version=1, source="t")
    a, b = snapshot.services["users"].routes
    assert a.action.policy is not None and a.action.policy.timeout == 1.0
    assert b.action.policy is not None and b.action.policy.timeout == 2.0
    assert b.action.policy.faults is not None and b.action.policy.faults.abort_status == 503
    orders = snapshot.services["orders"].routes[0].action.policy
    assert orders is not None and orders.faults is None and orders.timeout == 5.0


def test_unknown_exception_class_is_a_policy_error() -> None:
    from meshlib.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        policy_from_mapping(
            {
                "services": {
                    "users": {"retries": {"exceptions": ["nowhere.Missing", "builtins.len"]}}
                }
            }
        )
    paths = [issue.path for issue in caught.value.issues]
    assert paths == ["services.users.retries.exceptions[0]", "services.users.retries.exceptions[1]"]


def test_explain_shows_policies_and_protection() -> None:
    policy = {**RETRIES, "timeout": "2s", "circuit_breaker": {"consecutive_failures": 1}}
    with Mesh(
        {"services": {"users": {"endpoints": [{"address": "127.0.0.1:1"}], **policy}}}
    ) as mesh:
        guard = mesh.snapshot.clusters["users"].guard
        assert guard is not None
        guard.record("127.0.0.1:1", 503, None)
        result = mesh.explain("GET", "http://users/")
        assert result["resilience"]["retries"]["attempts"] == 3
        assert result["protection"]["endpoint_breakers"] == {"127.0.0.1:1": "open"}
        assert result["candidates"][0]["unavailable"] == "ejected or breaker open"
        dump = mesh.config_dump()
        assert dump["clusters"]["users"]["protection"]["endpoint_breakers"]["127.0.0.1:1"] == "open"


def test_decorator_retries_named_exceptions_sync_and_async() -> None:
    policy = {
        "retries": {
            "attempts": 3,
            "exceptions": ["builtins.KeyError"],
            "backoff": {"base": "1ms", "max": "1ms"},
        },
        "timeout": "1s",
    }
    with Mesh(
        {"services": {"users": {"endpoints": [{"address": "127.0.0.1:1"}], **policy}}}
    ) as mesh:
        calls: list[int] = []

        @mesh.resilient("users")
        def flaky() -> str:
            calls.append(1)
            if len(calls) < 3:
                raise KeyError("again")
            return "ok"

        assert flaky() == "ok" and len(calls) == 3

        @mesh.resilient("users")
        def wrong() -> None:
            raise ValueError("not retried")

        with pytest.raises(ValueError):
            wrong()

        async_calls: list[int] = []

        @mesh.resilient("users")
        async def slow() -> str:
            async_calls.append(1)
            await asyncio.sleep(5)
            return "never"

        with pytest.raises(DeadlineExceeded):
            asyncio.run(slow())
        assert len(async_calls) == 1  # timeouts are not in `on`


def test_inbound_deadline_caps_outbound_calls() -> None:
    from meshlib.resilience.deadline import INBOUND_DEADLINE

    clock = FakeClock()
    snapshot = snapshot_of({"timeout": "5s", **RETRIES})
    token = INBOUND_DEADLINE.set(clock.now + 0.3)
    try:
        control, _ = control_for(snapshot, clock)
        first = control.first(Endpoint("127.0.0.1", 8000))
        assert first.limit == "inbound deadline" and first.timeout == pytest.approx(0.3)
        clock.now += 0.31
        with pytest.raises(DeadlineExceeded, match="inbound deadline"):
            control_for(snapshot, clock)[0].first(Endpoint("127.0.0.1", 8000))
    finally:
        INBOUND_DEADLINE.reset(token)
    control, _ = control_for(snapshot, clock)
    assert control.first(Endpoint("127.0.0.1", 8000)).timeout == pytest.approx(5.0)
