"""Route matching, weighted split and rewrite: pure deciders, no sockets."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.config.compile import compile_snapshot, static_endpoints
from meshlib.config.load import policy_from_mapping
from meshlib.routing.decide import decide, find_route, pick_cluster, rewrite_target
from meshlib.routing.request import RequestView
from meshlib.snapshot import Snapshot


def snapshot_of(policy: dict[str, object]) -> Snapshot:
    config = policy_from_mapping(policy)
    endpoints = {name: static_endpoints(service) for name, service in config.services.items()}
    return compile_snapshot(config, endpoints, version=1, source="test")


def users(routes: list[dict[str, object]]) -> Snapshot:
    return snapshot_of(
        {
            "services": {
                "users": {
                    "endpoints": [
                        {"address": "127.0.0.1:1001", "labels": {"version": "v1"}},
                        {"address": "127.0.0.1:1002", "labels": {"version": "v2"}},
                    ],
                    "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
                    "routes": routes,
                },
                "orders": {"endpoints": [{"address": "127.0.0.1:2001"}]},
            }
        }
    )


def request(method: str = "GET", target: str = "/", **headers: str) -> RequestView:
    return RequestView.from_target(
        method, target, {k.replace("_", "-"): v for k, v in headers.items()}
    )


def route_name(snapshot: Snapshot, view: RequestView) -> str | None:
    route = find_route(snapshot.services["users"], view)
    return None if route is None else route.name


def test_first_match_wins_in_order() -> None:
    snap = users(
        [
            {"name": "a", "match": {"path": {"prefix": "/api/"}}},
            {"name": "b", "match": {"path": {"prefix": "/api/users"}}},
        ]
    )
    assert route_name(snap, request(target="/api/users/1")) == "a"


def test_path_kinds() -> None:
    snap = users(
        [
            {"name": "exact", "match": {"path": {"exact": "/health"}}},
            {"name": "regex", "match": {"path": {"regex": "/users/[0-9]+"}}},
            {"name": "prefix", "match": {"path": {"prefix": "/static/"}}},
        ]
    )
    assert route_name(snap, request(target="/health")) == "exact"
    assert route_name(snap, request(target="/health/x")) is None
    assert route_name(snap, request(target="/users/42?x=1")) == "regex"
    assert route_name(snap, request(target="/users/42/x")) is None  # regex is a full match
    assert route_name(snap, request(target="/static/a.css")) == "prefix"


def test_header_kinds_and_invert() -> None:
    snap = users(
        [
            {"name": "exact", "match": {"headers": {"X-Exact": "1"}}},
            {"name": "prefix", "match": {"headers": {"x-prefix": {"prefix": "ab"}}}},
            {"name": "suffix", "match": {"headers": {"x-suffix": {"suffix": "yz"}}}},
            {"name": "regex", "match": {"headers": {"x-regex": {"regex": "v[0-9]"}}}},
            {"name": "present", "match": {"headers": {"x-present": {"present": True}}}},
            {
                "name": "not-beta",
                "match": {
                    "headers": {
                        "x-tier": {"exact": "beta", "invert": True},
                        "x-absent": {"absent": True},
                    }
                },
            },
        ]
    )
    assert route_name(snap, request(x_exact="1")) == "exact"
    assert route_name(snap, request(x_prefix="abc")) == "prefix"
    assert route_name(snap, request(x_suffix="xyz")) == "suffix"
    assert route_name(snap, request(x_regex="v1")) == "regex"
    assert route_name(snap, request(x_present="")) == "present"
    assert route_name(snap, request(x_tier="gold")) == "not-beta"
    assert route_name(snap, request(x_tier="beta")) is None
    assert route_name(snap, request(x_tier="gold", x_absent="1")) is None


def test_method_and_query() -> None:
    snap = users(
        [
            {"name": "post", "match": {"method": ["post", "PUT"]}},
            {"name": "query", "match": {"query": {"debug": "1", "v": {"present": True}}}},
        ]
    )
    assert route_name(snap, request("POST")) == "post"
    assert route_name(snap, request("PUT")) == "post"
    assert route_name(snap, request(target="/?debug=1&v=")) == "query"
    assert route_name(snap, request(target="/?debug=2&v=1")) is None
    assert route_name(snap, request(target="/?debug=1")) is None


def test_mismatch_reasons_are_specific() -> None:
    snap = users([{"name": "canary", "match": {"headers": {"x-canary": "1"}, "method": "GET"}}])
    matcher = snap.services["users"].routes[0].matcher
    assert matcher.mismatch(request("POST")) == "method POST not in ['GET']"
    assert matcher.mismatch(request()) == "header x-canary is missing, wanted exact '1'"
    assert matcher.mismatch(request(x_canary="1")) is None


def test_prefix_rewrite_keeps_rest_and_query() -> None:
    snap = users([{"match": {"path": {"prefix": "/api/"}}, "rewrite": {"prefix": "/v2/"}}])
    route = snap.services["users"].routes[0]
    assert rewrite_target(route, request(target="/api/users/1?x=2")) == "/v2/users/1?x=2"
    snap = users([{"match": {"path": {"prefix": "/api"}}, "rewrite": {"prefix": ""}}])
    route = snap.services["users"].routes[0]
    assert rewrite_target(route, request(target="/api/users")) == "/users"


def test_decide_goes_to_subset_endpoint_and_other_service() -> None:
    snap = users([{"to": [{"subset": "v2"}]}])
    decision = decide(snap.services["users"], request(), random.Random(1))
    assert decision.cluster.name == "users/v2"
    assert decision.endpoint.address == "127.0.0.1:1002"
    snap = users([{"to": [{"service": "orders"}]}])
    decision = decide(snap.services["users"], request(), random.Random(1))
    assert decision.endpoint.address == "127.0.0.1:2001"


def test_service_without_routes_gets_a_catch_all() -> None:
    snap = users([])
    decision = decide(snap.services["users"], request(target="/anything"), random.Random(1))
    assert decision.route.name == "default"
    assert decision.cluster.name == "users"


@settings(max_examples=60, deadline=None)
@given(
    split=st.lists(st.integers(min_value=0, max_value=50), min_size=2, max_size=4).filter(
        lambda ws: sum(ws) > 0
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_shares_within_statistical_bounds(split: list[int], seed: int) -> None:
    services = {
        f"s{i}": {"endpoints": [{"address": f"127.0.0.1:{3000 + i}"}]} for i in range(len(split))
    }
    services["front"] = {
        "routes": [{"to": [{"service": f"s{i}", "weight": w} for i, w in enumerate(split)]}]
    }
    snap = snapshot_of({"services": services})
    action = snap.services["front"].routes[0].action
    rng = random.Random(seed)
    draws = 5000
    counts = Counter(pick_cluster(action.split, rng).name for _ in range(draws))
    total = sum(split)
    for i, weight in enumerate(split):
        share = weight / total
        expected = draws * share
        sigma = (draws * share * (1 - share)) ** 0.5
        assert abs(counts[f"s{i}"] - expected) <= 5 * sigma + 1, (split, counts)
        if weight == 0:
            assert counts[f"s{i}"] == 0
