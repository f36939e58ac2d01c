"""Compile a validated MeshConfig plus discovered endpoints into a frozen Snapshot."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping
from dataclasses import replace
from itertools import accumulate
from pathlib import Path
from types import MappingProxyType
from typing import Any

from meshlib.balancing import make_balancer
from meshlib.config.compile_resilience import (
    first_set,
    inbound_policy,
    route_policy,
    service_guard,
)
from meshlib.config.compile_security import inbound_security
from meshlib.config.model import (
    Destination,
    LoadBalancerConfig,
    MeshConfig,
    RouteConfig,
    ServiceConfig,
    ValueMatch,
)
from meshlib.endpoint import Endpoint, EndpointLoad, parse_address
from meshlib.resilience.fastlane import lane_for
from meshlib.resilience.guard import ServiceGuard
from meshlib.resilience.inbound import InboundPolicy
from meshlib.resilience.policy import NO_POLICY, RoutePolicy
from meshlib.resilience.state import StateTable
from meshlib.routing.match import RouteMatcher, ValueMatcher
from meshlib.snapshot import (
    Cluster,
    HeaderOps,
    MirrorAction,
    Route,
    RouteAction,
    Snapshot,
    VirtualService,
    WeightedSplit,
)

# Inbound policy parts accepted now and enforced by the security release.
_PENDING_INBOUND: tuple[str, ...] = ()


class LoadTable:
    """Per-address load counters that survive snapshot swaps."""

    def __init__(self) -> None:
        self._loads: dict[str, EndpointLoad] = {}

    def bind(self, endpoint: Endpoint) -> Endpoint:
        load = self._loads.get(endpoint.address)
        if load is None:
            load = self._loads[endpoint.address] = endpoint.load
        return endpoint if endpoint.load is load else replace(endpoint, load=load)


def static_endpoints(service: ServiceConfig) -> tuple[Endpoint, ...]:
    """The endpoints listed inline in a service's policy."""
    out = []
    for item in service.endpoints:
        host, port = parse_address(item.address)
        out.append(
            Endpoint(
                host=host,
                port=port,
                weight=item.weight,
                labels=MappingProxyType(dict(item.labels)),
                region=item.locality.region,
                zone=item.locality.zone,
                priority=item.priority,
            )
        )
    return tuple(out)


def not_enforced(config: MeshConfig) -> tuple[str, ...]:
    """Field paths that are set in the policy but not enforced by this release."""
    found: list[str] = []
    for name, service in config.services.items():
        inbound = service.inbound
        if inbound is not None:
            found += [
                f"services.{name}.inbound.{field}"
                for field in _PENDING_INBOUND
                if getattr(inbound, field) is not None
            ]
    return tuple(found)


def compile_snapshot(
    config: MeshConfig,
    endpoints: Mapping[str, tuple[Endpoint, ...]],
    *,
    version: int,
    source: str,
    loads: LoadTable | None = None,
    discovery: Mapping[str, Any] | None = None,
    rng: random.Random | None = None,
    state: StateTable | None = None,
) -> Snapshot:
    """Build every cluster and route; the result is never mutated.

    ``rng`` staggers round-robin start positions and drives outlier
    enforcement draws; ``state`` keeps breakers, budgets and buckets across
    compiles when their policy is unchanged.
    """
    loads = loads or LoadTable()
    rng = rng or random.Random()
    state = state or StateTable()
    state.begin()
    clusters: dict[str, Cluster] = {}
    guards: dict[str, ServiceGuard | None] = {}

    def guard_of(service_name: str) -> ServiceGuard | None:
        if service_name not in guards:
            addresses = [ep.address for ep in endpoints.get(service_name, ())]
            guards[service_name] = service_guard(
                service_name,
                config.services[service_name],
                config.defaults,
                addresses,
                state,
                rng,
            )
        return guards[service_name]

    def cluster(service_name: str, subset: str | None) -> Cluster:
        key = service_name if subset is None else f"{service_name}/{subset}"
        found = clusters.get(key)
        if found is not None:
            return found
        service = config.services[service_name]
        members = tuple(loads.bind(ep) for ep in endpoints.get(service_name, ()))
        if subset is not None:
            selector = service.subsets[subset].items()
            members = tuple(ep for ep in members if all(ep.labels.get(k) == v for k, v in selector))
        lb = service.load_balancer or config.defaults.load_balancer or LoadBalancerConfig()
        hash_on = None
        if lb.hash_on is not None:
            hash_on = ("header", lb.hash_on.header.lower()) if lb.hash_on.header else None
            if lb.hash_on.cookie:
                hash_on = ("cookie", lb.hash_on.cookie)
        built = Cluster(
            name=key,
            service=service_name,
            subset=subset,
            endpoints=members,
            balancer=make_balancer(
                lb.policy,
                members,
                choice_count=lb.choice_count,
                min_ring_size=lb.min_ring_size,
                start=rng.randrange(1 << 30),
            ),
            lb_policy=lb.policy,
            hash_on=hash_on,
            guard=guard_of(service_name),
        )
        clusters[key] = built
        return built

    services: dict[str, VirtualService] = {}
    inbound: dict[str, InboundPolicy] = {}
    service_policies: dict[str, RoutePolicy | None] = {}
    for name, service in config.services.items():
        cluster(name, None)
        for subset in service.subsets:
            cluster(name, subset)
        route_configs = service.routes or [RouteConfig(name="default")]
        routes = tuple(
            _route(name, index, route, config, service, cluster, state)
            for index, route in enumerate(route_configs)
        )
        services[name] = VirtualService(name, routes, forward_jwt=service.forward_jwt)
        inbound[name] = inbound_policy(name, service, config.defaults, state)
        service_policies[name] = route_policy(
            name, "*", RouteConfig(name="*"), service, config.defaults, state
        )
    base_dir = Path(source).parent if Path(source).is_file() else Path.cwd()
    security = {
        name: inbound_security(name, service, state, base_dir)
        for name, service in config.services.items()
    }
    state.sweep()
    peer_identities = {
        name: (service.tls.identity if service.tls and service.tls.identity else None)
        or f"spiffe://{config.trust_domain}/ns/default/sa/{name}"
        for name, service in config.services.items()
        if service.tls is None or service.tls.mode == "mutual"
    }

    return Snapshot(
        version=version,
        source=source,
        created_at=time.time(),
        services=MappingProxyType(services),
        clusters=MappingProxyType(clusters),
        policy=config.model_dump(mode="json", exclude_defaults=True),
        not_enforced=not_enforced(config),
        discovery=MappingProxyType(dict(discovery or {})),
        inbound=MappingProxyType(inbound),
        service_policies=MappingProxyType(service_policies),
        trust_domain=config.trust_domain,
        peer_identities=MappingProxyType(peer_identities),
        inbound_security=MappingProxyType(security),
    )


