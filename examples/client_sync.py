"""The example policy at work, through the sync client (``mesh.http_client()``).

Starts demo echo servers on loopback, loads examples/mesh.yaml with their
addresses substituted, and shows each feature of the policy in turn: the
canary split, the header route, mirroring, the path rewrite, sticky sessions,
the file registry with priority failover, pass-through, explain, hot reload
of the policy (a good edit and a broken one) and config_dump.

Run from the repository root:  .venv/bin/python examples/client_sync.py
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from loopback import loopback, server_of, shares, wait_until
from meshlib import Mesh


def main() -> None:
    logging.basicConfig(format="log: %(levelname)s %(name)s: %(message)s")
    with (
        loopback() as setup,
        Mesh.from_file(setup.policy, service="example-client") as mesh,
        mesh.http_client(timeout=5) as client,
    ):
        print(f"policy {mesh.snapshot.source} in force as snapshot v{mesh.snapshot.version}\n")

        # 1. Canary split: route `default` sends 90% to subset v1 (two endpoints) and
        #    10% to subset v2.
        counts = Counter(server_of(client.get(f"http://users/api/users/{i}")) for i in range(200))
        print(f"users, 200 requests (policy 90% v1 / 10% v2): {shares(counts, 200)}")

        # 2. Header route: `x-canary: 1` matches route `canary-by-header` first.
        canary = Counter(
            server_of(client.get("http://users/api/users/1", headers={"x-canary": "1"}))
            for _ in range(20)
        )
        print(f"users with x-canary: 1, 20 requests: {shares(canary, 20)}")

        # 3. Mirror: ~20% of the default route's requests were also copied to users-next;
        #    the copies are sent in the background and their answers discarded.
        time.sleep(0.5)
        mirrored = setup.apps["users-next"].seen
        print(f"users-next got {len(mirrored)} mirrored copies of 200 (policy 20%), ", end="")
        print(f"Host {mirrored[0]['headers']['host']!r}" if mirrored else "")

        # 4. Rewrite: /api/ becomes /v2/, Host becomes orders.internal, headers edited.
        echo = client.get("http://orders/api/orders/42?expand=1", headers={"x-debug": "1"}).json()
        headers = echo["headers"]
        print(
            f"orders GET /api/orders/42?expand=1 arrived as {echo['path']}?{echo['query']}, "
            f"Host {headers['host']}, x-api-version {headers.get('x-api-version')}, "
            f"x-debug {'kept' if 'x-debug' in headers else 'removed'}"
        )

        # 5. Ring hash on x-user-id: each user sticks to one endpoint.
        sticky = {}
        for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
            seen = {
                server_of(client.get("http://sessions/session", headers={"x-user-id": user}))
                for _ in range(5)
            }
            sticky[user] = "/".join(sorted(seen))
        print(f"sessions, 5 requests per user: {sticky}")

        # 6. File registry: payments' endpoints come from endpoints.yaml (weights 3:1,
        #    a standby at priority 1). Smooth weighted round robin gives exactly 3:1.
        counts = Counter(server_of(client.get("http://payments/charge")) for _ in range(40))
        print(f"payments, 40 requests (weights 3:1): {shares(counts, 40)}")

        #    A deploy script marks both priority-0 endpoints (the entries with a
        #    locality) unhealthy: the file is reloaded and traffic fails over to
        #    the priority-1 standby.
        good_endpoints = setup.endpoints.read_text(encoding="utf-8")
        setup.write_endpoints(good_endpoints.replace("locality:", "healthy: false, locality:"))
        wait_until(lambda: server_of(client.get("http://payments/charge")) == "payments-standby")
        counts = Counter(server_of(client.get("http://payments/charge")) for _ in range(10))
        print(f"payments after marking a and b unhealthy: {shares(counts, 10)}")
        setup.write_endpoints(good_endpoints)
        wait_until(lambda: server_of(client.get("http://payments/charge")) != "payments-standby")

        # 7. Hosts that are not mesh services pass through untouched.
        direct = client.get(f"http://{setup.addresses['127.0.0.1:8101']}/direct").json()
        print(f"a plain address (not a mesh name) passed through to {direct['server']}")

        # 8. explain: why a request goes where it goes, without sending it.
        why = mesh.explain("GET", "http://users/api/users/42", headers={"x-canary": "1"})
        print(f"\nexplain: {why['verdict']}")

        # 9. Hot reload: edit the policy file; the watcher validates it and swaps it in.
        policy = setup.policy.read_text(encoding="utf-8")
        setup.policy.write_text(
            policy.replace("weight: 90}", "weight: 50}").replace("weight: 10}", "weight: 50}"),
            encoding="utf-8",
        )
        wait_until(lambda: mesh.config_dump()["routes"]["users"][1]["to"]["users/v2"] == 50)
        counts = Counter(server_of(client.get(f"http://users/api/users/{i}")) for i in range(200))
        print(f"after editing the split to 50/50 (v{mesh.snapshot.version}): {shares(counts, 200)}")

        #    A broken edit is rejected as a whole; the last good policy stays in force.
        version = mesh.snapshot.version
        setup.policy.write_text(policy.replace("timeout: 1s", "timeout: 1"), encoding="utf-8")
        wait_until(lambda: mesh.last_error is not None)
        print(f"a broken edit was rejected: {mesh.last_error}")
        assert mesh.snapshot.version == version
        print(f"still v{version}; users answers: {server_of(client.get('http://users/'))}")

        # 10. config_dump: everything in force, as JSON-ready data.
        dump = mesh.config_dump()
        print(f"\nconfig_dump: version {dump['version']}, source {dump['source']}")
        print(f"  clusters: {', '.join(dump['clusters'])}")
        print(f"  discovery of payments: {dump['discovery']['payments']}")
        print(f"  not enforced: {dump['not_enforced'] or 'nothing'}")
        print(f"  last error: {dump['last_error']['issues'] if dump['last_error'] else None}")


if __name__ == "__main__":
    main()
