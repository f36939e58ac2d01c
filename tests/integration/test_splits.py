"""Weighted splits send the configured share of real traffic to each destination."""

from __future__ import annotations

import random

import pytest

from integration.support import Call, Driver, StartEcho, binomial_bounds, servers_of
from meshlib import Mesh

pytestmark = pytest.mark.integration

N = 500


def test_split_90_10_over_subsets(echo: StartEcho, driver: Driver) -> None:
    v1, v2 = echo("v1", "v2")
    policy = {
        "services": {
            "users": {
                "endpoints": [
                    {"address": v1.address, "labels": {"version": "v1"}},
                    {"address": v2.address, "labels": {"version": "v2"}},
                ],
                "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
                "routes": [
                    {
                        "name": "canary-split",
                        "match": {"path": {"prefix": "/"}},
                        "to": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}],
                    }
                ],
            }
        }
    }
    with Mesh(policy, rng=random.Random(7)) as mesh:
        replies = driver.get(mesh, "http://users/api/x", N)

    assert all(reply.status == 200 for reply in replies)
    counts = servers_of(replies)
    assert set(counts) <= {"v1", "v2"}
    low, high = binomial_bounds(N, 0.10)
    assert low <= counts.get("v2", 0) <= high, counts
    assert counts["v1"] + counts.get("v2", 0) == N
    # what each server saw agrees with what the callers were told
    assert len(v1.seen) == counts["v1"] and len(v2.seen) == counts.get("v2", 0)


def test_split_90_10_across_services(echo: StartEcho, driver: Driver) -> None:
    stable, next_ = echo("users", "users-next")
    policy = {
        "services": {
            "users": {
                "endpoints": [{"address": stable.address}],
                "routes": [
                    {
                        "name": "migrate",
                        "to": [{"weight": 90}, {"service": "users-next", "weight": 10}],
                    }
                ],
            },
            "users-next": {"endpoints": [{"address": next_.address}]},
        }
    }
    with Mesh(policy, rng=random.Random(11)) as mesh:
        replies = driver.get(mesh, "http://users/profile", N)

    counts = servers_of(replies)
    low, high = binomial_bounds(N, 0.10)
    assert low <= counts.get("users-next", 0) <= high, counts
    assert counts["users"] + counts.get("users-next", 0) == N
    # the other service got the request as sent: same path
    assert {record["path"] for record in next_.seen} == {"/profile"}


def test_split_with_concurrent_callers(echo: StartEcho, driver: Driver) -> None:
    """Shares hold when many requests are in flight at once (threads or tasks)."""
    a, b = echo("a", "b")
    policy = {
        "services": {
            "users": {
                "endpoints": [
                    {"address": a.address, "labels": {"v": "a"}},
                    {"address": b.address, "labels": {"v": "b"}},
                ],
                "subsets": {"a": {"v": "a"}, "b": {"v": "b"}},
                "routes": [{"to": [{"subset": "a", "weight": 3}, {"subset": "b", "weight": 1}]}],
            }
        }
    }
    with Mesh(policy, rng=random.Random(3)) as mesh:
        calls = [Call(f"http://users/item/{i}") for i in range(N)]
        replies = driver.send(mesh, calls, concurrency=8)

    assert all(reply.status == 200 for reply in replies)
    counts = servers_of(replies)
    low, high = binomial_bounds(N, 0.25)
    assert low <= counts.get("b", 0) <= high, counts
    assert sum(counts.values()) == N
