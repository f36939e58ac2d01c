"""Connections are pooled per endpoint: sequential requests reuse them, whatever
logical name or port the caller used to reach that endpoint.

The server records the client port of each request's connection; a new
connection per request would show one port per request.
"""

from __future__ import annotations

import random

import pytest

from integration.support import Call, Driver, StartEcho
from meshlib import Mesh

pytestmark = pytest.mark.integration


def test_sequential_requests_reuse_a_connection_per_endpoint(
    echo: StartEcho, driver: Driver
) -> None:
    a, b = echo("a", "b")
    policy = {
        "services": {
            "users": {"endpoints": [{"address": a.address}, {"address": b.address}]},
            "admin": {"endpoints": [{"address": a.address}]},
        }
    }
    names = ["http://users/x", "http://admin/y", "http://users:8080/z"]
    calls = [Call(names[i % 3]) for i in range(90)]
    with Mesh(policy, rng=random.Random(1)) as mesh:
        replies = driver.send(mesh, calls)

    assert all(reply.status == 200 for reply in replies)
    assert len(a.seen) == 60 and len(b.seen) == 30  # admin: 30, users: 30 each side
    # a keep-alive connection could in principle be closed and reopened once, but
    # never anything near one connection per request
    assert len(a.client_ports()) <= 2, a.client_ports()
    assert len(b.client_ports()) <= 2, b.client_ports()


def test_passthrough_requests_reuse_connections(echo: StartEcho, driver: Driver) -> None:
    (outside,) = echo("outside")
    with Mesh({"services": {}}, rng=random.Random(1)) as mesh:
        replies = driver.get(mesh, f"http://127.0.0.1:{outside.port}/", 30)
    assert all(reply.status == 200 for reply in replies)
    assert len(outside.client_ports()) <= 2, outside.client_ports()
