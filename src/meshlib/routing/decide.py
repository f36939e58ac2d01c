"""The routing decision: route → weighted cluster → endpoint. Pure; RNG passed in."""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Container
from dataclasses import dataclass

from meshlib.balancing import Balancer, hash_key_from
from meshlib.endpoint import Endpoint
from meshlib.errors import NoHealthyEndpointError, NoRouteError
from meshlib.routing.request import RequestView
from meshlib.snapshot import Cluster, Route, VirtualService, WeightedSplit


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes and what is done to it on the way."""

    service: VirtualService
    route: Route
    cluster: Cluster
    endpoint: Endpoint
    target: str
    mirror: Cluster | None


def find_route(service: VirtualService, request: RequestView) -> Route | None:
    """First route whose matcher accepts the request."""
    for route in service.routes:
        if route.matcher.matches(request):
            return route
    return None


def pick_cluster(split: WeightedSplit, rng: random.Random) -> Cluster:
    if len(split.clusters) == 1:
        return split.clusters[0]
    return split.clusters[bisect_right(split.cumulative, rng.random() * split.total)]


def rewrite_target(route: Route, request: RequestView) -> str:
    """Request target after prefix rewrite (query kept)."""
    path = request.path
    replacement = route.action.prefix_rewrite
    if replacement is not None and route.match_prefix is not None:
        path = replacement + path[len(route.match_prefix) :]
        if not path.startswith("/"):
            path = "/" + path
    return f"{path}?{request.raw_query}" if request.raw_query else path


def pick_endpoint(
    cluster: Cluster, request: RequestView, rng: random.Random, avoid: Container[str] = ()
) -> Endpoint:
    key = None
    if cluster.hash_on is not None:
        key = hash_key_from(request.headers, request.headers.get("cookie"), cluster.hash_on)
    endpoint = cluster.balancer.pick(rng, key, avoid)
    if endpoint is None:
        raise NoHealthyEndpointError(
            f"cluster {cluster.name!r} has no endpoints: check the service's endpoints or "
            "its registry (`meshlib explain` shows what discovery returned)"
        )
    return endpoint


def pick_another(
    cluster: Cluster, request: RequestView, rng: random.Random, avoid: Container[str]
) -> Endpoint:
    """An endpoint for a retry or a hedge, avoiding the ones given when possible.

    Round robin would advance its schedule for these extra picks and shift the
    next callers onto the endpoint being avoided, so for it the pick is a
    weighted random draw over the same priority level instead. Other policies
    keep their own choice (ring hash walks the ring, preserving affinity).
    """
    if cluster.lb_policy == "round_robin":
        levels: tuple[tuple[int, Balancer], ...] = getattr(cluster.balancer, "levels", ())
        for _, level in levels:
            candidates = [ep for ep in level.endpoints if ep.address not in avoid]
            if candidates:
                chosen: Endpoint = rng.choices(candidates, [ep.weight for ep in candidates])[0]
                return chosen
    return pick_endpoint(cluster, request, rng, avoid)


def decide(
    service: VirtualService,
    request: RequestView,
    rng: random.Random,
    avoid: frozenset[str] = frozenset(),
) -> Decision:
    """Route, split and pick for one request; raises a MeshError when impossible."""
    route = find_route(service, request)
    if route is None:
        raise NoRouteError(
            f"no route of service {service.name!r} matches {request.method} {request.path}: "
            "add a catch-all route (match: {path: {prefix: /}}) or fix the request"
        )
    action = route.action
    cluster = pick_cluster(action.split, rng)
    guard = cluster.guard
    if guard is not None:  # ejected endpoints and open breakers, unless in panic
        unavailable = guard.unavailable()
        if unavailable:
            avoid = unavailable | avoid
    endpoint = pick_endpoint(cluster, request, rng, avoid)
    mirror = None
    if action.mirror is not None and rng.random() < action.mirror.fraction:
        mirror = action.mirror.cluster
    return Decision(service, route, cluster, endpoint, rewrite_target(route, request), mirror)
