"""Hosts that are not mesh services pass through untouched; a port on a mesh name
is ignored for resolution."""

from __future__ import annotations

import random
from typing import Any

import pytest

from integration.support import Call, Driver, StartEcho, Upstream
from meshlib import Mesh

pytestmark = pytest.mark.integration


def policy(users: Upstream) -> dict[str, Any]:
    return {
        "services": {
            "users": {
                "endpoints": [{"address": users.address}],
                "routes": [
                    {
                        "match": {"path": {"prefix": "/api/"}},
                        "rewrite": {"prefix": "/v2/", "host": "rewritten.example"},
                        "request_headers": {"set": {"x-mesh": "yes"}, "remove": ["x-drop"]},
                        "mirror": {"service": "users"},
                    },
                    {"match": {"path": {"prefix": "/"}}},
                ],
            }
        }
    }


def test_non_mesh_host_passes_through_untouched(echo: StartEcho, driver: Driver) -> None:
    users, outside = echo("users", "outside")
    direct = f"http://127.0.0.1:{outside.port}"
    calls = [
        Call(f"{direct}/api/x?q=1", headers={"x-drop": "kept"}),
        Call(f"{direct}/api/y", method="POST", content=b"data"),
        Call(f"http://localhost:{outside.port}/api/z"),
    ]
    with Mesh(policy(users), rng=random.Random(1)) as mesh:
        replies = driver.send(mesh, calls)

    assert [(r.status, r.server) for r in replies] == [(200, "outside")] * 3
    first, second, third = (r.echo for r in replies)
    assert (first["path"], first["query"]) == ("/api/x", "q=1")  # no rewrite
    assert first["headers"]["host"] == f"127.0.0.1:{outside.port}"  # Host unchanged
    assert first["headers"]["x-drop"] == "kept"  # no header actions
    assert "x-mesh" not in first["headers"]
    assert (second["method"], second["body"]) == ("POST", "data")
    assert third["headers"]["host"] == f"localhost:{outside.port}"
    assert users.seen == []  # no mirror copies either


def test_mesh_name_with_port_resolves_like_without(echo: StartEcho, driver: Driver) -> None:
    (users,) = echo("users")
    calls = [
        Call("http://users/api/a"),
        Call("http://users:8080/api/a"),
        Call("http://users:1/plain?x=1"),
    ]
    with Mesh(policy(users), rng=random.Random(1)) as mesh:
        replies = driver.send(mesh, calls)
        explained = mesh.explain("GET", "http://users:8080/api/a")

    assert [(r.status, r.server) for r in replies] == [(200, "users")] * 3
    assert replies[0].echo["path"] == replies[1].echo["path"] == "/v2/a"
    assert replies[0].echo["headers"]["x-mesh"] == replies[1].echo["headers"]["x-mesh"] == "yes"
    assert replies[1].echo["headers"]["host"] == "rewritten.example"
    assert (replies[2].echo["path"], replies[2].echo["query"]) == ("/plain", "x=1")
    # without a host rewrite the upstream sees the Host the caller sent
    assert replies[2].echo["headers"]["host"] == "users:1"
    assert explained["service"] == "users"
    assert explained["endpoint"] == users.address
