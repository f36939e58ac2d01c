"""The bulkhead and rate limits against real servers: held requests fill the
concurrency limit, client-side buckets refuse with retry_after, and mesh.asgi
answers 429 with Retry-After per route and per caller."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from integration.resilience_support import call_once, protection, users_policy
from integration.support import CLIENT_TIMEOUT, Driver, StartEcho, Upstream, wait_until
from meshlib import Mesh
from meshlib.demo.services import EchoApp, ServerThread
from meshlib.errors import OverloadedError, RateLimitedError

pytestmark = pytest.mark.integration

URL = "http://users/x"


def _bulkhead_sync(mesh: Mesh, up: Upstream, held: int, extra: int, settle: bool) -> list[Any]:
    """Hold ``held`` calls at the server, then make ``extra`` more; release; outcomes.

    With ``settle``, the extra calls are left to end (refused, or given up waiting)
    before the held ones are released."""
    gate = up.hold()
    results: list[Any] = [None] * (held + extra)
    with mesh.http_client(timeout=CLIENT_TIMEOUT) as client:

        def call(index: int) -> None:
            try:
                results[index] = client.get(URL).status_code
            except Exception as exc:
                results[index] = exc

        threads = [threading.Thread(target=call, args=(i,)) for i in range(held)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(up.seen) == held, "the first calls to be held at the server")
        waiting = []
        for index in range(held, held + extra):
            pending = protection(mesh)["limits"]["pending"]
            thread = threading.Thread(target=call, args=(index,))
            thread.start()
            waiting.append(thread)
            wait_until(
                lambda i=index, before=pending: (
                    results[i] is not None or protection(mesh)["limits"]["pending"] > before
                ),
                "the extra call to be refused or queued",
            )
        if settle:
            wait_until(lambda: None not in results[held:], "the extra calls to give up")
        state = protection(mesh)["limits"]
        gate.set()
        for thread in threads + waiting:
            thread.join(timeout=30)
    return [*results, state]


async def _bulkhead_async(
    mesh: Mesh, up: Upstream, held: int, extra: int, settle: bool
) -> list[Any]:
    gate = up.hold()
    async with mesh.async_http_client(timeout=CLIENT_TIMEOUT) as client:

        async def call() -> Any:
            try:
                return (await client.get(URL)).status_code
            except Exception as exc:
                return exc

        first = [asyncio.ensure_future(call()) for _ in range(held)]
        for _ in range(1500):
            if len(up.seen) == held:
                break
            await asyncio.sleep(0.01)
        others = []
        for _ in range(extra):
            task = asyncio.ensure_future(call())
            pending = protection(mesh)["limits"]["pending"]
            for _ in range(1500):  # refused at once, or queued
                if task.done() or protection(mesh)["limits"]["pending"] > pending:
                    break
                await asyncio.sleep(0.01)
            others.append(task)
        if settle:
            await asyncio.wait_for(asyncio.wait(others), timeout=15)
        state = protection(mesh)["limits"]
        gate.set()
        return [*await asyncio.gather(*first, *others), state]


def bulkhead(
    driver: Driver, mesh: Mesh, up: Upstream, held: int, extra: int, settle: bool = False
) -> list[Any]:
    if driver.kind == "sync":
        return _bulkhead_sync(mesh, up, held, extra, settle)
    return asyncio.run(_bulkhead_async(mesh, up, held, extra, settle))


def test_bulkhead_refuses_the_third_concurrent_call(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    limits = {"max_requests": 2, "max_pending": 0}
    with Mesh(users_policy(up, limits=limits), rng=random.Random(1)) as mesh:
        first, second, third, state = bulkhead(driver, mesh, up, held=2, extra=1)
    assert (first, second) == (200, 200)
    assert isinstance(third, OverloadedError)
    assert "concurrency limit of 'users'" in str(third)
    assert len(up.seen) == 2  # nothing was sent for the refused call
    assert state["inflight"] == 2 and state["overflows"] == 1


def test_bulkhead_queues_up_to_max_pending(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    limits = {"max_requests": 2, "max_pending": 1, "pending_timeout": "20s"}
    with Mesh(users_policy(up, limits=limits), rng=random.Random(1)) as mesh:
        *results, state = bulkhead(driver, mesh, up, held=2, extra=2)
    # the third call waited in line and got the first freed slot; the fourth found
    # the line full
    assert results[:3] == [200, 200, 200]
    assert isinstance(results[3], OverloadedError)
    assert state["inflight"] == 2 and state["pending"] == 1
    assert len(up.seen) == 3


def test_bulkhead_wait_ends_at_pending_timeout(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    limits = {"max_requests": 1, "max_pending": 1, "pending_timeout": "100ms"}
    with Mesh(users_policy(up, limits=limits), rng=random.Random(1)) as mesh:
        first, second, state = bulkhead(driver, mesh, up, held=1, extra=1, settle=True)
    assert first == 200
    assert isinstance(second, OverloadedError)  # waited in line, then gave up
    assert state["pending"] == 0 and state["inflight"] == 1
    assert len(up.seen) == 1


# -- client-side rate limit ------------------------------------------------------------------


def test_client_rate_limit_refuses_with_retry_after(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    routes = [{"name": "limited", "rate_limit": {"requests_per_second": 1, "burst": 2}}]
    with Mesh(users_policy(up, routes=routes), rng=random.Random(1)) as mesh:
        first, second = call_once(mesh, driver.kind, URL), call_once(mesh, driver.kind, URL)
        third = call_once(mesh, driver.kind, URL)
    assert first.ok and second.ok
    error = third.error
    assert isinstance(error, RateLimitedError)
    assert 0 < error.retry_after <= 1.0
    assert "'users'" in str(error) and "'limited'" in str(error)
    assert len(up.seen) == 2  # nothing was sent


# -- server side: mesh.asgi inbound rate limits ----------------------------------------------


@pytest.fixture
def orders() -> Iterator[Any]:
    """``orders(inbound)``: an EchoApp behind mesh.asgi with that inbound policy, served."""
    started: list[tuple[ServerThread, Mesh]] = []

    def start(inbound: dict[str, Any]) -> tuple[Upstream, str]:
        policy = {
            "services": {"orders": {"endpoints": [{"address": "127.0.0.1:9"}], "inbound": inbound}}
        }
        server_mesh = Mesh(policy, service="orders", rng=random.Random(2))
        app = EchoApp("orders")
        server = ServerThread(server_mesh.asgi(app, service="orders")).start()
        started.append((server, server_mesh))
        return Upstream(app, server), server.address

    yield start
    for server, server_mesh in started:
        server.stop()
        server_mesh.close()


def client_mesh(address: str, caller: str) -> Mesh:
    policy = {"services": {"orders": {"endpoints": [{"address": address}]}}}
    return Mesh(policy, service=caller, rng=random.Random(1))


def test_inbound_rate_limit_per_caller_answers_429(orders: Any, driver: Driver) -> None:
    up, address = orders(
        {
            "rate_limit": {"requests_per_second": 1000, "burst": 1000},
            "routes": [
                {
                    "name": "exports",
                    "path_prefix": "/api/exports",
                    "rate_limit": {"requests_per_second": 0.5, "burst": 2, "per_caller": True},
                }
            ],
        }
    )
    exports = "http://orders/api/exports/1"
    with client_mesh(address, "checkout") as checkout, client_mesh(address, "billing") as billing:
        from_checkout = [call_once(checkout, driver.kind, exports) for _ in range(3)]
        other_path = call_once(checkout, driver.kind, "http://orders/api/search")
        from_billing = [call_once(billing, driver.kind, exports) for _ in range(2)]
    assert [o.status for o in from_checkout] == [200, 200, 429]
    limited = from_checkout[2]
    assert 1 <= int(limited.headers["retry-after"]) <= 2
    assert b"rate limited by rule 'exports'" in limited.body
    # other paths and other callers are unaffected
    assert other_path.status == 200
    assert [o.status for o in from_billing] == [200, 200]
    callers = [record["headers"]["x-mesh-caller"] for record in up.seen]
    assert callers == ["checkout", "checkout", "checkout", "billing", "billing"]


def test_inbound_service_rate_limit_applies_to_every_caller(orders: Any, driver: Driver) -> None:
    up, address = orders({"rate_limit": {"requests_per_second": 0.5, "burst": 3}})
    with client_mesh(address, "checkout") as checkout, client_mesh(address, "billing") as billing:
        outcomes = [call_once(checkout, driver.kind, "http://orders/a") for _ in range(2)]
        outcomes += [call_once(billing, driver.kind, "http://orders/b") for _ in range(2)]
    assert [o.status for o in outcomes] == [200, 200, 200, 429]
    assert b"rate limited by rule 'service'" in outcomes[3].body
    assert int(outcomes[3].headers["retry-after"]) >= 1
    assert len(up.seen) == 3


def test_inbound_limit_without_caller_header_is_keyed_by_client_ip(orders: Any) -> None:
    per_caller = {"requests_per_second": 0.5, "burst": 1, "per_caller": True}
    _, address = orders({"rate_limit": per_caller})
    with httpx.Client(base_url=f"http://{address}", trust_env=False) as client:
        assert client.get("/").status_code == 200
        assert client.get("/").status_code == 429
        assert client.get("/", headers={"x-mesh-caller": "someone"}).status_code == 200
