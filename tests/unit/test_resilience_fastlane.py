"""The fast lane must leave every piece of resilience state exactly as the attempt
loop would: the same calls, once through each path, on twin meshes."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlib import Mesh
from meshlib.errors import MeshError
from meshlib.http.plan import plan_request
from meshlib.http.resilient import run_sync
from meshlib.resilience import fastlane
from meshlib.resilience.budget import RetryBudget
from meshlib.resilience.guard import ServiceGuard
from meshlib.resilience.outlier import _Host


class Upstream:
    """Stands in for MeshTransport: answers the statuses of a script, one per attempt."""

    _caller_name = None  # this process's service, as the real transports have it

    def __init__(self, statuses: list[int]) -> None:
        self._rng = random.Random(7)
        self._statuses = statuses
        self.sent: list[tuple[str, list[tuple[bytes, bytes]], float | None]] = []

    def _send(
        self,
        request: httpx.Request,
        endpoint: Any,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        timeout: float | None,
        content: bytes | None = None,
        tls: str | None = None,
    ) -> httpx.Response:
        self.sent.append((endpoint.address, headers, timeout))
        status = self._statuses.pop(0) if len(self._statuses) > 1 else self._statuses[0]
        return httpx.Response(status)


def policy(service: dict[str, Any]) -> dict[str, Any]:
    endpoints = [{"address": f"127.0.0.1:{9000 + i}"} for i in range(2)]
    return {"services": {"users": {"endpoints": endpoints, **service}}}


def call(mesh: Mesh, upstream: Upstream, *, fast: bool) -> str:
    request = httpx.Request("GET", "http://users/x")
    plan = plan_request(mesh.snapshot, request, random.Random(3))
    assert plan is not None and plan.resilient
    original = fastlane.enter
    if not fast:
        fastlane.enter = lambda *args: None  # type: ignore[assignment]
    try:
        return str(run_sync(upstream, request, plan).status_code)  # type: ignore[arg-type]
    except MeshError as exc:
        return type(exc).__name__
    finally:
        fastlane.enter = original


def state(mesh: Mesh) -> dict[str, Any]:
    """Everything the resilience objects hold, minus wall-clock instants."""
    service = mesh.snapshot.services["users"]
    guard = service.routes[0].action.split.clusters[0].guard
    route_policy = service.routes[0].action.policy
    out: dict[str, Any] = {}
    if route_policy is not None and isinstance(route_policy.budget, RetryBudget):
        snap = route_policy.budget.snapshot()
        out["budget"] = {k: snap[k] for k in ("requests", "retries", "exhausted")}
    if guard is None:
        return out
    assert isinstance(guard, ServiceGuard)
    if guard.breakers is not None:
        out["breakers"] = {k: _timeless(v) for k, v in guard.breakers.describe().items()}
    if guard.cluster_breaker is not None:
        out["service_breaker"] = _timeless(guard.cluster_breaker.describe())
    if guard.outlier is not None:
        hosts = guard.outlier._hosts
        timeless = [s for s in _Host.__slots__ if s not in ("ejected_at", "ejected_until")]
        timeless.remove("unejected_at")
        out["outlier"] = {a: {s: getattr(h, s) for s in timeless} for a, h in hosts.items()}
        out["ejected"] = sorted(guard.outlier.ejected())
    if guard.bulkhead is not None:
        out["bulkhead"] = guard.bulkhead.snapshot()
    return out


def _timeless(described: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in described.items() if k not in ("opened_at", "retry_at", "retry_in")}


FAST_BACKOFF = {"base": "1ms", "max": "1ms"}
services = st.fixed_dictionaries(
    {"timeout": st.sampled_from(["2s", "30s"])},  # some resilience: the call takes the loop
    optional={
        "retries": st.fixed_dictionaries(
            {
                "attempts": st.integers(1, 3),
                "on": st.sampled_from([["5xx"], ["gateway-error"], ["retriable-status-codes"]]),
                "retriable_status_codes": st.just([409]),
                "backoff": st.just(FAST_BACKOFF),
            },
            optional={"per_try_timeout": st.sampled_from(["100ms", "5s"])},
        ),
        "circuit_breaker": st.fixed_dictionaries(
            {"consecutive_failures": st.integers(1, 4), "open_for": st.just("60s")}
        ),
        "outlier_detection": st.fixed_dictionaries({"consecutive_5xx": st.integers(1, 4)}),
        "limits": st.just({"max_requests": 100}),
    },
)
scripts = st.lists(
    st.lists(st.sampled_from([200, 201, 404, 409, 500, 502, 503]), min_size=1, max_size=3),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(service=services, calls=scripts)
def test_fast_lane_leaves_the_same_state_as_the_attempt_loop(
    service: dict[str, Any], calls: list[list[int]]
) -> None:
    twin = {"rng": random.Random(5)}, {"rng": random.Random(5)}  # the same balancer offsets
    with Mesh(policy(service), **twin[0]) as fast, Mesh(policy(service), **twin[1]) as slow:
        for statuses in calls:
            up_fast, up_slow = Upstream(list(statuses)), Upstream(list(statuses))
            assert call(fast, up_fast, fast=True) == call(slow, up_slow, fast=False)
            # the same attempts, to the same endpoints, with the same headers and limits
            # (time limits are read from the clock a little apart: within 50 ms)
            assert attempts(up_fast) == attempts(up_slow)
            for (_, _, a), (_, _, b) in zip(up_fast.sent, up_slow.sent, strict=True):
                assert (a is None) == (b is None)
                assert a is None or b is None or abs(a - b) < 0.05
            assert state(fast) == state(slow)


def attempts(upstream: Upstream) -> list[tuple[str, list[tuple[bytes, bytes | None]]]]:
    """Each attempt's endpoint and headers, the time limit's value left out."""
    return [
        (address, [(n, None if n == b"x-mesh-timeout-ms" else v) for n, v in headers])
        for address, headers, _ in upstream.sent
    ]


def lane_of(mesh: Mesh) -> tuple[fastlane.Lane | None, Any]:
    route = mesh.snapshot.services["users"].routes[0]
    cluster = route.action.split.clusters[0]
    return route.action.lanes.get(cluster.name), cluster.guard


def test_hedged_and_fault_injecting_routes_have_no_fast_lane() -> None:
    hedged = {"routes": [{"name": "r", "hedging": {"hedge_after": "1s"}}]}
    faulty = {"routes": [{"name": "r", "faults": {"abort": {"status": 503, "percent": 1}}}]}
    for service in (hedged, faulty):
        with Mesh(policy(service)) as mesh:
            assert lane_of(mesh)[0] is None
    with Mesh(policy({"retries": {"attempts": 2}})) as mesh:
        assert lane_of(mesh)[0] is not None


def test_fast_lane_declines_without_taking_anything() -> None:
    service = {
        "limits": {"max_requests": 1},
        "circuit_breaker": {"consecutive_failures": 1},
        "routes": [{"name": "r", "rate_limit": {"requests_per_second": 1, "burst": 1}}],
    }
    with Mesh(policy(service)) as mesh:
        lane, guard = lane_of(mesh)
        assert lane is not None and guard is not None and guard.bulkhead is not None
        first = fastlane.enter(lane, "127.0.0.1:9000", 1.0)
        assert first is not None and guard.bulkhead.inflight == 1
        # a full bulkhead: declined, and declining is not refusing (no overflow counted)
        assert fastlane.enter(lane, "127.0.0.1:9001", 1.0) is None
        assert guard.bulkhead.overflows == 0
        assert fastlane.settle(lane, "127.0.0.1:9000", 200)
        assert guard.bulkhead.inflight == 0
        # no token left: declined, and the slot it took for a moment is back
        assert fastlane.enter(lane, "127.0.0.1:9000", 1.0) is None
        assert guard.bulkhead.inflight == 0
        # an endpoint breaker that saw a failure: declined until a success heals it
        guard.record("127.0.0.1:9001", 503, None)
        assert fastlane.enter(lane, "127.0.0.1:9001", 1e9) is None
        assert guard.bulkhead.inflight == 0


@pytest.mark.parametrize("status", [200, 503])
def test_first_attempt_sends_the_time_limit_but_no_attempt_number(status: int) -> None:
    service = {"timeout": "2s", "retries": {"attempts": 2, "on": ["5xx"], "backoff": FAST_BACKOFF}}
    with Mesh(policy(service)) as mesh:
        upstream = Upstream([status, 200])
        assert call(mesh, upstream, fast=True) == "200"
    headers = [dict(h) for _, h, _ in upstream.sent]
    assert b"x-mesh-attempt" not in headers[0]
    assert 1900 < int(headers[0][b"x-mesh-timeout-ms"]) <= 2000
    if status == 503:  # the retry says which attempt it is
        assert headers[1][b"x-mesh-attempt"] == b"2"
        assert upstream.sent[1][0] != upstream.sent[0][0]  # and goes elsewhere
