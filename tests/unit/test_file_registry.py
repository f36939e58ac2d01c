"""The file registry: parse, watch, keep last good endpoints on a broken edit."""

from __future__ import annotations

from pathlib import Path

from meshlib.discovery import FileRegistry, Registry, Resolution, StaticRegistry
from meshlib.endpoint import Endpoint

GOOD = """\
services:
  users:
    - {address: 127.0.0.1:8001, priority: 0, locality: {zone: a}}
    - {address: 127.0.0.1:8002, priority: 1, healthy: false, weight: 3}
  orders:
    - {address: "[::1]:9000", labels: {version: v2}}
"""


def test_resolve_reads_every_field(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(GOOD)
    registry = FileRegistry(str(path), watch=False)
    try:
        assert isinstance(registry, Registry)
        users = registry.resolve("users")
        assert [ep.address for ep in users.endpoints] == ["127.0.0.1:8001", "127.0.0.1:8002"]
        assert users.endpoints[0].zone == "a"
        assert users.endpoints[1].priority == 1 and not users.endpoints[1].healthy
        assert users.endpoints[1].weight == 3
        assert registry.resolve("orders").endpoints[0].host == "::1"
        assert registry.resolve("orders").endpoints[0].labels == {"version": "v2"}
        assert registry.resolve("nobody").endpoints == ()
        assert registry.health().ok and not users.stale
    finally:
        registry.close()


def test_watchers_called_on_change_and_broken_edit_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(GOOD)
    registry = FileRegistry(str(path), watch=False)
    seen: list[Resolution] = []
    registry.watch("users", seen.append)
    try:
        path.write_text(GOOD.replace("8001", "8003"))
        registry.refresh()
        assert [ep.port for ep in seen[-1].endpoints] == [8003, 8002]
        count = len(seen)
        path.write_text(GOOD.replace("address: 127.0.0.1:8001", "adress: x"))
        registry.refresh()
        assert len(seen) == count + 1  # watchers learn the endpoints are now stale
        assert seen[-1].stale and [ep.port for ep in seen[-1].endpoints] == [8003, 8002]
        resolution = registry.resolve("users")
        assert [ep.port for ep in resolution.endpoints] == [8003, 8002]
        assert resolution.stale
        assert resolution.error is not None and f"{path}:3" in resolution.error
        health = registry.health()
        assert not health.ok and health.stale
        path.write_text(GOOD)
        registry.refresh()
        assert registry.health().ok
        assert not registry.resolve("users").stale
    finally:
        registry.close()


def test_missing_file_is_reported_not_raised(tmp_path: Path) -> None:
    registry = FileRegistry(str(tmp_path / "absent.yaml"), watch=False)
    try:
        assert registry.resolve("users").endpoints == ()
        health = registry.health()
        assert not health.ok and health.last_error is not None
        assert "cannot read" in health.last_error
    finally:
        registry.close()


def test_static_registry_notifies() -> None:
    registry = StaticRegistry({"users": (Endpoint("127.0.0.1", 1),)})
    seen: list[Resolution] = []
    unsubscribe = registry.watch("users", seen.append)
    registry.replace("users", (Endpoint("127.0.0.1", 2),))
    assert seen[-1].endpoints[0].port == 2
    unsubscribe()
    registry.replace("users", ())
    assert len(seen) == 1
