"""Mirroring: copies reach the mirror, callers only ever see the primary, and a
slow, failing or missing mirror cannot hurt them."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from integration.support import (
    CLIENT_TIMEOUT,
    Call,
    Driver,
    StartEcho,
    async_wait_until,
    binomial_bounds,
    wait_until,
)
from meshlib import Mesh

pytestmark = pytest.mark.integration


def policy(
    primary: str,
    mirror: str,
    *,
    percent: float = 100.0,
    max_concurrent: int = 64,
    timeout: str = "60s",
) -> dict[str, Any]:
    return {
        "mirroring": {"max_concurrent": max_concurrent, "timeout": timeout},
        "services": {
            "users": {
                "endpoints": [{"address": primary}],
                "routes": [
                    {
                        "name": "api",
                        "match": {"path": {"prefix": "/api/"}},
                        "rewrite": {"prefix": "/v1/"},
                        "request_headers": {"set": {"x-mirrored-route": "api"}},
                        "mirror": {"service": "audit", "percent": percent},
                    }
                ],
            },
            "audit": {"endpoints": [{"address": mirror}]},
        },
    }


def test_mirror_receives_copies_and_caller_gets_primary(echo: StartEcho, driver: Driver) -> None:
    primary, audit = echo("primary", "audit")
    calls = [
        Call(f"http://users/api/{i}?n={i}", method="POST", content=f"body-{i}".encode())
        if i % 2
        else Call(f"http://users/api/{i}?n={i}", headers={"x-i": str(i)})
        for i in range(20)
    ]
    with Mesh(policy(primary.address, audit.address), rng=random.Random(1)) as mesh:
        replies = driver.send(mesh, calls, settle=lambda: len(audit.seen) >= len(calls))

    assert [(reply.status, reply.server) for reply in replies] == [(200, "primary")] * len(calls)
    assert len(audit.seen) == len(calls)
    originals = {record["path"]: record for record in primary.seen}
    for copy in audit.seen:
        original = originals[copy["path"]]
        index = int(copy["path"].rsplit("/", 1)[1])
        assert copy["path"] == f"/v1/{index}"  # rewritten like the original
        assert copy["query"] == original["query"] == f"n={index}"
        assert copy["method"] == original["method"]
        assert copy["body"] == original["body"]
        assert copy["headers"]["host"] == "users-shadow"
        assert original["headers"]["host"] == "users"
        assert copy["headers"]["x-mirrored-route"] == "api"
        if index % 2 == 0:
            assert copy["headers"]["x-i"] == str(index)


def test_mirror_percent_is_a_share_of_requests(echo: StartEcho, driver: Driver) -> None:
    primary, audit = echo("primary", "audit")
    n = 300
    low, high = binomial_bounds(n, 0.30)
    mesh_policy = policy(primary.address, audit.address, percent=30, max_concurrent=4096)
    with Mesh(mesh_policy, rng=random.Random(5)) as mesh:
        replies = driver.send(
            mesh, [Call("http://users/api/x")] * n, settle=lambda: len(audit.seen) >= low
        )

    assert [reply.server for reply in replies] == ["primary"] * n
    assert low <= len(audit.seen) <= high


@pytest.mark.parametrize("failure", ["down", "error-500"])
def test_failing_mirror_never_changes_the_answer(
    echo: StartEcho, driver: Driver, dead_address: str, failure: str
) -> None:
    (primary,) = echo("primary")
    mirror_address = dead_address
    settle = None
    calls = [
        Call("http://users/api/get"),
        Call("http://users/api/post", method="POST", content=b"payload"),
    ] * 10
    if failure == "error-500":
        (broken,) = echo("broken", status=500)
        mirror_address = broken.address

        def settle() -> bool:
            return len(broken.seen) >= len(calls)

    with Mesh(policy(primary.address, mirror_address), rng=random.Random(1)) as mesh:
        replies = driver.send(mesh, calls, settle=settle)

    assert [(r.status, r.server) for r in replies] == [(200, "primary")] * len(calls)
    assert [r.echo["path"] for r in replies] == ["/v1/get", "/v1/post"] * 10
    assert len(primary.seen) == len(calls)


def test_slow_mirror_is_bounded_and_never_delays_callers(echo: StartEcho, driver: Driver) -> None:
    """With ``max_concurrent: 1`` and a mirror that does not answer, one copy is in
    flight, every other copy is dropped (not queued), and every caller still gets
    its answer: a caller that waited on the mirror would never finish, because the
    mirror answers only after the test releases it."""
    primary, audit = echo("primary", "audit")
    gate = audit.hold()
    n = 30
    with Mesh(
        policy(primary.address, audit.address, max_concurrent=1), rng=random.Random(1)
    ) as mesh:
        if driver.kind == "sync":
            with mesh.http_client(timeout=CLIENT_TIMEOUT) as client:
                statuses = [client.get(f"http://users/api/{i}").status_code for i in range(n)]
                wait_until(lambda: len(audit.seen) >= 1, "the first copy at the mirror")
                more = [client.get(f"http://users/api/more-{i}").status_code for i in range(n)]
                stuck = len(audit.seen)
                gate.set()
        else:

            async def main() -> tuple[list[int], list[int], int]:
                async with mesh.async_http_client(timeout=CLIENT_TIMEOUT) as client:
                    codes = [
                        (await client.get(f"http://users/api/{i}")).status_code for i in range(n)
                    ]
                    await async_wait_until(lambda: len(audit.seen) >= 1, "the first copy")
                    later = [
                        (await client.get(f"http://users/api/more-{i}")).status_code
                        for i in range(n)
                    ]
                    return codes, later, len(audit.seen)

            statuses, more, stuck = asyncio.run(main())
            gate.set()

    assert statuses == [200] * n
    assert more == [200] * n
    assert len(primary.seen) == 2 * n
    assert stuck == 1  # the other 2n - 1 copies were dropped
    assert audit.seen[0]["path"] == "/v1/0"


def test_only_bodies_in_memory_and_within_the_limit_are_mirrored(echo: StartEcho) -> None:
    """Copies need the body in memory: a streamed body or one over
    ``mirroring.max_body_bytes`` is not mirrored, and its caller is unaffected."""
    primary, audit = echo("primary", "audit")
    mesh_policy = policy(primary.address, audit.address)
    mesh_policy["mirroring"]["max_body_bytes"] = 100
    big, small = b"x" * 101, b"y" * 100

    def sync_stream() -> Iterator[bytes]:
        yield b"streamed"

    async def async_stream() -> AsyncIterator[bytes]:
        yield b"streamed"

    async def send_async(mesh: Mesh) -> list[int]:
        async with mesh.async_http_client(timeout=CLIENT_TIMEOUT) as client:
            codes = [
                (await client.post("http://users/api/async-big", content=big)).status_code,
                (
                    await client.post("http://users/api/async-stream", content=async_stream())
                ).status_code,
                (await client.post("http://users/api/async-small", content=small)).status_code,
            ]
            await async_wait_until(lambda: len(audit.seen) >= 2, "the small async copy")
            return codes

    with Mesh(mesh_policy, rng=random.Random(1)) as mesh:
        with mesh.http_client(timeout=CLIENT_TIMEOUT) as client:
            codes = [
                client.post("http://users/api/sync-big", content=big).status_code,
                client.post("http://users/api/sync-stream", content=sync_stream()).status_code,
                client.post("http://users/api/sync-small", content=small).status_code,
            ]
            wait_until(lambda: len(audit.seen) >= 1, "the small sync copy")
        codes += asyncio.run(send_async(mesh))

    assert codes == [200] * 6
    assert len(primary.seen) == 6
    assert sorted(r["path"] for r in audit.seen) == ["/v1/async-small", "/v1/sync-small"]
    assert {r["body"] for r in audit.seen} == {small.decode()}


def test_hanging_mirror_copy_times_out_and_frees_its_slot(echo: StartEcho, driver: Driver) -> None:
    """``mirroring.timeout`` bounds a copy: with one slot and a mirror that never
    answers, the first copy holds the slot only until it times out; a later copy
    then gets through (callers keep sending until one does, a bounded number of
    times)."""
    primary, audit = echo("primary", "audit")
    audit.hold()
    mesh_policy = policy(primary.address, audit.address, max_concurrent=1, timeout="200ms")
    attempts = 500
    with Mesh(mesh_policy, rng=random.Random(1)) as mesh:
        if driver.kind == "sync":
            with mesh.http_client(timeout=CLIENT_TIMEOUT) as client:
                statuses = [client.get("http://users/api/first").status_code]
                wait_until(lambda: len(audit.seen) >= 1, "the first copy at the mirror")
                for i in range(attempts):
                    statuses.append(client.get(f"http://users/api/next-{i}").status_code)
                    if len(audit.seen) >= 2:
                        break
                    time.sleep(0.01)
        else:

            async def main() -> list[int]:
                async with mesh.async_http_client(timeout=CLIENT_TIMEOUT) as client:
                    codes = [(await client.get("http://users/api/first")).status_code]
                    await async_wait_until(lambda: len(audit.seen) >= 1, "the first copy")
                    for i in range(attempts):
                        response = await client.get(f"http://users/api/next-{i}")
                        codes.append(response.status_code)
                        if len(audit.seen) >= 2:
                            break
                        await asyncio.sleep(0.01)
                    return codes

            statuses = asyncio.run(main())

    assert len(audit.seen) >= 2, "no copy got through after the first one timed out"
    assert audit.seen[0]["path"] == "/v1/first"
    assert audit.seen[1]["path"].startswith("/v1/next-")
    assert statuses == [200] * len(statuses)
    assert len(primary.seen) == len(statuses)
