"""Prefix and host rewrites and request header actions reach the upstream."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from integration.support import CLIENT_TIMEOUT, Call, Driver, StartEcho, Upstream
from meshlib import Mesh

pytestmark = pytest.mark.integration


def policy(up: Upstream) -> dict[str, Any]:
    return {
        "services": {
            "users": {
                "endpoints": [{"address": up.address}],
                "routes": [
                    {
                        "name": "api",
                        "match": {"path": {"prefix": "/api/"}},
                        "rewrite": {"prefix": "/v2/"},
                        "request_headers": {
                            "set": {"x-set": "mesh", "X-Override": "mesh"},
                            "add": {"x-add": "mesh"},
                            "remove": ["x-secret"],
                        },
                    },
                    {
                        "name": "strip",
                        "match": {"path": {"prefix": "/strip/"}},
                        "rewrite": {"prefix": "/"},
                    },
                    {
                        "name": "host",
                        "match": {"path": {"prefix": "/host/"}},
                        "rewrite": {"host": "users.internal.example"},
                    },
                    {
                        "name": "both",
                        "match": {"path": {"prefix": "/legacy"}},
                        "rewrite": {"prefix": "/modern", "host": "modern.example"},
                    },
                    {"name": "plain", "match": {"path": {"prefix": "/"}}},
                ],
            }
        }
    }


def header_values(raw: list[list[str]], name: str) -> list[str]:
    return [value for key, value in raw if key.lower() == name]


def test_prefix_rewrite_reaches_upstream(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    calls = [
        Call("http://users/api/users/42"),
        Call("http://users/api/search?q=a%20b&page=2"),
        Call("http://users/strip/a/b"),
        Call("http://users/legacy/items"),
        Call("http://users/untouched/path?x=1"),
    ]
    with Mesh(policy(up), rng=random.Random(1)) as mesh:
        replies = driver.send(mesh, calls)

    seen = [(reply.echo["path"], reply.echo["query"]) for reply in replies]
    assert seen == [
        ("/v2/users/42", ""),
        ("/v2/search", "q=a%20b&page=2"),
        ("/a/b", ""),
        ("/modern/items", ""),
        ("/untouched/path", "x=1"),
    ]


def test_host_rewrite_reaches_upstream(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    calls = [
        Call("http://users/host/x"),
        Call("http://users/legacy"),
        Call("http://users/other"),
        Call("http://users:8080/host/x"),
    ]
    with Mesh(policy(up), rng=random.Random(1)) as mesh:
        replies = driver.send(mesh, calls)

    hosts = [header_values(reply.echo["raw_headers"], "host") for reply in replies]
    assert hosts == [
        ["users.internal.example"],
        ["modern.example"],
        ["users"],  # no rewrite: the logical name, as the caller wrote it
        ["users.internal.example"],
    ]
    assert replies[1].echo["path"] == "/modern"


def test_request_header_set_add_remove(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    sent = {
        "x-override": "client",
        "x-add": "client",
        "X-Secret": "hunter2",
        "x-keep": "kept",
    }
    with Mesh(policy(up), rng=random.Random(1)) as mesh:
        (api,) = driver.send(mesh, [Call("http://users/api/x", headers=sent)])
        (plain,) = driver.send(mesh, [Call("http://users/plain", headers=sent)])

    raw = api.echo["raw_headers"]
    assert header_values(raw, "x-set") == ["mesh"]
    assert header_values(raw, "x-override") == ["mesh"]  # set replaces the caller's value
    assert header_values(raw, "x-add") == ["client", "mesh"]  # add appends
    assert header_values(raw, "x-secret") == []  # remove is case-insensitive
    assert header_values(raw, "x-keep") == ["kept"]
    assert header_values(raw, "host") == ["users"]

    # a route without header actions passes the caller's headers as they are
    raw = plain.echo["raw_headers"]
    assert header_values(raw, "x-override") == ["client"]
    assert header_values(raw, "x-add") == ["client"]
    assert header_values(raw, "x-secret") == ["hunter2"]
    assert header_values(raw, "x-set") == []


def test_request_body_and_method_reach_upstream(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    body = b'{"name": "ada"}' * 100
    with Mesh(policy(up), rng=random.Random(1)) as mesh:
        (reply,) = driver.send(
            mesh,
            [Call("http://users/api/users", method="POST", content=body, headers={"x-a": "1"})],
        )
    assert reply.status == 200
    assert reply.echo["method"] == "POST"
    assert reply.echo["path"] == "/v2/users"
    assert reply.echo["body"] == body.decode()
    assert header_values(reply.echo["raw_headers"], "content-length") == [str(len(body))]


def test_prefix_rewrite_keeps_percent_encoding(echo: StartEcho, driver: Driver) -> None:
    (up,) = echo("users")
    with Mesh(policy(up), rng=random.Random(1)) as mesh:
        (reply,) = driver.send(mesh, [Call("http://users/api/a%2Fb%20c?x=%20y")])
    assert reply.echo["raw_path"] == "/v2/a%2Fb%20c"
    assert reply.echo["query"] == "x=%20y"


def test_streamed_request_body_reaches_upstream(echo: StartEcho) -> None:
    """A body of unknown length (a generator) is sent chunked, through either client."""
    (up,) = echo("users")
    chunks = [b"first,", b"second,", b"third"]

    def sync_body() -> Iterator[bytes]:
        yield from chunks

    async def async_body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async def send_async(mesh: Mesh) -> httpx.Response:
        async with mesh.async_http_client(timeout=CLIENT_TIMEOUT) as client:
            return await client.post("http://users/api/upload", content=async_body())

    with Mesh(policy(up), rng=random.Random(1)) as mesh:
        with mesh.http_client(timeout=CLIENT_TIMEOUT) as client:
            sync_reply = client.post("http://users/api/upload", content=sync_body())
        async_reply = asyncio.run(send_async(mesh))

    for reply in (sync_reply, async_reply):
        assert reply.status_code == 200
        seen = reply.json()
        assert seen["path"] == "/v2/upload"
        assert seen["body"] == "first,second,third"
        assert header_values(seen["raw_headers"], "transfer-encoding") == ["chunked"]
        assert header_values(seen["raw_headers"], "x-set") == ["mesh"]
