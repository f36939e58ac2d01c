"""mesh.asgi tells the app which attempt of its caller a request is."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshlib import Mesh


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, 1), ("2", 2), ("7", 7), ("0", 1), ("two", 1), ("-3", 1)],
)
def test_attempt_number_from_x_mesh_attempt(header: str | None, expected: int) -> None:
    seen: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["extensions"]["mesh"]["attempt"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    headers = [] if header is None else [(b"x-mesh-attempt", header.encode())]
    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        return None

    with Mesh({"services": {"users": {}}}) as mesh:
        asyncio.run(mesh.asgi(app, "users")(scope, receive, send))
    assert seen == [expected]
