"""Timeouts against real servers: the route deadline and the per-try timeout fire
with DeadlineExceeded naming the limit, attempts carry x-mesh-timeout-ms and
x-mesh-attempt, and mesh.asgi turns a propagated deadline into a server-side one."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from integration.resilience_support import attempts_seen, users_policy
from integration.support import Call, Driver, StartEcho
from meshlib import Mesh
from meshlib.demo.services import EchoApp, ServerThread
from meshlib.errors import DeadlineExceeded

pytestmark = pytest.mark.integration


def test_route_timeout_raises_deadline_exceeded_naming_it(echo: StartEcho, driver: Driver) -> None:
    (slow,) = echo("slow")
    slow.hold()  # never answers until the test ends
    policy = users_policy(slow, timeout="300ms")
    with Mesh(policy, rng=random.Random(1)) as mesh, pytest.raises(DeadlineExceeded) as caught:
        driver.get(mesh, "http://users/slow")
    error = caught.value
    assert isinstance(error, httpx.TimeoutException)  # `except httpx.TimeoutException` still works
    assert error.limit == "route timeout"
    assert error.seconds == pytest.approx(0.3, abs=0.05)
    assert "route timeout" in str(error) and "'users'" in str(error)
    # the upstream was told how long it had; a first attempt has no attempt header
    (record,) = slow.seen
    assert 0 < int(record["headers"]["x-mesh-timeout-ms"]) <= 300
    assert "x-mesh-attempt" not in record["headers"]


def test_per_try_timeout_raises_deadline_exceeded_naming_it(
    echo: StartEcho, driver: Driver
) -> None:
    (slow,) = echo("slow")
    slow.hold()
    policy = users_policy(
        slow,
        timeout="5s",
        retries={"attempts": 2, "per_try_timeout": "200ms", "on": ["connect-failure"]},
    )
    with Mesh(policy, rng=random.Random(1)) as mesh, pytest.raises(DeadlineExceeded) as caught:
        driver.get(mesh, "http://users/slow")
    error = caught.value
    assert isinstance(error, httpx.TimeoutException)
    assert error.limit == "per-try timeout"
    assert error.seconds == pytest.approx(0.2)
    assert "per-try timeout" in str(error)
    # a timeout is not in `on`: one attempt only, limited to 200 ms
    assert [r["headers"]["x-mesh-timeout-ms"] for r in slow.seen] == ["200"]
    assert attempts_seen(slow) == ["1"]


def test_timed_out_attempt_is_retried_elsewhere_with_attempt_headers(
    echo: StartEcho, driver: Driver
) -> None:
    slow, fast = echo("slow", "fast")
    slow.hold()
    policy = users_policy(
        slow,
        fast,
        timeout="5s",
        retries={"attempts": 2, "per_try_timeout": "200ms", "on": ["timeout"]},
    )
    with Mesh(policy, rng=random.Random(1)) as mesh:
        replies = driver.get(mesh, "http://users/x", 4)
    # round robin sends two first attempts to the slow endpoint: each times out and
    # is retried on the fast one
    assert [reply.server for reply in replies] == ["fast"] * 4
    assert attempts_seen(slow) == ["1", "1"]
    assert sorted(attempts_seen(fast)) == ["1", "1", "2", "2"]
    for record in fast.seen + slow.seen:
        assert 0 < int(record["headers"]["x-mesh-timeout-ms"]) <= 200


def test_route_deadline_bounds_the_retries(echo: StartEcho, driver: Driver) -> None:
    a, b = echo("a", "b")
    a.hold()
    b.hold()
    policy = users_policy(
        a,
        b,
        timeout="300ms",
        retries={
            "attempts": 5,
            "per_try_timeout": "200ms",
            "on": ["timeout"],
            "backoff": {"base": "1ms", "max": "1ms"},
        },
    )
    with Mesh(policy, rng=random.Random(1)) as mesh, pytest.raises(DeadlineExceeded) as caught:
        driver.get(mesh, "http://users/x")
    # the first attempt used its 200 ms; the retry only had what was left of 300 ms
    assert caught.value.limit == "route timeout"
    assert "route timeout" in str(caught.value)
    records = sorted(a.seen + b.seen, key=lambda r: r["headers"].get("x-mesh-attempt", "1"))
    assert [r["headers"].get("x-mesh-attempt") for r in records] == [None, "2"]
    assert records[0]["headers"]["x-mesh-timeout-ms"] == "200"
    assert int(records[1]["headers"]["x-mesh-timeout-ms"]) < 200


# -- server side: mesh.asgi ---------------------------------------------------------------


class DeadlineApp:
    """Answers with the deadline mesh.asgi gave the request, as seconds from now."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        deadline = scope["extensions"]["mesh"]["deadline"]
        left = None if deadline is None else deadline - time.monotonic()
        body = json.dumps({"left": left}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve(asgi_app)`` runs it under uvicorn on loopback until the test ends."""
    started: list[ServerThread] = []

    def start(app: Any) -> ServerThread:
        server = ServerThread(app).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


SERVER_POLICY = {"services": {"orders": {"endpoints": [{"address": "127.0.0.1:9"}]}}}


def test_asgi_answers_504_without_running_the_app_when_no_time_is_left(serve: Any) -> None:
    app = EchoApp("orders")
    with Mesh(SERVER_POLICY, service="orders") as server_mesh:
        server = serve(server_mesh.asgi(app))
        with httpx.Client(base_url=f"http://{server.address}", trust_env=False) as client:
            for value in ("0", "-5"):
                response = client.get("/x", headers={"x-mesh-timeout-ms": value})
                assert response.status_code == 504
                assert "deadline exceeded before the request started" in response.text
            assert app.seen == []
            assert client.get("/x", headers={"x-mesh-timeout-ms": "5000"}).status_code == 200
            assert len(app.seen) == 1


def test_asgi_cuts_a_slow_app_off_at_the_deadline(serve: Any) -> None:
    app = EchoApp("orders", gate_timeout=10.0)
    gate = app.gate = threading.Event()
    try:
        with Mesh(SERVER_POLICY, service="orders") as server_mesh:
            server = serve(server_mesh.asgi(app, service="orders"))
            with httpx.Client(
                base_url=f"http://{server.address}", trust_env=False, timeout=30
            ) as client:
                response = client.get("/slow", headers={"x-mesh-timeout-ms": "200"})
        assert response.status_code == 504
        assert "deadline exceeded while handling the request" in response.text
        assert len(app.seen) == 1  # the app ran, and was cut off
    finally:
        gate.set()


def test_meshlib_client_deadline_reaches_the_server_app(serve: Any, driver: Driver) -> None:
    with Mesh(SERVER_POLICY, service="orders") as server_mesh:
        server = serve(server_mesh.asgi(DeadlineApp()))
        client_policy = {
            "services": {"orders": {"endpoints": [{"address": server.address}], "timeout": "2s"}}
        }
        with Mesh(client_policy, service="checkout", rng=random.Random(1)) as mesh:
            (reply,) = driver.get(mesh, "http://orders/x")
    assert reply.status == 200
    assert 1.0 < reply.echo["left"] <= 2.0


def test_attempt_headers_from_the_application_are_replaced(serve: Any, driver: Driver) -> None:
    # a service that forwards its own inbound headers must not pass on its caller's
    # deadline as this attempt's: mesh.asgi reads the first x-mesh-timeout-ms
    app = EchoApp("orders")
    with Mesh(SERVER_POLICY, service="orders") as server_mesh:
        server = serve(server_mesh.asgi(app))
        client_policy = {
            "services": {"orders": {"endpoints": [{"address": server.address}], "timeout": "2s"}}
        }
        with Mesh(client_policy, service="checkout", rng=random.Random(1)) as mesh:
            forwarded = {"x-mesh-timeout-ms": "0", "X-Mesh-Attempt": "7"}
            (reply,) = driver.send(mesh, [Call("http://orders/x", headers=forwarded)])
    assert reply.status == 200
    (record,) = app.seen
    sent = [(k, v) for k, v in record["raw_headers"] if k.startswith("x-mesh-")]
    # the forwarded attempt number is gone: this is the first attempt, which has none
    assert [k for k, _ in sent] == ["x-mesh-caller", "x-mesh-timeout-ms"]
    assert 1000 < int(dict(sent)["x-mesh-timeout-ms"]) <= 2000
