"""`meshlib demo`: three real services on loopback, a canary policy, and a table
of where requests went compared with what the policy says."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from importlib import resources

from meshlib.config.load import parse_policy
from meshlib.demo.services import EchoApp, ServerThread
from meshlib.mesh import Mesh


def load_demo_policy(addresses: dict[str, str]) -> str:
    text = resources.files("meshlib.demo").joinpath("policy.yaml").read_text(encoding="utf-8")
    for name, address in addresses.items():
        text = text.replace("{" + name + "}", address)
    return text


def run_demo(requests: int = 400, seed: int = 7, out: Callable[[str], None] = print) -> int:
    """Start the services, send traffic through the mesh, print the table."""
    apps = {
        name: EchoApp(name)
        for name in ("users_v1", "users_v2", "orders", "inventory_a", "inventory_b")
    }
    apps["inventory_flaky"] = EchoApp("inventory_flaky", statuses=(503, 503, 503, 200))
    servers = {name: ServerThread(app).start() for name, app in apps.items()}
    try:
        text = load_demo_policy({name: server.address for name, server in servers.items()})
        mesh = Mesh(parse_policy(text, "demo/policy.yaml"), rng=random.Random(seed))
        out(f"meshlib demo: {len(servers)} service endpoints on loopback")
        for name, server in servers.items():
            out(f"  {name:<16} {server.address}")
        plain = Counter[str]()
        canary = Counter[str]()
        orders_paths = Counter[str]()
        header_requests = max(requests // 8, 10)
        with mesh, mesh.http_client(timeout=5) as client:
            for index in range(requests):
                plain[client.get(f"http://users/api/users/{index}").json()["server"]] += 1
            for index in range(header_requests):
                reply = client.get(f"http://users/api/users/{index}", headers={"x-canary": "1"})
                canary[reply.json()["server"]] += 1
            for index in range(10):
                orders_paths[client.get(f"http://orders/api/orders/{index}").json()["path"]] += 1
            inventory = Counter[int]()
            for index in range(requests // 2):
                inventory[client.get(f"http://inventory/items/{index}").status_code] += 1
        rows = [
            ("default (90/10 split)", "users_v1", 90.0, plain, requests),
            ("default (90/10 split)", "users_v2", 10.0, plain, requests),
            ("canary-by-header", "users_v2", 100.0, canary, header_requests),
            ("canary-by-header", "users_v1", 0.0, canary, header_requests),
        ]
        out("")
        out(f"{'route':<24}{'destination':<12}{'policy':>8}{'observed':>10}{'requests':>10}")
        for route, dest, expected, counts, total in rows:
            seen = 100.0 * counts[dest] / total
            out(f"{route:<24}{dest:<12}{expected:>7.1f}%{seen:>9.1f}%{counts[dest]:>10}")
        rewritten = ", ".join(sorted(orders_paths))[:60]
        out(f"{'api (prefix rewrite)':<24}{'orders':<12}  /api/ → /v2/: {rewritten}...")
        flaky = apps["inventory_flaky"]
        pattern = flaky.statuses
        failed = sum(1 for n in range(len(flaky.seen)) if pattern[n % len(pattern)] >= 500)
        guard = mesh.snapshot.clusters["inventory"].guard
        ejected = guard.unavailable() if guard is not None else frozenset()
        out("")
        out(
            f"resilience: inventory_flaky answered {len(flaky.seen)} requests, {failed} with 503; "
            f"callers got {dict(sorted(inventory.items()))} "
            f"({'ejected' if servers['inventory_flaky'].address in ejected else 'not ejected'})"
        )
        out("")
        out("explain GET http://users/api/users/1 with x-canary: 1 →")
        result = Mesh.explain(mesh, "GET", "http://users/api/users/1", {"x-canary": "1"})
        out(f"  {result['verdict']}")
        ok = (
            canary["users_v1"] == 0
            and plain["users_v1"] > plain["users_v2"] > 0
            and set(inventory) == {200}
        )
        out("")
        out("demo OK: traffic followed the policy" if ok else "demo FAILED: see the table")
        return 0 if ok else 1
    finally:
        for server in servers.values():
            server.stop()
