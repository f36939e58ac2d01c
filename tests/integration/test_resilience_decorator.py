"""@mesh.resilient("users") around sync and async callables: retries on the named
exception classes, the retry budget, the service breaker, and async timeouts."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from integration.resilience_support import FLAKY, Flaky, users_policy
from meshlib import Mesh
from meshlib.errors import CircuitOpenError, DeadlineExceeded

pytestmark = pytest.mark.integration

FAST_BACKOFF = {"base": "1ms", "max": "2ms"}


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def wrap(mesh: Mesh, kind: str, body: Callable[[int], Any]) -> tuple[Callable[[], Any], list[int]]:
    """A decorated function (sync or async) that runs ``body(call_number)``; and its calls."""
    calls: list[int] = []
    if kind == "sync":

        @mesh.resilient("users")
        def work() -> Any:
            calls.append(len(calls) + 1)
            return body(len(calls))

        return work, calls

    @mesh.resilient("users")
    async def awork() -> Any:
        calls.append(len(calls) + 1)
        await asyncio.sleep(0)
        return body(len(calls))

    return lambda: asyncio.run(awork()), calls


def fail_until(success_at: int, exc: type[BaseException] = Flaky) -> Callable[[int], str]:
    def body(call: int) -> str:
        if call < success_at:
            raise exc(f"call {call}")
        return "ok"

    return body


def test_named_exception_is_retried_per_policy(kind: str) -> None:
    retries = {"attempts": 3, "exceptions": [FLAKY], "backoff": FAST_BACKOFF}
    with Mesh(users_policy("127.0.0.1:9", retries=retries), rng=random.Random(1)) as mesh:
        work, calls = wrap(mesh, kind, fail_until(3))
        assert work() == "ok"
        assert calls == [1, 2, 3]

        # attempts are counted: a fourth is never made
        work, calls = wrap(mesh, kind, fail_until(4))
        with pytest.raises(Flaky, match="call 3"):
            work()
        assert calls == [1, 2, 3]

        # an exception that is not listed is raised at once
        work, calls = wrap(mesh, kind, fail_until(2, ValueError))
        with pytest.raises(ValueError):
            work()
        assert calls == [1]


def test_http_status_error_is_retried_by_its_status(kind: str) -> None:
    retries = {"attempts": 3, "on": ["gateway-error"], "backoff": FAST_BACKOFF}

    def status_error(status: int) -> httpx.HTTPStatusError:
        request = httpx.Request("GET", "http://ledger.example/")
        response = httpx.Response(status, request=request)
        return httpx.HTTPStatusError(f"status {status}", request=request, response=response)

    def body(call: int) -> str:
        if call == 1:
            raise status_error(503)
        if call == 2:
            raise status_error(500)  # not a gateway error: given up
        return "ok"

    with Mesh(users_policy("127.0.0.1:9", retries=retries), rng=random.Random(1)) as mesh:
        work, calls = wrap(mesh, kind, body)
        with pytest.raises(httpx.HTTPStatusError, match="status 500"):
            work()
    assert calls == [1, 2]


def test_retry_budget_bounds_decorated_retries(kind: str) -> None:
    retries = {
        "attempts": 3,
        "exceptions": [FLAKY],
        "backoff": FAST_BACKOFF,
        "budget": {"ratio": 0, "min_per_second": 0.5, "window": "10s"},  # 5 retries, no more
    }
    with Mesh(users_policy("127.0.0.1:9", retries=retries), rng=random.Random(1)) as mesh:
        work, calls = wrap(mesh, kind, fail_until(10_000))
        for _ in range(10):
            with pytest.raises(Flaky):
                work()
    assert len(calls) == 10 + 5


def test_breaker_opens_and_fails_fast_without_calling(kind: str) -> None:
    policy = users_policy(
        "127.0.0.1:9",
        retries={"attempts": 1},
        circuit_breaker={"consecutive_failures": 3, "open_for": "30s"},
    )
    with Mesh(policy, rng=random.Random(1)) as mesh:
        work, calls = wrap(mesh, kind, fail_until(10_000))
        for _ in range(3):
            with pytest.raises(Flaky):
                work()
        with pytest.raises(CircuitOpenError, match="'users'"):
            work()
        assert len(calls) == 3
        protection = mesh.explain("GET", "http://users/")["protection"]
    assert protection["service_breaker"] == "open"


def test_async_call_is_cut_off_at_the_route_timeout() -> None:
    cancelled: list[bool] = []
    with Mesh(users_policy("127.0.0.1:9", timeout="200ms"), rng=random.Random(1)) as mesh:

        @mesh.resilient("users")
        async def slow() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        with pytest.raises(DeadlineExceeded) as caught:
            asyncio.run(slow())
    assert caught.value.limit == "route timeout"
    assert "route timeout" in str(caught.value) and "'users'" in str(caught.value)
    assert cancelled == [True]


def test_async_per_try_timeout_is_retried_then_names_its_limit() -> None:
    retries = {
        "attempts": 3,
        "per_try_timeout": "100ms",
        "on": ["timeout"],
        "backoff": FAST_BACKOFF,
    }
    policy = users_policy("127.0.0.1:9", timeout="5s", retries=retries)
    with Mesh(policy, rng=random.Random(1)) as mesh:
        calls: list[int] = []

        @mesh.resilient("users")
        async def slow_twice() -> str:
            calls.append(1)
            if len(calls) < 3:
                await asyncio.sleep(10)
            return "ok"

        assert asyncio.run(slow_twice()) == "ok"
        assert len(calls) == 3

        @mesh.resilient("users")
        async def always_slow() -> None:
            await asyncio.sleep(10)

        with pytest.raises(DeadlineExceeded) as caught:
            asyncio.run(always_slow())
    assert caught.value.limit == "per-try timeout"
    assert caught.value.seconds == pytest.approx(0.1)
    assert "per-try timeout" in str(caught.value)
