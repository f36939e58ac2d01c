"""explain() and config_dump() on a live mesh agree with what the wire shows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from integration.support import Call, Driver, StartEcho, Upstream, line_of, write_atomic
from meshlib import ConfigError, Mesh

pytestmark = pytest.mark.integration


def policy_text(v1: Upstream, v2: Upstream, canary: str = '"1"') -> str:
    return f"""\
defaults:
  timeout: 2s
services:
  users:
    endpoints:
      - {{address: "{v1.address}", labels: {{version: v1}}, locality: {{zone: a}}}}
      - {{address: "{v2.address}", labels: {{version: v2}}, locality: {{zone: b}}}}
    subsets:
      v1: {{version: v1}}
      v2: {{version: v2}}
    routes:
      - name: canary-by-header
        match: {{headers: {{x-canary: {canary}}}}}
        to: [{{subset: v2}}]
      - name: post-only
        match: {{method: [POST], path: {{prefix: /api/}}}}
        rewrite: {{prefix: /v2/}}
        request_headers: {{set: {{x-from: mesh}}}}
        mirror: {{service: users, subset: v1, percent: 50}}
        to: [{{subset: v1}}]
      - name: default
        match: {{path: {{prefix: /}}}}
        to: [{{subset: v1, weight: 90}}, {{subset: v2, weight: 10}}]
"""


def test_explain_names_route_reasons_cluster_and_endpoint(
    echo: StartEcho, driver: Driver, tmp_path: Path
) -> None:
    v1, v2 = echo("v1", "v2")
    path = tmp_path / "mesh.yaml"
    path.write_text(policy_text(v1, v2))
    with Mesh.from_file(path, watch=False, rng=random.Random(1)) as mesh:
        canary = mesh.explain("GET", "http://users/api/x", headers={"X-Canary": "1"})
        post = mesh.explain("POST", "http://users/api/items?x=1")
        default = mesh.explain("GET", "http://users/api/x")
        outside = mesh.explain("GET", "http://example.com/")
        # what the wire does for the deterministic cases
        on_wire = driver.send(
            mesh,
            [
                Call("http://users/api/x", headers={"X-Canary": "1"}),
                Call("http://users/api/items?x=1", method="POST", content=b"{}"),
            ],
        )

    for result in (canary, post, default, outside):
        json.dumps(result)

    assert canary["service"] == "users"
    assert canary["route"] == "canary-by-header"
    assert canary["routes"] == [
        {
            "route": "canary-by-header",
            "index": 0,
            "match": "header x-canary exact '1'",
            "matched": True,
        }
    ]
    assert canary["cluster"] == "users/v2"
    assert [c["address"] for c in canary["candidates"]] == [v2.address]
    assert canary["endpoint"] == v2.address
    assert on_wire[0].server == "v2"
    assert (
        canary["verdict"]
        == f"route 'canary-by-header' → cluster 'users/v2' → endpoint {v2.address}"
    )
    assert canary["snapshot_version"] == mesh.snapshot.version
    assert canary["timeout"] == 2.0

    assert post["route"] == "post-only"
    assert post["routes"][0]["matched"] is False
    assert post["routes"][0]["why_not"] == "header x-canary is missing, wanted exact '1'"
    assert post["cluster"] == "users/v1"
    assert post["endpoint"] == v1.address
    assert post["upstream_target"] == "/v2/items?x=1"
    assert post["request_headers"] == {"set": {"x-from": "mesh"}, "add": {}, "remove": []}
    assert post["mirror"] == {"cluster": "users/v1", "percent": 50.0}
    assert on_wire[1].server == "v1"
    assert (on_wire[1].echo["path"], on_wire[1].echo["query"]) == ("/v2/items", "x=1")

    assert default["route"] == "default"
    assert [r["why_not"] for r in default["routes"][:2]] == [
        "header x-canary is missing, wanted exact '1'",
        "method GET not in ['POST']",
    ]
    assert default["routes"][2]["matched"] is True
    assert default["split"] == [
        {"cluster": "users/v1", "weight": 90, "share": 90.0},
        {"cluster": "users/v2", "weight": 10, "share": 10.0},
    ]
    assert default["cluster"] in {"users/v1", "users/v2"}
    chosen = {c["address"] for c in default["candidates"]}
    assert default["endpoint"] in chosen
    for candidate in default["candidates"]:
        assert candidate["eligible"] is True and candidate["healthy"] is True

    assert outside["service"] is None
    assert "not a mesh service" in outside["verdict"]


def test_config_dump_is_json_and_tracks_version_source_and_errors(
    echo: StartEcho, driver: Driver, tmp_path: Path
) -> None:
    v1, v2 = echo("v1", "v2")
    path = tmp_path / "mesh.yaml"
    path.write_text(policy_text(v1, v2))
    with Mesh.from_file(path, watch=False, service="checkout", rng=random.Random(1)) as mesh:
        driver.get(mesh, "http://users/", 3)
        dump = json.loads(json.dumps(mesh.config_dump()))
        assert dump["version"] == mesh.snapshot.version
        assert dump["source"] == str(path)
        assert dump["service"] == "checkout"
        assert dump["last_error"] is None
        assert set(dump["clusters"]) == {"users", "users/v1", "users/v2"}
        assert [ep["address"] for ep in dump["clusters"]["users"]["endpoints"]] == [
            v1.address,
            v2.address,
        ]
        assert [r["name"] for r in dump["routes"]["users"]] == [
            "canary-by-header",
            "post-only",
            "default",
        ]
        assert dump["routes"]["users"][2]["to"] == {"users/v1": 90, "users/v2": 10}
        assert dump["discovery"]["users"] == {"registry": "static", "endpoints": 2}
        version = dump["version"]

        # a broken edit: rejected, reported with file, line and path, old policy kept
        broken = policy_text(v1, v2, canary='{regex: "[unclosed"}')
        write_atomic(path, broken)
        assert mesh.reload() is True
        dump = json.loads(json.dumps(mesh.config_dump()))
        assert dump["version"] == version
        (issue,) = dump["last_error"]["issues"]
        assert issue["file"] == str(path)
        assert issue["line"] == line_of(broken, "[unclosed")
        assert issue["path"] == "services.users.routes[0].match.headers.x-canary.regex"
        assert "invalid regex" in issue["message"]
        replies = driver.get(mesh, "http://users/", 3, headers={"x-canary": "1"})
        assert [r.server for r in replies] == ["v2"] * 3

        # Mesh.update with a bad mapping raises and is recorded the same way
        with pytest.raises(ConfigError):
            mesh.update({"services": {"users": {"endpointz": []}}})
        dump = mesh.config_dump()
        assert dump["version"] == version
        assert dump["last_error"]["issues"][0]["path"] == "services.users.endpointz"

        # the next good edit applies and clears the error
        write_atomic(path, policy_text(v1, v2, canary='"yes"'))
        assert mesh.reload() is True
        dump = json.loads(json.dumps(mesh.config_dump()))
        assert dump["version"] > version
        assert dump["last_error"] is None
        replies = driver.get(mesh, "http://users/", 3, headers={"x-canary": "yes"})
        assert [r.server for r in replies] == ["v2"] * 3
