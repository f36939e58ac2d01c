"""Priority failover with endpoints from the file registry: traffic leaves priority
0 when its endpoints turn unhealthy or disappear, and comes back when they return."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from integration.support import Driver, StartEcho, Upstream, servers_of, wait_until, write_atomic
from meshlib import Mesh

pytestmark = pytest.mark.integration


def endpoints_file(*entries: tuple[Upstream, int, bool]) -> str:
    return yaml.safe_dump(
        {
            "services": {
                "users": [
                    {"address": up.address, "priority": priority, "healthy": healthy}
                    for up, priority, healthy in entries
                ]
            }
        }
    )


def change_endpoints(mesh: Mesh, path: Path, text: str) -> None:
    """Rewrite the endpoints file and wait (bounded) for the snapshot to pick it up."""
    before = mesh.snapshot.version
    write_atomic(path, text)
    wait_until(lambda: mesh.snapshot.version > before, "the endpoints change to take effect")


def test_traffic_fails_over_by_priority_and_back(
    echo: StartEcho, driver: Driver, tmp_path: Path
) -> None:
    p0a, p0b, p1 = echo("p0-a", "p0-b", "p1")
    path = tmp_path / "endpoints.yaml"
    path.write_text(endpoints_file((p0a, 0, True), (p0b, 0, True), (p1, 1, True)))
    policy = {"services": {"users": {"discovery": {"registry": "file", "path": str(path)}}}}

    def spread(count: int = 20) -> dict[str | None, int]:
        replies = driver.get(mesh, "http://users/", count)
        assert all(reply.status == 200 for reply in replies)
        return servers_of(replies)

    with Mesh(policy, rng=random.Random(1)) as mesh:
        # priority 0 takes everything while it is healthy (round robin over both)
        assert spread() == {"p0-a": 10, "p0-b": 10}

        # one priority-0 endpoint unhealthy: the rest of priority 0 still takes it all
        change_endpoints(mesh, path, endpoints_file((p0a, 0, False), (p0b, 0, True), (p1, 1, True)))
        assert spread() == {"p0-b": 20}

        # every priority-0 endpoint unhealthy: priority 1 takes over
        change_endpoints(
            mesh, path, endpoints_file((p0a, 0, False), (p0b, 0, False), (p1, 1, True))
        )
        assert spread() == {"p1": 20}
        candidates = mesh.explain("GET", "http://users/")["candidates"]
        assert {c["address"]: (c["healthy"], c["eligible"]) for c in candidates} == {
            p0a.address: (False, False),
            p0b.address: (False, False),
            p1.address: (True, True),
        }

        # nothing healthy at all: panic mode ignores health and keeps the priority order
        change_endpoints(
            mesh, path, endpoints_file((p0a, 0, False), (p0b, 0, False), (p1, 1, False))
        )
        assert spread() == {"p0-a": 10, "p0-b": 10}

        # healthy again: back to priority 0
        change_endpoints(mesh, path, endpoints_file((p0a, 0, True), (p0b, 0, True), (p1, 1, True)))
        assert spread() == {"p0-a": 10, "p0-b": 10}

        # priority-0 endpoints removed from the file: priority 1 takes over
        change_endpoints(mesh, path, endpoints_file((p1, 1, True)))
        assert spread() == {"p1": 20}

        # and they come back
        change_endpoints(mesh, path, endpoints_file((p0a, 0, True), (p1, 1, True)))
        assert spread() == {"p0-a": 20}

        dump = mesh.config_dump()
        assert dump["discovery"]["users"]["registry"] == "file"
        assert dump["discovery"]["users"]["endpoints"] == 2
        assert dump["registries"][f"file:{path}"]["ok"] is True


def test_broken_endpoints_file_keeps_the_last_good_endpoints(
    echo: StartEcho, driver: Driver, tmp_path: Path
) -> None:
    p0, p1 = echo("p0", "p1")
    path = tmp_path / "endpoints.yaml"
    path.write_text(endpoints_file((p0, 0, True), (p1, 1, True)))
    policy = {"services": {"users": {"discovery": {"registry": "file", "path": str(path)}}}}
    with Mesh(policy, rng=random.Random(1)) as mesh:
        assert servers_of(driver.get(mesh, "http://users/", 5)) == {"p0": 5}
        write_atomic(path, "services:\n  users:\n    - {address: nowhere, priority: 0}\n")
        key = f"file:{path}"
        wait_until(
            lambda: mesh.config_dump()["registries"][key]["last_error"] is not None,
            "the registry to reject the broken file",
        )
        health = mesh.config_dump()["registries"][key]
        assert health["stale"] is True
        assert str(path) in health["last_error"]
        assert "services.users[0].address" in health["last_error"]
        # the last good endpoints keep serving
        assert servers_of(driver.get(mesh, "http://users/", 5)) == {"p0": 5}

        change_endpoints(mesh, path, endpoints_file((p0, 0, False), (p1, 1, True)))
        assert servers_of(driver.get(mesh, "http://users/", 5)) == {"p1": 5}
        assert mesh.config_dump()["registries"][key]["ok"] is True
