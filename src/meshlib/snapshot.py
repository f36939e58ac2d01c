"""The compiled, frozen form of the policy that the request path reads.

A snapshot is built whole by `meshlib.config.compile` and swapped in
atomically; nothing in it changes afterwards except endpoint load counters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshlib.balancing import Balancer
from meshlib.endpoint import Endpoint
from meshlib.resilience.fastlane import Lane
from meshlib.resilience.guard import ServiceGuard
from meshlib.resilience.inbound import InboundPolicy
from meshlib.resilience.policy import RoutePolicy
from meshlib.routing.match import RouteMatcher
from meshlib.security.inbound import InboundSecurity


@dataclass(frozen=True, slots=True)
class Cluster:
    """A service, optionally narrowed to a subset: endpoints plus their balancer."""

    name: str
    service: str
    subset: str | None
    endpoints: tuple[Endpoint, ...]
    balancer: Balancer
    lb_policy: str
    hash_on: tuple[str, str] | None = None
    guard: ServiceGuard | None = None


@dataclass(frozen=True, slots=True)
class WeightedSplit:
    clusters: tuple[Cluster, ...]
    weights: tuple[int, ...]
    cumulative: tuple[int, ...]
    total: int


@dataclass(frozen=True, slots=True)
class MirrorAction:
    cluster: Cluster
    fraction: float  # 0..1


@dataclass(frozen=True, slots=True)
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RouteAction:
    split: WeightedSplit
    prefix_rewrite: str | None = None
    host_rewrite: str | None = None
    header_ops: HeaderOps | None = None
    mirror: MirrorAction | None = None
    timeout: float | None = None
    policy: RoutePolicy | None = None
    lanes: Mapping[str, Lane] = field(default_factory=dict)
    """The resilience fast lane of the calls to each cluster (by name) that can take it."""


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    index: int
    matcher: RouteMatcher
    action: RouteAction
    # the path prefix the route matched on, replaced by prefix_rewrite
    match_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class VirtualService:
    """A logical service name and its ordered routes."""

    name: str
    routes: tuple[Route, ...]
    # forward the JWT of the request being served (from a provider with `forward`)
    forward_jwt: bool = False


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything in force at one version."""

    version: int
    source: str
    created_at: float
    services: Mapping[str, VirtualService]
    clusters: Mapping[str, Cluster]
    policy: Mapping[str, Any]
    not_enforced: tuple[str, ...] = ()
    discovery: Mapping[str, Any] = field(default_factory=dict)
    inbound: Mapping[str, InboundPolicy] = field(default_factory=dict)
    # a service's own policy (its routes aside), used by @mesh.resilient
    service_policies: Mapping[str, RoutePolicy | None] = field(default_factory=dict)
    trust_domain: str = "cluster.local"
    # services called with mutual TLS (when the mesh has an identity): the SPIFFE ID
    # or pattern their servers must present
    peer_identities: Mapping[str, str] = field(default_factory=dict)
    # inbound mTLS mode, JWT providers and RBAC policies per service (mesh.asgi, mesh.serve)
    inbound_security: Mapping[str, InboundSecurity] = field(default_factory=dict)
