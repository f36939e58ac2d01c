"""The example policy at work, through the async client (``mesh.async_http_client()``).

Starts demo echo servers on loopback, loads examples/mesh.yaml with their
addresses substituted, and sends concurrent requests: the canary split, the
header route, sticky sessions, the path rewrite through ``mesh.async_transport()``
mounted in an ``httpx.AsyncClient`` of your own, and the file registry's
priority failover. On the wire the async client uses aiohttp; the caller sees
plain httpx.

Run from the repository root:  .venv/bin/python examples/client_async.py
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from loopback import async_wait_until, loopback, server_of, shares
from meshlib import Mesh


async def main() -> None:
    with loopback() as setup:
        async with Mesh.from_file(setup.policy, service="example-client") as mesh:
            async with mesh.async_http_client(timeout=5) as client:
                # Canary split, 200 requests at once: 90% subset v1, 10% subset v2.
                replies = await asyncio.gather(
                    *(client.get(f"http://users/api/users/{i}") for i in range(200))
                )
                counts = Counter(server_of(reply) for reply in replies)
                print(f"users, 200 concurrent requests (policy 90/10): {shares(counts, 200)}")

                # Header route: x-canary: 1 always goes to v2.
                replies = await asyncio.gather(
                    *(client.get("http://users/", headers={"x-canary": "1"}) for _ in range(20))
                )
                counts = Counter(server_of(reply) for reply in replies)
                print(f"users with x-canary: 1, 20 concurrent requests: {shares(counts, 20)}")

                # Ring hash: concurrent requests of one user all land on one endpoint.
                for user in ("alice", "bob", "carol", "dave"):
                    replies = await asyncio.gather(
                        *(
                            client.get("http://sessions/s", headers={"x-user-id": user})
                            for _ in range(10)
                        )
                    )
                    seen = sorted({server_of(reply) for reply in replies})
                    print(f"sessions for {user}, 10 concurrent requests → {', '.join(seen)}")

                # File registry and priority failover, as in client_sync.py: mark the two
                # priority-0 entries (the ones with a locality) unhealthy.
                async def on_standby() -> bool:
                    return server_of(await client.get("http://payments/")) == "payments-standby"

                good_endpoints = setup.endpoints.read_text(encoding="utf-8")
                setup.write_endpoints(
                    good_endpoints.replace("locality:", "healthy: false, locality:")
                )
                await async_wait_until(on_standby)
                print("payments failed over to payments-standby after a and b turned unhealthy")
                setup.write_endpoints(good_endpoints)

            # The transport mounted in a client of your own: base_url, default headers,
            # event hooks and so on are all httpx's. trust_env=False keeps proxy settings
            # from the environment from taking requests away from the mesh transport.
            async with httpx.AsyncClient(
                transport=mesh.async_transport(),
                trust_env=False,
                base_url="http://orders",
                headers={"x-debug": "1"},
                timeout=5,
            ) as orders:
                echo = (await orders.get("/api/orders/42")).json()
                print(
                    f"orders /api/orders/42 arrived as {echo['path']} with Host "
                    f"{echo['headers']['host']}, x-debug "
                    f"{'kept' if 'x-debug' in echo['headers'] else 'removed'}"
                )

            why = mesh.explain("GET", "http://sessions/s", headers={"x-user-id": "alice"})
            print(f"explain: {why['verdict']}")


if __name__ == "__main__":
    asyncio.run(main())
