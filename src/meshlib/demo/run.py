"""`meshlib demo`: three real services on loopback, a canary policy, and a table
of where requests went compared with what the policy says."""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from collections.abc import Callable
from importlib import resources
from typing import Any

from meshlib.config.load import parse_policy
from meshlib.demo.services import EchoApp, ServerThread
from meshlib.mesh import Mesh

log = logging.getLogger("meshlib.demo")


def load_demo_policy(addresses: dict[str, str]) -> str:
    text = resources.files("meshlib.demo").joinpath("policy.yaml").read_text(encoding="utf-8")
    for name, address in addresses.items():
        text = text.replace("{" + name + "}", address)
    return text


def run_demo(
    requests: int = 400,
    seed: int = 7,
    out: Callable[[str], None] = print,
    *,
    serve: bool = False,
    admin_port: int = 0,
    until: threading.Event | None = None,
) -> int:
    """Start the services, send traffic through the mesh, print the tables.

    With ``serve``, keep running afterwards with the admin endpoint up (on
    ``admin_port``) and a trickle of traffic, until ``until`` is set or Ctrl-C.
    """
    apps = {
        name: EchoApp(name)
        for name in ("users_v1", "users_v2", "orders", "inventory_a", "inventory_b")
    }
    apps["inventory_flaky"] = EchoApp("inventory_flaky", statuses=(503, 503, 503, 200))
    servers = {name: ServerThread(app).start() for name, app in apps.items()}
    mesh: Mesh | None = None
    try:
        text = load_demo_policy({name: server.address for name, server in servers.items()})
        mesh = Mesh(
            parse_policy(text, "demo/policy.yaml"), service="demo-client", rng=random.Random(seed)
        )
        out(f"meshlib demo: {len(servers)} service endpoints on loopback")
        for name, server in servers.items():
            out(f"  {name:<16} {server.address}")
        plain = Counter[str]()
        canary = Counter[str]()
        orders_paths = Counter[str]()
        header_requests = max(requests // 8, 10)
        with mesh.http_client(timeout=5) as client:
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
        out("")
        out(golden_table(mesh.stats()))
        if serve:
            keep_serving(mesh, admin_port, out, until or threading.Event())
        ok = (
            canary["users_v1"] == 0
            and plain["users_v1"] > plain["users_v2"] > 0
            and set(inventory) == {200}
        )
        out("")
        out("demo OK: traffic followed the policy" if ok else "demo FAILED: see the table")
        return 0 if ok else 1
    finally:
        if mesh is not None:
            mesh.close()
        for server in servers.values():
            server.stop()


def golden_table(stats: dict[str, Any]) -> str:
    """The client's golden metrics per destination and route, as a text table."""
    lines = [
        "golden metrics, last minute, client side (mesh.stats()):",
        f"{'service':<12}{'route':<20}{'requests':>9}{'rps':>9}{'success':>9}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}",
    ]
    for service, entry in stats["outbound"].items():
        for route, row in entry["routes"].items():
            success = row["success_rate"]
            cells = [_ms(row[key]) for key in ("p50_ms", "p95_ms", "p99_ms")]
            lines.append(
                f"{service:<12}{route:<20}{row['requests']:>9}{row['rps']:>9.1f}"
                f"{'-' if success is None else f'{success * 100:.1f}%':>9}"
                + "".join(f"{cell:>9}" for cell in cells)
            )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def keep_serving(
    mesh: Mesh, admin_port: int, out: Callable[[str], None], until: threading.Event
) -> None:
    """The admin endpoint and ~20 requests/s through the mesh until ``until`` is set
    (or Ctrl-C), so that `meshlib top`, `tap` and `graph` have something to show."""
    admin = mesh.start_admin(port=admin_port)
    out("")
    out(f"admin endpoint: {admin.url}  (Ctrl-C to stop)")
    out(f"  meshlib top --admin {admin.url}")
    out(f"  meshlib tap --admin {admin.url} --service users")
    out(f"  meshlib graph --admin {admin.url} --format dot")
    paths = ["http://users/api/users/1", "http://orders/api/orders/1", "http://inventory/items/1"]
    try:
        with mesh.http_client(timeout=5) as client:
            index = 0
            while not until.wait(0.05):
                try:
                    client.get(paths[index % len(paths)])
                except Exception as exc:  # keep the demo alive; the table shows failures
                    log.debug("demo request failed: %s", exc)
                index += 1
    except KeyboardInterrupt:
        out("stopped")
