"""Fault injection against real servers, client side and through mesh.asgi: delays
and aborts at their percentages (binomial bounds, 5 sigma), header gating, and the
`faults: off` kill switch."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from integration.resilience_support import run_load, seen_total, statuses_of, users_policy
from integration.support import Driver, StartEcho, Upstream, binomial_bounds
from meshlib import Mesh
from meshlib.demo.services import EchoApp, ServerThread
from meshlib.errors import DeadlineExceeded

pytestmark = pytest.mark.integration

URL = "http://users/x"


def within(count: int, n: int, percent: float) -> bool:
    low, high = binomial_bounds(n, percent / 100.0)
    return low <= count <= high


def test_client_abort_percentage_is_never_sent_nor_retried(echo: StartEcho, driver: Driver) -> None:
    ups = echo("a", "b")
    requests = 200
    policy = users_policy(
        *ups,
        faults={"abort": {"status": 503, "percent": 30}},
        retries={"attempts": 3, "on": ["gateway-error"]},
        outlier_detection={"consecutive_gateway_failure": 1},
    )
    with Mesh(policy, rng=random.Random(7)) as mesh:
        outcomes = run_load(mesh, driver.kind, URL, requests, concurrency=4)
        state = mesh.explain("GET", URL)["protection"]["outlier_detection"]
    aborted = [o for o in outcomes if o.injected]
    assert within(len(aborted), requests, 30), len(aborted)
    assert all(o.status == 503 and o.body == b"fault injected" for o in aborted)
    assert statuses_of(o for o in outcomes if not o.injected) == {200: requests - len(aborted)}
    # an abort reaches no endpoint, is not retried and ejects nobody
    assert seen_total(*ups) == requests - len(aborted)
    assert not any(host["ejected"] for host in state.values())


def test_client_delay_percentage(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    requests, delay_ms, timeout_ms = 40, 250, 5000
    policy = users_policy(
        up, timeout="5s", faults={"delay": {"duration": f"{delay_ms}ms", "percent": 50}}
    )
    with Mesh(policy, rng=random.Random(7)) as mesh:
        outcomes = run_load(mesh, driver.kind, URL, requests, concurrency=10)
    assert statuses_of(outcomes) == {200: requests}
    # a delayed call reaches the upstream with at most timeout - delay left
    left = [int(record["headers"]["x-mesh-timeout-ms"]) for record in up.seen]
    delayed = sum(ms <= timeout_ms - delay_ms for ms in left)
    assert within(delayed, requests, 50), sorted(left)


def test_injected_delay_counts_against_the_route_deadline(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    policy = users_policy(up, timeout="100ms", faults={"delay": {"duration": "300ms"}})
    with Mesh(policy, rng=random.Random(7)) as mesh:
        (outcome,) = run_load(mesh, driver.kind, URL, 1, concurrency=1)
    assert isinstance(outcome.error, DeadlineExceeded)
    assert outcome.error.limit == "route timeout"
    assert "route timeout" in str(outcome.error)
    assert up.seen == []  # no time was left for an attempt


def test_client_faults_gated_on_a_header(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    faults = {"abort": {"status": 503}, "when_header": {"X-Chaos": "on"}}
    with Mesh(users_policy(up, faults=faults), rng=random.Random(7)) as mesh:
        plain = run_load(mesh, driver.kind, URL, 5, concurrency=1)
        gated = run_load(mesh, driver.kind, URL, 5, concurrency=1, headers={"x-chaos": "on"})
        other = run_load(mesh, driver.kind, URL, 5, concurrency=1, headers={"x-chaos": "ON"})
    assert statuses_of(plain) == {200: 5}
    assert statuses_of(gated) == {503: 5} and all(o.injected for o in gated)
    assert statuses_of(other) == {200: 5}  # the value is matched exactly
    assert len(up.seen) == 10


def test_route_faults_off_overrides_the_service_faults(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    routes = [
        {"name": "calm", "match": {"path": {"prefix": "/calm"}}, "faults": "off"},
        {"name": "default"},
    ]
    policy = users_policy(up, faults={"abort": {"status": 503}}, routes=routes)
    with Mesh(policy, rng=random.Random(7)) as mesh:
        calm = run_load(mesh, driver.kind, "http://users/calm", 3, concurrency=1)
        other = run_load(mesh, driver.kind, "http://users/other", 3, concurrency=1)
    assert statuses_of(calm) == {200: 3}
    assert statuses_of(other) == {503: 3}


def test_faults_off_in_defaults_turns_client_faults_off(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    policy = users_policy(up, faults={"abort": {"status": 503}, "delay": {"duration": "5s"}})
    policy["defaults"] = {"faults": "off"}
    with Mesh(policy, rng=random.Random(7)) as mesh:
        outcomes = run_load(mesh, driver.kind, URL, 10, concurrency=2)
    assert statuses_of(outcomes) == {200: 10}
    assert len(up.seen) == 10


# -- server side ---------------------------------------------------------------------------


@pytest.fixture
def orders() -> Iterator[Any]:
    """``orders(policy_blocks)``: an EchoApp behind mesh.asgi, with a client mesh for it."""
    started: list[tuple[ServerThread, Mesh, Mesh]] = []

    def start(defaults: dict[str, Any] | None = None, **service: Any) -> tuple[Upstream, Mesh]:
        policy: dict[str, Any] = {
            "services": {"orders": {"endpoints": [{"address": "127.0.0.1:9"}], **service}}
        }
        if defaults:
            policy["defaults"] = defaults
        server_mesh = Mesh(policy, service="orders", rng=random.Random(11))
        app = EchoApp("orders")
        server = ServerThread(server_mesh.asgi(app)).start()
        client = Mesh(
            {"services": {"orders": {"endpoints": [{"address": server.address}]}}},
            service="checkout",
            rng=random.Random(1),
        )
        started.append((server, server_mesh, client))
        return Upstream(app, server), client

    yield start
    for server, server_mesh, client in started:
        server.stop()
        server_mesh.close()
        client.close()


def test_server_side_faults_by_route(orders: Any, driver: Driver) -> None:
    up, mesh = orders(
        inbound={
            "faults": {"abort": {"status": 503, "percent": 40}},
            "routes": [
                {
                    "name": "slow",
                    "path_prefix": "/slow",
                    "faults": {"delay": {"duration": "300ms", "percent": 50}},
                },
                {"name": "calm", "path_prefix": "/calm", "faults": "off"},
                {
                    "name": "gated",
                    "path_prefix": "/gated",
                    "faults": {"abort": {"status": 500}, "when_header": {"x-chaos": "1"}},
                },
            ],
        }
    )
    api = run_load(mesh, driver.kind, "http://orders/api", 150, concurrency=4)
    aborted = [o for o in api if o.injected]
    assert within(len(aborted), 150, 40), len(aborted)
    assert all(o.status == 503 and o.body == b"fault injected\n" for o in aborted)
    assert statuses_of(o for o in api if not o.injected) == {200: 150 - len(aborted)}
    assert len(up.seen) == 150 - len(aborted)  # an abort never runs the app

    # the route's faults replace the service-wide ones: delays, no aborts
    slow = run_load(mesh, driver.kind, "http://orders/slow", 30, concurrency=10)
    assert statuses_of(slow) == {200: 30}
    delayed = sum(o.elapsed >= 0.3 for o in slow)
    assert within(delayed, 30, 50), sorted(o.elapsed for o in slow)

    # `faults: off` on a route turns the service-wide abort off there
    calm = run_load(mesh, driver.kind, "http://orders/calm", 20, concurrency=2)
    assert statuses_of(calm) == {200: 20}

    plain = run_load(mesh, driver.kind, "http://orders/gated", 3, concurrency=1)
    gated = run_load(
        mesh, driver.kind, "http://orders/gated", 3, concurrency=1, headers={"x-chaos": "1"}
    )
    assert statuses_of(plain) == {200: 3}
    assert statuses_of(gated) == {500: 3} and all(o.injected for o in gated)


def test_faults_off_in_defaults_turns_server_faults_off(orders: Any, driver: Driver) -> None:
    up, mesh = orders(
        defaults={"faults": "off"},
        inbound={
            "faults": {"abort": {"status": 503}},
            "routes": [{"path_prefix": "/r", "faults": {"abort": {"status": 500}}}],
        },
    )
    outcomes = run_load(mesh, driver.kind, "http://orders/api", 10, concurrency=2)
    outcomes += run_load(mesh, driver.kind, "http://orders/r", 10, concurrency=2)
    assert statuses_of(outcomes) == {200: 20}
    assert len(up.seen) == 20
