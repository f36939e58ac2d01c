"""Retries against real servers: which outcomes are retried, which methods and bodies,
where the retry goes, and the retry budget under total failure and in health."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from integration.resilience_support import (
    attempts_seen,
    run_load,
    seen_total,
    statuses_of,
    users_policy,
)
from integration.support import Call, Driver, StartEcho
from meshlib import Mesh

pytestmark = pytest.mark.integration

FAST_BACKOFF = {"base": "1ms", "max": "2ms"}


def test_connect_failure_is_retried_on_the_live_endpoint(
    echo: StartEcho, driver: Driver, dead_address: str
) -> None:
    (live,) = echo("live")
    policy = users_policy(
        dead_address, live, retries={"on": ["connect-failure"], "backoff": FAST_BACKOFF}
    )
    with Mesh(policy, rng=random.Random(1)) as mesh:
        replies = driver.get(mesh, "http://users/x", 10)
    assert [reply.status for reply in replies] == [200] * 10
    # round robin sent every other first attempt to the dead address
    assert sorted(attempts_seen(live)) == ["1"] * 5 + ["2"] * 5


@pytest.mark.parametrize(
    ("on", "codes", "status", "retried"),
    [
        (["5xx"], [], 500, True),
        (["gateway-error"], [], 503, True),
        (["gateway-error"], [], 500, False),
        (["retriable-status-codes"], [409], 409, True),
        ([], [409], 409, True),  # listing the code is enough
        (["5xx"], [], 409, False),
    ],
    ids=["5xx", "gateway-503", "gateway-not-500", "codes", "codes-only", "5xx-not-409"],
)
def test_status_outcomes(
    echo: StartEcho,
    driver: Driver,
    on: list[str],
    codes: list[int],
    status: int,
    retried: bool,
) -> None:
    bad, good = echo("bad", "good")
    bad.app.status = status
    retries = {"attempts": 2, "on": on, "retriable_status_codes": codes, "backoff": FAST_BACKOFF}
    with Mesh(users_policy(bad, good, retries=retries), rng=random.Random(1)) as mesh:
        replies = driver.get(mesh, "http://users/x", 4)
    statuses = sorted(reply.status for reply in replies)
    # the bad endpoint only ever sees first attempts: a retry goes elsewhere
    assert attempts_seen(bad) == ["1", "1"]
    if retried:
        assert statuses == [200] * 4
        assert sorted(attempts_seen(good)) == ["1", "1", "2", "2"]
    else:
        assert statuses == sorted([200, 200, status, status])
        assert attempts_seen(good) == ["1", "1"]


def test_named_exception_classes_are_retried_whatever_on_says(
    echo: StartEcho, driver: Driver, dead_address: str
) -> None:
    (live,) = echo("live")
    listed = {"on": ["5xx"], "exceptions": ["httpx.ConnectError"], "backoff": FAST_BACKOFF}
    with Mesh(users_policy(dead_address, live, retries=listed), rng=random.Random(1)) as mesh:
        assert [r.status for r in driver.get(mesh, "http://users/x", 4)] == [200] * 4
    unlisted = users_policy(dead_address, live, retries={"on": ["5xx"], "backoff": FAST_BACKOFF})
    with Mesh(unlisted, rng=random.Random(1)) as mesh, pytest.raises(httpx.ConnectError):
        driver.get(mesh, "http://users/x", 2)


@pytest.mark.parametrize("non_idempotent", [False, True])
def test_post_is_retried_only_with_non_idempotent(
    echo: StartEcho, driver: Driver, non_idempotent: bool
) -> None:
    bad, good = echo("bad", "good", status=503)
    good.app.status = 200
    retries = {"on": ["gateway-error"], "non_idempotent": non_idempotent, "backoff": FAST_BACKOFF}
    with Mesh(users_policy(bad, good, retries=retries), rng=random.Random(1)) as mesh:
        replies = driver.send(mesh, [Call("http://users/x", method="POST", content=b"{}")] * 4)
    statuses = sorted(reply.status for reply in replies)
    if non_idempotent:
        assert statuses == [200] * 4
        assert seen_total(bad, good) == 6
    else:
        assert statuses == [200, 200, 503, 503]
        assert seen_total(bad, good) == 4


def test_body_is_replayed_on_retry(echo: StartEcho, driver: Driver) -> None:
    bad, good = echo("bad", "good")
    bad.app.status = 503
    body = bytes(range(256)) * 40  # 10 KiB, under max_body_bytes
    retries = {"on": ["gateway-error"], "backoff": FAST_BACKOFF}
    with Mesh(users_policy(bad, good, retries=retries), rng=random.Random(1)) as mesh:
        replies = driver.send(mesh, [Call("http://users/x", method="PUT", content=body)] * 4)
    assert [reply.status for reply in replies] == [200] * 4
    expected = body.decode("latin-1")
    retried = [r for r in good.seen if r["headers"].get("x-mesh-attempt") == "2"]
    assert len(retried) == 2
    assert all(record["body"] == expected for record in bad.seen + good.seen)


def test_body_over_max_body_bytes_is_not_retried(echo: StartEcho, driver: Driver) -> None:
    bad, good = echo("bad", "good")
    bad.app.status = 503
    retries = {"on": ["gateway-error"], "max_body_bytes": 100, "backoff": FAST_BACKOFF}
    with Mesh(users_policy(bad, good, retries=retries), rng=random.Random(1)) as mesh:
        replies = driver.send(mesh, [Call("http://users/x", method="PUT", content=b"x" * 101)] * 4)
        small = driver.send(mesh, [Call("http://users/x", method="PUT", content=b"x" * 100)] * 4)
    assert sorted(reply.status for reply in replies) == [200, 200, 503, 503]
    assert [reply.status for reply in small] == [200] * 4
    sizes = sorted(len(record["body"]) for record in bad.seen + good.seen)
    assert sizes == [100] * 6 + [101] * 4  # 100 bytes: two retries; 101 bytes: none


def _chunks() -> Iterator[bytes]:
    yield b"streamed-"
    yield b"body"


async def _achunks() -> AsyncIterator[bytes]:
    yield b"streamed-"
    yield b"body"


def test_streamed_body_is_not_retried(echo: StartEcho, driver: Driver) -> None:
    bad, good = echo("bad", "good")
    bad.app.status = 503
    retries = {"on": ["gateway-error"], "backoff": FAST_BACKOFF}
    with Mesh(users_policy(bad, good, retries=retries), rng=random.Random(1)) as mesh:
        if driver.kind == "sync":
            with mesh.http_client() as client:
                statuses = [client.put("http://users/x", content=_chunks()).status_code]
                statuses.append(client.put("http://users/x", content=_chunks()).status_code)
        else:

            async def send() -> list[int]:
                async with mesh.async_http_client() as client:
                    out = []
                    for _ in range(2):
                        response = await client.put("http://users/x", content=_achunks())
                        out.append(response.status_code)
                    return out

            statuses = asyncio.run(send())
    assert sorted(statuses) == [200, 503]
    assert seen_total(bad, good) == 2
    assert [record["body"] for record in bad.seen + good.seen] == ["streamed-body"] * 2


# -- retry budget ---------------------------------------------------------------------------


def test_budget_bounds_attempts_against_a_service_that_always_fails(
    echo: StartEcho, driver: Driver
) -> None:
    ups = echo("a", "b", "c", status=503)
    ratio, min_per_second, window = 0.2, 1.0, 10.0
    retries: dict[str, Any] = {
        "attempts": 3,
        "on": ["5xx"],
        "backoff": FAST_BACKOFF,
        "budget": {"ratio": ratio, "min_per_second": min_per_second, "window": "10s"},
    }
    requests = 150
    with Mesh(users_policy(*ups, retries=retries), rng=random.Random(1)) as mesh:
        outcomes = run_load(mesh, driver.kind, "http://users/x", requests, concurrency=4)
        budget = mesh.explain("GET", "http://users/x")["resilience"]["retry_budget"]
    assert statuses_of(outcomes) == {503: requests}  # the failure is handed back, no error
    total = seen_total(*ups)
    reserve = min_per_second * window
    # a few retries of slack for concurrent callers racing on the balance check
    assert total <= requests * (1 + ratio) + reserve + 4
    assert total >= requests + reserve  # the budget did allow retries
    assert budget["exhausted"] > 0
    assert budget["requests"] == requests


def test_budget_never_blocks_a_first_attempt(echo: StartEcho, driver: Driver) -> None:
    ups = echo("a", "b", "c")
    empty_budget = {
        "attempts": 3,
        "on": ["5xx", "connect-failure"],
        "budget": {"ratio": 0, "min_per_second": 0, "window": "10s"},
    }
    requests = 90
    with Mesh(users_policy(*ups, retries=empty_budget), rng=random.Random(1)) as mesh:
        outcomes = run_load(mesh, driver.kind, "http://users/x", requests, concurrency=3)
    assert statuses_of(outcomes) == {200: requests}
    assert seen_total(*ups) == requests
    assert all(attempt == "1" for up in ups for attempt in attempts_seen(up))