def _route(
    owner: str,
    index: int,
    route: RouteConfig,
    config: MeshConfig,
    service: ServiceConfig,
    cluster: Any,
    state: StateTable,
) -> Route:
    def target(dest: Destination) -> Cluster:
        return cluster(dest.service or owner, dest.subset)  # type: ignore[no-any-return]

    members = tuple(target(dest) for dest in route.to if dest.weight > 0)
    weights = tuple(dest.weight for dest in route.to if dest.weight > 0)
    cumulative = tuple(accumulate(weights))
    split = WeightedSplit(members, weights, cumulative, cumulative[-1])
    header_ops = None
    if route.request_headers is not None:
        ops = route.request_headers
        header_ops = HeaderOps(
            set=tuple((k.lower(), v) for k, v in ops.set.items()),
            add=tuple((k.lower(), v) for k, v in ops.add.items()),
            remove=frozenset(name.lower() for name in ops.remove),
        )
    mirror = None
    if route.mirror is not None and route.mirror.percent > 0:
        mirror_dest = Destination(service=route.mirror.service, subset=route.mirror.subset)
        mirror = MirrorAction(target(mirror_dest), route.mirror.percent / 100.0)
    rewrite = route.rewrite
    route_name = route.name or f"route-{index}"
    policy = route_policy(owner, route_name, route, service, config.defaults, state)
    lanes = {}
    for member in members:
        lane = lane_for(policy or NO_POLICY, member.guard)
        if lane is not None:
            lanes[member.name] = lane
    action = RouteAction(
        split=split,
        prefix_rewrite=rewrite.prefix if rewrite else None,
        host_rewrite=rewrite.host if rewrite else None,
        header_ops=header_ops,
        mirror=mirror,
        timeout=first_set(route.timeout, service.timeout, config.defaults.timeout),
        policy=policy,
        lanes=MappingProxyType(lanes),
    )
    match = route.match
    path = None
    match_prefix = None
    if match.path is not None:
        if match.path.exact is not None:
            path = ValueMatcher("exact", match.path.exact)
        elif match.path.prefix is not None:
            path = ValueMatcher("prefix", match.path.prefix)
            match_prefix = match.path.prefix
        else:
            path = _value_matcher(ValueMatch(regex=match.path.regex))
    matcher = RouteMatcher(
        path=path,
        methods=frozenset(match.method) if match.method else None,
        headers=tuple((name, _value_matcher(m)) for name, m in match.headers.items()),
        query=tuple((name, _value_matcher(m)) for name, m in match.query.items()),
    )
    return Route(route_name, index, matcher, action, match_prefix)


def _value_matcher(match: ValueMatch) -> ValueMatcher:
    if match.regex is not None:
        return ValueMatcher("regex", match.regex, re.compile(match.regex), match.invert)
    if match.present is not None:
        kind = "present" if match.present else "absent"
        return ValueMatcher(kind, invert=match.invert)
    if match.absent:
        return ValueMatcher("absent", invert=match.invert)
    for kind in ("exact", "prefix", "suffix"):
        value = getattr(match, kind)
        if value is not None:
            return ValueMatcher(kind, value, invert=match.invert)
    raise AssertionError("validated ValueMatch has one condition")
