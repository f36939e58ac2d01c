"""A request in flight finishes on the snapshot it started with, while a policy
swap sends new requests elsewhere."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import httpx
import pytest

from integration.support import CLIENT_TIMEOUT, StartEcho, Upstream, async_wait_until, wait_until
from meshlib import Mesh

pytestmark = pytest.mark.integration


def policy(target: Upstream, prefix: str) -> dict[str, Any]:
    return {
        "services": {
            "users": {
                "endpoints": [{"address": target.address}],
                "routes": [
                    {
                        "match": {"path": {"prefix": "/api/"}},
                        "rewrite": {"prefix": prefix},
                        "request_headers": {"set": {"x-policy": target.name}},
                    }
                ],
            }
        }
    }


def test_sync_inflight_request_finishes_on_its_snapshot(echo: StartEcho) -> None:
    old, new = echo("old", "new")
    gate = old.hold()
    with Mesh(policy(old, "/v1/"), rng=random.Random(1)) as mesh:
        first_version = mesh.snapshot.version
        with mesh.http_client(timeout=CLIENT_TIMEOUT) as client:
            result: list[httpx.Response | BaseException] = []

            def slow_call() -> None:
                try:
                    result.append(client.get("http://users/api/slow"))
                except BaseException as exc:  # reported by the assertions below
                    result.append(exc)

            caller = threading.Thread(target=slow_call)
            caller.start()
            try:
                wait_until(lambda: len(old.seen) == 1, "the slow request to reach its server")
                assert mesh.update(policy(new, "/v2/")).version > first_version
                fresh = client.get("http://users/api/fresh")
                assert result == []  # still in flight
            finally:
                gate.set()
                caller.join(timeout=CLIENT_TIMEOUT)

    (slow,) = result
    assert isinstance(slow, httpx.Response)
    assert slow.status_code == 200
    assert slow.headers["x-server"] == "old"
    assert slow.json()["path"] == "/v1/slow"
    assert slow.json()["headers"]["x-policy"] == "old"
    assert fresh.headers["x-server"] == "new"
    assert fresh.json()["path"] == "/v2/fresh"
    assert [r["path"] for r in old.seen] == ["/v1/slow"]
    assert [r["path"] for r in new.seen] == ["/v2/fresh"]


def test_async_inflight_request_finishes_on_its_snapshot(echo: StartEcho) -> None:
    old, new = echo("old", "new")
    gate = old.hold()

    async def main(mesh: Mesh) -> tuple[httpx.Response, httpx.Response, bool]:
        async with mesh.async_http_client(timeout=CLIENT_TIMEOUT) as client:
            slow_task = asyncio.create_task(client.get("http://users/api/slow"))
            try:
                await async_wait_until(lambda: len(old.seen) == 1, "the slow request")
                mesh.update(policy(new, "/v2/"))
                fresh = await client.get("http://users/api/fresh")
                pending = not slow_task.done()
            finally:
                gate.set()
            slow = await slow_task
        return slow, fresh, pending

    with Mesh(policy(old, "/v1/"), rng=random.Random(1)) as mesh:
        slow, fresh, pending = asyncio.run(main(mesh))

    assert pending
    assert (slow.status_code, slow.headers["x-server"]) == (200, "old")
    assert slow.json()["path"] == "/v1/slow"
    assert (fresh.status_code, fresh.headers["x-server"]) == (200, "new")
    assert fresh.json()["path"] == "/v2/fresh"
    assert [r["path"] for r in old.seen] == ["/v1/slow"]
    assert [r["path"] for r in new.seen] == ["/v2/fresh"]


def test_inflight_count_survives_the_swap(echo: StartEcho) -> None:
    """The endpoint's in-flight counter is shared across snapshots: it shows the
    held request after the swap and drops back to 0 when it completes."""
    a, b = echo("a", "b")
    gate = a.hold()
    both = {"services": {"users": {"endpoints": [{"address": a.address}, {"address": b.address}]}}}
    only_a = {"services": {"users": {"endpoints": [{"address": a.address}]}}}

    def inflight() -> dict[str, Any]:
        endpoints = mesh.config_dump()["clusters"]["users"]["endpoints"]
        return {ep["address"]: ep["inflight"] for ep in endpoints}

    mesh = Mesh(only_a, rng=random.Random(1))
    with mesh, mesh.http_client(timeout=CLIENT_TIMEOUT) as client:
        caller = threading.Thread(target=client.get, args=("http://users/",))
        caller.start()
        try:
            wait_until(lambda: len(a.seen) == 1, "the held request")
            mesh.update(both)
            assert inflight() == {a.address: 1, b.address: 0}
        finally:
            gate.set()
            caller.join(timeout=CLIENT_TIMEOUT)
        assert inflight() == {a.address: 0, b.address: 0}
