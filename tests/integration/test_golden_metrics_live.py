"""Golden metrics and the service graph from real traffic: exact counts on both
sides of a call, success rates, and latency quantiles within the bucket error of
what the client measured itself."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from meshlib import Mesh
from meshlib.demo.services import EchoApp, ServerThread


def test_client_and_server_stats_and_graph_from_real_traffic() -> None:
    app = EchoApp("users")
    with Mesh({}, service="users") as server_mesh:
        server = ServerThread(server_mesh.asgi(app)).start()
        try:
            policy: dict[str, Any] = {
                "services": {
                    "users": {
                        "endpoints": [{"address": server.address}],
                        "routes": [
                            {"name": "api", "match": {"path": {"prefix": "/api/"}}},
                            {"name": "default"},
                        ],
                    }
                }
            }
            measured: list[float] = []
            with Mesh(policy, service="checkout") as mesh:
                with mesh.http_client() as client:
                    for path in ["/api/x"] * 30 + ["/other"] * 10:
                        started = time.perf_counter()
                        client.get(f"http://users{path}")
                        measured.append(time.perf_counter() - started)
                    app.status = 503
                    for _ in range(10):
                        client.get("http://users/api/y")
                    app.status = 200

                async def five() -> None:
                    async with mesh.async_http_client() as client:
                        for _ in range(5):
                            await client.get("http://users/other")

                asyncio.run(five())
                stats = mesh.stats()
                graph = mesh.graph()
                dot = mesh.graph("dot")
            server_stats = server_mesh.stats()
        finally:
            server.stop()
    users = stats["outbound"]["users"]
    assert stats["service"] == "checkout"
    assert users["routes"]["api"]["requests"] == 40
    assert users["routes"]["api"]["success_rate"] == 30 / 40
    assert users["routes"]["default"]["requests"] == 15
    assert users["routes"]["default"]["success_rate"] == 1.0
    assert users["total"]["requests"] == 55
    assert users["total"]["rps"] > 0
    # the server counted the same requests, under its service name
    inbound = server_stats["inbound"]["users"]["total"]
    assert inbound["requests"] == 55 and inbound["success_rate"] == 45 / 55
    # latency: the client-side p50 lies below what the caller measured around the call
    ordered = sorted(measured)
    outer_p50 = ordered[math.ceil(0.5 * len(ordered)) - 1] * 1000
    assert 0 < users["routes"]["api"]["p50_ms"] <= outer_p50 * 1.1
    edge = graph["edges"][0]  # type: ignore[index]
    assert (edge["source"], edge["destination"], edge["requests"]) == ("checkout", "users", 55)
    assert '"checkout" -> "users"' in dot
