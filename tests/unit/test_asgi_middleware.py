"""The inbound ASGI middleware driven directly with ASGI messages (no sockets)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from meshlib import Mesh

Message = dict[str, Any]


class App:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(app: Any, path: str = "/", headers: dict[str, str] | None = None) -> list[Message]:
    sent: list[Message] = []
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 5000),
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def status(sent: list[Message]) -> int:
    return int(sent[0]["status"])


def mesh_with(inbound: dict[str, Any], **service: Any) -> Mesh:
    policy = {
        "services": {
            "users": {"endpoints": [{"address": "127.0.0.1:1"}], "inbound": inbound, **service}
        }
    }
    return Mesh(policy, rng=random.Random(3))


def test_expired_deadline_is_not_started_and_slow_app_is_cut_off() -> None:
    app = App(delay=1.0)
    with mesh_with({}) as mesh:
        wrapped = mesh.asgi(app, service="users")
        assert status(call(wrapped, headers={"x-mesh-timeout-ms": "0"})) == 504
        assert app.calls == 0
        assert status(call(wrapped, headers={"x-mesh-timeout-ms": "30"})) == 504
        assert app.calls == 1
        app.delay = 0
        assert status(call(wrapped, headers={"x-mesh-timeout-ms": "5000"})) == 200


def test_rate_limit_per_caller_with_retry_after() -> None:
    app = App()
    inbound = {"rate_limit": {"requests_per_second": 0.5, "burst": 2, "per_caller": True}}
    with mesh_with(inbound) as mesh:
        wrapped = mesh.asgi(app, service="users")
        alice = {"x-mesh-caller": "alice"}
        assert [status(call(wrapped, headers=alice)) for _ in range(3)] == [200, 200, 429]
        limited = call(wrapped, headers=alice)
        assert dict(limited[0]["headers"])[b"retry-after"] in {b"1", b"2"}
        assert status(call(wrapped, headers={"x-mesh-caller": "bob"})) == 200


def test_route_rules_and_header_gated_faults() -> None:
    app = App()
    inbound = {
        "routes": [
            {"path_prefix": "/admin", "rate_limit": {"requests_per_second": 0.1, "burst": 1}},
            {
                "path_prefix": "/chaos",
                "faults": {"abort": {"status": 503}, "when_header": {"x-chaos": "1"}},
            },
        ]
    }
    with mesh_with(inbound) as mesh:
        wrapped = mesh.asgi(app, service="users")
        assert [status(call(wrapped, "/admin/x")) for _ in range(2)] == [200, 429]
        assert status(call(wrapped, "/other")) == 200
        assert status(call(wrapped, "/chaos")) == 200
        assert status(call(wrapped, "/chaos", {"x-chaos": "1"})) == 503
    with mesh_with(inbound, faults="off") as mesh:
        assert status(call(mesh.asgi(app, service="users"), "/chaos", {"x-chaos": "1"})) == 200
