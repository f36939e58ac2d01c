"""Header, method and query matching pick the route; the first matching route wins.

Every route stamps ``x-route: <name>`` on the request, so the upstream tells
which route carried it.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from integration.support import Call, Driver, StartEcho, Upstream
from meshlib import Mesh

pytestmark = pytest.mark.integration


def route(name: str, match: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "match": match, "request_headers": {"set": {"x-route": name}}, **extra}


def policy(main: Upstream, canary: Upstream) -> dict[str, Any]:
    return {
        "services": {
            "users": {
                "endpoints": [
                    {"address": main.address, "labels": {"track": "main"}},
                    {"address": canary.address, "labels": {"track": "canary"}},
                ],
                "subsets": {"main": {"track": "main"}, "canary": {"track": "canary"}},
                "routes": [
                    route("exact", {"headers": {"x-exact": "yes"}}, to=[{"subset": "canary"}]),
                    route("prefix", {"headers": {"x-prefix": {"prefix": "beta-"}}}),
                    route("regex", {"headers": {"x-regex": {"regex": "v[0-9]+"}}}),
                    route("suffix", {"headers": {"x-suffix": {"suffix": ".internal"}}}),
                    route("present", {"headers": {"x-present": {"present": True}}}),
                    route(
                        "invert",
                        {
                            "path": {"prefix": "/invert"},
                            "headers": {"x-tenant": {"exact": "internal", "invert": True}},
                        },
                    ),
                    route(
                        "absent",
                        {"path": {"prefix": "/absent"}, "headers": {"x-debug": {"absent": True}}},
                    ),
                    route("method", {"path": {"prefix": "/method"}, "method": ["post", "PUT"]}),
                    route("query-regex", {"query": {"version": {"regex": r"2\..*"}}}),
                    route("query-exact", {"query": {"lang": "fr"}}),
                    route(
                        "query-and-header",
                        {"query": {"flag": {"present": True}}, "headers": {"x-flag": "on"}},
                    ),
                    route("default", {"path": {"prefix": "/"}}, to=[{"subset": "main"}]),
                ],
            }
        }
    }


CASES: list[tuple[str, Call, str]] = [
    # header exact: the value is case-sensitive, the name is not
    ("exact", Call("http://users/", headers={"x-exact": "yes"}), "exact"),
    ("exact-name-case", Call("http://users/", headers={"X-Exact": "yes"}), "exact"),
    ("exact-value-case", Call("http://users/", headers={"x-exact": "Yes"}), "default"),
    # first match wins: this request matches exact, prefix and regex
    (
        "first-wins",
        Call("http://users/", headers={"x-regex": "v2", "x-prefix": "beta-1", "x-exact": "yes"}),
        "exact",
    ),
    (
        "first-wins-2",
        Call("http://users/", headers={"x-regex": "v2", "x-prefix": "beta-1"}),
        "prefix",
    ),
    ("prefix", Call("http://users/", headers={"x-prefix": "beta-7"}), "prefix"),
    ("prefix-miss", Call("http://users/", headers={"x-prefix": "alpha-beta-7"}), "default"),
    # regex must match the whole value
    ("regex", Call("http://users/", headers={"x-regex": "v12"}), "regex"),
    ("regex-partial", Call("http://users/", headers={"x-regex": "v12-rc"}), "default"),
    ("suffix", Call("http://users/", headers={"x-suffix": "db.internal"}), "suffix"),
    ("present", Call("http://users/", headers={"x-present": "anything"}), "present"),
    ("present-empty", Call("http://users/", headers={"x-present": ""}), "present"),
    ("invert-other", Call("http://users/invert", headers={"x-tenant": "acme"}), "invert"),
    ("invert-equal", Call("http://users/invert", headers={"x-tenant": "internal"}), "default"),
    # documented: a missing value fails `exact`, so the inverted match accepts it
    ("invert-missing", Call("http://users/invert"), "invert"),
    ("absent", Call("http://users/absent"), "absent"),
    ("absent-but-present", Call("http://users/absent", headers={"x-debug": "1"}), "default"),
    ("method-post", Call("http://users/method", method="POST", content=b"{}"), "method"),
    ("method-put", Call("http://users/method", method="PUT", content=b"{}"), "method"),
    ("method-get", Call("http://users/method"), "default"),
    ("method-delete", Call("http://users/method", method="DELETE"), "default"),
    ("query-regex", Call("http://users/list?version=2.4&x=1"), "query-regex"),
    ("query-regex-miss", Call("http://users/list?version=12.4"), "default"),
    ("query-exact", Call("http://users/list?lang=fr"), "query-exact"),
    ("query-first-value", Call("http://users/list?lang=fr&lang=de"), "query-exact"),
    ("query-exact-miss", Call("http://users/list?lang=frr"), "default"),
    ("query-encoded", Call("http://users/list?version=2%2E0"), "query-regex"),
    ("query-and-header", Call("http://users/?flag", headers={"x-flag": "on"}), "query-and-header"),
    ("query-without-header", Call("http://users/?flag"), "default"),
    ("nothing", Call("http://users/some/where"), "default"),
]


def test_routes_match_headers_methods_and_query(echo: StartEcho, driver: Driver) -> None:
    main, canary = echo("main", "canary")
    with Mesh(policy(main, canary), rng=random.Random(1)) as mesh:
        replies = driver.send(mesh, [call for _, call, _ in CASES])

    by_label = dict(zip([label for label, _, _ in CASES], replies, strict=True))
    got = {label: reply.upstream_headers.get("x-route") for label, reply in by_label.items()}
    assert got == {label: expected for label, _, expected in CASES}
    assert all(reply.status == 200 for reply in replies)
    # a route's destination is used, not just its header actions
    assert by_label["exact"].server == "canary"
    assert by_label["nothing"].server == "main"


def test_explain_agrees_with_the_wire(echo: StartEcho) -> None:
    """explain() names the same route the real request took, for every case."""
    main, canary = echo("main", "canary")
    with Mesh(policy(main, canary), rng=random.Random(1)) as mesh:
        for label, call, expected in CASES:
            result = mesh.explain(call.method, call.url, headers=call.headers)
            assert result["route"] == expected, (label, result["routes"])
