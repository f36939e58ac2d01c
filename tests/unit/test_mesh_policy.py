"""Mesh-level policy handling without traffic: reload, errors kept, dump, explain, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from meshlib import ConfigError, Mesh
from meshlib.cli import main

POLICY = """\
defaults:
  timeout: 2s
  retries: {attempts: 3}
services:
  users:
    endpoints:
      - {address: 127.0.0.1:8001, labels: {version: v1}}
      - {address: 127.0.0.1:8002, labels: {version: v2}, priority: 1}
    subsets: {v1: {version: v1}, v2: {version: v2}}
    load_balancer: {policy: ring_hash, hash_on: {header: x-user}}
    circuit_breaker: {consecutive_failures: 5}
    routes:
      - name: canary
        match: {headers: {x-canary: "1"}}
        to: [{subset: v2}]
      - name: default
        match: {path: {prefix: /api/}}
        rewrite: {prefix: /v1/}
        to: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]
        mirror: {subset: v2, percent: 5}
    inbound: {mtls: permissive, authz: [{name: allow-all, action: ALLOW, rules: [{}]}]}
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(POLICY)
    return path


def test_from_file_then_broken_edit_keeps_last_good(policy_file: Path) -> None:
    with Mesh.from_file(policy_file, watch=False) as mesh:
        first = mesh.snapshot
        policy_file.write_text(POLICY.replace("subsets:", "subset:"))
        assert mesh.reload()
        assert mesh.snapshot is first  # still in force
        assert mesh.last_error is not None
        issue = mesh.last_error.issues[0]
        assert (issue.file, issue.line, issue.path) == (
            str(policy_file),
            9,
            "services.users.subset",
        )
        dumped = mesh.config_dump()["last_error"]
        assert dumped["issues"][0]["line"] == 9
        policy_file.write_text(POLICY.replace("weight: 90", "weight: 80"))
        assert mesh.reload()
        assert mesh.snapshot.version == first.version + 1
        assert mesh.last_error is None


def test_update_rejects_and_keeps(policy_file: Path) -> None:
    with Mesh.from_file(policy_file, watch=False) as mesh:
        before = mesh.snapshot
        with pytest.raises(ConfigError):
            mesh.update({"services": {"users": {"endpoints": [{"address": "nope"}]}}})
        assert mesh.snapshot is before
        assert mesh.last_error is not None
        mesh.update({"services": {"users": {"endpoints": [{"address": "127.0.0.1:9"}]}}})
        assert mesh.snapshot.version == before.version + 1
        assert mesh.last_error is None


def test_config_dump_is_json_and_reports_not_enforced(policy_file: Path) -> None:
    with Mesh.from_file(policy_file, watch=False) as mesh:
        dump = mesh.config_dump()
        json.dumps(dump)
        assert dump["version"] == 1
        assert dump["source"] == str(policy_file)
        assert dump["last_error"] is None
        assert dump["not_enforced"] == []  # every field of this release is enforced
        assert dump["clusters"]["users/v1"]["load_balancer"] == "ring_hash"
        assert dump["routes"]["users"][1]["to"] == {"users/v1": 90, "users/v2": 10}
        assert dump["policy"]["defaults"]["timeout"] == "2s"


def test_explain_names_route_reasons_and_endpoint(policy_file: Path) -> None:
    with Mesh.from_file(policy_file, watch=False, rng=random.Random(3)) as mesh:
        result = mesh.explain("get", "http://users/api/users/1", {"X-User": "alice"})
        assert result["route"] == "default"
        assert result["routes"][0]["why_not"] == "header x-canary is missing, wanted exact '1'"
        assert result["cluster"] in {"users/v1", "users/v2"}
        assert result["upstream_target"] == "/v1/users/1"
        assert result["mirror"] == {"cluster": "users/v2", "percent": 5.0}
        assert result["timeout"] == 2.0
        assert result["endpoint"] in {c["address"] for c in result["candidates"]}
        assert result["not_enforced"] == []
        json.dumps(result)
        assert mesh.explain("GET", "http://example.com/")["service"] is None


def test_cli_check_ok_prints_summary(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(policy_file)]) == 0
    out = capsys.readouterr().out
    assert "service users: 2 endpoint(s), lb ring_hash" in out
    assert "route default: path prefix '/api/' → users/v1 90%, users/v2 10%" in out
    assert "rewrite /api/ → /v1/" in out and "mirror users/v2 5%" in out
    assert "no effect yet" not in out


def test_cli_check_bad_file_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        POLICY.replace("weight: 90", "weight: -1").replace("x-canary", "x canary") + "oops: 1\n"
    )
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:19: services.users.routes[1].to[0].weight:" in err
    assert f"{bad}:22: oops: unknown key 'oops'" in err


def test_cli_explain(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["explain", str(policy_file), "GET", "http://users/x", "-H", "x-canary: 1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "✓ route canary" in out
    assert "cluster  users/v2" in out
    assert main(["explain", str(policy_file), "GET", "http://users/x", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"].startswith("no route matched")
    assert result["routes"][1]["why_not"] == "path '/x' is not prefix '/api/'"


def test_endpoint_loads_survive_swaps(policy_file: Path) -> None:
    import yaml

    with Mesh.from_file(policy_file, watch=False) as mesh:
        endpoint = mesh.snapshot.clusters["users"].endpoints[0]
        endpoint.load.inflight += 3
        mesh.update(yaml.safe_load(POLICY.replace("weight: 90", "weight: 70")))
        assert mesh.snapshot.version == 2
        assert mesh.snapshot.clusters["users"].endpoints[0].load.inflight == 3


def test_cli_check_reports_broken_endpoints_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "mesh.yaml"
    policy.write_text("services:\n  pay:\n    discovery: {registry: file, path: eps.yaml}\n")
    assert main(["check", str(policy)]) == 1
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "eps.yaml").write_text("services:\n  pay:\n    - {address: 127.0.0.1:1}\n")
    assert main(["check", str(policy)]) == 0  # relative to the policy file, not the cwd
    assert "service pay: 1 endpoint(s)" in capsys.readouterr().out


def test_unknown_registry_and_custom_registry() -> None:
    from meshlib.discovery import StaticRegistry
    from meshlib.endpoint import Endpoint

    policy = {"services": {"pay": {"discovery": {"registry": "inventory"}}}}
    with pytest.raises(ConfigError) as caught:
        Mesh(policy)
    assert caught.value.issues[0].path == "services.pay.discovery.registry"
    registry = StaticRegistry({"pay": (Endpoint("127.0.0.1", 4000),)})
    with Mesh(policy, registries={"inventory": registry}) as mesh:
        assert mesh.snapshot.clusters["pay"].endpoints[0].port == 4000
        registry.replace("pay", (Endpoint("127.0.0.1", 4001),))
        assert mesh.snapshot.clusters["pay"].endpoints[0].port == 4001
        assert mesh.snapshot.version == 2


def test_https_to_a_mesh_name_is_a_clear_error() -> None:
    from meshlib import MeshError

    mesh = Mesh({"services": {"users": {"endpoints": [{"address": "127.0.0.1:9"}]}}})
    with mesh, mesh.http_client() as client, pytest.raises(MeshError, match="http://"):
        client.get("https://users/")
